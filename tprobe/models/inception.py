"""Inception v3 in plain torch, for Wang et al.'s Inception baselines, loading timm's checkpoints.

The network follows timm's ``timm/models/inception_v3.py`` (itself torchvision's ``Inception3``)
layer for layer, with the same module and parameter names (``Conv2d_1a_3x3.conv.weight``,
``Conv2d_1a_3x3.bn.running_var``, ..., ``Mixed_7c.branch_pool.bn.bias``, ``fc.weight``), so a timm
or torchvision state dict loads unchanged: every convolution is bias-free and followed by a
BatchNorm (eps 1e-3) and a ReLU; global average pooling gives 2048 features; ``fc`` maps them to
the 1000 ImageNet classes. The auxiliary classifier (``AuxLogits``, only used as a training loss)
is not built; its keys in a checkpoint are ignored, every other key must match.

Weights (``--inception-weights``):

- a Hugging Face hub repo, default ``timm/inception_v3.tv_in1k`` (torchvision's original ImageNet
  weights, as timm republishes them): ``model.safetensors`` is fetched with ``hf_hub_download``
  into the HF cache and identified by the snapshot commit it resolves to;
- a local folder holding ``model.safetensors``, identified by the file's SHA-256;
- ``random``: timm's random initialisation (truncated normal, std 0.1) from the seed — a plumbing
  check: runs are marked random-init and reports label them so.

Only safetensors files are read (data, never code); pickle checkpoints (``.pth``, ``.bin``) are refused.

Input: each cell's preprocessed canvas (default 140 px, the cell ~20 px at its centre) is
upsampled, whole (no centre crop: its border is background, and cropping would cut large cells),
to ``size`` x ``size`` px with bicubic interpolation (the checkpoint's ``interpolation``), clamped
to [0, 1], the grey channel replicated to R, G, B and normalised with the checkpoint's mean and
std, (0.5, 0.5, 0.5) for ``inception_v3.tv_in1k`` (timm's IMAGENET_INCEPTION_MEAN/STD). This is the
input torchvision's ``transform_input=True`` produces from ImageNet-normalised input, so timm (and
tprobe) feed it directly and do not apply ``transform_input``. The default size is 299 px, the
checkpoint's ``input_size`` and Inception's native input (a ~20 px cell becomes ~43 px); the
network accepts any size >= 75 px (its smallest valid input), e.g. 75 or 150 px to run faster on a CPU.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tprobe.errors import TprobeError

__all__ = [
    "HUB_ID",
    "INPUT_SIZE",
    "MIN_INPUT_SIZE",
    "MEAN",
    "STD",
    "InceptionV3",
    "InceptionWeights",
    "InceptionClassifier",
    "resolve_weights",
    "load_inception",
    "inception_features",
]

HUB_ID = "timm/inception_v3.tv_in1k"
WEIGHTS_FILE = "model.safetensors"
INPUT_SIZE = 299  # the checkpoint's input_size (3, 299, 299)
MIN_INPUT_SIZE = 75  # smaller inputs leave Mixed_7a's 3x3 stride-2 convolutions nothing to read
MEAN = STD = (0.5, 0.5, 0.5)  # inception_v3.tv_in1k: IMAGENET_INCEPTION_MEAN / _STD
NUM_FEATURES = 2048
IGNORED_PREFIXES = ("AuxLogits.",)
log = logging.getLogger(__name__)


class ConvBN(nn.Module):
    """Conv2d (no bias) + BatchNorm2d (eps 1e-3) + ReLU: timm's ``ConvNormAct`` (``.conv``, ``.bn``)."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([self.branch1x1(x), b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            d = layer(d)
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([self.branch1x1(x), b7, d, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        d = torch.cat([self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d)], 1)
        bp = self.branch_pool(F.avg_pool2d(x, kernel_size=3, stride=1, padding=1))
        return torch.cat([self.branch1x1(x), b3, d, bp], 1)


class InceptionV3(nn.Module):
    """timm's ``inception_v3`` (``aux_logits=False``): normalised (B, 3, H, W) input -> class logits."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(in_chans, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Pool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Pool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048)
        self.num_features = NUM_FEATURES
        self.fc = nn.Linear(NUM_FEATURES, num_classes)
        for m in self.modules():  # timm's initialisation
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.1, a=-2.0, b=2.0)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the last feature map (B, 2048, h, w); 8 x 8 for 299 px."""
        for name in (
            "Conv2d_1a_3x3",
            "Conv2d_2a_3x3",
            "Conv2d_2b_3x3",
            "Pool1",
            "Conv2d_3b_1x1",
            "Conv2d_4a_3x3",
            "Pool2",
            "Mixed_5b",
            "Mixed_5c",
            "Mixed_5d",
            "Mixed_6a",
            "Mixed_6b",
            "Mixed_6c",
            "Mixed_6d",
            "Mixed_6e",
            "Mixed_7a",
            "Mixed_7b",
            "Mixed_7c",
        ):
            x = getattr(self, name)(x)
        return x

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Global-average-pooled features (B, 2048): timm's ``forward_head(pre_logits=True)``."""
        return self.forward_features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pooled(x))


