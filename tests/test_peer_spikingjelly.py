"""Parity with SpikingJelly 2.0's multi-step LIFNode on the same input (a test peer).

spikingjelly is installed by the Makefile with --no-deps; under `make test` this runs,
never skips.
"""
import pytest
import torch
from spikingjelly.activation_based import neuron as sj_neuron, surrogate as sj_surrogate

from spikegrad import neuron, surrogate as sg


@pytest.mark.parametrize("backend", ["torch", "eager", "fused"])
@pytest.mark.parametrize("decay_input, v_reset, detach_reset", [
    (True, 0.0, False), (False, 0.0, False), (True, None, False), (False, -0.2, True),
])
def test_lif_matches_spikingjelly(backend, decay_input, v_reset, detach_reset):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 3, 5, 5, generator=gen) * 0.8 + 0.5
    tau, v_th = 2.5, 0.9
    ours_x, peer_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours = neuron.LIF(tau=tau, decay_input=decay_input, v_threshold=v_th, v_reset=v_reset,
                      detach_reset=detach_reset, surrogate=sg.ATan(alpha=2.0), backend=backend)
    peer = sj_neuron.LIFNode(tau=tau, decay_input=decay_input, v_threshold=v_th, v_reset=v_reset,
                             detach_reset=detach_reset, surrogate_function=sj_surrogate.ATan(alpha=2.0),
                             step_mode="m")
    s_ours, s_peer = ours(ours_x), peer(peer_x)
    upstream = torch.randn(s_ours.shape, generator=gen)
    (s_ours * upstream).sum().backward()
    (s_peer * upstream).sum().backward()
    assert torch.equal(s_ours, s_peer)
    assert torch.allclose(ours_x.grad, peer_x.grad, atol=1e-5, rtol=1e-5)
