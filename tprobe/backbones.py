"""DINOv2 backbones: the alias registry, real ``from_pretrained`` loading, and the token layout.

Hugging Face's ``last_hidden_state`` (already final-layernormed) is laid out as
``[CLS, R register tokens, P patch tokens]`` with ``R = config.num_register_tokens`` (4 for the
``-with-registers`` checkpoints, 0 otherwise); nothing here hard-codes R, the patch size or the
hidden size: they are read from the model's config.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tprobe.errors import TprobeError

__all__ = ["ALIASES", "ModelRef", "Backbone", "resolve_model", "pick_device"]

ALIASES = {
    "dinov2-small": "facebook/dinov2-small",
    "dinov2-base": "facebook/dinov2-base",
    "dinov2-large": "facebook/dinov2-large",
    "dinov2-giant": "facebook/dinov2-giant",
    "dinov2-small-reg": "facebook/dinov2-with-registers-small",
    "dinov2-base-reg": "facebook/dinov2-with-registers-base",
    "dinov2-large-reg": "facebook/dinov2-with-registers-large",
    "dinov2-giant-reg": "facebook/dinov2-with-registers-giant",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's own normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelRef:
    """What ``--model`` names, resolved: where to load from and the exact version for cache keys."""

    name: str  # as the user gave it
    source: str  # hub id or local directory passed to from_pretrained
    revision: str | None  # requested revision (hub only)
    resolved: str  # commit hash (hub) or content hash (local dir): the cache key's version
    config: object  # the transformers config

    @property
    def is_local(self) -> bool:
        return Path(self.source).is_dir()

    @property
    def slug(self) -> str:
        base = f"local--{Path(self.source).name}" if self.is_local else self.source.replace("/", "--")
        return f"{base}@{self.resolved[:12]}"

    @property
    def num_registers(self) -> int:
        return int(getattr(self.config, "num_register_tokens", 0) or 0)


def _hub_error(name: str, exc: Exception) -> TprobeError:
    aliases = ", ".join(ALIASES)
    if name not in ALIASES and "/" not in name:
        return TprobeError(
            f"model {name!r} is not a known alias, a hub id (owner/name) or a local directory; "
            f"aliases: {aliases}"
        )
    return TprobeError(
        f"model {name!r}: weights not reachable ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
        "the Hugging Face hub cannot be reached and they are not in the HF cache — download them "
        "where the hub is reachable (huggingface-cli download <id>) or pass --model /path/to/local/dir"
    )


def resolve_model(model: str, revision: str | None = None, *, offline: bool = False) -> ModelRef:
    """Resolve an alias, hub id or local directory to a :class:`ModelRef` (reads only the config)."""
    from transformers import AutoConfig

    source = ALIASES.get(model, model)
    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise TprobeError(f"{local}: no config.json; save the model with save_pretrained()")
        if revision:
            raise TprobeError(f"--revision {revision} applies to hub models, not {local}")
        config = AutoConfig.from_pretrained(local)
        resolved = _dir_hash(local)
        source = str(local.resolve())
    else:
        try:
            config = AutoConfig.from_pretrained(source, revision=revision, local_files_only=offline)
        except (OSError, ValueError) as exc:
            raise _hub_error(model, exc) from None
        resolved = getattr(config, "_commit_hash", None) or revision or "unknown"
    if getattr(config, "model_type", "") not in ("dinov2", "dinov2_with_registers"):
        raise TprobeError(
            f"model {model!r} is a {getattr(config, 'model_type', '?')!r} model; tprobe reads "
            "DINOv2 token layouts (model_type dinov2 or dinov2_with_registers)"
        )
    return ModelRef(model, source, revision, resolved, config)


def _dir_hash(folder: Path) -> str:
    """Content hash of a saved model directory (config + weights), for cache keys."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if f.suffix in (".json", ".safetensors", ".bin") and f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 22), b""):
                    h.update(block)
    return h.hexdigest()


def pick_device(device: str = "auto") -> torch.device:
    """``auto`` picks cuda, then mps, then cpu; anything else is checked and returned."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise TprobeError(f"--device {device!r} is not a device; use auto, cpu, cuda or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TprobeError("--device cuda asked for, but no CUDA GPU is visible; use --device cpu")
    return dev


class Backbone:
    """A loaded DINOv2 model with its token layout and input normalisation.

    ``Backbone.from_pretrained(name_or_path, revision=...)`` follows Hugging Face's conventions:
    aliases (see ``ALIASES``), hub ids, local directories, the HF cache and ``HF_HUB_OFFLINE``.
    """

    def __init__(self, model: torch.nn.Module, ref: ModelRef, mean, std, device: torch.device):
        self.model = model
        self.ref = ref
        self.device = device
        cfg = ref.config
        self.hidden_size = int(cfg.hidden_size)
        self.patch_size = int(cfg.patch_size)
        self.num_registers = ref.num_registers
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def from_pretrained(
        cls,
        model: str | ModelRef,
        revision: str | None = None,
        *,
        device: str = "auto",
        offline: bool = False,
        attn_implementation: str = "sdpa",
    ) -> Backbone:
        """Load weights (real ``from_pretrained``); ``attn_implementation='eager'`` for attention maps."""
        from transformers import AutoModel

        ref = model if isinstance(model, ModelRef) else resolve_model(model, revision, offline=offline)
        try:
            net = AutoModel.from_pretrained(
                ref.source,
                revision=ref.revision,
                local_files_only=offline or ref.is_local,
                attn_implementation=attn_implementation,
            )
        except (OSError, ValueError) as exc:
            raise _hub_error(ref.name, exc) from None
        mean, std = _normalisation(ref, offline)
        dev = pick_device(device)
        return cls(net.eval().to(dev), ref, mean, std, dev)

    def grid(self, side: int) -> int:
        """Patches per side for a square input of ``side`` pixels."""
        if side % self.patch_size:
            raise TprobeError(
                f"canvas {side} px is not a multiple of the patch size {self.patch_size}; "
                f"set --canvas to {-(-side // self.patch_size) * self.patch_size}"
            )
        return side // self.patch_size

    def pixel_values(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, H, W) grey in [0, 1] -> (B, 3, H, W) normalised with the backbone's mean/std."""
        x = torch.as_tensor(images, dtype=torch.float32)
        x = x.unsqueeze(1).expand(-1, 3, -1, -1)
        return (x - self._mean.to(x.device)) / self._std.to(x.device)

    def split(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``last_hidden_state`` -> (cls (B,D), registers (B,R,D), patches (B,P,D))."""
        r = self.num_registers
        return hidden[:, 0], hidden[:, 1 : 1 + r], hidden[:, 1 + r :]

    def __call__(self, pixel_values: torch.Tensor, **kw):
        return self.model(pixel_values=pixel_values, **kw)


def _normalisation(ref: ModelRef, offline: bool) -> tuple[tuple, tuple]:
    """The checkpoint's image processor mean/std when it ships one, else DINOv2's ImageNet values."""
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(ref.source, revision=ref.revision, local_files_only=True)
        return tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, KeyError, TypeError):
        return IMAGENET_MEAN, IMAGENET_STD
