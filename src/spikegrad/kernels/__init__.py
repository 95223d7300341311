"""Fused multi-step neuron kernels (see ``kernels.fused``)."""
