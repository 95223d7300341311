"""The trainer: one loop, methods and schedules plugged in as small objects.

    trainer = Trainer(load_config("configs/default.yaml"), overwrite=True)
    summary = trainer.fit()          # writes runs/<name>/...

Run directory (docs/architecture.md, "The run directory"): ``config.yaml``, ``metrics.jsonl``, ``checkpoints/last.pt``
and ``best.pt`` (atomic), ``plots/*.png``, ``report.md``.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from tqdm import tqdm

from . import __version__, callbacks, checkpoint, distributed, layers, losses, methods, monitor, neuron, tracking
from .checkpoint import model_file
from .config import Config, ConfigError, check_run_name, from_dict, safe_yaml, to_dict
from .data import DatasetError, FileDataset, create_dataset, make_loader
from .kernels import warmup
from .kernels.lif import AUTO
from .models import create_model

__all__ = ["Trainer", "TrainingError", "build_model", "model_kwargs", "evaluate", "resolve_device",
           "run_directory", "config_changes", "RESUME_ALLOWED"]

# keys a resume may change without --allow-change: where and how the run executes, how long
# it trains (the end of the learning-rate schedule), what it says about the paper; every
# other key changes what the run computes
RESUME_ALLOWED = ("epochs", "device", "data.root", "data.num_workers", "log_every", "checkpoint_every",
                  "progress_every", "eval_batch_size", "nan_policy", "compile", "eager_steps", "neuron.backend",
                  "model.spike_conv", "expected_accuracy", "expected_source")
# run directories this process holds the lock of: resolved path -> (descriptor, id of the Trainer)
_HELD: dict[str, tuple[int, int]] = {}
# files of a run directory the trainer writes (a symbolic link among them is refused)
_RUN_FILES = ("config.yaml", "metrics.jsonl", "report.md", "checkpoints", "plots", "checkpoints/last.pt",
              "checkpoints/best.pt", "checkpoints/model.pt", ".lock")


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message says where and why."""


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device' is 'cuda' but no CUDA GPU is visible; use auto or cpu")
    return torch.device(name)


def dataset_info(dataset: Any) -> dict:
    """``in_channels``, ``size`` (H) and ``num_classes`` of a dataset (from its first item)."""
    x, _ = dataset.item(0, augment=False)
    return {"in_channels": int(x.shape[-3]), "size": int(x.shape[-1]),
            "num_classes": int(dataset.num_classes), "events": x.dim() == 4}


def model_kwargs(cfg: Config, info: dict) -> dict:
    """The ``create_model`` keyword arguments of a run (everything but the name), as its
    method trains it (``Method.model_kwargs``: the ANN twin for ``ann``)."""
    neuron = dict(vars(cfg.neuron))
    if neuron["type"] == "plif":
        neuron["init_tau"] = neuron.pop("tau")
    kwargs = {"num_classes": info["num_classes"], "T": cfg.model.T,
              "in_channels": info["in_channels"], "encoding": cfg.model.encoding,
              "neuron": neuron, "surrogate": dict(cfg.surrogate), "norm": cfg.model.norm,
              "width": cfg.model.width, "channels_last": cfg.model.channels_last,
              "spike_conv": cfg.model.spike_conv}
    if cfg.model.name.startswith("resnet"):
        stem = cfg.model.stem
        kwargs["stem"] = ("imagenet" if info["size"] >= 64 else "cifar") if stem == "auto" else stem
        kwargs["sew"] = cfg.model.sew
    return methods.METHODS.get(cfg.method.name).model_kwargs(kwargs)


def build_model(cfg: Config, info: dict) -> nn.Module:
    """The registry model a config describes."""
    return create_model(cfg.model.name, **model_kwargs(cfg, info))


