"""``python -m spikegrad`` (and so ``torchrun -m spikegrad``) runs the command line."""
from .cli import main

if __name__ == "__main__":
    main()
