"""Hostile and careless input (issue 22): nothing escapes ``out``, nothing is lost, every bad
input a user can type or a file can hold ends in one line. Each test names the promise of
docs/reliability.md it checks."""
import errno
import fcntl
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from spikegrad import checkpoint
from spikegrad.cli import main
from spikegrad.config import Config, ConfigError, load_config
from spikegrad.train import Trainer, TrainingError

TINY = ["model.width=0.125", "model.T=2", "data.limit_train=128", "data.limit_test=64",
        "epochs=1", "batch_size=32", "neuron.backend=eager", "log_every=1"]
FMNIST = next(p for p in (Path("/usr/share/datasets/fashion-mnist"),
                          Path(".data/usr/share/datasets/fashion-mnist").absolute()) if p.is_dir())


def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def _fails(args, capsys, code=2):
    """Run the CLI in-process; return its one stderr line (asserting exit ``code``)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert exc.value.code == code, err
    lines = [line for line in err.splitlines() if line.strip()
             and not line.startswith("spikegrad: run directory ")]  # a run that started says where
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """A finished one-epoch run."""
    root = tmp_path_factory.mktemp("hostile")
    main(["train", *_sets(TINY + [f"out={root / 'runs'}", "name=done"])])
    return root / "runs" / "done"


@pytest.fixture
def run(done, tmp_path):
    """A private copy of the finished run."""
    copy = tmp_path / "runs" / "done"
    shutil.copytree(done, copy)
    return copy


# ---------------------------------------------------------------- 1. security: confined to out
@pytest.mark.parametrize("name", ["..", "../../x", "ABSOLUTE", "a/b", ".", ""])
def test_run_name_cannot_leave_out(name, tmp_path, capsys):
    absolute = tmp_path / "abs-run"  # an absolute name outside out
    name = str(absolute) if name == "ABSOLUTE" else name
    victim = tmp_path / "A" / "b"
    (victim / "out").mkdir(parents=True)
    (victim / "report.md").write_text("keep me\n")
    (victim / "metrics.jsonl").write_text("{}\n")
    before = _snapshot(tmp_path)
    line = _fails(["train", "--overwrite", *_sets(TINY + [f"out={victim / 'out'}", f"name={name}"])], capsys)
    assert "config key 'name' must be" in line
    assert _snapshot(tmp_path) == before
    assert not absolute.exists()


def test_symlinked_run_directory_is_refused(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "report.md").write_text("keep me\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(outside)
    line = _fails(["train", "--overwrite", *_sets(TINY + [f"out={tmp_path / 'out'}", "name=link"])], capsys)
    assert "symbolic link" in line
    assert sorted(p.name for p in outside.iterdir()) == ["report.md"]


# ---------------------------------------------- 2. everything validated before anything written
def test_overwrite_with_a_mistyped_teacher_deletes_nothing(run, capsys):
    before = _snapshot(run.parent)
    line = _fails(["train", "--overwrite", *_sets(TINY + [f"out={run.parent}", "name=done", "method=ltl",
                                                           f"teacher={run}/checkpoints/bets.pt"])], capsys)
    assert "bets.pt" in line
    assert _snapshot(run.parent) == before


def _idx(path: Path, array: np.ndarray, code: int) -> None:
    header = struct.pack(">BBBB", 0, 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(header + data, compresslevel=1))


def _fmnist_copy(tmp_path: Path, labels=None, code=0x08, images=None) -> Path:
    """The real Fashion-MNIST training files and a tiny test split made of ``images``/``labels``."""
    root = tmp_path / "fm"
    root.mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (root / name).symlink_to(FMNIST / name)
    images = np.zeros((4, 28, 28), np.uint8) if images is None else images
    _idx(root / "t10k-images-idx3-ubyte.gz", images, 0x08)
    labels = np.array([0, 1, 2, 3], np.uint8) if labels is None else labels
    _idx(root / "t10k-labels-idx1-ubyte.gz", labels, code)
    return root


@pytest.mark.parametrize("labels, code, message", [
    (np.array([0, 1, -1, 3], np.int8), 0x09, "label -1 out of range 0..9"),
    (np.array([0, 1, 2, 10], np.uint8), 0x08, "label 10 out of range 0..9"),
    (np.array([0, 1.5, 2, np.inf]), 0x0E, "labels must be integers"),
])
def test_bad_test_labels_refused_before_the_run_directory_exists(labels, code, message, tmp_path, capsys):
    root = _fmnist_copy(tmp_path, labels, code)
    line = _fails(["train", *_sets(TINY + ["data.limit_test=null", f"data.root={root}",
                                           f"out={tmp_path / 'runs'}", "name=x"])], capsys)
    assert message in line and "t10k-labels" in line
    assert not (tmp_path / "runs").exists()


def test_empty_test_split_is_one_line(tmp_path, capsys):
    root = _fmnist_copy(tmp_path, np.zeros(0, np.uint8), images=np.zeros((0, 28, 28), np.uint8))
    line = _fails(["train", *_sets(TINY + [f"data.root={root}", f"out={tmp_path / 'runs'}"])], capsys)
    assert "holds no images" in line
    assert not (tmp_path / "runs").exists()


def test_batch_larger_than_the_training_set_is_an_error(tmp_path, capsys):
    line = _fails(["train", *_sets(TINY + ["data.limit_train=16", f"out={tmp_path}", "name=x"])], capsys)
    assert "'batch_size' (32) is larger than the training set (16 items)" in line
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------- 3. resume cannot brick
@pytest.mark.parametrize("override", ["model.width=0.25", "model.T=4", "seed=1", "data.limit_train=64",
                                      "optim.name=adam", "method=vanilla", "data.name=mnist"])
def test_resume_refuses_meaning_changes_and_keeps_config(override, run, capsys):
    before = _snapshot(run)
    line = _fails(["train", "--resume", run, "--set", override, "--set", "epochs=2"], capsys)
    assert f"cannot resume {str(run)!r} with {override.split('=')[0].replace('method', 'method.name')}" in line
    assert "--allow-change" in line
    assert _snapshot(run) == before


def test_resume_with_truncated_last_pt_keeps_config(run, capsys):
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[:1000])
    config = (run / "config.yaml").read_bytes()
    line = _fails(["train", "--resume", run, "--set", "epochs=3"], capsys)
    assert "last.pt" in line and "truncated or corrupted" in line
    assert (run / "config.yaml").read_bytes() == config


def test_allowed_change_past_the_epoch_end_is_refused(run, capsys):
    """--allow-change with a smaller training set: the checkpoint's batch must still exist."""
    last = run / "checkpoints" / "last.pt"
    state = checkpoint.load(last)
    state.update(epoch=0, batch=3)
    checkpoint.save(state, last)
    before = _snapshot(run)
    line = _fails(["train", "--resume", run, "--allow-change", "--set", "data.limit_train=64"], capsys)
    assert "at batch 3 of epoch 1" in line and "2 batches per epoch" in line
    assert _snapshot(run) == before


