#!/usr/bin/env python
"""Benchmark: `tprobe extract` vs a naive per-image loop, with FLOPs and achieved GFLOP/s.

Uses a randomly initialised model of the real ViT-S/14-with-registers shape (same compute as
facebook/dinov2-with-registers-small), or of DINOv3's ViT-S/16 with --model-type dinov3_vit (canvas
140 rounded to 144), on the first N kept views of the bundled sample, so it runs
offline. Prints one table; nothing here is a test.

    python scripts/bench_extract.py                 # 192 views, batch sizes 1/16/64, fp32
    python scripts/bench_extract.py --n 384 --bf16  # add bf16 and bf16 + torch.compile rows
    python scripts/bench_extract.py --model-type dinov3_vit   # ViT-S/16 DINOv3 shape, canvas 144
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def matmul_peak(dtype=torch.float32, n=2048, seconds=2.0) -> float:
    """Measured GFLOP/s of a square matmul on this machine."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def flops_per_image(model, side: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(pixel_values=torch.zeros(1, 3, side, side))
    return counter.get_total_flops()


def naive_loop(model_dir: Path, kept, config) -> float:
    """HF image processor + one model call per image: what a first script usually does."""
    from transformers import AutoImageProcessor, AutoModel

    from tprobe.data.preprocess import load_view

    proc = AutoImageProcessor.from_pretrained(model_dir, do_resize=False, do_center_crop=False)
    model = AutoModel.from_pretrained(model_dir).eval()
    t0 = time.perf_counter()
    for path, view in zip(kept["path"], kept["view"], strict=True):
        grey = (load_view(path, view, config) * 255).astype(np.uint8)
        inputs = proc(Image.fromarray(grey).convert("RGB"), return_tensors="pt")
        with torch.no_grad():
            model(**inputs).last_hidden_state.numpy()
    return len(kept) / (time.perf_counter() - t0)


def tprobe_rate(model_dir: Path, pre, **kw) -> float:
    from tprobe.cache.extract import extract
    from tprobe.models.backbones import Backbone

    backbone = Backbone.from_pretrained(str(model_dir), device="cpu")
    with tempfile.TemporaryDirectory() as cache:
        res = extract(pre, backbone, cache=cache, progress=False, **kw)
    return res.images_per_s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=192, help="views to extract per row")
    ap.add_argument("--bf16", action="store_true", help="add bf16 and bf16+compile rows")
    ap.add_argument(
        "--model-type",
        default="dinov2_with_registers",
        choices=["dinov2_with_registers", "dinov2", "dinov3_vit"],
        help="random ViT-S of this type; dinov3_vit: patch 16, canvas 144",
    )
    args = ap.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    from tprobe.data.dataset import discover
    from tprobe.data.preprocess import PreprocessConfig, preprocess
    from tprobe.models.backbones import round_canvas
    from tprobe.testing import VIT_TYPES, save_random_vit

    patch = VIT_TYPES[args.model_type][0]
    pre = preprocess(discover(), PreprocessConfig(canvas=round_canvas(PreprocessConfig().canvas, patch)))
    pre.manifest = pre.manifest[pre.manifest["kept"]].head(args.n).reset_index(drop=True)
    side = pre.config.canvas
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_random_vit(Path(tmp) / "vit-s", model_type=args.model_type, shape="small")
        from transformers import AutoModel

        gflop = flops_per_image(AutoModel.from_pretrained(model_dir).eval(), side) / 1e9
        peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16) if args.bf16 else None
        print(
            f"threads {torch.get_num_threads()}, {args.n} views of {side}x{side}, ViT-S/{patch} {args.model_type} shape: "
            f"{gflop:.2f} GFLOP/image; matmul peak fp32 {peak32:.0f} GFLOP/s"
            + (f", bf16 {peak16:.0f} GFLOP/s" if peak16 else "")
        )
        naive = naive_loop(model_dir, pre.kept, pre.config)
        rows = [("naive loop (HF processor, 1 image/call)", "fp32", 1, naive, peak32)]
        for bs in (1, 16, 64):
            rows.append(
                (
                    "tprobe extract",
                    "fp32",
                    bs,
                    tprobe_rate(model_dir, pre, batch_size=bs, chunk_rows=64),
                    peak32,
                )
            )
        if args.bf16:
            rows.append(
                (
                    "tprobe extract",
                    "bf16",
                    16,
                    tprobe_rate(model_dir, pre, batch_size=16, precision="bf16"),
                    peak16,
                )
            )
            t0 = time.perf_counter()  # first call compiles; the timed call reuses the compiled graph
            tprobe_rate(model_dir, pre, batch_size=16, precision="bf16", compile=True)
            print(
                f"torch.compile warm-up (compile + {len(pre.kept)} views): {time.perf_counter() - t0:.0f} s"
            )
            rate = tprobe_rate(model_dir, pre, batch_size=16, precision="bf16", compile=True)
            rows.append(("tprobe extract --compile (after warm-up)", "bf16", 16, rate, peak16))
    print(
        f"{'path':48s} {'prec':5s} {'batch':>5s} {'img/s':>7s} {'GFLOP/s':>8s} {'% peak':>7s} {'x naive':>7s}"
    )
    for name, prec, bs, rate, peak in rows:
        print(
            f"{name:48s} {prec:5s} {bs:5d} {rate:7.1f} {rate * gflop:8.1f} {100 * rate * gflop / peak:6.0f}% "
            f"{rate / naive:7.2f}"
        )


if __name__ == "__main__":
    main()
