"""Randomly initialised ViTs (DINOv2, DINOv3, ViT, ViT-MSN) saved locally, and a synthetic multi-channel
16-bit copy of the bundled sample, for tests, benchmarks and demos.

The models load through the same ``from_pretrained`` path as hub checkpoints. Their features are
random projections, not DINOv2's: use them to check plumbing and speed, never for results. The
multi-channel images are derived from the real NAD(P)H images; their extra channels carry no new
biology.
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "save_random_dinov2",
    "save_random_vit",
    "make_multichannel",
    "SHAPES",
    "VIT_TYPES",
    "SYNTHETIC_CHANNELS",
]

# hidden, layers, heads: "small" is the real ViT-S/14 shape (same compute as dinov2-small)
# "tiny-deep": tiny with 4 blocks, so tests can take layers -1 to -4 (last4)
# "blockless-small": ViT-S token width with no transformer blocks, so benchmarks see the data path alone
SHAPES = {
    "tiny": (32, 2, 2),
    "tiny-deep": (32, 4, 2),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "blockless-small": (384, 0, 6),
}


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
    common = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        patch_size=14,
        image_size=518,
        mlp_ratio=4,
    )
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
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
        do_resize=False,
        do_center_crop=False,
    ).save_pretrained(path)
    return path


# model_type -> (patch size, image size, registers): each family's hub shape; registers only where it has them
VIT_TYPES = {
    "dinov2": (14, 518, 0),
    "dinov2_with_registers": (14, 518, 4),
    "dinov3_vit": (16, 224, 4),
    "vit": (16, 224, 0),
    "vit_msn": (16, 224, 0),
}


def save_random_vit(
    path: str | Path,
    *,
    model_type: str = "dinov3_vit",
    shape: str = "tiny",
    registers: int | None = None,
    seed: int = 0,
    image_mean=(0.485, 0.456, 0.406),
    image_std=(0.229, 0.224, 0.225),
) -> Path:
    """Build a random ViT of ``model_type`` (see :data:`VIT_TYPES`) in its hub checkpoints' shape and save it.

    DINOv2 keeps patch 14 / image 518 (the config's own defaults are 16 / 224), DINOv3 has patch 16
    and 4 registers; ``registers`` overrides the register count of the types that have registers.
    ``image_mean`` / ``image_std`` go into ``preprocessor_config.json``.
    """
    import torch
    from transformers import AutoConfig, AutoModel, BitImageProcessor

    if model_type not in VIT_TYPES:
        raise ValueError(f"model_type {model_type!r} is not one of {', '.join(VIT_TYPES)}")
    if model_type in ("dinov2", "dinov2_with_registers"):
        return save_random_dinov2(
            path,
            shape=shape,
            seed=seed,
            registers=(4 if registers is None else registers) if model_type.endswith("registers") else 0,
        )
    hidden, layers, heads = SHAPES[shape]
    patch, image, regs = VIT_TYPES[model_type]
    kw = dict(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        patch_size=patch,
        image_size=image,
    )
    if model_type == "dinov3_vit":
        kw["num_register_tokens"] = regs if registers is None else registers
    torch.manual_seed(seed)
    model = AutoModel.from_config(AutoConfig.for_model(model_type, **kw))
    model.config.tprobe_random_init = True
    path = Path(path)
    model.save_pretrained(path)
    BitImageProcessor(
        image_mean=list(image_mean), image_std=list(image_std), do_resize=False, do_center_crop=False
    ).save_pretrained(path)
    return path


SYNTHETIC_CHANNELS = ("nadh", "fad", "mask")
# the camera range of each synthetic channel: 12-bit NAD(P)H and FAD, a 16-bit mask
SYNTHETIC_MAX = {"nadh": 4095, "fad": 4095, "mask": 65535}


def make_multichannel(
    out: str | Path,
    *,
    source: str | Path | None = None,
    layout: str = "chw",
    donors=None,
    per_class: int | None = None,
) -> Path:
    """Write a 3-channel 16-bit copy of the sample (``donor_N/<class>/`` folders) under ``out``.

    Channels (:data:`SYNTHETIC_CHANNELS`): ``nadh`` the real 8-bit image on a 12-bit scale (x 16),
    ``fad`` a blurred, dimmer copy (a second channel correlated with the cell), ``mask`` the
    above-threshold cell mask at 65535 (a segmentation channel). ``layout``: ``chw`` or ``hwc`` TIFF
    stacks, or ``files`` (one TIFF per channel, ``<stem>_<channel>.tif``). ``donors`` (folder names,
    e.g. ``("donor_1", "donor_2")``) and ``per_class`` take a subset (default: everything).
    """
    import numpy as np
    import tifffile
    from PIL import Image
    from scipy.ndimage import uniform_filter

    from tprobe.data.dataset import DEFAULT_DATA

    if layout not in ("chw", "hwc", "files"):
        raise ValueError(f"layout {layout!r} is not one of chw, hwc, files")
    source, out = Path(source or DEFAULT_DATA), Path(out)
    for donor_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        if donors is not None and donor_dir.name not in {str(d) for d in donors}:
            continue
        for cls_dir in sorted(p for p in donor_dir.iterdir() if p.is_dir()):
            files = sorted(cls_dir.glob("*.png"))[:per_class]
            (out / donor_dir.name / cls_dir.name).mkdir(parents=True, exist_ok=True)
            for f in files:
                img = np.asarray(Image.open(f)).astype(np.uint16)
                planes = {
                    "nadh": img * 16,
                    "fad": (uniform_filter(img.astype(np.float32), 3) * 6).astype(np.uint16),
                    "mask": np.where(img > 20, 65535, 0).astype(np.uint16),
                }
                stem = out / donor_dir.name / cls_dir.name / f.stem
                if layout == "files":
                    for name, plane in planes.items():
                        tifffile.imwrite(f"{stem}_{name}.tif", plane, photometric="minisblack")
                    continue
                stack = np.stack([planes[c] for c in SYNTHETIC_CHANNELS])
                if layout == "chw":  # three pages, as ImageJ and most acquisition software write stacks
                    tifffile.imwrite(f"{stem}.tif", stack, photometric="minisblack")
                else:  # interleaved samples
                    tifffile.imwrite(f"{stem}.tif", np.moveaxis(stack, 0, -1), photometric="rgb")
    if not out.exists():
        raise ValueError(
            f"donors {donors!r} matched no donor folder of {source} (they are folder names, e.g. 'donor_1')"
        )
    license_file = source / "LICENSE"
    if license_file.exists():
        (out / "LICENSE").write_text(license_file.read_text())
    return out
