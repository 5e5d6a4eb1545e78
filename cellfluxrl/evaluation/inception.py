"""The FID InceptionV3 (TensorFlow 2015-12-05 graph, as ported by pytorch-fid), defined here.

No torchvision: the network below has the layer names of torchvision's ``Inception3`` (so the
standard FID weights load by name) and the FID-specific blocks that pytorch-fid calls
``FIDInceptionA/C/E_1/E_2``: average pools that exclude padding from the count, and a max pool in
the pooling branch of the last block. Features are the 2048-d global average pool of ``Mixed_7c``.

Weights are read from a local file only (nothing is downloaded). :func:`load_inception` accepts:

* the pytorch-fid weights ``pt_inception-2015-12-05-6726825d.pth`` (a torchvision-style state
  dict, 566 keys, with a 1008-way ``fc``),
* torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (the same layout),
* a state dict of pytorch-fid's ``InceptionV3`` wrapper (keys ``blocks.<i>.<j>...``), or any of the
  above with a ``module.`` prefix,
* a TorchScript file such as StyleGAN/clean-fid's ``inception-2015-12-05.pt``; it is called the way
  clean-fid calls it: ``module(x, return_features=True)`` with float ``(B, 3, H, W)`` in
  ``[0, 255]`` (it resizes internally), returning ``(B, 2048)``.

Preprocessing (pytorch-fid): images in ``[-1, 1]`` are first quantised to 8 bits (as generated
images are when saved, and as real images are on disk), mapped to ``[0, 1]``, resized to 299x299
with bilinear interpolation (``align_corners=False``, no antialiasing), then mapped to ``[-1, 1]``.
"""

from __future__ import annotations

import logging
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cellfluxrl.errors import CellfluxError

log = logging.getLogger(__name__)

FEATURE_DIM = 2048
INPUT_SIZE = 299


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU."""

    def __init__(self, c_in: int, c_out: int, **conv_kwargs):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **conv_kwargs)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # The FID blocks exclude the zero padding from the average (TensorFlow's behaviour).
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (pytorch-fid's FIDInceptionA): 64 + 64 + 96 + pool_features channels."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """35x35 -> 17x17 reduction: 384 + 96 + c_in channels."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, bd, bp], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (pytorch-fid's FIDInceptionC): 4 x 192 channels."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        row, col = {"kernel_size": (1, 7), "padding": (0, 3)}, {"kernel_size": (7, 1), "padding": (3, 0)}
        self.branch1x1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool(x))
        return torch.cat([b1, b7, bd, bp], dim=1)


class InceptionD(nn.Module):
    """17x17 -> 8x8 reduction: 320 + 192 + c_in channels."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class InceptionE(nn.Module):
    """8x8 block with split 1x3/3x1 branches: 320 + 768 + 768 + 192 = 2048 channels.

    Args:
        c_in: input channels.
        max_pool: pool branch uses a 3x3 max pool (pytorch-fid's FIDInceptionE_2, ``Mixed_7c``)
            instead of the padding-excluding average pool (FIDInceptionE_1, ``Mixed_7b``).
    """

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(c_in, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], dim=1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([b1, b3, bd, self.branch_pool(pooled)], dim=1)


class FIDInceptionV3(nn.Module):
    """InceptionV3 with the FID blocks; ``forward`` returns the 2048-d pool features.

    Input: float32 ``(B, 3, H, W)`` in ``[0, 1]`` (any H, W; resized to 299x299 here).
    Output: float32 ``(B, 2048)``. The ``fc`` layer (1008 classes) exists only so that the
    standard weight files load strictly; it is not used.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURE_DIM, 1008)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        x = 2.0 * x - 1.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


# pytorch-fid's InceptionV3 wrapper stores the same layers as blocks[i][j].
_PYTORCH_FID_BLOCKS = (
    ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"),
    ("Conv2d_3b_1x1", "Conv2d_4a_3x3"),
    ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"),
    ("Mixed_7a", "Mixed_7b", "Mixed_7c"),
)


def canonical_state_dict(state: dict) -> dict:
    """Map any supported key layout onto :class:`FIDInceptionV3`'s names.

    Handles a ``module.`` prefix and pytorch-fid's wrapper names (``blocks.<i>.<j>.`` -> layer
    name); torchvision-style names (pytorch-fid and torch-fidelity weight files) pass unchanged.
    """
    out = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module."):]
        parts = key.split(".")
        if parts[0] == "blocks" and len(parts) > 3:
            i, j = int(parts[1]), int(parts[2])
            if i < len(_PYTORCH_FID_BLOCKS) and j < len(_PYTORCH_FID_BLOCKS[i]):
                key = ".".join([_PYTORCH_FID_BLOCKS[i][j], *parts[3:]])
        out[key] = value
    return out


