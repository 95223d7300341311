"""Runs survive faults: SIGKILL anywhere, resume, and the weights are bit-identical to an
uninterrupted run; a non-finite loss stops (or skips) without damaging best.pt."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spikegrad import checkpoint
from spikegrad.config import load_config
from spikegrad.train import Trainer, TrainingError

# Every source of state a resume must restore: per-step evolutionary λ, MSG masks,
# augmentation, TWO's decoding weights, SGD momentum.
RUN = ["model.width=0.125", "model.T=2", "data.limit_train=384", "data.limit_test=100",
       "epochs=2", "batch_size=32", "neuron.backend=eager", "checkpoint_every=2",
       "method.per_step=true", "surrogate=msg", "data.augment=true",
       "loss=two", "loss.warmup=1", "log_every=1"]


def _cmd(out: Path, name: str, resume: bool = False) -> list[str]:
    base = [sys.executable, "-m", "spikegrad", "train"]
    if resume:
        return base + ["--resume", str(out / name)]
    return base + [a for s in RUN + [f"out={out}", f"name={name}"] for a in ("--set", s)]


def _last_step(run: Path) -> int:
    try:
        return int(checkpoint.load(run / "checkpoints" / "last.pt")["step"])
    except Exception:  # not written yet
        return -1


def _kill_after(cmd: list[str], run: Path, step: int) -> None:
    """Start ``cmd`` and SIGKILL it once last.pt has reached ``step``."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while _last_step(run) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _epoch_lines(run: Path) -> list[dict]:
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    drop = {"time", "samples_per_s", "epoch_time"}
    return [{k: v for k, v in m.items() if k not in drop} for m in lines if m["kind"] == "epoch"]


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    subprocess.run(_cmd(tmp_path, "straight"), check=True, capture_output=True, timeout=600)
    run = tmp_path / "killed"
    _kill_after(_cmd(tmp_path, "killed"), run, 4)              # mid-epoch 1
    _kill_after(_cmd(tmp_path, "killed", resume=True), run, 14)  # resumed mid-epoch 1, killed mid-epoch 2
    assert 0 < _last_step(run) < 24, "the run was meant to be interrupted"
    subprocess.run(_cmd(tmp_path, "killed", resume=True), check=True, capture_output=True, timeout=600)
    a = checkpoint.load(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = checkpoint.load(run / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 24
    for key, value in a["net"].items():
        assert torch.equal(value, b["net"][key]), key
    assert torch.equal(a["callbacks"]["objective"]["weights"], b["callbacks"]["objective"]["weights"])
    assert _epoch_lines(tmp_path / "straight") == _epoch_lines(run)


def _trainer(tmp_path, *extra):
    cfg = load_config(None, ["model.width=0.125", "model.T=2", "data.limit_train=128",
                             "data.limit_test=64", "epochs=2", "batch_size=32", "neuron.backend=eager",
                             f"out={tmp_path}", "name=nan", *extra])
    return Trainer(cfg, overwrite=True, progress=False)


def _poison_at(trainer, bad_step):
    original = trainer.method.loss

    def loss(output, target):
        value, logits = original(output, target)
        return (value * float("nan"), logits) if trainer.step == bad_step else (value, logits)

    trainer.method.loss = loss


def test_nan_loss_stops_naming_step_and_keeps_best(tmp_path):
    trainer = _trainer(tmp_path)
    _poison_at(trainer, 6)  # in the second epoch (4 steps per epoch)
    best = tmp_path / "nan" / "checkpoints" / "best.pt"
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 2, step 7; last good checkpoint: .*last\.pt"):
        trainer.fit()
    saved = checkpoint.load(best)
    assert saved["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in saved["net"].values() if v.is_floating_point())


def test_nan_loss_skipped_when_configured(tmp_path):
    trainer = _trainer(tmp_path, "nan_policy=skip")
    _poison_at(trainer, 2)
    summary = trainer.fit()
    lines = (tmp_path / "nan" / "metrics.jsonl").read_text()
    assert "skipped" in lines and summary["epochs"] == 2
    state = checkpoint.load(tmp_path / "nan" / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["net"].values() if v.is_floating_point())


def test_interrupted_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    checkpoint.save({"kind": "run", "value": torch.ones(3)}, path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        checkpoint.save({"kind": "run", "value": torch.zeros(3)}, path)
    assert torch.equal(checkpoint.load(path)["value"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind
