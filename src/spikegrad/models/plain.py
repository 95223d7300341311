"""``plain-N``: a deep non-residual spiking CNN, the net where gradients vanish first."""
from __future__ import annotations

from .base import Body, Context, conv_net

__all__ = ["DEPTHS", "WIDTHS", "plain", "split_depth"]

DEPTHS = range(8, 41)
WIDTHS = (64, 128, 256)


def split_depth(depth: int) -> list[int]:
    """``depth`` convs over the three stages as evenly as possible, earlier stages taking the remainder."""
    base, rest = divmod(depth, len(WIDTHS))
    return [base + (i < rest) for i in range(len(WIDTHS))]


def plain(ctx: Context, depth: int) -> Body:
    """``depth`` 3x3 convs in stages of widths 64-128-256 (stride 2 opening stages 2 and 3)."""
    if depth not in DEPTHS:
        raise ValueError(f"plain-N needs N in {DEPTHS.start}..{DEPTHS.stop - 1}, got {depth}")
    sizes = split_depth(depth)
    return conv_net(ctx, [[w] * n for w, n in zip(WIDTHS, sizes)], downsample="stride")
