"""The run configuration: one dataclass tree, loaded from YAML, overridden by ``--set``.

    cfg = load_config("configs/default.yaml", ["epochs=1", "model.name=plain-20"])

Every default lives here (and only here). Unknown keys get a did-you-mean, wrong
types and out-of-range values one line naming the key and what was expected:
all raise ``ConfigError`` (a ``ValueError``). ``--set`` values parse as YAML scalars;
``--set method=ann`` is shorthand for ``method.name=ann`` (any table with a ``name``),
``--set teacher=PATH`` for ``method.teacher=PATH``. Setting ``surrogate.name`` resets
the other surrogate arguments unless they are set in the same call.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .defaults import NEURON

__all__ = ["Config", "ConfigError", "load_config", "apply_overrides", "from_dict", "to_dict", "choices",
           "safe_yaml", "check_run_name", "MAX_CONFIG_BYTES", "MAX_YAML_NODES"]

MAX_CONFIG_BYTES = 1 << 20   # a config file or --set value longer than this is refused
MAX_YAML_NODES = 100_000     # nodes after alias expansion (an alias bomb expands to billions)


class ConfigError(ValueError):
    """A configuration that cannot be run; the message is one line for the user."""


@dataclass
class ModelConfig:
    """``create_model`` name and arguments (the channel count comes from the dataset)."""
    name: str = "plain-8"
    T: int = 4
    encoding: str = "direct"
    width: float = 1.0
    norm: str = "bn"
    stem: str = "auto"
    sew: bool = False
    channels_last: bool = True
    spike_conv: str = "auto"  # CPU convolutions of spikes from the active inputs: auto | on | off


@dataclass
class NeuronConfig:
    """The spiking neuron of every layer (docs/methods.md, "Spiking neurons"); defaults
    from ``defaults.NEURON``."""
    type: str = NEURON["type"]
    tau: float = NEURON["tau"]
    v_threshold: float = NEURON["v_threshold"]
    v_reset: Optional[float] = NEURON["v_reset"]
    decay_input: bool = NEURON["decay_input"]
    detach_reset: bool = NEURON["detach_reset"]
    backend: str = NEURON["backend"]


@dataclass
class MethodConfig:
    """vanilla | shortcut | evolutionary | ltl | ann, and each one's options."""
    name: str = "evolutionary"
    schedule: str = "linear"
    combine: str = "logits"
    lam: float = 1.0
    step_epoch: Optional[int] = None
    per_step: bool = False
    attach: Optional[list] = None
    teacher: Optional[str] = None
    finetune_epochs: int = 0
    init_from_teacher: bool = False
    local_weight: float = 16.0


@dataclass
class LossConfig:
    """ce | tet | two; ``lam``/``phi`` are TET's, ``alpha``/``warmup``/``variant`` TWO's."""
    name: str = "ce"
    lam: float = 0.0
    phi: float = 1.0
    alpha: float = 0.3
    warmup: int = 5
    variant: str = "official"


@dataclass
class DataConfig:
    """Dataset name and place; training augmentation (``augment``: crop and flip, plus
    ``autoaugment`` and ``cutout`` pixels); ``limit_*`` take the first N (class-balanced) items."""
    name: str = "fashion-mnist"
    root: Optional[str] = None
    augment: bool = False
    autoaugment: bool = False
    cutout: int = 0
    limit_train: Optional[int] = None
    limit_test: Optional[int] = None
    num_workers: int = 0
    frames: str = "count"
    size: Optional[int] = None


@dataclass
class OptimConfig:
    """Optimiser and learning-rate schedule (cosine annealing over all steps, or none)."""
    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1.0e-4
    schedule: str = "cosine"
    grad_clip: Optional[float] = None


