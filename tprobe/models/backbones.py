"""ViT backbones (DINOv2, DINOv3, ViT, ViT-MSN): the alias registry, real ``from_pretrained`` loading,
and model identity.

tprobe reads any Hugging Face vision transformer whose ``last_hidden_state`` is ``[CLS, R register
tokens, patch grid]`` (:data:`LAYOUT_TYPES`). The token layout (:class:`tprobe.models.tokens.TokenLayout`)
is read from the model's config: nothing here hard-codes the register count
(``num_register_tokens``), the patch size or the hidden size. Other models are refused by
:func:`resolve_model` with one line naming what their output lacks.

Model identity is content, never a label: a hub model is keyed by the commit its Hugging Face cache
snapshot resolves to (``refs/<revision>`` -> ``snapshots/<commit>``), and its weights are then loaded
from exactly that commit; a local folder is keyed by a hash of its config and weight files. An
identity that cannot be resolved is an error.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import pickle
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tprobe.errors import TprobeError
from tprobe.models import dinov2_torch
from tprobe.models.tokens import TokenLayout

__all__ = [
    "ALIASES",
    "FAMILIES",
    "expand_models",
    "LAYOUT_TYPES",
    "ENGINES",
    "ModelRef",
    "Backbone",
    "resolve_model",
    "pick_device",
    "fit_canvas",
    "round_canvas",
    "normalisation",
    "normalisation_tag",
    "parse_layers",
]
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
    # DINOv3 ViTs (patch 16, 4 registers, RoPE); gated on the hub: accept the licence before `hf download`
    "dinov3-vits16": "facebook/dinov3-vits16-pretrain-lvd1689m",
    "dinov3-vits16plus": "facebook/dinov3-vits16plus-pretrain-lvd1689m",
    "dinov3-vitb16": "facebook/dinov3-vitb16-pretrain-lvd1689m",
    "dinov3-vitl16": "facebook/dinov3-vitl16-pretrain-lvd1689m",
    "dinov3-vith16plus": "facebook/dinov3-vith16plus-pretrain-lvd1689m",
    "dinov3-vit7b16": "facebook/dinov3-vit7b16-pretrain-lvd1689m",
    # supervised ImageNet-21k ViT and MSN ViTs (CLS + patches, no registers)
    "vit-base-in21k": "google/vit-base-patch16-224-in21k",
    "vit-msn-small": "facebook/vit-msn-small",
    "vit-msn-base": "facebook/vit-msn-base",
}
# family aliases: one --model name standing for several models, extracted in one pass / probed together
FAMILIES = {
    "dinov2-all": ("dinov2-small", "dinov2-small-reg", "dinov2-base", "dinov2-base-reg"),
}
# what runs a Backbone's forward (Backbone.from_pretrained's engine)
ENGINES = ("transformers", "auto", "torch")
# model types whose last_hidden_state is CLS + num_register_tokens registers + a square patch grid
LAYOUT_TYPES = ("dinov2", "dinov2_with_registers", "dinov3_vit", "vit", "vit_msn")
# model types known not to fit, and what their output lacks
_UNFIT = {
    "swin": "a CLS token and a single patch grid (hierarchical stages, pooled output only)",
    "swinv2": "a CLS token and a single patch grid (hierarchical stages, pooled output only)",
    "convnext": "tokens (a CNN: a feature map and a pooled output only)",
    "convnextv2": "tokens (a CNN: a feature map and a pooled output only)",
    "dinov3_convnext": "tokens (a CNN: a feature map and a pooled output only)",
    "resnet": "tokens (a CNN: a feature map and a pooled output only)",
    "siglip_vision_model": "a CLS token (patches only; its pooled output comes from an attention head)",
    "ijepa": "a CLS token (patches only)",
    "deit": "a plain layout (a distillation token follows CLS)",
    "vit_mae": "a deterministic patch grid (it masks a random 75% of the patches)",
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
        """True for models saved by :mod:`tprobe.testing` (``save_random_dinov2``, ``save_random_vit``)."""
        return bool(getattr(self.config, "tprobe_random_init", False))

    @property
    def slug(self) -> str:
        base = f"local--{Path(self.source).name}" if self.is_local else self.source.replace("/", "--")
        return f"{base}@{self.resolved[:12]}"

    @property
    def num_registers(self) -> int:
        return int(getattr(self.config, "num_register_tokens", 0) or 0)

    @property
    def patch_size(self) -> int:
        return _square(getattr(self.config, "patch_size", None))

    @property
    def num_layers(self) -> int:
        """Transformer blocks (``hidden_states`` holds one more: the embeddings, at index 0)."""
        return int(getattr(self.config, "num_hidden_layers", 0) or 0)


def expand_models(names) -> list[str]:
    """``--model`` values with each family alias (:data:`FAMILIES`) replaced by its models, in order, each once."""
    out: list[str] = []
    for name in names:
        for m in FAMILIES.get(name, (name,)):
            if m not in out:
                out.append(m)
    return out


def parse_layers(spec, n_layers: int, option: str = "--layers") -> tuple[int, ...]:
    """``"-1,-4"`` (or a sequence of ints) -> sorted unique negative layer indices, shallow to deep.

    Layer ``-1`` is the last block's output, ``-k`` the k-th from the end, ``-(n_layers+1)`` the
    embeddings; a non-negative ``i`` counts from the embeddings (``0``) like ``hidden_states[i]`` and is
    turned into its negative index, so ``--layers 12`` and ``-1`` key the same store for a 12-block model.
    """
    items = [t.strip() for t in spec.split(",")] if isinstance(spec, str) else list(spec)
    out = set()
    for item in items:
        if item == "":
            continue
        try:
            v = int(item)
        except (TypeError, ValueError):
            raise TprobeError(
                f"{option} {spec!r}: {item!r} is not an integer layer index; e.g. {option} -1,-4,-7"
            ) from None
        if not -(n_layers + 1) <= v <= n_layers:
            raise TprobeError(
                f"{option} {spec!r}: layer {v} is outside the model's {n_layers} blocks; use -1 (the "
                f"last block) to -{n_layers + 1} (the embeddings)"
            )
        out.add(v - (n_layers + 1) if v >= 0 else v)
    if not out:
        raise TprobeError(f"{option} {spec!r}: no layer given; e.g. {option} -1")
    return tuple(sorted(out))


def _square(value) -> int:
    """A patch size given as ``16`` or ``[16, 16]`` -> 16; 0 for anything else (missing, non-square)."""
    if isinstance(value, list | tuple):
        return int(value[0]) if len(value) == 2 and value[0] == value[1] else 0
    return int(value) if isinstance(value, int) else 0


def _check_layout(name: str, config) -> None:
    """Refuse, in one line, a model whose last_hidden_state is not CLS + registers + a square patch grid."""
    mtype = getattr(config, "model_type", "?")
    supported = ", ".join(LAYOUT_TYPES)
    if mtype not in LAYOUT_TYPES:
        lacks = _UNFIT.get(mtype, "a token layout tprobe knows (CLS + registers + a square patch grid)")
        raise TprobeError(
            f"model {name!r} is a {mtype!r} model: its last_hidden_state lacks {lacks}; "
            f"tprobe reads ViTs of model type {supported}"
        )
    patch = getattr(config, "patch_size", None)
    if not _square(patch):
        raise TprobeError(
            f"model {name!r}: config.patch_size {patch!r} is not one square patch size; "
            "tprobe reads square patch grids"
        )
    if int(getattr(config, "num_channels", 3) or 3) != 3:
        raise TprobeError(
            f"model {name!r}: config.num_channels is {config.num_channels}; "
            "tprobe feeds 3-channel (grey as RGB) input"
        )


def round_canvas(canvas: int, patch_size: int) -> int:
    """The smallest multiple of ``patch_size`` that is at least ``canvas`` (140 -> 140 for /14, 144 for /16)."""
    return -(-int(canvas) // patch_size) * patch_size


def fit_canvas(config, patch_size: int, *, user_set: bool):
    """The preprocessing config with its canvas fitted to a model's ``patch_size`` (:attr:`ModelRef.patch_size`).

    A canvas the user left at its default is rounded up to the patch size (the new canvas is part of
    the preprocessing config, so it keys the store); a canvas the user set is kept as given, and
    :meth:`Backbone.grid` refuses it with the fix when it does not fit.
    """
    from dataclasses import replace

    if user_set or not patch_size:
        return config
    canvas = round_canvas(config.canvas, patch_size)
    if canvas != config.canvas:
        log.info("canvas %d px rounded to %d px (patch size %d)", config.canvas, canvas, patch_size)
    return replace(config, canvas=canvas)


def _hub_error(name: str, exc: Exception) -> TprobeError:
    aliases = ", ".join(ALIASES)
    if name not in ALIASES and "/" not in name:
        return TprobeError(
            f"model {name!r} is not a known alias, a hub id (owner/name) or a local directory; "
            f"aliases: {aliases}"
        )
    hub_id = ALIASES.get(name, name)
    gated = (
        " (gated: accept the DINOv3 licence on its hub page and `hf auth login` first)"
        if "dinov3" in hub_id
        else ""
    )
    return TprobeError(
        f"model {name!r}: weights not reachable ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
        f"the Hugging Face hub cannot be reached and they are not in the HF cache — download them where "
        f"the hub is reachable (`hf download {hub_id}`{gated}) or pass --model /path/to/local/dir "
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


def _auto_config(*args, **kw):
    """transformers' ``AutoConfig.from_pretrained``, imported only when called (~0.7 s)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(*args, **kw)


