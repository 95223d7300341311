"""How long a training run waits for its first step, and what the kernel warm-up costs.

Trains ``configs/default.yaml`` with the given overrides for one epoch and prints one
JSON line: the first step's seconds, the median step before the switch to compiled
kernels (``eager_steps``), the switch step, the median step after, and the total.
Empty ``TORCHINDUCTOR_CACHE_DIR`` for a cold cache. The README's table came from:

    D="data.limit_train=10240 data.limit_test=1000"
    R="model.name=resnet18 model.width=1 model.T=4 batch_size=32 data.limit_train=256 data.limit_test=64 eager_steps=3"
    TORCHINDUCTOR_CACHE_DIR=/tmp/cold-dn .venv/bin/python benchmarks/first_step.py dn-auto $D
    TORCHINDUCTOR_CACHE_DIR=/tmp/cold-dn .venv/bin/python benchmarks/first_step.py dn-eager neuron.backend=eager $D
    TORCHINDUCTOR_CACHE_DIR=/tmp/cold-old .venv/bin/python benchmarks/first_step.py dn-old eager_steps=0 $D
    TORCHINDUCTOR_CACHE_DIR=/tmp/cold-r18 .venv/bin/python benchmarks/first_step.py r18-auto $R
    (and the same with neuron.backend=eager and eager_steps=0 for ResNet-18)
"""
from __future__ import annotations

import json
import statistics
import sys
import time

from spikegrad.config import load_config
from spikegrad.train import Trainer


def main(label: str, overrides: list[str]) -> None:
    start = time.perf_counter()
    cfg = load_config("configs/default.yaml", ["out=runs/first-step", f"name={label}", "epochs=1", *overrides])
    trainer = Trainer(cfg, overwrite=True, progress=False)
    times: list[float] = []
    step = trainer._train_step

    def timed(*args):
        begun = time.perf_counter()
        out = step(*args)
        times.append(time.perf_counter() - begun)
        return out
    trainer._train_step = timed
    trainer.fit()
    switch = cfg.eager_steps
    before, after = times[1:switch], times[switch + 1:]
    print(json.dumps({
        "label": label, "first_step": round(times[0], 2),
        "step_before_switch": round(statistics.median(before), 3) if before else None,
        "switch_step": round(times[switch], 2) if switch < len(times) else None,
        "step_after_switch": round(statistics.median(after), 3) if after else None,
        "steps": len(times), "total_s": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
