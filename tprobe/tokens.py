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

__all__ = ["TokenLayout", "pool_tokens", "POOLS", "TOKENS", "check_pool"]

POOLS = ("cls", "mean", "registers", "cls+mean", "concat")
TOKENS = ("cls", "registers", "patches")
# the token arrays each pool reads
POOL_NEEDS = {"cls": ("cls",), "mean": ("patches",), "registers": ("registers",),
              "cls+mean": ("cls", "patches"), "concat": TOKENS}  # fmt: skip


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
        return {"cls": d, "mean": d, "registers": d, "cls+mean": 2 * d,
                "concat": (1 + self.registers + self.patches) * d}[pool]  # fmt: skip

    def to_dict(self) -> dict:
        return asdict(self)


def check_pool(pool: str, registers: int) -> None:
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
    if pool == "cls":
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