def test_allowed_change_is_recorded_in_metrics(run, capsys):
    main(["train", "--resume", str(run), "--set", "epochs=2"])
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    resumes = [m for m in lines if m["kind"] == "resume"]
    assert resumes and resumes[0]["changes"] == {"epochs": [1, 2]}
    assert [m["epoch"] for m in lines if m["kind"] == "epoch"] == [1, 2]
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 2
    main(["train", "--resume", str(run)])  # the checkpoint now carries the change: resumes cleanly


def test_run_killed_in_its_first_epoch_resumes(tmp_path, capsys):
    cfg = load_config(None, TINY + [f"out={tmp_path}", "name=early"])
    trainer = Trainer(cfg, progress=False)   # as if killed before its first step
    trainer.close()
    del trainer
    state = checkpoint.load(tmp_path / "early" / "checkpoints" / "last.pt", kind="run")
    assert state["step"] == 0 and state["epoch"] == 0
    stale = tmp_path / "early" / "checkpoints" / ".last.pt.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    main(["train", "--resume", str(tmp_path / "early")])
    assert checkpoint.load(tmp_path / "early" / "checkpoints" / "last.pt")["epoch"] == 1
    assert not stale.exists()   # stale temp files go at the next start


def test_resume_without_checkpoint_says_why(tmp_path, capsys):
    (tmp_path / "r" / "checkpoints").mkdir(parents=True)
    (tmp_path / "r" / "config.yaml").write_text("epochs: 1\n")
    line = _fails(["train", "--resume", tmp_path / "r"], capsys)
    assert "stopped before its first checkpoint" in line and "--overwrite" in line