def last_checkpoint(run_dir: str | Path) -> Path:
    """``run_dir/checkpoints/last.pt``, or ConfigError when there is none to resume from."""
    run_dir = Path(run_dir)
    last = run_dir / "checkpoints" / "last.pt"
    if not last.is_file():
        if not run_dir.is_dir():
            raise ConfigError(f"cannot resume: run directory {str(run_dir)!r} does not exist")
        if not (run_dir / "config.yaml").is_file():
            raise ConfigError(f"cannot resume: {str(run_dir)!r} is not a run directory "
                              "(no config.yaml, no checkpoints/last.pt)")
        raise ConfigError(f"cannot resume: {str(last)!r} does not exist (the run stopped before its "
                          "first checkpoint); start it again with --overwrite")
    return last


def run_directory(cfg: Config) -> Path:
    """``<out>/<name>``, confined to ``out``: ``name`` is one plain folder name and the run
    directory (and the files the trainer writes in it) are no symbolic links, so nothing is
    ever written or deleted outside ``out``. ConfigError otherwise."""
    check_run_name(cfg.name)
    run = Path(cfg.out).expanduser() / cfg.name
    for entry in ("", *_RUN_FILES):
        path = run / entry if entry else run
        if path.is_symlink():
            raise ConfigError(f"{str(path)!r} is a symbolic link; a run directory and its files must "
                              "be real files inside 'out' (refusing to write through it)")
    if run.exists() and run.resolve().parent != Path(cfg.out).expanduser().resolve():
        raise ConfigError(f"run directory {str(run)!r} resolves outside 'out' ({cfg.out!r})")
    return run


def _flat(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "surrogate":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """``{key: (checkpoint's value, cfg's value)}`` for every key ``cfg`` changes against a
    checkpoint's stored config (``out`` and ``name``, where the run lives, excluded)."""
    old, new = _flat(to_dict(from_dict(saved))), _flat(to_dict(cfg))
    return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
            if k not in ("out", "name") and old.get(k) != new.get(k)}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every global RNG state as tensors and plain lists (``weights_only`` loadable)."""
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": [version, list(state), gauss],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)),
                      int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state()``."""
    torch.set_rng_state(state["torch"])
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine annealing from ``base`` to 0 over ``total`` steps."""
    return base * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def make_optimizer(cfg: Config, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay), Adam or AdamW from ``cfg.optim``."""
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    cls = torch.optim.Adam if o.name == "adam" else torch.optim.AdamW
    return cls(params, lr=o.lr, weight_decay=o.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Any, objective: losses.RateCE, device: torch.device,
             rates: monitor.FiringRates | None = None) -> dict:
    """Top-1 accuracy (%) and mean loss of ``model`` (eval mode) over ``loader``."""
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss_sum += float(objective.loss(logits, y)) * y.numel()
        correct += int((objective.decode(logits).argmax(-1) == y).sum())
        total += y.numel()
    return {"acc": 100.0 * correct / max(total, 1), "loss": loss_sum / max(total, 1)}


