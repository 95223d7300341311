"""Data-parallel training with torchrun (2 CPU processes, gloo) equals one process with
the same global batch; a killed distributed run resumes to the same weights.

By design the model has no normalisation (per-rank BatchNorm statistics differ by
design), direct encoding and no MSG.
"""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from spikegrad import checkpoint

RUN = ["model.width=0.125", "model.T=2", "model.norm=none", "data.limit_train=256",
       "data.limit_test=64", "epochs=2", "batch_size=32", "neuron.backend=eager",
       "checkpoint_every=2", "method.per_step=true", "log_every=4"]


def _sets(out, name):
    return [a for s in RUN + [f"out={out}", f"name={name}"] for a in ("--set", s)]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
            "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "spikegrad", "train", *args]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _weights(run):
    return checkpoint.load(run / "checkpoints" / "last.pt")


def _assert_close(a, b):
    assert a["step"] == b["step"]
    for key, value in a["net"].items():
        assert torch.allclose(value, b["net"][key], atol=1e-5, rtol=0), key


def _kill_strays(marker: str) -> None:
    """SIGKILL any worker still running with ``marker`` on its command line (torchrun's
    workers may sit outside the killed process group)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().decode(errors="replace"):
                os.kill(int(cmdline.parent.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    subprocess.run([sys.executable, "-m", "spikegrad", "train", *_sets(out, "one")], check=True,
                   capture_output=True, timeout=600, env=_env())
    return _weights(out / "one")


def test_two_processes_equal_one_with_the_same_global_batch(single, tmp_path):
    proc = subprocess.run(_torchrun(*_sets(tmp_path, "ddp")), capture_output=True, text=True,
                          timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    _assert_close(single, _weights(tmp_path / "ddp"))
    assert proc.stdout.count("run directory:") == 1  # rank 0 alone reports


def test_killed_distributed_run_resumes_to_the_same_weights(single, tmp_path):
    run = tmp_path / "ddp"
    proc = subprocess.Popen(_torchrun(*_sets(tmp_path, "ddp")), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=_env(), start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        try:
            if checkpoint.load(run / "checkpoints" / "last.pt")["step"] >= 6:
                break
        except Exception:  # not written yet
            pass
        time.sleep(0.05)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _kill_strays(str(tmp_path))
    assert 0 < _weights(run)["step"] < 16, "the run was meant to be interrupted"
    resumed = subprocess.run(_torchrun("--resume", str(run)), capture_output=True, text=True,
                             timeout=600, env=_env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_close(single, _weights(run))