# ---------------------------------------------------------------------------------- 4. files
def test_export_refuses_to_overwrite(run, tmp_path, capsys):
    target = tmp_path / "mine.pt"
    target.write_bytes(b"precious")
    line = _fails(["export", run / "checkpoints" / "best.pt", target], capsys)
    assert "exists; pass --force" in line and target.read_bytes() == b"precious"
    last = run / "checkpoints" / "last.pt"
    before = last.read_bytes()
    line = _fails(["export", run / "checkpoints" / "best.pt", last], capsys)
    assert last.read_bytes() == before
    line = _fails(["export", last, last, "--force"], capsys)
    assert "is the checkpoint being exported" in line and last.read_bytes() == before
    main(["export", str(run / "checkpoints" / "best.pt"), str(target), "--force"])
    assert checkpoint.load(target, kind="model")


def test_export_onto_a_directory_is_one_line(run, tmp_path, capsys):
    (tmp_path / "d.pt").mkdir()
    line = _fails(["export", run / "checkpoints" / "best.pt", tmp_path / "d.pt", "--force"], capsys)
    assert "d.pt" in line and "directory" in line


def test_flipped_bytes_inside_a_tensor_are_refused(run, tmp_path, capsys):
    path = run / "checkpoints" / "model.pt"
    state = checkpoint.load(path)
    tensor = max(state["state_dict"].values(), key=lambda t: t.numel())
    raw = path.read_bytes()
    at = raw.index(tensor.numpy().tobytes()[:256])
    flipped = raw[:at + 64] + bytes(b ^ 0xFF for b in raw[at + 64:at + 128]) + raw[at + 128:]
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(flipped)
    line = _fails(["eval", bad, "--limit", "64"], capsys)
    assert str(bad) in line and "checksum" in line


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_disk_full_or_read_only_is_one_line(code, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(torch, "save", refuse)
    line = _fails(["train", *_sets(TINY + [f"out={tmp_path}", "name=x"])], capsys)
    assert os.strerror(code) in line and "last.pt" in line
    assert not list((tmp_path / "x" / "checkpoints").glob(".*.tmp"))


def test_best_is_written_before_last_records_it(tmp_path, monkeypatch):
    written = []
    original = checkpoint.save

    def spy(obj, path):
        written.append((Path(path).name, obj.get("best_acc")))
        return original(obj, path)

    monkeypatch.setattr(checkpoint, "save", spy)
    trainer = Trainer(load_config(None, TINY + ["epochs=2", f"out={tmp_path}", "name=b"]), progress=False)
    trainer.fit()
    names = [name for name, _ in written]
    for i, (name, best) in enumerate(written):
        if name == "last.pt" and best is not None and best >= 0:
            assert "best.pt" in names[:i], names


# ------------------------------------------------------------------------ 5. non-finite weights
def test_non_finite_weights_end_the_run(tmp_path, capsys, monkeypatch):
    import spikegrad.train as train

    make = train.make_optimizer

    def poisoned(cfg, params):
        opt = make(cfg, params)
        step = opt.step

        def step_then_poison(*a, **k):
            out = step(*a, **k)
            with torch.no_grad():
                params[0].fill_(float("inf"))  # a diverged update; this step's loss was finite
            return out

        opt.step = step_then_poison
        return opt

    monkeypatch.setattr(train, "make_optimizer", poisoned)
    line = _fails(["train", *_sets(TINY + [f"out={tmp_path}", "name=inf"])], capsys, code=1)
    assert "weights became non-finite" in line and "optim.lr" in line
    ckpt = tmp_path / "inf" / "checkpoints"
    assert not (ckpt / "best.pt").exists() and not (ckpt / "model.pt").exists()
    assert not (tmp_path / "inf" / "report.md").exists()
    state = checkpoint.load(ckpt / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["net"].values() if v.is_floating_point())


@pytest.mark.parametrize("override", ["optim.lr=.inf", "model.width=.inf", "optim.lr=.nan", "model.T=1e30"])
def test_non_finite_or_huge_config_numbers_are_refused(override, tmp_path, capsys):
    line = _fails(["train", *_sets(TINY + [override, f"out={tmp_path}"])], capsys)
    assert override.split("=")[0] in line
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ 6. resource bombs
def test_yaml_alias_bomb_is_refused_quickly(tmp_path, capsys):
    bomb = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        bomb.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    (tmp_path / "bomb.yaml").write_text("\n".join(bomb) + "\n")
    start = time.perf_counter()
    line = _fails(["train", "--config", tmp_path / "bomb.yaml"], capsys)
    assert time.perf_counter() - start < 10 and "expands to more than" in line


@pytest.mark.parametrize("text, message", [
    ("epochs: 1\nepochs: 5\n", "key 'epochs' appears twice"),
    ("model: {T: 2, T: 4}\n", "key 'T' appears twice"),
    ("a: &a [*a]\n", "refers to itself"),
    ("x: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
])
def test_yaml_traps_are_one_line(text, message, tmp_path, capsys):
    (tmp_path / "c.yaml").write_text(text)
    line = _fails(["train", "--config", tmp_path / "c.yaml", "--set", f"out={tmp_path}/runs"], capsys)
    assert message in line
    assert not (tmp_path / "runs").exists()


def test_yaml_merge_keys_still_work(tmp_path):
    (tmp_path / "m.yaml").write_text("model: {<<: {T: 2, width: 0.5}, T: 3}\n")
    cfg = load_config(tmp_path / "m.yaml")
    assert cfg.model.T == 3 and cfg.model.width == 0.5


def test_archive_member_claiming_a_huge_size_is_refused_quickly(tmp_path, capsys):
    root = tmp_path / "cifar"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/batches.meta")
        info.size = 300 << 20  # zeros: a few hundred KB compressed

        class Zeros(io.RawIOBase):
            left = info.size

            def readable(self):
                return True

            def readinto(self, buffer):
                n = min(len(buffer), self.left)
                buffer[:n] = bytes(n)
                self.left -= n
                return n

        tar.addfile(info, io.BufferedReader(Zeros(), 1 << 20))
    start = time.perf_counter()
    line = _fails(["train", *_sets(TINY + ["data.name=cifar10", f"data.root={root}", f"out={tmp_path}/r"])],
                  capsys)
    assert time.perf_counter() - start < 10 and "claims" in line and "refused" in line


def test_gzip_bomb_bounded(tmp_path, monkeypatch):
    from spikegrad.data import DatasetError, idx

    monkeypatch.setattr(idx, "MAX_BYTES", 6 << 20)  # t10k images: 4.4 MB gzipped, 7.8 MB inflated
    with pytest.raises(DatasetError, match="decompresses to more than 6 MiB"):
        idx.read_maybe_gzipped(FMNIST / "t10k-images-idx3-ubyte.gz")


# ------------------------------------------------------------- 7. one line for every bad input
def _model_file(run: Path, tmp_path: Path, edit) -> Path:
    state = checkpoint.load(run / "checkpoints" / "model.pt")
    edit(state)
    path = tmp_path / "edited.pt"
    checkpoint.save(state, path)
    return path


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(model_kwargs=[1, 2]), "'model_kwargs' must be a dict"),
    (lambda s: s.update(model_name=7), "'model_name' must be a string"),
    (lambda s: s.pop("decoder"), "lacks its 'decoder' entry"),
    (lambda s: s.update(model_kwargs={**s["model_kwargs"], "width": "wide"}), "does not match its model"),
])
def test_malformed_model_file_schema(edit, message, run, tmp_path, capsys):
    line = _fails(["eval", _model_file(run, tmp_path, edit), "--limit", "64"], capsys)
    assert message in line and "edited.pt" in line


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("sums"), "earlier spikegrad"),
    (lambda s: s.update(rng={"torch": 1}), "'rng' must be"),
    (lambda s: s.update(rng={**s["rng"], "python": [3, [1, 2], None]}), "cannot be resumed"),
    (lambda s: s.update(epoch="one"), "'epoch' must be an integer"),
    (lambda s: s.update(optimizer={"state": {}, "param_groups": [{"params": "x"}]}), "cannot be resumed"),
])
def test_malformed_run_checkpoint_schema(edit, message, run, capsys):
    last = run / "checkpoints" / "last.pt"
    state = checkpoint.load(last)
    edit(state)
    checkpoint.save(state, last)
    config = (run / "config.yaml").read_bytes()
    line = _fails(["train", "--resume", run, "--set", "epochs=2"], capsys)
    assert message in line and "last.pt" in line
    assert (run / "config.yaml").read_bytes() == config


