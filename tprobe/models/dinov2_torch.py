"""DINOv2 (with and without registers) in plain torch, for extraction: no transformers import.

``tprobe extract`` spends most of its start-up importing transformers' modelling code (~1.3 s, it pulls
``torch._dynamo``, ``torch.distributed.tensor``, sympy and scipy) and its config machinery (~0.7 s) for a
model that is twenty lines of torch. This module reads a DINOv2 checkpoint's ``config.json`` as JSON
(:class:`Dinov2Config`, transformers' defaults for the keys a file leaves out) and its safetensors
weights, and runs the forward pass of transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel``
with SDPA attention: the same modules under the same names (``embeddings``, ``encoder.layer[i]``,
``layernorm``), the same torch operations in the same order, so the tokens are transformers' to the
bit (``tests/test_dinov2_torch.py`` compares every layer's tokens of several configurations, at
several input sizes, with the installed transformers).

It serves inference only: :func:`load` returns ``None`` (and the caller loads through transformers)
for anything it does not reproduce exactly: other model types, attention maps (eager attention),
non-float32 weights (or a config naming another dtype), pickle weights, activations other than GELU / SwiGLU,
unknown weights.
Training (``finetune``) always loads through transformers; ``TPROBE_FORWARD=transformers`` makes
``extract`` do so too.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tprobe.errors import TprobeError

__all__ = ["TYPES", "Dinov2Config", "Dinov2Torch", "TokensOutput", "read_config", "weight_files", "load"]
log = logging.getLogger(__name__)

TYPES = ("dinov2", "dinov2_with_registers")
# transformers' own defaults (Dinov2Config(), Dinov2WithRegistersConfig(), transformers 5.x) for the keys
# the forward reads; a config.json written by save_pretrained may leave any of them out.
# tests/test_dinov2_torch.py checks this table against the installed transformers.
_DINOV2 = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    mlp_ratio=4,
    hidden_act="gelu",
    layer_norm_eps=1e-6,
    image_size=224,
    patch_size=14,
    num_channels=3,
    qkv_bias=True,
    use_swiglu_ffn=False,
)
DEFAULTS = {
    "dinov2": _DINOV2,
    # the registers config differs in its patch size default, and has registers
    "dinov2_with_registers": {**_DINOV2, "patch_size": 16, "num_register_tokens": 4},
}
# checkpoint names (the hub's, and what save_pretrained writes) -> this module's (transformers 5's)
RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
    (".mlp.weights_out.", ".mlp.down_proj."),
)


class Dinov2Config:
    """A DINOv2 ``config.json`` read as JSON: every key as an attribute, transformers' defaults for the
    keys the forward needs and the file leaves out. Plain data: it pickles, and loading it runs no code."""

    def __init__(self, values: dict):
        self.__dict__.update(DEFAULTS[values["model_type"]])
        self.__dict__.update(values)

    def __repr__(self) -> str:
        return f"Dinov2Config({self.model_type}, hidden {self.hidden_size}, {self.num_hidden_layers} blocks)"

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def __eq__(self, other) -> bool:  # as transformers' configs compare: by their values
        return isinstance(other, Dinov2Config) and self.__dict__ == other.__dict__

    __hash__ = None  # mutable, like transformers' configs

    @property
    def head_dim(self) -> int:
        return int(self.__dict__.get("head_dim") or self.hidden_size // self.num_attention_heads)


def read_config(path: str | Path) -> Dinov2Config | None:
    """``config.json`` -> :class:`Dinov2Config` for a DINOv2 checkpoint this module runs; ``None`` for any
    other model or value (the caller then reads it with transformers, which names what is wrong)."""
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(values, dict) or values.get("model_type") not in TYPES:
        return None
    config = Dinov2Config(values)
    ints = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_channels", "num_register_tokens")
    if not all(
        isinstance(getattr(config, k, 0), int) and not isinstance(getattr(config, k, 0), bool) for k in ints
    ):
        return None
    if config.hidden_act != "gelu" or not isinstance(config.mlp_ratio, int | float):
        return None
    if not isinstance(config.layer_norm_eps, int | float) or not isinstance(config.qkv_bias, bool):
        return None
    if config.num_attention_heads <= 0 or config.hidden_size % config.num_attention_heads:
        return None
    return config


@dataclass
class TokensOutput:
    """What ``Dinov2Model`` returns that tprobe reads."""

    last_hidden_state: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class _PatchEmbeddings(nn.Module):
    def __init__(self, c: Dinov2Config, patch: int):
        super().__init__()
        self.patch_size = (patch, patch)
        self.projection = nn.Conv2d(c.num_channels, c.hidden_size, kernel_size=patch, stride=patch)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixel_values = pixel_values.to(self.projection.weight.dtype)
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class _Embeddings(nn.Module):
    """CLS token, position embeddings (bicubic-interpolated to the input's grid), register tokens."""

    def __init__(self, c: Dinov2Config, patch: int, positions: int):
        super().__init__()
        self.cls_token = nn.Parameter(torch.empty(1, 1, c.hidden_size))
        self.patch_embeddings = _PatchEmbeddings(c, patch)
        self.position_embeddings = nn.Parameter(torch.empty(1, positions + 1, c.hidden_size))
        self.registers = (
            c.num_register_tokens if c.model_type == "dinov2_with_registers" else 0
        )  # plain: none
        if self.registers:
            self.register_tokens = nn.Parameter(torch.empty(1, self.registers, c.hidden_size))
        # DINOv2 with registers interpolates with antialiasing, plain DINOv2 without (as transformers does)
        self.antialias = c.model_type == "dinov2_with_registers"

    def interpolate_pos_encoding(self, embeddings: torch.Tensor, height: int, width: int) -> torch.Tensor:
        num_patches = embeddings.shape[1] - 1
        num_positions = self.position_embeddings.shape[1] - 1
        if num_patches == num_positions and height == width:
            return self.position_embeddings
        class_pos_embed = self.position_embeddings[:, :1]
        patch_pos_embed = self.position_embeddings[:, 1:]
        dim = embeddings.shape[-1]
        side = int(num_positions**0.5)
        patch_pos_embed = patch_pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2)
        target_dtype = patch_pos_embed.dtype
        patch_pos_embed = nn.functional.interpolate(
            patch_pos_embed.to(torch.float32),
            size=(
                height // self.patch_embeddings.patch_size[0],
                width // self.patch_embeddings.patch_size[1],
            ),
            mode="bicubic",
            align_corners=False,
            antialias=self.antialias,
        ).to(dtype=target_dtype)
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
        return torch.cat((class_pos_embed, patch_pos_embed), dim=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        embeddings = self.patch_embeddings(pixel_values)
        embeddings = torch.cat((self.cls_token.expand(batch, -1, -1), embeddings), dim=1)
        embeddings = embeddings + self.interpolate_pos_encoding(embeddings, height, width)
        if self.registers:
            embeddings = torch.cat(
                (
                    embeddings[:, :1],
                    self.register_tokens.expand(embeddings.shape[0], -1, -1),
                    embeddings[:, 1:],
                ),
                dim=1,
            )
        return embeddings


class _Attention(nn.Module):
    def __init__(self, c: Dinov2Config):
        super().__init__()
        self.head_dim = c.head_dim
        self.scaling = self.head_dim**-0.5
        width = c.num_attention_heads * self.head_dim
        self.q_proj = nn.Linear(c.hidden_size, width, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, width, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, width, bias=c.qkv_bias)
        self.o_proj = nn.Linear(width, c.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_shape = x.shape[:-1]
        shape = (*input_shape, -1, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(1, 2)
        k = self.k_proj(x).view(shape).transpose(1, 2)
        v = self.v_proj(x).view(shape).transpose(1, 2)
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=None, dropout_p=0.0, scale=self.scaling, is_causal=False
        )
        out = out.transpose(1, 2).contiguous()
        return self.o_proj(out.reshape(*input_shape, -1).contiguous())


class _MLP(nn.Module):
    def __init__(self, c: Dinov2Config):
        super().__init__()
        hidden = int(c.hidden_size * c.mlp_ratio)
        self.fc1 = nn.Linear(c.hidden_size, hidden)
        self.fc2 = nn.Linear(hidden, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class _SwiGLU(nn.Module):
    def __init__(self, c: Dinov2Config):
        super().__init__()
        hidden = (int(int(c.hidden_size * c.mlp_ratio) * 2 / 3) + 7) // 8 * 8
        self.gate_proj = nn.Linear(c.hidden_size, hidden)
        self.up_proj = nn.Linear(c.hidden_size, hidden)
        self.down_proj = nn.Linear(hidden, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class _LayerScale(nn.Module):
    def __init__(self, c: Dinov2Config):
        super().__init__()
        self.lambda1 = nn.Parameter(torch.empty(c.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.lambda1


class _Layer(nn.Module):
    def __init__(self, c: Dinov2Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attention = _Attention(c)
        self.layer_scale1 = _LayerScale(c)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = _SwiGLU(c) if c.use_swiglu_ffn else _MLP(c)
        self.layer_scale2 = _LayerScale(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer_scale1(self.attention(self.norm1(x))) + x
        return self.layer_scale2(self.mlp(self.norm2(x))) + x


class _Encoder(nn.Module):
    def __init__(self, c: Dinov2Config):
        super().__init__()
        self.layer = nn.ModuleList(_Layer(c) for _ in range(c.num_hidden_layers))


class Dinov2Torch(nn.Module):
    """transformers' ``Dinov2Model`` / ``Dinov2WithRegistersModel`` forward (SDPA attention, inference)."""

    def __init__(self, config: Dinov2Config, positions: int):
        super().__init__()
        self.config = config
        patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
        self.embeddings = _Embeddings(config, patch, positions)
        self.encoder = _Encoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def train(self, mode: bool = True):
        if mode:
            raise TprobeError(
                "the torch-only DINOv2 runs inference only; load with Backbone.from_pretrained(..., "
                "engine='transformers') to train"
            )
        return super().train(False)

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> TokensOutput:
        x = self.embeddings(pixel_values)
        states = [x] if output_hidden_states else None
        for layer in self.encoder.layer:
            x = layer(x)
            if states is not None:
                states.append(x)
        return TokensOutput(self.layernorm(x), tuple(states) if states is not None else None)


def weight_files(folder: Path) -> list[Path] | None:
    """The safetensors files holding a checkpoint's weights (one, or the shards its index names); None if
    the folder has none (pickle weights, or not downloaded)."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return None
    try:
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    files = [folder / n for n in names]
    return files if files and all(f.is_file() for f in files) else None


def _state_dict(files: list[Path]) -> dict[str, torch.Tensor] | None:
    """The checkpoint's tensors under this module's names; None when one is not float32."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in files:
        for name, t in load_file(f).items():
            if t.dtype != torch.float32:
                return None
            name = name.removeprefix("dinov2.").removeprefix("dinov2_with_registers.")
            for old, new in RENAMES:
                name = name.replace(old, new)
            if name.endswith((".mlp.weights_in.weight", ".mlp.weights_in.bias")):
                gate, up = t.chunk(2, dim=0)  # SwiGLU's fused input projection, split as transformers does
                base, kind = name.rsplit(".weights_in.", 1)
                out[f"{base}.gate_proj.{kind}"], out[f"{base}.up_proj.{kind}"] = gate, up
                continue
            out[name] = t
    out.pop("embeddings.mask_token", None)  # masked pretraining only
    return out


def _load_dtype(config: Dinov2Config, files: list[Path]) -> str | None:
    """The dtype the files tell transformers' ``from_pretrained`` (``dtype="auto"``, its default in 5.x)
    to load the model in: config.json's ``dtype``, else its older ``torch_dtype``, else (sharded weights)
    the index's metadata ``dtype``; None when none is named (the weights' own dtype then)."""
    named = config.__dict__.get("dtype")
    if named is None:
        named = config.__dict__.get("torch_dtype")
    if named is None and files[0].name != "model.safetensors":
        try:
            meta = json.loads((files[0].parent / "model.safetensors.index.json").read_text()).get("metadata")
        except (OSError, ValueError, AttributeError):
            meta = None
        named = meta.get("dtype") if isinstance(meta, dict) else None
    return named


def load(config: Dinov2Config, folder: Path) -> Dinov2Torch | None:
    """The model of ``folder`` (its ``config.json`` read as ``config``), or None when this module cannot
    reproduce transformers' forward for it exactly (the reason is logged)."""
    files = weight_files(folder)
    if files is None:
        log.info("%s: no safetensors weights; loading through transformers", folder)
        return None
    named = _load_dtype(config, files)
    if named not in (None, "float32"):  # transformers would cast the float32 weights and run in that dtype
        log.info("%s: config names dtype %r; loading through transformers", folder, named)
        return None
    if config.__dict__.get("quantization_config"):  # transformers quantizes the weights as it loads them
        log.info("%s: config asks for quantization; loading through transformers", folder)
        return None
    if (folder / "adapter_config.json").is_file():  # with peft installed, transformers applies the adapter
        log.info("%s: holds a PEFT adapter; loading through transformers", folder)
        return None
    state = _state_dict(files)
    if state is None or "embeddings.position_embeddings" not in state:
        log.info("%s: weights not float32 or not DINOv2's; loading through transformers", folder)
        return None
    positions = state["embeddings.position_embeddings"].shape[1] - 1
    if math.isqrt(positions) ** 2 != positions:
        return None
    with torch.device("meta"):
        model = Dinov2Torch(config, positions)
    expected = set(model.state_dict())
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)
        log.info("%s: weights %s do not match DINOv2's; loading through transformers", folder, odd[:4])
        return None
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # a shape that does not match the config
        log.info("%s: %s; loading through transformers", folder, str(exc).splitlines()[0][:200])
        return None
    return model.eval()