@dataclass
class SurrogateScheduleConfig:
    """auto: Dspike's temperature search for ``dspike`` (``delta``, ``eps``, ``directions``;
    ``relative_eps``: eps times the first layer's weight norm; ``train_mode``: estimate with
    batch statistics as in training), the boundary schedule (``kind``, after a calibration
    when ``calibrate``) for ``adali``; none: keep the surrogate fixed."""
    name: str = "auto"
    delta: float = 0.2
    eps: float = 1.0e-3
    directions: int = 32
    relative_eps: bool = False
    train_mode: bool = True
    kind: str = "log"
    calibrate: bool = True


@dataclass
class Config:
    """A whole run. ``surrogate`` is the argument dict of ``surrogate.create``."""
    name: str = "code-defaults"  # configs/default.yaml (`make train`) is fmnist-evolutionary
    out: str = "runs"
    seed: int = 0
    device: str = "auto"
    epochs: int = 2
    batch_size: int = 64
    eval_batch_size: int = 500
    amp: str = "none"
    compile: bool = False
    eager_steps: int = 30  # CPU, neuron.backend auto: steps on the uncompiled kernels while they compile
    nan_policy: str = "stop"
    log_every: int = 20
    checkpoint_every: Optional[int] = None
    progress_every: float = 30.0  # seconds between plain progress lines when stderr is no terminal
    tensorboard: bool = False  # also write TensorBoard event files (needs the tensorboard package)
    sync_bn: bool = False
    expected_accuracy: Optional[float] = None
    expected_source: str = ""
    model: ModelConfig = field(default_factory=ModelConfig)
    neuron: NeuronConfig = field(default_factory=NeuronConfig)
    surrogate: dict = field(default_factory=lambda: {"name": "atan", "alpha": 2.0})
    surrogate_schedule: SurrogateScheduleConfig = field(default_factory=SurrogateScheduleConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


# keys whose values are fixed words; the keys that name a registered thing (neuron type,
# backend, method, loss, schedules) take their choices from the registries: ``choices()``
CHOICES = {
    "device": ("auto", "cpu", "cuda"),
    "amp": ("none", "bf16"),
    "nan_policy": ("stop", "skip"),
    "model.stem": ("auto", "cifar", "imagenet"),
    "method.combine": ("logits", "losses"),
    "loss.variant": ("official", "paper"),
    "data.frames": ("count", "time"),
    "optim.name": ("sgd", "adam", "adamw"),
    "optim.schedule": ("cosine", "none"),
    "surrogate_schedule.name": ("auto", "none"),
}


def choices() -> dict[str, tuple[str, ...]]:
    """Every key with a closed set of values: ``CHOICES`` and the registries' names (read
    when a config is checked, so a user's registered neuron, method or loss is accepted)."""
    from . import data, layers, losses, methods, models, neuron, schedules  # torch: not at import time
    from .kernels import spike_conv

    return {**CHOICES,
            "model.encoding": tuple(layers.ENCODERS), "model.norm": models.NORMS,
            "model.spike_conv": spike_conv.MODES,
            "neuron.type": tuple(layers.NEURONS.names()), "neuron.backend": neuron.BACKENDS,
            "method.name": tuple(methods.METHODS.names()), "method.schedule": schedules.BALANCE_KINDS,
            "loss.name": tuple(losses.LOSSES.names()), "surrogate_schedule.kind": schedules.ADALI_KINDS,
            "data.name": tuple(data.DATASETS.names())}


# key -> (lowest allowed, whether the bound is inclusive)
MINIMUM = {
    "epochs": (1, True), "batch_size": (1, True), "eval_batch_size": (1, True),
    "log_every": (1, True), "checkpoint_every": (1, True), "model.T": (1, True), "model.width": (0, False),
    "neuron.tau": (1, True), "neuron.v_threshold": (0, False), "optim.lr": (0, False),
    "optim.momentum": (0, True), "optim.weight_decay": (0, True), "optim.grad_clip": (0, False),
    "method.lam": (0, True), "method.finetune_epochs": (0, True), "loss.warmup": (0, True),
    "method.local_weight": (0, True),
    "data.limit_train": (1, True), "data.limit_test": (1, True), "data.num_workers": (0, True),
    "data.size": (1, True), "data.cutout": (0, True), "progress_every": (0, False), "eager_steps": (0, True),
    "surrogate_schedule.directions": (1, True),
    "surrogate_schedule.delta": (0, False), "surrogate_schedule.eps": (0, False),
}

ALIASES = {"teacher": "method.teacher"}


def _sections(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    name = getattr(base, "__name__", str(base))
    return f"{name} or null" if args else name


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (int widens to float), or ConfigError naming ``key``."""
    optional = typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {key!r} must be of type {_type_name(tp)}, got null")
    base = [a for a in typing.get_args(tp) if a is not type(None)][0] if optional else tp
    if base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if base in (int, float) and isinstance(value, bool) or not isinstance(value, base):
        raise ConfigError(f"config key {key!r} must be of type {_type_name(tp)}, "
                          f"got {type(value).__name__} {_short(value)}")
    if base is float and not math.isfinite(value):
        raise ConfigError(f"config key {key!r} must be a finite number, got {value!r}")
    if base is int and abs(value) >= 2**62:
        raise ConfigError(f"config key {key!r} is out of range, got {_short(value)}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_run_name(name: str, key: str = "name") -> str:
    """``name`` if it is one plain path component (the run directory ``<out>/<name>``),
    else ConfigError: no ``/`` or ``\\``, not ``.``/``..``, no NUL or control characters,
    at most 200 characters, so a run can never be written outside ``out``."""
    bad = (not name or name in (".", "..") or any(c in name for c in "/\\") or len(name) > 200
           or any(ord(c) < 32 or ord(c) == 127 for c in name) or name != name.strip())
    if bad:
        raise ConfigError(f"config key {key!r} must be a plain folder name inside 'out' (no '/', "
                          f"'..', leading or trailing spaces, control characters), got {_short(name)}")
    return name


def _unknown(key: str, known: list[str]) -> ConfigError:
    section, _, leaf = key.rpartition(".")
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f"; did you mean {(section + '.' if section else '') + close[0]!r}?" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint} (expected one of {', '.join(known)})")


def _check_value(key: str, value: Any, allowed: dict[str, tuple[str, ...]]) -> None:
    if key in allowed and value not in allowed[key]:
        raise ConfigError(f"config key {key!r} must be one of {', '.join(allowed[key])}, got {value!r}")
    if key in MINIMUM and value is not None:
        low, inclusive = MINIMUM[key]
        if value < low or (not inclusive and value == low):
            relation = ">=" if inclusive else ">"
            raise ConfigError(f"config key {key!r} must be {relation} {low}, got {value!r}")


def _build(cls: type, data: dict, allowed: dict[str, tuple[str, ...]], prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or 'root'!r} must be a mapping, "
                          f"got {type(data).__name__}")
    hints = _sections(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise _unknown(full, list(hints))
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, allowed, f"{full}.")
        else:
            if isinstance(value, bool) and {"on", "off"} <= set(allowed.get(full, ())):
                value = "on" if value else "off"  # YAML 1.1 reads a bare on/off as a boolean
            kwargs[key] = _coerce(full, value, tp)
            _check_value(full, kwargs[key], allowed)
    return cls(**kwargs)


def from_dict(data: dict) -> Config:
    """A validated ``Config`` from a nested dict (missing keys take their defaults)."""
    cfg = _build(Config, data, choices())
    check_run_name(cfg.name)
    if not cfg.out or "\0" in cfg.out:
        raise ConfigError(f"config key 'out' must be a folder path, got {cfg.out!r}")
    _check_surrogate(cfg.surrogate)
    return cfg


def _check_surrogate(args: dict) -> None:
    from . import surrogate as sg  # imports torch; kept out of module import time

    if "name" not in args:
        raise ConfigError("config key 'surrogate.name' is required (one of "
                          f"{', '.join(sg.names())})")
    try:
        sg.create(**args)
    except (ValueError, TypeError, OverflowError) as err:
        raise ConfigError(f"config key 'surrogate': {err}") from None


def to_dict(cfg: Config) -> dict:
    """The plain nested dict of ``cfg`` (what config.yaml and checkpoints store)."""
    return dataclasses.asdict(cfg)


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"--set takes key=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = ALIASES.get(key.strip(), key.strip())
    try:
        value = safe_yaml(raw, f"--set {key}") if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` strings to a nested dict (returns a new dict)."""
    data = copy.deepcopy(data)
    pairs = [_parse_override(item) for item in overrides]
    set_keys = {k for k, _ in pairs}
    hints = _sections(Config)
    for key, value in pairs:
        if key in hints and (dataclasses.is_dataclass(hints[key]) or key == "surrogate") \
                and not isinstance(value, dict):
            key = f"{key}.name"  # --set method=ann means method.name=ann
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            if not isinstance(node.setdefault(part, {}), dict):
                raise ConfigError(f"config key {part!r} is not a section; cannot set {key!r}")
            node = node[part]
        if key == "surrogate.name" and value != node.get("name"):
            kept = {k.split(".", 1)[1] for k in set_keys if k.startswith("surrogate.")}
            for arg in [k for k in node if k not in kept]:
                del node[arg]
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file at ``path`` (if any), then ``overrides``."""
    data: dict = to_dict(Config())
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            if path.stat().st_size > MAX_CONFIG_BYTES:
                raise ConfigError(f"config file {str(path)!r} is larger than {MAX_CONFIG_BYTES} bytes")
            text = path.read_text()
        except UnicodeDecodeError:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text") from None
        try:
            loaded = safe_yaml(text, f"config file {str(path)!r}") or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError(f"config file {str(path)!r} is not valid YAML{where}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys")
        data = _merge(data, loaded)
    return from_dict(apply_overrides(data, overrides or []))


def _merge(base: dict, new: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in new.items():
        if key == "surrogate" and isinstance(value, dict):
            out[key] = copy.deepcopy(value)  # a surrogate table replaces the default wholesale
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping (merge keys
    ``<<`` excepted: explicit keys override merged ones, as YAML intends)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    line = key_node.start_mark.line + 1
                    raise ConfigError(f"{self._source}: key {key_node.value!r} appears twice in one "
                                      f"mapping (line {line})")
                seen.add(key)
        return super().construct_mapping(node, deep)


def _expanded_size(node: yaml.Node, sizes: dict, active: set, source: str) -> int:
    """Nodes of ``node`` once every alias is expanded (memoised: aliases share node objects);
    ConfigError past ``MAX_YAML_NODES`` or for an alias that contains itself."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in active:
        raise ConfigError(f"{source}: an alias refers to itself (a recursive YAML structure)")
    active.add(key)
    total = 1
    if isinstance(node, yaml.SequenceNode):
        children = node.value
    elif isinstance(node, yaml.MappingNode):
        children = [part for pair in node.value for part in pair]
    else:
        children = []
    for child in children:
        total += _expanded_size(child, sizes, active, source)
        if total > MAX_YAML_NODES:
            raise ConfigError(f"{source}: expands to more than {MAX_YAML_NODES} YAML nodes "
                              "(aliases nested too deeply: refused)")
    active.discard(key)
    sizes[key] = total
    return total


def safe_yaml(text: str, source: str = "YAML") -> Any:
    """``yaml.safe_load(text)`` with limits: at most ``MAX_CONFIG_BYTES`` characters, at most
    ``MAX_YAML_NODES`` nodes after alias expansion, no recursive aliases, no key twice in a
    mapping, no nesting deep enough to exhaust the stack. Limits raise ConfigError naming
    ``source``; malformed YAML raises ``yaml.YAMLError``."""
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source}: longer than {MAX_CONFIG_BYTES} characters")
    loader = _StrictLoader(text)
    loader._source = source
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set(), source)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply") from None
    finally:
        loader.dispose()
