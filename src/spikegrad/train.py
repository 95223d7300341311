"""The trainer: one loop, methods and schedules plugged in as small objects.

    trainer = Trainer(load_config("configs/default.yaml"), overwrite=True)
    summary = trainer.fit()          # writes runs/<name>/...

Run directory (docs/architecture.md, "The run directory"): ``config.yaml``, ``metrics.jsonl``, ``checkpoints/last.pt``
and ``best.pt`` (atomic), ``plots/*.png``, ``report.md``.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from tqdm import tqdm

from . import __version__, callbacks, checkpoint, distributed, layers, losses, methods, monitor
from .checkpoint import model_file
from .config import Config, ConfigError, to_dict
from .data import create_dataset, make_loader
from .models import create_model

__all__ = ["Trainer", "TrainingError", "build_model", "model_kwargs", "evaluate", "resolve_device"]


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
              "width": cfg.model.width, "channels_last": cfg.model.channels_last}
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
    last = Path(run_dir) / "checkpoints" / "last.pt"
    if not last.is_file():
        raise ConfigError(f"cannot resume: {str(last)!r} does not exist "
                          f"(is {str(run_dir)!r} a run directory?)")
    return last


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
                 progress: bool | None = None) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.out) / cfg.name
        self.progress = progress
        self.world, self.device = distributed.init(resolve_device(cfg.device))
        self.is_main, self.world_size = self.world.is_main, self.world.size
        if cfg.batch_size % self.world_size:
            raise ConfigError(f"config key 'batch_size' ({cfg.batch_size}) must be divisible by the "
                              f"number of processes ({self.world_size}); it is the global batch")
        if resume:
            last_checkpoint(self.run_dir)
        seed_everything(cfg.seed)
        self._build_data()
        self.objective = losses.from_config(cfg.loss, cfg.model.T)
        self.model = build_model(cfg, self.info).to(self.device)
        self.method = methods.create(cfg.method, self.objective)
        self.net = self.method.wrap(self.model).to(self.device)
        self.optimizer = make_optimizer(cfg, [p for p in self.net.parameters() if p.requires_grad])
        self.callbacks = callbacks.create_all(self)
        self.epoch, self.batch, self.step = 0, 0, 0
        self.best_acc, self.history, self.sums = -1.0, [], {}
        self._prepare_run_dir(resume, overwrite)  # only once everything above has been validated
        if resume:
            self._load(checkpoint.load(last_checkpoint(self.run_dir), kind="run"))
        self.runner = distributed.wrap(self.net, self.world, self.device, cfg.sync_bn)
        if cfg.compile:
            self.runner = layers.compile_model(self.runner)

    # ----------------------------------------------------------------- set-up
    def _prepare_run_dir(self, resume: bool, overwrite: bool) -> None:
        if self.run_dir.exists() and not (resume or overwrite):
            raise ConfigError(f"run directory {str(self.run_dir)!r} exists; pass --resume to "
                              "continue it or --overwrite to start it afresh")
        distributed.barrier(self.world)  # every rank has checked before rank 0 creates anything
        if self.is_main:
            self._write_run_dir(resume, overwrite)
        distributed.barrier(self.world)

    def _write_run_dir(self, resume: bool, overwrite: bool) -> None:
        try:
            (self.run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            (self.run_dir / "plots").mkdir(exist_ok=True)
            if overwrite and not resume:
                for stale in ("metrics.jsonl", "report.md", "checkpoints/last.pt",
                              "checkpoints/best.pt", "checkpoints/model.pt"):
                    (self.run_dir / stale).unlink(missing_ok=True)
            (self.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        except OSError as err:
            raise ConfigError(f"cannot write run directory {str(self.run_dir)!r}: {err.strerror}") from None

    def _build_data(self) -> None:
        d, T = self.cfg.data, self.cfg.model.T
        self.train_set = create_dataset(d.name, d.root, "train", T=T, frames=d.frames, size=d.size,
                                        augment=d.augment, autoaugment=d.autoaugment,
                                        cutout=d.cutout, limit=d.limit_train)
        self.test_set = create_dataset(d.name, d.root, "test", T=T, frames=d.frames, size=d.size,
                                       augment=False, limit=d.limit_test)
        self.info = dataset_info(self.train_set)

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
        while self.epoch < self.cfg.epochs:
            record = self._train_epoch(self.epoch)
            self._end_epoch(record)
        return self._finish()

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
        bar = tqdm(loader, total=len(loader), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not self.is_main or self.progress is False
                   or (self.progress is None and not sys.stderr.isatty()),
                   file=sys.stderr, dynamic_ncols=True)
        for x, y in bar:
            start = time.perf_counter()
            loss, logits = self._train_step(x.to(self.device), y.to(self.device), epoch, steps)
            sums["time"] += time.perf_counter() - start
            if loss is not None:
                self._accumulate(sums, loss, logits, y)
            self.batch += 1
            self.step += 1
            seen = max(sums["seen"], 1)
            bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}", acc=f"{100 * sums['correct'] / seen:.1f}",
                            sps=f"{sums['seen'] * self.world_size / max(sums['time'], 1e-9):.0f}")
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

    def _save(self, name: str, also_best: bool = False) -> None:
        """Write ``checkpoints/<name>`` (and ``best.pt``) atomically, from rank 0 only."""
        if not self.is_main:
            return
        state = self._state()
        checkpoint.save(state, self.run_dir / "checkpoints" / name)
        if also_best:
            checkpoint.save(state, self.run_dir / "checkpoints" / "best.pt")

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

    def _load(self, state: dict) -> None:
        """Restore ``_state()``; metrics logged after that checkpoint are dropped."""
        try:
            self.net.load_state_dict(state["net"])
        except RuntimeError as err:
            raise checkpoint.CheckpointError(f"checkpoint does not fit this run's model: "
                                             f"{str(err).splitlines()[0]}") from None
        if "callbacks" not in state:
            raise checkpoint.CheckpointError("checkpoint was written by an earlier spikegrad and cannot be "
                                             "resumed (eval and export still read it)")
        self.sums = state["sums"]
        if self.is_main and self._metrics_size() > state["metrics_bytes"]:
            with open(self.run_dir / "metrics.jsonl", "r+b") as handle:
                handle.truncate(state["metrics_bytes"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.batch, self.step = state["epoch"], state["batch"], state["step"]
        self.best_acc, self.history = state["best_acc"], list(state["history"])
        for name, cb in self.callbacks.items():
            cb.load_state_dict(state["callbacks"][name])
        set_rng_state(state["rng"])

    def export_state(self) -> dict:
        """The inference-only model file (``kind: model``)."""
        return model_file(self.method.export(self.net), self.cfg.model.name,
                          model_kwargs(self.cfg, self.info), self.objective)

    # ------------------------------------------------------------------ end
    def _finish(self) -> dict:
        from . import plots, report

        if not self.is_main:
            return {"run_dir": str(self.run_dir), "final_acc": None, "best_acc": None, "epochs": self.epoch}
        checkpoint.save(self.export_state(), self.run_dir / "checkpoints" / "model.pt")
        final = self.history[-1] if self.history else {}
        summary = {"run_dir": str(self.run_dir), "final_acc": final.get("test_acc"),
                   "best_acc": self.best_acc, "epochs": self.epoch}
        plots.plot_run(self.run_dir)
        peers = self._sibling_runs()
        if len(peers) > 1:
            plots.plot_compare(peers, self.run_dir / "plots" / "compare_methods.png")
        report.write(self.run_dir, self.cfg, self.history, self._sops())
        return summary

    def _sibling_runs(self) -> dict[str, Path]:
        """Finished runs beside this one with the same model and data but another method
        (e.g. vanilla beside evolutionary), labelled by method, this run included."""
        runs = {self.cfg.method.name: self.run_dir}
        for other in sorted(self.run_dir.parent.iterdir()):
            try:
                cfg = yaml.safe_load((other / "config.yaml").read_text())
                finished = (other / "report.md").is_file() and (other / "metrics.jsonl").is_file()
                same = cfg["model"] == to_dict(self.cfg)["model"] and cfg["data"]["name"] == self.cfg.data.name
            except (OSError, yaml.YAMLError, KeyError, TypeError):
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
