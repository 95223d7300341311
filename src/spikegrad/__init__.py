"""spikegrad: train deep spiking neural networks with surrogate gradients and shortcuts.

Spiking tensors are ``[T, B, ...]`` (time first). Main entry points:
``spikegrad.neuron`` (LIF, IF, PLIF), ``spikegrad.surrogate`` (create),
``spikegrad.models.create_model``, ``spikegrad.shortcut.ShortcutNet``.
"""
__version__ = "0.1.0"