def test_cifar_meta_of_the_wrong_type(tmp_path, capsys):
    folder = tmp_path / "c" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": 5}, protocol=2))
    batch = {b"data": np.zeros((10, 3072), np.uint8), b"labels": list(range(10))}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    line = _fails(["train", *_sets(TINY + ["data.name=cifar10", "data.limit_train=null", "batch_size=10",
                                           f"data.root={tmp_path / 'c'}", f"out={tmp_path}/r"])], capsys)
    assert "label_names" in line and "list of 10 class names" in line


def test_allocation_failure_is_one_line_but_bugs_keep_their_traceback(tmp_path, capsys, monkeypatch):
    import spikegrad.train as train

    def alloc(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(train.Trainer, "fit", alloc)
    line = _fails(["train", *_sets(TINY + [f"out={tmp_path}", "name=a"])], capsys)
    assert "out of memory" in line and "batch_size" in line

    def bug(*a, **k):
        raise RuntimeError("a bug in spikegrad")

    monkeypatch.setattr(train.Trainer, "fit", bug)
    with pytest.raises(RuntimeError, match="a bug in spikegrad"):
        main(["train", *_sets(TINY + [f"out={tmp_path}", "name=b"])])


def test_nir_with_a_link_cycle_is_one_line(tmp_path, capsys):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "cycle.nir"
    with h5py.File(path, "w") as f:
        node = f.create_group("node")
        node["self"] = h5py.SoftLink("/node")
        f.attrs["version"] = "1.0"
    line = _fails(["eval", path], capsys)
    assert "cycle.nir" in line


class _SigintState(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        import signal

        return torch.tensor([float(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)]), 0


def test_dataloader_workers_ignore_ctrl_c():
    """Ctrl-C goes to the main process alone (one line), not to every worker (a traceback each)."""
    from spikegrad.data import make_loader

    batches = list(make_loader(_SigintState(), 2, shuffle=False, num_workers=2))
    assert all(bool(x.all()) for x, _ in batches)


def test_ctrl_c_with_workers_prints_one_line(tmp_path):
    script = tmp_path / "interrupt.py"
    script.write_text(
        "import os, signal, threading, time, torch, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # as from a shell: xdist workers ignore it\n"
        "from spikegrad.cli import main\n"
        "import spikegrad.cli as cli\n"
        "from spikegrad.data import make_loader\n"
        "class Slow(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 400\n"
        "    def __getitem__(self, i): time.sleep(0.05); return torch.zeros(1), 0\n"
        "def work(args):\n"
        "    threading.Timer(1.5, lambda: os.killpg(os.getpgrp(), signal.SIGINT)).start()\n"
        "    for _ in make_loader(Slow(), 4, shuffle=False, num_workers=2): pass\n"
        "    time.sleep(30)\n"
        "cli._cmd_list = work\n"
        "main(['list', 'models'])\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          start_new_session=True)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == "spikegrad: interrupted", proc.stderr


# ------------------------------------------------------------------------------- 8. lock file
def test_second_process_cannot_train_the_same_run(run, capsys):
    holder = subprocess.Popen([sys.executable, "-c",
                               "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
                               "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('held', flush=True);"
                               "time.sleep(60)", str(run / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(run)
        line = _fails(["train", "--resume", run, "--set", "epochs=2"], capsys)
        assert "in use by another spikegrad process (pid 4242" in line
        assert _snapshot(run) == before
    finally:
        holder.kill()
        holder.wait()