def _dinov2_hub_config(source: str, revision: str | None, offline: bool):
    """A hub DINOv2's config.json read as JSON (:func:`tprobe.models.dinov2_torch.read_config`), or None:
    another model type, or the file not obtainable (transformers then tries, and its error is reported)."""
    from huggingface_hub import hf_hub_download

    try:
        found = hf_hub_download(source, "config.json", revision=revision, local_files_only=offline)
    except Exception:  # noqa: BLE001 - transformers' AutoConfig retries and names the error
        return None
    return dinov2_torch.read_config(found)


def resolve_model(model: str, revision: str | None = None, *, offline: bool = False) -> ModelRef:
    """Resolve an alias, hub id or local directory to a :class:`ModelRef` (reads only the config).

    A DINOv2 config is read as JSON (no transformers import); other models' through transformers'
    ``AutoConfig``."""

    source = ALIASES.get(model, model)
    local = Path(source).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise TprobeError(f"{local}: no config.json; save the model with save_pretrained()")
        if revision:
            raise TprobeError(f"--revision {revision} applies to hub models, not {local}")
        config = dinov2_torch.read_config(local / "config.json") or _auto_config(local)
        resolved = _dir_hash(local)
        source = str(local.resolve())
    else:
        if _looks_like_a_path(source):
            what = "is a file, not a model folder" if local.is_file() else "is not there (moved or deleted?)"
            raise TprobeError(
                f"model folder {source} {what}; pass the folder's current path, or a hub id (owner/name)"
            )
        if "/" not in source:
            raise _hub_error(model, FileNotFoundError(source))
        forced = False
        if not offline:
            log.info("contacting the Hugging Face hub for %s ...", source)
            forced = offline = not _hub_reachable()
        config = _dinov2_hub_config(source, revision, offline)
        try:
            config = config or _auto_config(source, revision=revision, local_files_only=offline)
        except (OSError, ValueError) as exc:
            raise _hub_error(model, exc) from None
        resolved = _snapshot_commit(source, revision)
        if forced:
            log.info("hub unreachable: using the cached snapshot %s", resolved[:12])
    _check_layout(model, config)
    return ModelRef(model, source, revision, resolved, config)


