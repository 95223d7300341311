"""Surrogate gradients: forward is the Heaviside step, backward is a smooth derivative.

Every surrogate is a parameter-free ``nn.Module`` taking ``x = h - v_threshold``
of any shape and returning spikes of the same shape and dtype:

    >>> sg = create("atan", alpha=2.0)
    >>> s = sg(x)            # Θ(x) forward, sg.grad(x) backward
    >>> sg.grad(x)           # the analytic derivative, for tests and plots

The fused neuron kernels do not call the module; they call
``surrogate.backward_grad(x)`` on the whole ``[T, N]`` pre-spike tensor, so every
surrogate (with its temperature, mask or schedule) runs on every backend.

Formulas and defaults: docs/methods.md, "Surrogate gradients".
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .registry import Registry

__all__ = [
    "Surrogate", "Rectangle", "Triangle", "Sigmoid", "ATan", "Dspike", "AdaLi", "MSG",
    "SURROGATES", "create", "names", "resolve", "heaviside",
]


def heaviside(x: Tensor) -> Tensor:
    """Θ(x): 1 where ``x >= 0``, else 0, in ``x``'s dtype (shape kept)."""
    return (x >= 0).to(x.dtype)


def _positive(name: str, value: float, what: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{what}: {name} must be a positive number, got {value!r}")
    return float(value)


class _SpikeFunction(torch.autograd.Function):
    """Θ(x) forward; ``grad_out * surrogate.backward_grad(x)`` backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, surrogate: "Surrogate") -> Tensor:
        ctx.save_for_backward(x)
        ctx.surrogate = surrogate
        return surrogate.activation(x)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad_out * ctx.surrogate.backward_grad(x), None


class _SequenceMaskedSpike(torch.autograd.Function):
    """Θ(x[t]) forward for one step of a sequence; backward masks with that step's slice
    of one ``[T, ...]`` mask, drawn at the first backward call, so that a per-step loop
    consumes the generator exactly as a fused kernel drawing the whole mask does."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, msg: "MSG", shared: dict, t: int) -> Tensor:
        ctx.save_for_backward(x)
        ctx.msg, ctx.shared, ctx.t = msg, shared, t
        return msg.activation(x)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        (x,) = ctx.saved_tensors
        shared = ctx.shared
        if "mask" not in shared:
            shared["mask"] = ctx.msg.mask(x.new_empty(shared["shape"]))
        return grad_out * ctx.msg.base.backward_grad(x) * shared["mask"][ctx.t], None, None, None


class Surrogate(nn.Module):
    """Base class. Subclasses define ``grad(x)`` and, where one exists, ``primitive(x)``.

    ``spiking=False`` makes the forward the smooth primitive instead of Θ, so
    that whole networks can be checked against finite differences (gradcheck).
    """

    def __init__(self, spiking: bool = True) -> None:
        super().__init__()
        self.spiking = spiking

    def forward(self, x: Tensor) -> Tensor:
        """Spikes ``Θ(x)`` (or the primitive when ``spiking=False``), same shape as ``x``."""
        return _SpikeFunction.apply(x, self)

    def activation(self, x: Tensor) -> Tensor:
        """The forward value without autograd: Θ(x), or primitive(x) when not spiking."""
        return heaviside(x) if self.spiking else self.primitive(x)

    def grad(self, x: Tensor) -> Tensor:
        """Analytic surrogate derivative g(x), same shape as ``x``."""
        raise NotImplementedError

    def primitive(self, x: Tensor) -> Tensor:
        """A smooth function whose derivative is ``grad``, rising from 0 to 1."""
        raise NotImplementedError(f"{type(self).__name__} has no smooth primitive")

    def backward_grad(self, x: Tensor) -> Tensor:
        """What back-propagation multiplies the incoming gradient by (``grad`` unless masked)."""
        return self.grad(x)

    def stepper(self, seq_shape: torch.Size) -> Callable[[Tensor, int], Tensor]:
        """``spike(x_t, t)`` for a loop over the T steps of a ``seq_shape`` sequence."""
        return lambda x, t: self(x)

    def split_mask(self, x: Tensor) -> tuple["Surrogate", Tensor | None]:
        """``(s, mask)`` with ``backward_grad(x) == s.grad(x) * mask`` (mask None: unmasked).

        Lets fused kernels draw random masks eagerly and compile the rest.
        """
        return self, None

    def config(self) -> dict:
        """The ``create()`` arguments that rebuild this surrogate."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.config().items() if k != "name")


class Rectangle(Surrogate):
    """g(x) = 1/width for |x| < width/2 (the straight-through box)."""

    def __init__(self, width: float = 1.0, spiking: bool = True) -> None:
        super().__init__(spiking)
        self.width = _positive("width", width, "Rectangle")

    def grad(self, x: Tensor) -> Tensor:
        return (x.abs() < self.width / 2).to(x.dtype) / self.width

    def primitive(self, x: Tensor) -> Tensor:
        return (x / self.width + 0.5).clamp(0.0, 1.0)

    def config(self) -> dict:
        return {"name": "rectangle", "width": self.width}


class Triangle(Surrogate):
    """g(x) = max(0, gamma - |x|) / gamma²."""

    def __init__(self, gamma: float = 1.0, spiking: bool = True) -> None:
        super().__init__(spiking)
        self.gamma = _positive("gamma", gamma, "Triangle")

    def grad(self, x: Tensor) -> Tensor:
        return (self.gamma - x.abs()).clamp(min=0.0) / self.gamma**2

    def primitive(self, x: Tensor) -> Tensor:
        u = (x / self.gamma).clamp(-1.0, 1.0)
        return 0.5 + u - u * u.abs() / 2

    def config(self) -> dict:
        return {"name": "triangle", "gamma": self.gamma}


class Sigmoid(Surrogate):
    """g(x) = alpha σ(alpha x)(1 - σ(alpha x))."""

    def __init__(self, alpha: float = 4.0, spiking: bool = True) -> None:
        super().__init__(spiking)
        self.alpha = _positive("alpha", alpha, "Sigmoid")

    def grad(self, x: Tensor) -> Tensor:
        s = torch.sigmoid(self.alpha * x)
        return self.alpha * s * (1 - s)

    def primitive(self, x: Tensor) -> Tensor:
        return torch.sigmoid(self.alpha * x)

    def config(self) -> dict:
        return {"name": "sigmoid", "alpha": self.alpha}


class ATan(Surrogate):
    """g(x) = (alpha/2) / (1 + (π alpha x / 2)²)."""

    def __init__(self, alpha: float = 2.0, spiking: bool = True) -> None:
        super().__init__(spiking)
        self.alpha = _positive("alpha", alpha, "ATan")

    def grad(self, x: Tensor) -> Tensor:
        return (self.alpha / 2) / (1 + (math.pi / 2 * self.alpha * x).square())

    def primitive(self, x: Tensor) -> Tensor:
        return torch.atan(math.pi / 2 * self.alpha * x) / math.pi + 0.5

    def config(self) -> dict:
        return {"name": "atan", "alpha": self.alpha}


class Dspike(Surrogate):
    """Dspike (Li et al., NeurIPS 2021), temperature ``b``:

    g(x) = b / (2 tanh(b/2) width) · sech²(b x / width) for |x| < width/2.
    ``b`` is a plain attribute; ``schedules.DspikeTemperature`` moves it per epoch.
    """

    def __init__(self, b: float = 3.0, width: float = 1.0, spiking: bool = True) -> None:
        super().__init__(spiking)
        self.b = _positive("b", b, "Dspike")
        self.width = _positive("width", width, "Dspike")

    def grad(self, x: Tensor) -> Tensor:
        scale = self.b / (2 * math.tanh(self.b / 2) * self.width)
        sech2 = 1 - torch.tanh(self.b * x / self.width).square()
        return scale * sech2 * (x.abs() < self.width / 2).to(x.dtype)

    def primitive(self, x: Tensor) -> Tensor:
        u = x.clamp(-self.width / 2, self.width / 2)
        return torch.tanh(self.b * u / self.width) / (2 * math.tanh(self.b / 2)) + 0.5

    def config(self) -> dict:
        return {"name": "dspike", "b": self.b, "width": self.width}


class AdaLi(Surrogate):
    """AdaLi (Hou, Wu, Zhou, 2026): an asymmetric rectangle with shrinking bounds.

    g(x) = alpha/L on [-L, 0), beta/R on [0, R], 0 elsewhere; alpha + beta = 1.
    ``set_bounds(L, R)`` is called once per epoch by ``schedules.AdaLiSchedule``,
    which shrinks (L, R) from (L_max, R_max) to (L_min, R_min).
    """

    def __init__(self, alpha: float = 0.5, beta: float | None = None, L: float = 1.5,
                 R: float = 1.5, L_min: float = 0.3, R_min: float = 0.3,
                 spiking: bool = True) -> None:
        super().__init__(spiking)
        beta = 1.0 - alpha if beta is None else beta
        if not (0 < alpha < 1) or abs(alpha + beta - 1) > 1e-6:
            raise ValueError(f"AdaLi: alpha and beta must be in (0, 1) and sum to 1, got {alpha}, {beta}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.L_max = _positive("L", L, "AdaLi")
        self.R_max = _positive("R", R, "AdaLi")
        self.L_min = _positive("L_min", L_min, "AdaLi")
        self.R_min = _positive("R_min", R_min, "AdaLi")
        self.L, self.R = self.L_max, self.R_max

    def set_bounds(self, L: float, R: float) -> None:
        """Set the current boundaries (both positive)."""
        self.L = _positive("L", L, "AdaLi")
        self.R = _positive("R", R, "AdaLi")

    def grad(self, x: Tensor) -> Tensor:
        below = ((x >= -self.L) & (x < 0)).to(x.dtype) * (self.alpha / self.L)
        above = ((x >= 0) & (x <= self.R)).to(x.dtype) * (self.beta / self.R)
        return below + above

    def primitive(self, x: Tensor) -> Tensor:
        below = self.alpha * (x.clamp(-self.L, 0) + self.L) / self.L
        above = self.beta * x.clamp(0, self.R) / self.R
        return below + above

    @torch.no_grad()
    def calibrate(self, x: Tensor, q: float = 0.5) -> "AdaLi":
        """Set L, R, alpha, beta from a batch of centred potentials ``x = h - v_th`` (any shape).

        L (R) is the q-quantile of the distances below (above) threshold, clipped to
        [L_min, L_max] ([R_min, R_max]); alpha:beta is the ratio of potentials inside
        [-L, 0) and [0, R]. The result becomes the schedule's starting point.
        """
        if not 0 < q < 1:
            raise ValueError(f"AdaLi.calibrate: q must be in (0, 1), got {q}")
        x = x.detach().flatten().double()
        below, above = -x[x < 0], x[x >= 0]
        if below.numel() == 0 or above.numel() == 0:
            raise ValueError("AdaLi.calibrate: potentials must lie on both sides of the threshold")
        L = float(below.quantile(q).clamp(self.L_min, self.L_max))
        R = float(above.quantile(q).clamp(self.R_min, self.R_max))
        n_below = float((below <= L).sum())
        n_above = float((above <= R).sum())
        self.alpha = n_below / (n_below + n_above)
        self.beta = 1.0 - self.alpha
        self.L_max, self.R_max = L, R
        self.set_bounds(L, R)
        return self

    def config(self) -> dict:
        return {"name": "adali", "alpha": self.alpha, "beta": self.beta, "L": self.L_max,
                "R": self.R_max, "L_min": self.L_min, "R_min": self.R_min}


class MSG(Surrogate):
    """Masked surrogate gradient (Li, Zhao, Zhao, Zeng, 2024) around any ``base``.

    Backward: ``base.grad(x) * (1 - m)``, ``m ~ Bernoulli(p)`` drawn afresh per element
    at every backward from this module's own ``torch.Generator`` (seeded by ``seed``;
    its state is checkpointed through ``get_rng_state``/``set_rng_state``).
    ``rescale=True`` divides by ``1 - p`` so the expected gradient is unchanged.
    """

    def __init__(self, base: Surrogate | dict | None = None, p: float = 0.5,
                 rescale: bool = False, seed: int = 0) -> None:
        base = resolve(base)
        if not isinstance(base, Surrogate) or isinstance(base, MSG):
            raise ValueError(f"MSG: base must be a non-MSG surrogate, got {base!r}")
        super().__init__(base.spiking)
        if not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise ValueError(f"MSG: p must be in [0, 1), got {p!r}")
        self.base, self.p, self.rescale, self.seed = base, float(p), bool(rescale), int(seed)
        self._generators: dict[str, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """The mask generator for ``device`` (one per device, all seeded from ``seed``)."""
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._generators[key]

    def get_rng_state(self) -> dict[str, Tensor]:
        """Generator states by device name (uint8 tensors), for checkpoints."""
        return {k: g.get_state() for k, g in self._generators.items()}

    def set_rng_state(self, states: dict[str, Tensor]) -> None:
        """Restore what ``get_rng_state`` returned."""
        for key, state in states.items():
            self.generator(torch.device(key)).set_state(state.cpu())

    def grad(self, x: Tensor) -> Tensor:
        return self.base.grad(x)

    def primitive(self, x: Tensor) -> Tensor:
        return self.base.primitive(x)

    def mask(self, x: Tensor) -> Tensor:
        """A fresh keep-mask ``1 - m`` of ``x``'s shape and dtype."""
        keep = torch.empty_like(x).bernoulli_(1 - self.p, generator=self.generator(x.device))
        return keep / (1 - self.p) if self.rescale else keep

    def backward_grad(self, x: Tensor) -> Tensor:
        return self.base.backward_grad(x) * self.mask(x)

    def split_mask(self, x: Tensor) -> tuple[Surrogate, Tensor]:
        return self.base, self.mask(x)

    def stepper(self, seq_shape: torch.Size) -> Callable[[Tensor, int], Tensor]:
        shared: dict = {"shape": seq_shape}
        return lambda x, t: _SequenceMaskedSpike.apply(x, self, shared, t)

    def config(self) -> dict:
        return {"name": "msg", "p": self.p, "rescale": self.rescale, "seed": self.seed,
                "base": self.base.config()}