def to_input(images: torch.Tensor | np.ndarray, size: int = INPUT_SIZE, mean=MEAN, std=STD) -> torch.Tensor:
    """(B, H, W) grey or (B, 3, H, W) RGB in [0, 1] -> (B, 3, size, size): bicubic resize, clamp, normalise."""
    x = torch.as_tensor(images, dtype=torch.float32)
    if x.ndim == 4 and x.shape[1] != 3:
        raise TprobeError(
            f"images of shape {tuple(x.shape)}: Inception takes grey or RGB input; use "
            "--channel-mode grey or rgb"
        )
    x = x if x.ndim == 4 else x.unsqueeze(1)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp_(0.0, 1.0)
    x = x.expand(-1, 3, -1, -1)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


@dataclass(frozen=True)
class InceptionWeights:
    """What ``--inception-weights`` names, resolved: the file to load and its identity for the run record."""

    name: str  # as given
    source: str  # hub id, local folder (absolute), or "random"
    resolved: str  # hub snapshot commit, sha256 of the local model.safetensors, or "random"
    path: str | None = None  # the model.safetensors to load (None: random)

    @property
    def random_init(self) -> bool:
        return self.source == "random"


def _hub_error(name: str, exc: Exception) -> TprobeError:
    return TprobeError(
        f"--inception-weights {name!r}: weights not reachable ({type(exc).__name__}); the Hugging Face "
        f"hub cannot be reached and they are not in the HF cache — download them where the hub is reachable "
        f"(`hf download {name} {WEIGHTS_FILE}`) or pass --inception-weights /path/to/folder holding "
        f"{WEIGHTS_FILE} (`--inception-weights random` checks the pipeline offline)"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _refuse_pickle(path: Path) -> TprobeError:
    return TprobeError(
        f"{path}: tprobe loads Inception weights only from {WEIGHTS_FILE} (safetensors: data, "
        "never code); pickle checkpoints (.pth, .pt, .bin) can run code when loaded — convert it "
        "with safetensors.torch.save_file where you trust it"
    )


def resolve_weights(weights: str = HUB_ID, *, offline: bool = False) -> InceptionWeights:
    """Resolve ``--inception-weights`` (hub id, folder holding model.safetensors, or ``random``)."""
    if weights == "random":
        return InceptionWeights("random", "random", "random")
    local = Path(weights).expanduser()
    if local.is_file():
        if local.name == WEIGHTS_FILE or local.suffix == ".safetensors":
            raise TprobeError(
                f"--inception-weights {weights}: pass the folder holding {local.name}, not the file"
            )
        raise _refuse_pickle(local)
    if local.is_dir():
        found = local / WEIGHTS_FILE
        if not found.is_file():
            others = sorted(p.name for p in local.iterdir() if p.suffix in (".pth", ".pt", ".bin", ".pkl"))
            if others:
                raise _refuse_pickle(local / others[0])
            raise TprobeError(
                f"{local}: no {WEIGHTS_FILE}; download one (`hf download {HUB_ID} {WEIGHTS_FILE} "
                f"--local-dir {local}`) or pass another folder"
            )
        return InceptionWeights(weights, str(local.resolve()), _sha256(found), str(found))
    if weights.count("/") != 1 or weights.startswith((".", "/", "~")):
        raise TprobeError(
            f"--inception-weights {weights!r} is not a hub id (owner/name), a folder holding "
            f"{WEIGHTS_FILE}, or random"
        )
    from huggingface_hub import hf_hub_download

    from tprobe.models.backbones import _hub_reachable

    if not offline:
        log.info("contacting the Hugging Face hub for %s ...", weights)
        offline = not _hub_reachable()
    try:
        found = Path(hf_hub_download(weights, WEIGHTS_FILE, local_files_only=offline))
    except Exception as exc:  # noqa: BLE001 - unreachable hub, missing repo or file: one line with the fix
        raise _hub_error(weights, exc) from None
    return InceptionWeights(weights, weights, found.parent.name, str(found))  # .../snapshots/<commit>/file


def load_inception(weights: InceptionWeights, *, seed: int = 0) -> InceptionV3:
    """The network with ``weights`` loaded (random: timm's initialisation from ``seed``), in eval mode."""
    torch.manual_seed(seed)
    model = InceptionV3()
    if weights.random_init:
        return model.eval()
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(weights.path)
    try:
        state = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise TprobeError(
            f"{path}: not a readable safetensors file ({type(exc).__name__}); download {WEIGHTS_FILE} again"
        ) from None
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = [
            f"{len(v)} {what} (e.g. {v[0]})"
            for what, v in (("missing", missing), ("unexpected", unexpected), ("of another shape", wrong))
            if v
        ]
        raise TprobeError(
            f"{path}: not Inception v3 weights in timm/torchvision naming: keys {'; '.join(parts)}"
        )
    # checkpoints without num_batches_tracked (old torchvision ones) keep the model's zeros
    model.load_state_dict({**{k: v for k, v in own.items() if k.endswith("num_batches_tracked")}, **state})
    return model.eval()


class InceptionClassifier(nn.Module):
    """Inception v3 + one linear layer on its pooled features -> one activation logit per grey image."""

    def __init__(self, network: InceptionV3, *, size: int = INPUT_SIZE, mean=MEAN, std=STD):
        super().__init__()
        check_size(size)
        self.encoder = network
        self.size, self.mean, self.std = size, tuple(mean), tuple(std)
        self.head = nn.Linear(NUM_FEATURES, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_input(images, self.size, self.mean, self.std)
        return self.head(self.encoder.pooled(x)).squeeze(1)

    def param_groups(self, lr_head: float, lr_backbone: float) -> list[dict]:
        body = [
            p for n, p in self.encoder.named_parameters() if not n.startswith("fc.")
        ]  # ImageNet fc unused
        return [{"params": list(self.head.parameters()), "lr": lr_head}, {"params": body, "lr": lr_backbone}]


def check_size(size: int) -> int:
    if int(size) < MIN_INPUT_SIZE:
        raise TprobeError(
            f"--inception-size {size}: Inception v3 needs at least {MIN_INPUT_SIZE} px; "
            f"use {MIN_INPUT_SIZE} or more (default {INPUT_SIZE})"
        )
    return int(size)


@torch.no_grad()
def inception_features(
    network: InceptionV3,
    images,
    *,
    size: int = INPUT_SIZE,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Pooled 2048-d features (float32) of (N, H, W) grey images in [0, 1], in batches, eval mode."""
    check_size(size)
    network = network.eval().to(device)
    out = [
        network.pooled(to_input(torch.as_tensor(images[i : i + batch_size]).to(device), size))
        .float()
        .cpu()
        .numpy()
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, NUM_FEATURES), np.float32)