def _looks_like_a_path(source: str) -> bool:
    """A local path, never a hub id (``owner/name``): absolute, ``./``, ``../``, ``~``, or more than one ``/``."""
    return source.startswith(("/", "./", "../", "~", "\\")) or source.count("/") > 1 or Path(source).is_file()


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
    """A loaded ViT (DINOv2, DINOv3, ViT, ViT-MSN) with its token layout and input normalisation.

    ``Backbone.from_pretrained(name_or_path, revision=...)`` follows Hugging Face's conventions:
    aliases (see ``ALIASES``), hub ids, local directories, the HF cache and ``HF_HUB_OFFLINE``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        ref: ModelRef,
        mean,
        std,
        device: torch.device,
        engine: str = "transformers",
    ):
        self.model = model
        self.ref = ref
        self.device = device
        self.engine = engine  # which code runs the forward: "transformers" or "torch" (tprobe's DINOv2)
        cfg = ref.config
        self.hidden_size = int(cfg.hidden_size)
        self.patch_size = ref.patch_size
        self.num_registers = ref.num_registers
        self.mean, self.std = tuple(mean), tuple(std)  # input normalisation, recorded in stores
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
        engine: str = "transformers",
    ) -> Backbone:
        """Load weights (real ``from_pretrained``); ``attn_implementation='eager'`` for attention maps.

        ``engine``: ``"transformers"`` loads the model class of transformers (what training needs);
        ``"auto"`` runs a DINOv2 checkpoint on :mod:`tprobe.models.dinov2_torch` (the same tokens to the
        bit, without importing transformers) when it can, else transformers; ``"torch"`` insists on it.
        """
        if engine not in ENGINES:
            raise TprobeError(f"engine {engine!r} is not one of {', '.join(ENGINES)}")
        ref = model if isinstance(model, ModelRef) else resolve_model(model, revision, offline=offline)
        net = _torch_dinov2(ref) if engine != "transformers" and attn_implementation == "sdpa" else None
        used = "transformers" if net is None else "torch"
        if net is None and engine == "torch":
            raise TprobeError(
                f"model {ref.name!r}: the torch-only forward runs float32 safetensors DINOv2 checkpoints with "
                "SDPA attention (see the log for what this one lacks); use TPROBE_FORWARD=transformers"
            )
        if net is None:
            net = _transformers_model(ref, offline, attn_implementation)
        mean, std = _normalisation(ref, offline or ref.is_local)
        dev = pick_device(device)
        return cls(net.eval().to(dev), ref, mean, std, dev, engine=used)

    @property
    def blocks(self) -> torch.nn.ModuleList:
        """The transformer blocks, in order (``encoder.layer`` in DINOv2, ``model.layer`` in DINOv3, ``layers``)."""
        for path in ("encoder.layer", "model.layer", "layers", "encoder.layers"):
            try:
                layers = self.model.get_submodule(path)
            except AttributeError:
                continue
            if isinstance(layers, torch.nn.ModuleList):
                return layers
        raise TprobeError(
            f"model {self.ref.name!r}: no list of transformer blocks found "
            "(encoder.layer, model.layer or layers)"
        )

    def layer_outputs(self, pixel_values: torch.Tensor, layers) -> dict[int, torch.Tensor]:
        """``{layer: (B, T, D) tokens}`` of every layer in ``layers`` from ONE forward pass, each through the
        final layer norm as DINOv2's ``get_intermediate_layers(norm=True)`` does: layer -1 is
        ``last_hidden_state`` itself (already normed), layer ``l`` is ``final_norm(hidden_states[l])``."""
        out = self.model(pixel_values=pixel_values, output_hidden_states=any(v != -1 for v in layers))
        norm = self.final_norm
        return {v: out.last_hidden_state if v == -1 else norm(out.hidden_states[v]) for v in layers}

    @property
    def final_norm(self) -> torch.nn.Module:
        """The layer norm applied to ``last_hidden_state`` (``layernorm`` or, in DINOv3, ``norm``)."""
        norm = getattr(self.model, "layernorm", None) or getattr(self.model, "norm", None)
        return norm if norm is not None else torch.nn.Identity()

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
        """(B, H, W) grey (copied to R, G, B) or (B, 3, H, W) RGB, in [0, 1] -> normalised (B, 3, H, W)."""
        x = torch.as_tensor(images, dtype=torch.float32)
        if x.ndim == 4 and x.shape[1] != 3:
            raise TprobeError(
                f"images of shape {tuple(x.shape)}: the model takes grey (B, H, W) or RGB (B, 3, H, W); "
                "use --channel-mode per-channel for other channel counts"
            )
        x = x if x.ndim == 4 else x.unsqueeze(1).expand(-1, 3, -1, -1)
        return (x - self._mean.to(x.device)) / self._std.to(x.device)

    def __call__(self, pixel_values: torch.Tensor, **kw):
        return self.model(pixel_values=pixel_values, **kw)


def _transformers_model(ref: ModelRef, offline: bool, attn_implementation: str) -> torch.nn.Module:
    """``ref``'s model class of transformers, loaded with its weights and set up as tprobe reads it."""
    from transformers import AutoModel

    try:
        net = AutoModel.from_pretrained(
            ref.source,
            revision=ref.load_revision,
            local_files_only=offline or ref.is_local,
            attn_implementation=attn_implementation,
        )
    except pickle.UnpicklingError:  # torch's weights-only loader refused a pickle weight file
        raise TprobeError(
            f"model {ref.name!r}: {ref.source} holds only pickle weights (pytorch_model.bin) that are not plain "
            "tensors, and tprobe never runs code from a file; convert them to safetensors where you trust them "
            "(model.save_pretrained(folder, safe_serialization=True))"
        ) from None
    except (OSError, ValueError) as exc:
        raise _hub_error(ref.name, exc) from None
    if _takes_interpolate(net):
        # ViT / ViT-MSN check the input size against config.image_size unless told to interpolate
        # their position embeddings; DINOv2 always interpolates, DINOv3 uses RoPE
        net.forward = functools.partial(net.forward, interpolate_pos_encoding=True)
    if ref.config.model_type == "dinov3_vit":
        # DINOv3 jitters and rescales its RoPE patch coordinates in train mode (a pretraining
        # augmentation); off, so a frozen or partly frozen backbone computes in training exactly
        # what the store holds
        net.config.pos_embed_shift = net.config.pos_embed_jitter = net.config.pos_embed_rescale = None
    return net


