"""Where a fine-tuned model looks: input-gradient saliency and last-layer CLS attention.

- ``gradient``: |d logit / d pixel|;
- ``grad_x_input``: |gradient x pixel| (zero on the padding, by construction);
- ``attention``: mean over heads of the last layer's CLS-to-patch attention, upsampled to pixels
  (needs ``attn_implementation="eager"``; SDPA returns no attention weights).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import torch

from tprobe.data.preprocess import PreprocessConfig, load_view

__all__ = ["saliency_maps", "saliency_grid"]


def saliency_maps(model, images: np.ndarray) -> dict[str, np.ndarray]:
    """Maps of shape (B, H, W) for a DinoClassifier and grey (B, H, W) or RGB (B, 3, H, W) images in [0, 1].

    With RGB input the gradient maps are summed over the channels.
    """
    dev = next(model.parameters()).device
    x = torch.as_tensor(images, dtype=torch.float32, device=dev).requires_grad_(True)
    model.eval()
    model.encoder.set_attn_implementation("eager")
    logit, attentions = model(x, output_attentions=True)
    (grad,) = torch.autograd.grad(logit.sum(), x)
    side = images.shape[-1]
    layout = model.backbone.layout(side)
    g = layout.grid
    att = attentions[-1][:, :, 0, layout.patch_start :].mean(1).reshape(-1, g, g).detach().cpu().numpy()
    scale = side // g
    att = np.kron(att, np.ones((scale, scale), dtype=att.dtype))
    grad = grad.detach().cpu().numpy()
    axis = (1,) if grad.ndim == 4 else ()
    return {
        "gradient": np.abs(grad).sum(axis),
        "grad_x_input": np.abs(grad * images).sum(axis),
        "attention": att,
        "p_activated": torch.sigmoid(logit).detach().cpu().numpy(),
    }


def _crop(a: np.ndarray, size: int) -> np.ndarray:
    c0 = (a.shape[-1] - size) // 2
    return a[..., c0 : c0 + size, c0 : c0 + size]


@matplotlib.rc_context({"text.parse_math": False})  # a $ in a name is text, not mathtext
def saliency_grid(
    model,
    rows: pd.DataFrame,
    prep: PreprocessConfig,
    out: str | Path,
    *,
    title: str = "",
    threshold: float = 0.5,
) -> Path:
    """A PNG grid: one column per image (title: true class, p(activated), the call; a wrong call framed in
    red), rows image / |gradient| / |gradient x input| / CLS attention, each map scaled to its own maximum
    (one colour bar, 0-1)."""
    import matplotlib.pyplot as plt

    images = np.stack([load_view(p, v, prep) for p, v in zip(rows["path"], rows["view"], strict=True)])
    maps = saliency_maps(model, images)
    images = images.mean(1) if images.ndim == 4 else images  # RGB shown as its mean intensity
    size = int(min(prep.canvas, max(28, 8 + rows[["height", "width"]].to_numpy().max())))
    n = len(rows)
    fig, axes = plt.subplots(4, n, figsize=(1.55 * n + 1.6, 7.0), squeeze=False)
    names = {
        "image": "image",
        "gradient": "|gradient|",
        "grad_x_input": "|gradient x input|",
        "attention": "CLS attention\n(last layer)",
    }
    shown = None
    for j in range(n):
        p = float(maps["p_activated"][j])
        truth = rows["label"].iloc[j] == 1
        wrong = (p >= threshold) != truth
        for i, name in enumerate(names):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(wrong)
                spine.set_color("firebrick")
                spine.set_linewidth(2.5)
            if name == "image":
                ax.imshow(_crop(images[j], size), cmap="gray")
                call = "WRONG call" if wrong else "right call"
                ax.set_title(
                    f"true: {'activated' if truth else 'quiescent'}\np(activated)={p:.2f}\n{call}",
                    fontsize=6.5,
                    color="firebrick" if wrong else "black",
                )
            else:
                m = _crop(maps[name][j], size)
                m = m / m.max() if m.max() > 0 else m
                ax.imshow(_crop(images[j], size), cmap="gray")
                shown = ax.imshow(m, cmap="inferno", alpha=0.6, vmin=0, vmax=1)
            if j == 0:
                ax.set_ylabel(names[name], fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.9, 1))
    if shown is not None:
        cax = fig.add_axes((0.92, 0.1, 0.015, 0.55))
        bar = fig.colorbar(shown, cax=cax)
        bar.set_label("saliency, scaled to each map's maximum", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    fig.text(
        0.5,
        0.005,
        f"red frame = wrong call (p(activated) >= {threshold:g} calls activated)",
        ha="center",
        va="bottom",
        fontsize=7,
        color="firebrick",
    )
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(out)