class Trainer:
    """Trains the run ``cfg`` describes into ``<cfg.out>/<cfg.name>/``.

    A run directory that exists is refused unless ``resume`` (continue from
    ``checkpoints/last.pt``) or ``overwrite`` (start afresh).
    """

    def __init__(self, cfg: Config, *, resume: bool = False, overwrite: bool = False,
                 progress: bool | None = None, allow_change: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = run_directory(cfg)
        self.progress = progress
        self._lock_fd: int | None = None
        self.changes: dict[str, tuple[Any, Any]] = {}
        self.world, self.device = distributed.init(resolve_device(cfg.device))
        self.is_main, self.world_size = self.world.is_main, self.world.size
        if cfg.batch_size % self.world_size:
            raise ConfigError(f"config key 'batch_size' ({cfg.batch_size}) must be divisible by the "
                              f"number of processes ({self.world_size}); it is the global batch")
        if self.run_dir.exists() and not (resume or overwrite):
            raise ConfigError(f"run directory {str(self.run_dir)!r} exists; pass --resume to "
                              "continue it or --overwrite to start it afresh")
        state = None
        if resume:  # read and checked before anything is built or written
            last = last_checkpoint(self.run_dir)
            state = checkpoint.load(last, kind="run")
            self.changes = self._check_changes(state, last, allow_change)
        seed_everything(cfg.seed)
        # everything is validated before the run directory is touched: data (both splits),
        # model, method (an LTL teacher file), optimiser, callbacks, the checkpoint to resume
        self._build_data()
        self.objective = losses.from_config(cfg.loss, cfg.model.T)
        self.model = build_model(cfg, self.info).to(self.device)
        self.method = methods.create(cfg.method, self.objective)
        self.net = self.method.wrap(self.model).to(self.device)
        if not resume:
            self._check_teacher()
        self.optimizer = make_optimizer(cfg, [p for p in self.net.parameters() if p.requires_grad])
        self.callbacks = callbacks.create_all(self)
        if cfg.tensorboard and self.is_main:
            tracking.require_tensorboard()
        self.tensorboard: tracking.TensorBoard | None = None
        self.epoch, self.batch, self.step = 0, 0, 0
        self.warmup: warmup.Warmup | None = None
        self.best_acc, self.history, self.sums = -1.0, [], {}
        if state is not None:
            self._load(state, last)  # into memory only; the files are rewritten below
            self._check_position()
        self._prepare_run_dir(resume, overwrite, None if state is None else state["metrics_bytes"])
        if not resume:  # a run killed in its first epoch resumes from its start
            self._save("last.pt")
        elif self.changes:
            self._log({"kind": "resume", "changes": {k: list(v) for k, v in self.changes.items()}})
            self._save("last.pt")  # the checkpoint's config is now the changed one
        self.runner = distributed.wrap(self.net, self.world, self.device, cfg.sync_bn)
        if cfg.compile:
            self.runner = layers.compile_model(self.runner)

    def _check_changes(self, state: dict, last: Path, allow_change: bool) -> dict[str, tuple[Any, Any]]:
        """The keys this resume changes against ``last``'s config; ConfigError for one that
        changes the run's meaning unless ``allow_change``."""
        try:
            changes = config_changes(state["config"], self.cfg)
        except ConfigError as err:
            raise checkpoint.CheckpointError(f"checkpoint {str(last)!r} holds a config this version "
                                             f"cannot read: {err}") from None
        meaning = [k for k in changes if k not in RESUME_ALLOWED]
        if meaning and not allow_change:
            key = meaning[0]
            old, new = changes[key]
            more = f" (and {len(meaning) - 1} more)" if len(meaning) > 1 else ""
            raise ConfigError(f"cannot resume {str(self.run_dir)!r} with {key}={new!r}: the run was "
                              f"trained with {old!r}{more}; that changes what the run computes (pass "
                              f"--allow-change to do it anyway; allowed freely: {', '.join(RESUME_ALLOWED)})")
        ended = state["epoch"] + (1 if state["batch"] else 0)
        if self.cfg.epochs < ended:
            raise ConfigError(f"cannot resume {str(self.run_dir)!r} with epochs={self.cfg.epochs}: its "
                              f"checkpoint is already in epoch {ended}")
        return changes

    def _check_position(self) -> None:
        """A mid-epoch checkpoint's batch must exist in this run's epochs (a changed training
        set or batch size can leave it past the end)."""
        steps = self.train_loader(self.epoch).num_batches
        if self.batch > steps:
            raise ConfigError(f"cannot resume {str(self.run_dir)!r}: its checkpoint is at batch "
                              f"{self.batch} of epoch {self.epoch + 1}, but this configuration has "
                              f"{steps} batches per epoch")

    def _check_teacher(self) -> None:
        """Read a teacher file the method will load on its first step (LTL) now, so a wrong
        path or model fails before the run directory is touched."""
        teacher = getattr(self.net, "_teacher", None)
        if isinstance(teacher, (str, Path)):
            self.net.teacher  # noqa: B018 (loads and checks it; CheckpointError or ValueError)

    # ----------------------------------------------------------------- set-up
    def _prepare_run_dir(self, resume: bool, overwrite: bool, metrics_bytes: int | None) -> None:
        distributed.barrier(self.world)  # every rank has checked before rank 0 creates anything
        if self.is_main:
            self._write_run_dir(resume, overwrite, metrics_bytes)
        distributed.barrier(self.world)

    def _write_run_dir(self, resume: bool, overwrite: bool, metrics_bytes: int | None) -> None:
        created = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self._lock()
            for folder in (self.run_dir, self.run_dir / "checkpoints", self.run_dir / "plots"):
                checkpoint.remove_stale_temp_files(folder)  # left by a killed write
            (self.run_dir / "checkpoints").mkdir(exist_ok=True)
            (self.run_dir / "plots").mkdir(exist_ok=True)
            if overwrite and not resume:
                for stale in ("metrics.jsonl", "report.md", "checkpoints/last.pt",
                              "checkpoints/best.pt", "checkpoints/model.pt"):
                    (self.run_dir / stale).unlink(missing_ok=True)
            metrics = self.run_dir / "metrics.jsonl"
            if metrics_bytes is not None and self._metrics_size() > metrics_bytes:
                with open(metrics, "r+b") as handle:  # drop what was logged after the checkpoint
                    handle.truncate(metrics_bytes)
            checkpoint.atomic_write(self.run_dir / "config.yaml", lambda tmp: tmp.write_text(
                yaml.safe_dump(to_dict(self.cfg), sort_keys=False)))
        except ConfigError:
            self._unlock()
            raise
        except OSError as err:
            self._unlock()
            if created:  # leave no half-made run directory to block the corrected re-run
                shutil.rmtree(self.run_dir, ignore_errors=True)
            raise ConfigError(f"cannot write run directory {str(self.run_dir)!r}: "
                              f"{err.strerror or err}") from None

    def _lock(self) -> None:
        """Hold ``<run_dir>/.lock`` (an advisory ``flock``, released when this process ends,
        SIGKILL included) so a second process cannot train the same run directory. A later
        Trainer of this same process takes the lock over (an earlier one not yet collected)."""
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no lock
            return
        key = str(self.run_dir.resolve())
        if key in _HELD:
            _HELD[key] = (_HELD[key][0], id(self))
            self._lock_fd = _HELD[key][0]
            return
        path = self.run_dir / ".lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ConfigError(f"run directory {str(self.run_dir)!r} is in use by another spikegrad "
                              f"process (pid {holder}, holding {str(path)!r}); wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        _HELD[key] = (fd, id(self))
        self._lock_fd = fd

    def _unlock(self) -> None:
        for key, (fd, owner) in list(_HELD.items()):
            if owner == id(self):
                del _HELD[key]
                os.close(fd)  # closing the descriptor releases the flock
        self._lock_fd = None

    def close(self) -> None:
        """Release the run directory's lock (``fit`` does it when it returns or fails)."""
        self._unlock()

    def __del__(self) -> None:
        try:
            self._unlock()
        except Exception:  # interpreter shutdown
            pass

    def _build_data(self) -> None:
        d, T = self.cfg.data, self.cfg.model.T
        self.train_set = create_dataset(d.name, d.root, "train", T=T, frames=d.frames, size=d.size,
                                        augment=d.augment, autoaugment=d.autoaugment,
                                        cutout=d.cutout, limit=d.limit_train)
        self.test_set = create_dataset(d.name, d.root, "test", T=T, frames=d.frames, size=d.size,
                                       augment=False, limit=d.limit_test)
        self.info = dataset_info(self.train_set)
        test = dataset_info(self.test_set)  # the test split is read now, not after an epoch
        for key in ("in_channels", "size", "num_classes"):
            if test[key] != self.info[key]:
                raise DatasetError(f"{d.name}: the test split's {key} ({test[key]}) differs from the "
                                   f"training split's ({self.info[key]})")
        for split in (self.train_set, self.test_set):
            if isinstance(split, FileDataset):
                for path in split.files:
                    if not path.is_file() or path.stat().st_size == 0:
                        raise DatasetError(f"{path}: missing or empty file of the {d.name} dataset")
        if len(self.train_set) < self.cfg.batch_size:
            raise ConfigError(f"config key 'batch_size' ({self.cfg.batch_size}) is larger than the "
                              f"training set ({len(self.train_set)} items): no full batch to train on")

    def train_loader(self, epoch: int, start_batch: int = 0) -> Any:
        """This rank's batches of ``epoch`` (a pure function of seed and epoch)."""
        return make_loader(self.train_set, self.cfg.batch_size // self.world_size, shuffle=True,
                           seed=self.cfg.seed, epoch=epoch, rank=self.world.rank,
                           world_size=self.world_size, drop_last=True, start_batch=start_batch,
                           num_workers=self.cfg.data.num_workers)

    def test_loader(self) -> Any:
        """The test set in order."""
        return make_loader(self.test_set, self.cfg.eval_batch_size, shuffle=False, seed=0, epoch=0,
                           num_workers=self.cfg.data.num_workers)

    def fixed_batch(self) -> tuple[Tensor, Tensor]:
        """The first training batch of epoch 0 over the whole set (the same on every rank),
        unaugmented: what callbacks that probe the model use."""
        loader = make_loader(self.train_set, self.cfg.batch_size, shuffle=True, seed=self.cfg.seed,
                             epoch=0, augment=False)
        x, y = next(iter(loader))
        return x.to(self.device), y.to(self.device)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict:
        """Train for ``cfg.epochs``, evaluating after each; returns the final summary."""
        try:
            if self.is_main and self.progress is not False:
                where = (f"resuming at epoch {self.epoch + 1}, step {self.step}" if self.step
                         else f"{self.cfg.epochs} epoch{'s' if self.cfg.epochs != 1 else ''}")
                print(f"spikegrad: run directory {self.run_dir} ({where})", file=sys.stderr, flush=True)
            self.warmup = self._kernel_warmup()
            while self.epoch < self.cfg.epochs:
                record = self._train_epoch(self.epoch)
                self._end_epoch(record)
            return self._finish()
        finally:
            if self.warmup is not None:
                self.warmup.close()
            self._unlock()

    def _kernel_warmup(self) -> warmup.Warmup | None:
        """The run's kernel schedule (``kernels.warmup``) when its neurons run ``backend="auto"``
        on CPU and the trainer compiles nothing itself: eager for ``eager_steps`` steps while
        a background process compiles the kernels, compiled after."""
        cfg = self.cfg
        if (self.device.type != "cpu" or cfg.neuron.backend != "auto" or cfg.compile
                or neuron.default_backend(self.device) != "fused"):  # $SPIKEGRAD_BACKEND chose
            return None
        total = self.train_loader(0).num_batches * cfg.epochs
        log = (lambda line: print(line, file=sys.stderr, flush=True)) if self.is_main and \
            self.progress is not False else (lambda line: None)
        return warmup.Warmup(cfg.eager_steps, total, self.step, log)

    def _check_finite_weights(self) -> None:
        """TrainingError when a parameter or buffer holds NaN or Inf (a diverged step): such
        weights are never checkpointed, evaluated as a best model or exported."""
        for name, value in self.net.state_dict().items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                last = self.run_dir / "checkpoints" / "last.pt"
                raise TrainingError(
                    f"the weights became non-finite in epoch {self.epoch + 1} (first: {name}), by step "
                    f"{self.step}; lower optim.lr (now {self.cfg.optim.lr:g}) or set optim.grad_clip; "
                    f"last good checkpoint: {last if last.is_file() else 'none'}")

    def _train_epoch(self, epoch: int) -> dict:
        cfg = self.cfg
        logged: dict = {}
        for cb in self.callbacks.values():
            logged.update(cb.start_epoch(self, epoch))
        loader = self.train_loader(epoch, self.batch)
        steps = len(loader) + self.batch
        self.net.train()
        if self.batch == 0:
            self.sums = {"loss": 0.0, "correct": 0, "seen": 0, "time": 0.0, "norms": {}}
        sums = self.sums
        plain = self.is_main and self.progress is None and not sys.stderr.isatty()
        bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not self.is_main or self.progress is False or plain,
                   file=sys.stderr, dynamic_ncols=True)
        last_line = time.monotonic()
        for x, y in bar:
            if self.warmup is not None:
                self.warmup.before_step(self.step)
            start, compiling = time.perf_counter(), AUTO.compile_seconds
            loss, logits = self._train_step(x.to(self.device), y.to(self.device), epoch, steps)
            sums["time"] += time.perf_counter() - start - (AUTO.compile_seconds - compiling)
            if self.warmup is not None:
                self.warmup.after_step()
            if loss is not None:
                self._accumulate(sums, loss, logits, y)
            self.batch += 1
            self.step += 1
            seen = max(sums["seen"], 1)
            sps = sums["seen"] * self.world_size / max(sums["time"], 1e-9)
            bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", acc=f"{100 * sums['correct'] / seen:.1f}",
                            sps=f"{sps:.0f}")
            if plain and time.monotonic() - last_line >= cfg.progress_every and self.batch < steps:
                last_line = time.monotonic()  # nohup, SLURM, CI: a plain line now and then
                print(f"epoch {epoch + 1}/{cfg.epochs} step {self.batch}/{steps}: train loss "
                      f"{sums['loss'] / seen:.4f} acc {100 * sums['correct'] / seen:.2f}% | "
                      f"{sps:.0f} samples/s", file=sys.stderr, flush=True)
            if self.step % cfg.log_every == 0:
                self._log({"kind": "step", "loss": float(loss) if loss is not None else None,
                           "lr": self.optimizer.param_groups[0]["lr"], "lambda": self.method.lam})
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.batch < steps:
                self._save("last.pt")
        bar.close()
        seen = max(sums["seen"], 1)
        record = {"train_loss": sums["loss"] / seen, "train_acc": 100.0 * sums["correct"] / seen,
                  "samples_per_s": sums["seen"] * self.world_size / max(sums["time"], 1e-9),
                  "epoch_time": sums["time"], "lr": self.optimizer.param_groups[0]["lr"], **logged}
        if self.method.lam is not None:
            record["lambda"] = self.method.lam
        record.update({f"grad_norm/{k}": v / max(steps, 1) for k, v in sums["norms"].items()})
        return record

    def _accumulate(self, sums: dict, loss: Tensor, logits: Tensor, y: Tensor) -> None:
        sums["loss"] += float(loss) * y.numel()
        sums["correct"] += int((self.objective.decode(logits).argmax(-1).cpu() == y).sum())
        sums["seen"] += y.numel()
        for name, value in monitor.grad_norms(self.model).items():
            sums["norms"][name] = sums["norms"].get(name, 0.0) + value

    def _train_step(self, x: Tensor, y: Tensor, epoch: int, steps: int):
        cfg = self.cfg
        if cfg.optim.schedule == "cosine":
            for group in self.optimizer.param_groups:
                group["lr"] = cosine_lr(cfg.optim.lr, self.step, steps * cfg.epochs)
        self.method.set_progress(epoch, cfg.epochs, self.batch, steps)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
            loss, logits = self.method.loss(self.runner(x), y)
        if not torch.isfinite(loss):
            return self._non_finite(loss, epoch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip:
            nn.utils.clip_grad_norm_(self.net.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        logits = logits.detach().float()
        for cb in self.callbacks.values():
            cb.end_step(self, logits, y)
        return loss.detach(), logits

    def _non_finite(self, loss: Tensor, epoch: int) -> tuple[None, None]:
        last = self.run_dir / "checkpoints" / "last.pt"
        where = f"loss is {loss.item()} at epoch {epoch + 1}, step {self.step + 1}"
        if self.cfg.nan_policy == "skip":
            self.optimizer.zero_grad(set_to_none=True)
            self._log({"kind": "step", "skipped": where})
            return None, None
        good = str(last) if last.is_file() else "none written yet"
        raise TrainingError(f"{where}; last good checkpoint: {good} (set nan_policy: skip to skip such steps)")

    def _end_epoch(self, record: dict) -> None:
        self._check_finite_weights()
        for cb in self.callbacks.values():
            cb.end_epoch(self, self.epoch)
        self.epoch += 1
        self.batch = 0
        if not self.is_main:
            return
        inference = self.method.export(self.net)
        with monitor.FiringRates(inference) as rates:
            result = evaluate(inference, self.test_loader(), self.objective, self.device)
            record.update({f"firing_rate/{k}": v for k, v in rates.rates().items()})
            overall = rates.overall()
            if overall is not None:
                record["firing_rate"] = overall
        record["test_acc"], record["test_loss"] = result["acc"], result["loss"]
        self._log({"kind": "epoch", **record})
        self.history.append(record)
        finite = all(math.isfinite(v) for v in (record["train_loss"], result["loss"]))
        improved = finite and result["acc"] > self.best_acc
        if improved:
            self.best_acc = result["acc"]
        self._save("last.pt", also_best=improved)
        print(f"epoch {self.epoch}/{self.cfg.epochs}: train loss {record['train_loss']:.4f} "
              f"acc {record['train_acc']:.2f}% | test acc {result['acc']:.2f}% "
              f"(best {self.best_acc:.2f}%) | {record['samples_per_s']:.0f} samples/s",
              file=sys.stderr, flush=True)

    def _log(self, obj: dict) -> None:
        if not self.is_main:
            return
        obj = {"kind": obj.pop("kind"), "epoch": self.epoch, "step": self.step, "time": time.time(), **obj}
        with open(self.run_dir / "metrics.jsonl", "a") as handle:
            handle.write(json.dumps(obj) + "\n")
        if self.cfg.tensorboard:
            self.tensorboard = self.tensorboard or tracking.TensorBoard(self.run_dir)
            self.tensorboard.write(obj)

    def _save(self, name: str, also_best: bool = False) -> None:
        """Write ``checkpoints/<name>`` (and ``best.pt``) atomically, from rank 0 only."""
        if not self.is_main:
            return
        state = self._state()
        if also_best:  # first: a last.pt that records a best accuracy always has its best.pt
            checkpoint.save(state, self.run_dir / "checkpoints" / "best.pt")
        checkpoint.save(state, self.run_dir / "checkpoints" / name)

    # ------------------------------------------------------------ checkpoints
    def _state(self) -> dict:
        """Everything a bit-exact resume needs, as ``weights_only``-loadable data."""
        return {
            "kind": "run", "version": __version__, "config": to_dict(self.cfg),
            "model_name": self.cfg.model.name, "model_kwargs": model_kwargs(self.cfg, self.info),
            "net": self.net.state_dict(), "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch, "batch": self.batch, "step": self.step, "best_acc": self.best_acc,
            "history": self.history, "sums": self.sums, "metrics_bytes": self._metrics_size(),
            "callbacks": {name: cb.state_dict() for name, cb in self.callbacks.items()},
            "model_prefix": self._model_prefix(), "rng": rng_state(),
        }

    def _model_prefix(self) -> str:
        """Where the model's keys sit in the trained net's ``state_dict`` (``model.`` in a
        ``ShortcutNet``, none for a plain model): what ``checkpoint`` strips to load it alone."""
        name = next(name for name, m in self.net.named_modules() if m is self.model)
        return f"{name}." if name else ""

    def _metrics_size(self) -> int:
        path = self.run_dir / "metrics.jsonl"
        return path.stat().st_size if path.is_file() else 0

    def _load(self, state: dict, path: Path) -> None:
        """Restore ``_state()`` read from ``path`` (in memory; ``_write_run_dir`` then drops
        the metrics logged after that checkpoint). Whatever the file holds that does not fit
        is a CheckpointError naming it."""
        where = f"checkpoint {str(path)!r}"
        try:
            self.net.load_state_dict(state["net"])
        except RuntimeError as err:
            raise checkpoint.CheckpointError(f"{where} does not fit this run's model: "
                                             f"{str(err).splitlines()[0]}") from None
        if not all(k in state for k in ("callbacks", "sums", "metrics_bytes", "rng")):
            raise checkpoint.CheckpointError(f"{where} was written by an earlier spikegrad and cannot be "
                                             "resumed (eval and export still read it)")
        try:  # the file's contents drive every call here: an error is the file's, not ours
            self.optimizer.load_state_dict(state["optimizer"])
            self.sums = state["sums"]
            self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
            self.best_acc, self.history = float(state["best_acc"]), list(state["history"])
            if not isinstance(state["callbacks"], dict):
                raise TypeError("'callbacks' is not a dict")
            for name, cb in self.callbacks.items():
                cb.load_state_dict(state["callbacks"][name])
            set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError, OverflowError) as err:
            detail = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise checkpoint.CheckpointError(f"{where} cannot be resumed: {type(err).__name__}: {detail}") from None

    def export_state(self) -> dict:
        """The inference-only model file (``kind: model``)."""
        return model_file(self.method.export(self.net), self.cfg.model.name,
                          model_kwargs(self.cfg, self.info), self.objective)

    # ------------------------------------------------------------------ end
    def _finish(self) -> dict:
        from . import plots, report

        if not self.is_main:
            return {"run_dir": str(self.run_dir), "final_acc": None, "best_acc": None, "epochs": self.epoch}
        self._check_finite_weights()  # never export non-finite weights
        checkpoint.save(self.export_state(), self.run_dir / "checkpoints" / "model.pt")
        final = self.history[-1] if self.history else {}
        summary = {"run_dir": str(self.run_dir), "final_acc": final.get("test_acc"),
                   "best_acc": self.best_acc, "epochs": self.epoch}
        plots.plot_run(self.run_dir)
        peers = self._sibling_runs()
        if len(peers) > 1:
            plots.plot_compare(peers, self.run_dir / "plots" / "compare_methods.png")
        report.write(self.run_dir, self.cfg, self.history, self._sops())
        if self.tensorboard is not None:
            self.tensorboard.close()
        return summary

    def _sibling_runs(self) -> dict[str, Path]:
        """Finished runs beside this one with the same model and data but another method
        (e.g. vanilla beside evolutionary), labelled by method, this run included."""
        runs = {self.cfg.method.name: self.run_dir}
        for other in sorted(self.run_dir.parent.iterdir()):
            try:
                if other.is_symlink() or not (other / "config.yaml").is_file():
                    continue
                cfg = safe_yaml((other / "config.yaml").read_text(), str(other / "config.yaml"))
                finished = (other / "report.md").is_file() and (other / "metrics.jsonl").is_file()
                same = cfg["model"] == to_dict(self.cfg)["model"] and cfg["data"]["name"] == self.cfg.data.name
            except (OSError, yaml.YAMLError, ConfigError, KeyError, TypeError, UnicodeDecodeError):
                continue
            if finished and same and cfg["method"]["name"] not in runs:
                runs[cfg["method"]["name"]] = other
        return runs

    @torch.no_grad()
    def _sops(self) -> dict:
        inference = self.method.export(self.net).eval()
        x, _ = next(iter(self.test_loader()))
        with monitor.SynapticOps(inference) as counter:
            inference(x[:64].to(self.device))
        return counter.summary()