def _torch_dinov2(ref: ModelRef) -> torch.nn.Module | None:
    """``ref``'s DINOv2 on :mod:`tprobe.models.dinov2_torch`, or None (not DINOv2, weights not local or
    not safetensors float32, anything it does not reproduce: the caller loads through transformers)."""
    if not isinstance(ref.config, dinov2_torch.Dinov2Config):
        return None
    if ref.is_local:
        folder = Path(ref.source)
    else:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(ref.source, "config.json", revision=ref.resolved)
        if not isinstance(found, str):
            return None
        folder = Path(found).parent
    return dinov2_torch.load(ref.config, folder)


def _takes_interpolate(net: torch.nn.Module) -> bool:
    import inspect

    return "interpolate_pos_encoding" in inspect.signature(net.forward).parameters


def normalisation(ref: ModelRef, offline: bool = False) -> tuple[tuple, tuple]:
    """The input normalisation (mean, std) a :class:`Backbone` of ``ref`` applies; part of the store key."""
    return _normalisation(ref, offline or ref.is_local)


def normalisation_tag(mean, std) -> str:
    """``""`` for ImageNet's mean/std (every DINOv2 checkpoint's, so their store names stay as they were),
    else ``-n<hash>``: stores of inputs normalised differently never share a name."""
    mean, std = tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)
    if mean == IMAGENET_MEAN and std == IMAGENET_STD:
        return ""
    return "-n" + hashlib.sha256(json.dumps([mean, std]).encode()).hexdigest()[:8]


