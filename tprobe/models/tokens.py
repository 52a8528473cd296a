"""The token layout of a ViT's ``last_hidden_state`` and the one pooling function, in one place.

Hugging Face DINOv2 models return ``[CLS, R register tokens, P patch tokens]`` (already
final-layernormed), with ``R = config.num_register_tokens`` (4 for the ``-with-registers``
checkpoints, 0 otherwise). :class:`TokenLayout` splits that sequence; :func:`pool_tokens` pools the
three parts for the store reader (numpy, chunk by chunk) and the fine-tune head (torch) alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from tprobe.errors import TprobeError

__all__ = [
    "TokenLayout",
    "pool_tokens",
    "POOLS",
    "TOKENS",
    "check_pool",
    "LAYER_POOLS",
    "is_pool",
    "pool_layer",
    "pool_needs",
    "pool_layered",
    "check_layered_pool",
    "pool_layers",
]

POOLS = ("cls", "mean", "registers", "cls+mean", "concat")
# pools over a store's layer axis (``tprobe extract --layers``): ``cls@<layer>`` (one block's CLS, e.g. cls@-4)
# and ``last4`` (DINOv2's linear evaluation: CLS of the last 4 blocks, then the last block's mean patch token)
LAYER_POOLS = ("cls@<layer>", "last4")
LAST4 = (-4, -3, -2, -1)
TOKENS = ("cls", "registers", "patches")
# the token arrays each pool reads
POOL_NEEDS = {
    "cls": ("cls",),
    "mean": ("patches",),
    "registers": ("registers",),
    "cls+mean": ("cls", "patches"),
    "concat": TOKENS,
}


def pool_layer(pool: str) -> int | None:
    """``cls@-4`` -> -4; None for every other pool."""
    if isinstance(pool, str) and pool.startswith("cls@"):
        try:
            return int(pool[4:])
        except ValueError:
            return None
    return None


def pool_layers(pool: str) -> tuple[int, ...]:
    """The CLS layers ``pool`` reads: (-4, -3, -2, -1) for ``last4``, (l,) for ``cls@l``, (-1,) otherwise."""
    layer = pool_layer(pool)
    return LAST4 if pool == "last4" else (layer,) if layer is not None else (-1,)


def is_pool(pool: str) -> bool:
    """One of :data:`POOLS`, ``last4`` or ``cls@<integer layer>``."""
    return pool in POOLS or pool == "last4" or pool_layer(pool) is not None


def pool_needs(pool: str) -> tuple[str, ...]:
    """The token arrays ``pool`` reads."""
    if pool == "last4":
        return ("cls", "patches")
    return ("cls",) if pool_layer(pool) is not None else POOL_NEEDS[pool]


def _layer_line(pool: str, want, held, what: str) -> str:
    return (
        f"pool {pool!r} needs the {what} of layer(s) {', '.join(map(str, want))}, but the store holds "
        f"layer(s) {', '.join(map(str, held))}; re-extract with --layers {','.join(map(str, sorted(set(held) | set(want))))}"
        if what == "CLS"
        else f"pool {pool!r} needs the patch tokens of layer -1, but the store holds patches of layer(s) "
        f"{', '.join(map(str, held))}; re-extract with --patch-layers -1"
    )


def check_pool_name(pool: str, where: str = "", *, also: tuple[str, ...] = ()) -> None:
    """Refuse a name that is no pool at all (:func:`is_pool`) nor one of ``also`` (more names a caller
    takes, listed in the message); ``where`` prefixes the message."""
    if not is_pool(pool) and pool not in also:
        raise TprobeError(f"{where}pool {pool!r} is not one of {', '.join(POOLS + LAYER_POOLS + also)}")


def check_layered_pool(pool: str, registers: int, layers=(-1,), patch_layers=(-1,)) -> None:
    """Refuse (one line naming the fix) a pool the stored layers cannot give; ``layers`` holds the
    CLS/register layers, ``patch_layers`` the patch layers (negative indices, -1 = the last block)."""
    check_pool_name(pool)
    layer = pool_layer(pool)
    want = LAST4 if pool == "last4" else (layer,) if layer is not None else (-1,)
    if set(pool_needs(pool)) - {"patches"} and any(w not in layers for w in want):
        raise TprobeError(_layer_line(pool, want, layers, "CLS"))
    if pool in ("mean", "cls+mean", "concat", "last4") and -1 not in patch_layers:
        raise TprobeError(_layer_line(pool, (-1,), patch_layers, "patches"))
    if layer is None and pool != "last4":
        check_pool(pool, registers)


def pool_layered(cls, registers, patches, pool: str, layers=(-1,), patch_layers=(-1,)):
    """:func:`pool_tokens` on arrays with a layer axis after the rows: ``cls (n, L, D)``,
    ``registers (n, L, R, D)``, ``patches (n, Lp, P, D)``, their layers named by ``layers`` /
    ``patch_layers``. ``cls@<l>`` is layer l's CLS; ``last4`` concatenates the CLS of layers -4, -3, -2, -1
    and the mean patch token of layer -1 (DINOv2's linear evaluation); every other pool is taken on layer -1.
    """
    layers, patch_layers = list(layers), list(patch_layers)
    if pool == "last4":
        parts = [cls[:, layers.index(i)] for i in LAST4] + [patches[:, patch_layers.index(-1)].mean(1)]
        return np.concatenate(parts, 1) if isinstance(cls, np.ndarray) else __import__("torch").cat(parts, 1)
    layer = pool_layer(pool)
    if layer is not None:
        return cls[:, layers.index(layer)]

    def last(a, names):
        return None if a is None else a[:, names.index(-1)]

    return pool_tokens(last(cls, layers), last(registers, layers), last(patches, patch_layers), pool)


@dataclass(frozen=True)
class TokenLayout:
    """``hidden`` width, ``registers`` (R) and the ``grid`` x ``grid`` patch tokens after them."""

    hidden: int
    registers: int
    grid: int

    @property
    def patches(self) -> int:
        return self.grid * self.grid

    @property
    def patch_start(self) -> int:
        """Index of the first patch token in ``last_hidden_state``."""
        return 1 + self.registers

    def split(self, hidden):
        """``last_hidden_state`` (..., 1+R+P, D) -> (cls (..., D), registers (..., R, D), patches (..., P, D)).

        Leading axes are kept: (B, T, D) for one image per row, (B, C, T, D) with a channel axis.
        """
        r = self.registers
        return hidden[..., 0, :], hidden[..., 1 : 1 + r, :], hidden[..., 1 + r :, :]

    def width(self, pool: str) -> int:
        """Feature width of ``pool``."""
        check_pool(pool, self.registers)
        d = self.hidden
        if pool_layer(pool) == -1:
            return d
        return {
            "cls": d,
            "mean": d,
            "registers": d,
            "cls+mean": 2 * d,
            "concat": (1 + self.registers + self.patches) * d,
        }[pool]

    def to_dict(self) -> dict:
        return asdict(self)


def check_pool(pool: str, registers: int) -> None:
    """Refuse a pool of the last block's tokens that is unknown, or needs registers the model lacks
    (``cls@-1`` is ``cls``; other layers need a store with a layer axis: :func:`check_layered_pool`)."""
    if pool_layer(pool) is not None or pool == "last4":
        if pool_layer(pool) == -1:
            return
        raise TprobeError(
            f"pool {pool!r} needs tokens of other layers than the last; extract a store with "
            f"--layers {'-4,-3,-2,-1' if pool == 'last4' else f'{pool_layer(pool)},-1'} and probe it"
        )
    if pool not in POOLS:
        raise TprobeError(f"pool {pool!r} is not one of {', '.join(POOLS)}")
    if pool == "registers" and not registers:
        raise TprobeError(
            "pool 'registers': the model has no register tokens; use a -reg model or another pool"
        )


def pool_tokens(cls, registers, patches, pool: str):
    """Pool one batch of tokens into one vector per row (numpy arrays or torch tensors).

    ``cls`` the CLS token; ``mean`` the patch mean (registers excluded); ``registers`` the register
    mean; ``cls+mean``; ``concat`` CLS, registers and every patch token, flattened in that order.
    """
    check_pool(pool, 0 if registers is None else registers.shape[1])
    first = next(
        t for t in (cls, registers, patches) if t is not None
    )  # cls is None when a pool needs no CLS
    if isinstance(first, np.ndarray):
        cat = np.concatenate
    else:
        import torch

        cat = torch.cat
    if pool == "cls" or pool_layer(pool) == -1:
        return cls
    if pool == "mean":
        return patches.mean(1)
    if pool == "registers":
        return registers.mean(1)
    if pool == "cls+mean":
        return cat([cls, patches.mean(1)], 1)
    n = cls.shape[0]
    parts = [cls] + [t.reshape(n, -1) for t in (registers, patches) if t is not None and t.shape[1]]
    return cat(parts, 1)
