"""Randomly initialised DINOv2 models saved locally, for tests, benchmarks and offline demos.

They load through the same ``from_pretrained`` path as hub checkpoints. Their features are
random projections, not DINOv2's: use them to check plumbing and speed, never for results.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["save_random_dinov2", "SHAPES"]

# hidden, layers, heads: "small" is the real ViT-S/14 shape (same compute as dinov2-small)
# "blockless-small": ViT-S token width with no transformer blocks, so benchmarks see the data path alone
SHAPES = {"tiny": (32, 2, 2), "small": (384, 12, 6), "base": (768, 12, 12), "blockless-small": (384, 0, 6)}


def save_random_dinov2(path: str | Path, *, shape: str = "tiny", registers: int = 4, seed: int = 0) -> Path:
    """Build a random DINOv2 (with ``registers`` register tokens; 0 = plain DINOv2) and save it."""
    import torch
    from transformers import (
        BitImageProcessor,
        Dinov2Config,
        Dinov2Model,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )

    hidden, layers, heads = SHAPES[shape]
    # the hub checkpoints use patch 14 / image 518; the configs' own defaults (16 / 224) do not
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  patch_size=14, image_size=518, mlp_ratio=4)  # fmt: skip
    torch.manual_seed(seed)
    if registers:
        config = Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        model = Dinov2WithRegistersModel(config)
    else:
        model = Dinov2Model(Dinov2Config(**common))
    # recorded in config.json, so stores, runs and reports can mark results as plumbing checks
    model.config.tprobe_random_init = True
    path = Path(path)
    model.save_pretrained(path)
    BitImageProcessor(
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
        do_resize=False, do_center_crop=False,
    ).save_pretrained(path)  # fmt: skip
    return path
