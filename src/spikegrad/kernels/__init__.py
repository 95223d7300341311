"""The fused multi-step neuron: the operator ``torch.ops.spikegrad.lif`` (``kernels.lif``),
its plain-torch loops (``kernels.fused``, compiled on CPU) and its Triton kernels
(``kernels.triton_lif``, CUDA; imported only when used)."""