def _normalisation(ref: ModelRef, offline: bool = False) -> tuple[tuple, tuple]:
    """The checkpoint's ``preprocessor_config.json`` mean/std (read as JSON, no code), else ImageNet's.

    For a hub model the file is taken from the resolved snapshot in the HF cache, fetched into it
    (a few hundred bytes) when the hub is reachable; the values used are recorded in the store.
    """
    import json

    if ref.is_local:
        found = Path(ref.source) / "preprocessor_config.json"
    else:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        found = try_to_load_from_cache(ref.source, "preprocessor_config.json", revision=ref.resolved)
        if found is None and not offline:  # not cached, and not known to be absent
            try:
                found = hf_hub_download(ref.source, "preprocessor_config.json", revision=ref.resolved)
            except Exception:  # noqa: BLE001 - absent file, unreachable hub: ImageNet values, logged below
                found = None
        found = Path(found) if isinstance(found, str) else None
        if found is None:
            log.warning(
                "%s: no preprocessor_config.json in snapshot %s; normalising with ImageNet mean/std",
                ref.source,
                ref.resolved[:12],
            )
    try:
        proc = json.loads(found.read_text())
        mean, std = tuple(float(v) for v in proc["image_mean"]), tuple(float(v) for v in proc["image_std"])
    except (AttributeError, OSError, ValueError, KeyError, TypeError):
        return IMAGENET_MEAN, IMAGENET_STD
    if len(mean) != 3 or len(std) != 3:
        return IMAGENET_MEAN, IMAGENET_STD
    return mean, std