SURROGATES: Registry[Callable[..., Surrogate]] = Registry("surrogate")
for _name, _cls in {"rectangle": Rectangle, "triangle": Triangle, "sigmoid": Sigmoid, "atan": ATan,
                    "dspike": Dspike, "adali": AdaLi, "msg": MSG}.items():
    SURROGATES.register(_name, _cls)


def names() -> list[str]:
    """Every name ``create`` accepts (``SURROGATES.names()``)."""
    return SURROGATES.names()


def create(name: str, **kwargs: Any) -> Surrogate:
    """Build a registered surrogate (``SURROGATES``) by name with its keyword arguments."""
    factory = SURROGATES.get(name)
    try:
        return factory(**kwargs)
    except TypeError as err:
        raise ValueError(f"surrogate {str(name).lower()!r}: {err}") from None


def resolve(spec: Surrogate | str | dict | None) -> Surrogate:
    """A surrogate from what a user may write: an object (used as is), a name (``"atan"``,
    its defaults), a ``create`` dict (``{"name": "atan", "alpha": 2}``), or None (ATan, alpha 2)."""
    if spec is None:
        return ATan(alpha=2.0)
    if isinstance(spec, Surrogate):
        return spec
    if isinstance(spec, str):
        return create(spec)
    if isinstance(spec, dict) and "name" in spec:
        return create(**spec)
    raise ValueError(f"surrogate must be a Surrogate, a name or a dict with a 'name' (one of "
                     f"{', '.join(names())}) or None, got {spec!r}")
