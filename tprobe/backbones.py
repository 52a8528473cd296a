"""DINOv2 backbones: the alias registry, real ``from_pretrained`` loading, and model identity.

The token layout (:class:`tprobe.tokens.TokenLayout`) is read from the model's config: nothing here
hard-codes the register count, the patch size or the hidden size.

Model identity is content, never a label: a hub model is keyed by the commit its Hugging Face cache
snapshot resolves to (``refs/<revision>`` -> ``snapshots/<commit>``), and its weights are then loaded
from exactly that commit; a local folder is keyed by a hash of its config and weight files. An
identity that cannot be resolved is an error.
"""

from __future__ import annotations

import hashlib
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tprobe.errors import TprobeError
from tprobe.tokens import TokenLayout

__all__ = ["ALIASES", "ModelRef", "Backbone", "resolve_model", "pick_device"]
log = logging.getLogger(__name__)

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
    def load_revision(self) -> str | None:
        """What ``from_pretrained`` loads: the resolved commit of a hub model, so weights match the key."""
        return None if self.is_local else self.resolved

    @property
    def random_init(self) -> bool:
        """True for models saved by :func:`tprobe.testing.save_random_dinov2` (random weights)."""
        return bool(getattr(self.config, "tprobe_random_init", False))

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
    hub_id = ALIASES.get(name, name)
    return TprobeError(
        f"model {name!r}: weights not reachable ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
        f"the Hugging Face hub cannot be reached and they are not in the HF cache — download them where "
        f"the hub is reachable (`hf download {hub_id}`) or pass --model /path/to/local/dir "
        "(to check the pipeline offline, see the README's random-model check)"
    )


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick request to the hub endpoint, so an unreachable hub fails in seconds, not minutes."""
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # the server answered
    except (OSError, ValueError):
        return False
    return True


def _snapshot_commit(source: str, revision: str | None) -> str:
    """The commit that the HF cache resolves ``revision`` (default main) of ``source`` to."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source, "config.json", revision=revision)
    if not isinstance(found, str):
        raise TprobeError(
            f"model {source!r}: cannot resolve revision {revision or 'main'!r} to a snapshot commit in the HF "
            f"cache; run `hf download {source}` (with --revision) where the hub is reachable, or pass a local folder"
        )
    return Path(found).parent.name


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
        if "/" not in source:
            raise _hub_error(model, FileNotFoundError(source))
        forced = False
        if not offline:
            log.info("contacting the Hugging Face hub for %s ...", source)
            forced = offline = not _hub_reachable()
        try:
            config = AutoConfig.from_pretrained(source, revision=revision, local_files_only=offline)
        except (OSError, ValueError) as exc:
            raise _hub_error(model, exc) from None
        resolved = _snapshot_commit(source, revision)
        if forced:
            log.info("hub unreachable: using the cached snapshot %s", resolved[:12])
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
                revision=ref.load_revision,
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

    def layout(self, side: int) -> TokenLayout:
        """The token layout of a square input of ``side`` pixels."""
        return TokenLayout(self.hidden_size, self.num_registers, self.grid(side))

    @contextmanager
    def fixed_canvas(self, side: int):
        """Within the block, the position embeddings are interpolated to ``side`` once, not on every call.

        HF DINOv2 re-interpolates its 37 x 37 position grid (bicubic) on every forward for any other
        input size; the cached result is the same tensor, so outputs are bit-identical. The original
        parameter is restored on exit.
        """
        emb = getattr(self.model, "embeddings", None)
        original = getattr(emb, "position_embeddings", None)
        if original is None or not hasattr(emb, "interpolate_pos_encoding") or self.model.training:
            yield self
            return
        g = self.grid(side)
        with torch.no_grad():
            dummy = torch.zeros(1, 1 + g * g, self.hidden_size, dtype=original.dtype, device=original.device)
            cached = emb.interpolate_pos_encoding(dummy, side, side).detach().clone()
        emb.position_embeddings = torch.nn.Parameter(cached, requires_grad=False)
        try:
            yield self
        finally:
            emb.position_embeddings = original

    def pixel_values(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, H, W) grey in [0, 1] -> (B, 3, H, W) normalised with the backbone's mean/std."""
        x = torch.as_tensor(images, dtype=torch.float32)
        x = x.unsqueeze(1).expand(-1, 3, -1, -1)
        return (x - self._mean.to(x.device)) / self._std.to(x.device)

    def __call__(self, pixel_values: torch.Tensor, **kw):
        return self.model(pixel_values=pixel_values, **kw)


def _normalisation(ref: ModelRef, offline: bool) -> tuple[tuple, tuple]:
    """The checkpoint's image processor mean/std when it ships one, else DINOv2's ImageNet values."""
    from transformers import AutoImageProcessor

    try:
        proc = AutoImageProcessor.from_pretrained(
            ref.source, revision=ref.load_revision, local_files_only=True
        )
        return tuple(proc.image_mean), tuple(proc.image_std)
    except (OSError, ValueError, KeyError, TypeError):
        return IMAGENET_MEAN, IMAGENET_STD
