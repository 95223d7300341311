"""The ``amp: bf16`` and ``compile: true`` switches give the same loss as fp32 eager.

Tolerances:
- compile: inductor fuses and may reorder float32 arithmetic, so membranes move by a
  few ulps; a spike flips only where ``|h - v_th|`` is that small, which the fixed seed
  avoids. The first step's loss must agree within 1e-5 (relative), the updated weights
  within 1e-4. Both run contiguous (``model.channels_last=false``): inductor lays out
  its convolutions itself, and against an eager channels-last model the different
  summation order moves a conv output by an ulp, which BN amplifies to ~1e-4 and which
  flips a spike on this tiny net (the loss then moves by ~0.2%).
- bf16: autocast runs convolutions and linear layers in bfloat16 (8-bit mantissa, a
  relative rounding of 2^-8 = 0.4% per operation) and spikes near threshold flip; on
  this tiny net the loss moves by about 0.5%. The bound is 5%, and training must still
  lower the loss.
"""
import subprocess
import sys

import pytest
import torch

from spikegrad.config import load_config
from spikegrad.train import Trainer

BASE = ["model.width=0.125", "model.T=2", "data.limit_train=64", "data.limit_test=64",
        "epochs=1", "batch_size=16", "neuron.backend=eager", "method=vanilla"]


def _trainer(tmp_path, name, *extra):
    cfg = load_config(None, BASE + [f"out={tmp_path}", f"name={name}", *extra])
    return Trainer(cfg, overwrite=True, progress=False)


def _first_step(trainer):
    x, y = next(iter(trainer.train_loader(0)))
    loss, _ = trainer._train_step(x, y, 0, 4)
    return float(loss), {k: v.detach().clone() for k, v in trainer.net.state_dict().items()}


def test_compiled_step_matches_eager(tmp_path):
    eager_loss, eager_weights = _first_step(_trainer(tmp_path, "eager", "model.channels_last=false"))
    compiled_loss, compiled_weights = _first_step(_trainer(tmp_path, "compiled", "compile=true",
                                                           "model.channels_last=false"))
    assert compiled_loss == pytest.approx(eager_loss, rel=1e-5)
    for key, value in eager_weights.items():
        assert torch.allclose(value, compiled_weights[key], atol=1e-4), key


def test_bf16_loss_close_to_fp32_and_trains(tmp_path):
    fp32_loss, _ = _first_step(_trainer(tmp_path, "fp32"))
    trainer = _trainer(tmp_path, "bf16", "amp=bf16", "optim.name=adam", "optim.lr=0.003")
    bf16_loss, _ = _first_step(trainer)
    assert bf16_loss == pytest.approx(fp32_loss, rel=0.05)
    x, y = next(iter(trainer.train_loader(0)))
    losses = [float(trainer._train_step(x, y, 0, 4)[0]) for _ in range(15)]
    assert losses[-1] < losses[0]


COMPILE_TWO_BATCH_SIZES = """
import torch
from spikegrad.models import create_model
torch.manual_seed(0)
model = create_model("plain-8", 10, T=2, in_channels=1, width=0.125).train()
compiled = torch.compile(model, fullgraph=True)
for batch in (2, 3):
    x = torch.rand(batch, 1, 16, 16)
    expected = model(x)
    out = compiled(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    out.sum().backward()
print("ok")
"""


def test_channels_last_model_compiles_as_one_graph():
    """Under torch.compile the layout rule, the spike marks and the saved-tensor hooks
    step aside without a graph break (``fullgraph=True`` raises on one); the eager model
    runs maps of 16, 8 and 4 pixels a side in both layouts. The second batch size
    recompiles with dynamic shapes, as a smaller last batch does in training. Outputs
    agree with eager within float rounding. In a fresh process: after the trainer's
    compiled runs above, torch 2.13's inductor fails the dynamic recompile of this model
    ("cannot determine truth value of Relational"), with or without this library's
    layout work (checked against the code before it)."""
    done = subprocess.run([sys.executable, "-c", COMPILE_TWO_BATCH_SIZES], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