def to_pytorch_fid_wrapper_names(state: dict) -> dict:
    """The inverse of the wrapper mapping: our names -> ``blocks.<i>.<j>.`` (``fc`` is dropped)."""
    where = {name: (i, j) for i, names in enumerate(_PYTORCH_FID_BLOCKS) for j, name in enumerate(names)}
    out = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in where:
            out[f"blocks.{where[head][0]}.{where[head][1]}.{rest}"] = value
    return out


class InceptionFeatures:
    """Callable feature extractor: images in ``[-1, 1]`` -> float64 ``(B, 2048)`` numpy features.

    Args:
        module: :class:`FIDInceptionV3`, or a TorchScript module (``torchscript=True``).
        torchscript: call convention of clean-fid's TorchScript file (``[0, 255]`` input,
            ``return_features=True``).
        device: where to run.
        source: the weight file, for the report.
    """

    name = "FID"
    kid_name = "KID"

    def __init__(self, module: nn.Module, torchscript: bool = False, device: str | torch.device = "cpu",
                 source: str = ""):
        self.module = module.to(device).eval()
        self.torchscript, self.device, self.source = torchscript, torch.device(device), source
        self.dim = FEATURE_DIM

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """Features of float ``(B, 3, H, W)`` images in ``[-1, 1]`` -> float64 ``(B, 2048)``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise CellfluxError(f"Inception features need (B, 3, H, W) images, got {tuple(images.shape)}")
        x = torch.floor(torch.clamp(images.float() * 0.5 + 0.5, 0.0, 1.0) * 255.0).clamp(0, 255)
        x = x.to(self.device)
        if self.torchscript:
            try:
                f = self.module(x, return_features=True)
            except (RuntimeError, TypeError):  # a TorchScript file without that keyword
                f = self.module(x)
        else:
            f = self.module(x / 255.0)
        f = f.reshape(f.shape[0], -1).double().cpu().numpy()
        if f.shape[1] != self.dim:
            raise CellfluxError(f"{self.source}: the network returned {f.shape[1]}-d features, expected {self.dim}")
        return f


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def load_inception(path: str | os.PathLike, device: str | torch.device = "cpu") -> InceptionFeatures:
    """Load the FID InceptionV3 from a local weight file (see the module docstring for formats).

    Raises:
        CellfluxError: missing file, unreadable file, or a state dict whose keys or shapes do not
            match the FID InceptionV3 (the message names the file and the first mismatching key).
    """
    path = Path(path)
    if not path.is_file():
        raise CellfluxError(f"Inception weights {path}: no such file")
    if _is_torchscript(path):
        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any failure is a bad file
            raise CellfluxError(f"Inception weights {path}: not a loadable TorchScript file ({exc})") from exc
        return InceptionFeatures(module, torchscript=True, device=device, source=str(path))
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of foreign files
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CellfluxError(f"Inception weights {path}: not a PyTorch state dict or TorchScript file "
                            f"({type(exc).__name__})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CellfluxError(f"Inception weights {path}: expected a state dict, found {type(state).__name__}")
    state = canonical_state_dict(state)
    net = FIDInceptionV3()
    expected = net.state_dict()
    state.setdefault("fc.weight", expected["fc.weight"])  # the wrapper layout has no fc (unused anyway)
    state.setdefault("fc.bias", expected["fc.bias"])
    for key in expected:
        if key.endswith("num_batches_tracked"):
            state.setdefault(key, expected[key])
        if key not in state:
            raise CellfluxError(f"Inception weights {path}: missing key {key!r} (not an FID InceptionV3 state dict)")
        if tuple(state[key].shape) != tuple(expected[key].shape):
            raise CellfluxError(f"Inception weights {path}: {key!r} has shape {tuple(state[key].shape)}, "
                                f"expected {tuple(expected[key].shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        log.info("Inception weights %s: ignoring %d extra keys (first: %s)", path, len(extra), extra[0])
    net.load_state_dict({k: state[k] for k in expected})
    return InceptionFeatures(net, device=device, source=str(path))
