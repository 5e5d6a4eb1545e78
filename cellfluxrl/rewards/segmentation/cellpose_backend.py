"""The Cellpose segmentation backend, and offline training of a small Cellpose model.

It follows the contract of :mod:`cellfluxrl.rewards.segmentation.base` (which imports this module
only when ``make_segmenter("cellpose")`` is called).

Nothing here ever downloads: a model given by name is used only when its weights are already in
Cellpose's model folder (``$CELLPOSE_LOCAL_MODELS_PATH`` or ``~/.cellpose/models``), and the file
is resolved to a full path *before* Cellpose sees it (Cellpose itself falls back to downloading
its default model when a name or path does not resolve). Without any cached weights, train a
small model from scratch on the synthetic dataset's ground truth with :func:`train_cellpose`
(CLI: ``cellfluxrl prepare cellpose-model DATASET OUT``) and pass its path.

Cellpose 3.1.x (the ``cellfluxrl[cellpose]`` extra; residual U-Net "CPnet", 6.6 M parameters) is
the main target. Cellpose 4.x (Cellpose-SAM, a ViT-L; needs torchvision) is supported for
inference with its own weights file (``cpsam``); the old ``nuclei``/``cyto3`` weights do not load
in 4.x, and training from scratch is 3.1.x only.

Input convention (both versions): two channels per image, ``[cytoplasm, nucleus]`` =
``[actin + tubulin, DNA]`` for the cell model and ``[DNA, 0]`` for the nucleus model, as the
built-in ``cyto3`` / ``nuclei`` models expect with ``channels=[1, 2]`` / ``[1, 0]``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from cellfluxrl.errors import CellfluxError
from cellfluxrl.rewards.segmentation.base import check_images

log = logging.getLogger(__name__)

# Cellpose 3 built-in model name -> weights file name in the model folder.
_CP3_FILES = {"nuclei": "nucleitorch_0", "cyto": "cytotorch_0", "cyto2": "cyto2torch_0"}
_NUCLEI_DIAMETER = 17.0  # diam_mean of Cellpose's built-in nuclei model
_TRAIN_HINT = "train one offline with `cellfluxrl prepare cellpose-model DATASET OUT` and pass its path"


def cellpose_version() -> tuple[int, ...]:
    """Installed Cellpose version as a tuple of ints (CellfluxError if not installed)."""
    try:
        text = importlib.metadata.version("cellpose")
    except importlib.metadata.PackageNotFoundError:
        raise CellfluxError("the cellpose backend needs Cellpose: pip install 'cellfluxrl[cellpose]'") from None
    return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())


def model_dir() -> Path:
    """Cellpose's local model folder: ``$CELLPOSE_LOCAL_MODELS_PATH`` or ``~/.cellpose/models``."""
    env = os.environ.get("CELLPOSE_LOCAL_MODELS_PATH")
    return Path(env) if env else Path.home() / ".cellpose" / "models"


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """The weights file of a model given by path or by Cellpose model name; never downloads.

    Raises:
        CellfluxError: the path does not exist and no cached weights of that name exist.
    """
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return path.resolve()
    name = str(name_or_path)
    if os.sep not in name and "/" not in name:
        cached = model_dir() / _CP3_FILES.get(name, name)
        if cached.is_file():
            return cached
        raise CellfluxError(f"Cellpose model {name!r}: no cached weights at {cached} (this machine cannot "
                            f"download them); copy them there, or {_TRAIN_HINT}")
    raise CellfluxError(f"Cellpose model file {path} not found; {_TRAIN_HINT}")


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file (identifies the weights in ``settings``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def two_channel(images: np.ndarray, target: str) -> np.ndarray:
    """Model-space images -> float32 ``(B, 2, H, W)`` Cellpose input in ``[0, 1]``.

    Args:
        images: float32 ``(B, 3, H, W)`` in ``[-1, 1]`` (actin, tubulin, DNA).
        target: ``"cyto"`` -> ``[(actin + tubulin) / 2, DNA]``; ``"nuclei"`` -> ``[DNA, 0]``.
    """
    unit = np.clip(images * 0.5 + 0.5, 0.0, 1.0).astype(np.float32)
    out = np.zeros((unit.shape[0], 2, *unit.shape[2:]), np.float32)
    if target == "cyto":
        out[:, 0] = 0.5 * (unit[:, 0] + unit[:, 1])
        out[:, 1] = unit[:, 2]
    else:
        out[:, 0] = unit[:, 2]
    return out


def _relabel_batch(masks: list[np.ndarray] | np.ndarray) -> np.ndarray:
    """Cellpose masks -> int32 ``(B, H, W)`` with contiguous labels in raster order."""
    out = []
    for m in masks:
        m = np.asarray(m, dtype=np.int64)
        _, first = np.unique(m.ravel(), return_index=True)
        order = m.ravel()[np.sort(first)]
        order = order[order > 0]
        lut = np.zeros(int(m.max()) + 1, np.int32)
        lut[order] = np.arange(1, order.size + 1, dtype=np.int32)
        out.append(lut[m])
    return np.stack(out).astype(np.int32) if out else np.zeros((0, 0, 0), np.int32)


class CellposeSegmenter:
    """Nuclei and cells with two Cellpose models (batched, GPU when present).

    Args:
        model: shorthand used by the ``--cellpose-model`` CLI option: a folder written by
            ``prepare cellpose-model`` (its ``cellpose_nuclei`` and ``cellpose_cyto`` files), or a
            name/file that replaces ``cyto_model`` only.
        nuclei_model: model name (cached weights only, e.g. ``"nuclei"``) or weights file path.
        cyto_model: model name (e.g. ``"cyto3"``; ``"cpsam"`` for Cellpose 4) or file path.
        diameter: expected object diameter (px) passed to ``eval``; ``None`` lets the model use
            its own scale (``diam_mean / diam_labels``, i.e. no rescaling for a model trained
            by :func:`train_cellpose`).
        gpu: use CUDA; ``None`` = when available.
        batch_size: tiles per network forward pass.
        flow_threshold, cellprob_threshold, min_size: Cellpose's mask reconstruction parameters.

    Raises:
        CellfluxError: Cellpose missing, or a model that does not resolve to a local file.
    """

    def __init__(self, model: str | os.PathLike | None = None, nuclei_model: str = "nuclei", cyto_model: str = "cyto3",
                 diameter: float | None = None, gpu: bool | None = None, batch_size: int = 64,
                 flow_threshold: float = 0.4, cellprob_threshold: float = 0.0, min_size: int = 15):
        self.version = cellpose_version()
        if model is not None and Path(model).expanduser().is_dir():
            nuclei_model = os.fspath(Path(model).expanduser() / "cellpose_nuclei")
            cyto_model = os.fspath(Path(model).expanduser() / "cellpose_cyto")
        elif model is not None:
            cyto_model = os.fspath(model)
        self.nuclei_path = resolve_model(nuclei_model)
        self.cyto_path = resolve_model(cyto_model)
        self.nuclei_model, self.cyto_model = str(nuclei_model), str(cyto_model)
        self.diameter = None if diameter is None else float(diameter)
        self.batch_size = int(batch_size)
        self.flow_threshold, self.cellprob_threshold = float(flow_threshold), float(cellprob_threshold)
        self.min_size = int(min_size)
        if gpu is None:
            import torch

            gpu = torch.cuda.is_available()
        self.gpu = bool(gpu)
        self._hashes = {"nuclei": file_sha256(self.nuclei_path), "cyto": file_sha256(self.cyto_path)}
        self._models: dict[str, Any] = {}

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "backend": "cellpose", "cellpose_version": ".".join(map(str, self.version)),
            "nuclei_model": self.nuclei_model, "nuclei_model_sha256": self._hashes["nuclei"],
            "cyto_model": self.cyto_model, "cyto_model_sha256": self._hashes["cyto"],
            "diameter": self.diameter, "flow_threshold": self.flow_threshold,
            "cellprob_threshold": self.cellprob_threshold, "min_size": self.min_size,
        }

    def _model(self, target: str):
        """The loaded Cellpose model for ``"nuclei"`` or ``"cyto"`` (one instance per file)."""
        path = os.fspath(self.nuclei_path if target == "nuclei" else self.cyto_path)
        if path not in self._models:
            from cellpose import models

            try:
                if self.version[0] >= 4:
                    model = models.CellposeModel(gpu=self.gpu, pretrained_model=path)
                else:  # diam_mean only matters for Cellpose's own files, whose weights do not store it
                    diam = _NUCLEI_DIAMETER if target == "nuclei" else 30.0
                    model = models.CellposeModel(gpu=self.gpu, pretrained_model=path, diam_mean=diam)
            except Exception as exc:  # a corrupt or foreign file
                raise CellfluxError(f"cannot load Cellpose model {path}: {' '.join(str(exc).split())}") from None
            self._models[path] = model
        return self._models[path]

    def _eval(self, target: str, x: np.ndarray) -> np.ndarray:
        """float32 (B, 2, H, W) -> int32 (B, H, W) masks."""
        model = self._model(target)
        kwargs = dict(batch_size=self.batch_size, diameter=self.diameter, flow_threshold=self.flow_threshold,
                      cellprob_threshold=self.cellprob_threshold, min_size=self.min_size)
        if self.version[0] >= 4:
            # Cellpose-SAM takes up to 3 channels in any order; segment nuclei from DNA alone
            x3 = np.zeros((x.shape[0], x.shape[2], x.shape[3], 3), np.float32)
            x3[..., 0] = x[:, 0]
            x3[..., 1] = x[:, 1]
            masks = model.eval(x3, channel_axis=-1, **kwargs)[0]
        else:
            channels = [1, 2] if target == "cyto" else [1, 0]
            # a (B, 2, H, W) stack runs the network in batches; with do_3D=False and no stitching
            # Cellpose normalises and reconstructs masks plane by plane, i.e. per image
            if x.shape[0] == 1:
                masks = model.eval([x[0]], channels=channels, channel_axis=0, **kwargs)[0]
            else:
                masks = model.eval(x, channels=channels, channel_axis=1, z_axis=0, do_3D=False,
                                   stitch_threshold=0.0, **kwargs)[0]
        return _relabel_batch(masks)

    def segment(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float32 ``(B, 3, H, W)`` in [-1, 1] (actin, tubulin, DNA) -> int32 (nuclei, cells) ``(B, H, W)``."""
        images = check_images(images)
        if images.shape[0] == 0:
            empty = np.zeros((0, *images.shape[2:]), np.int32)
            return empty, empty.copy()
        nuclei = self._eval("nuclei", two_channel(images, "nuclei"))
        cells = self._eval("cyto", two_channel(images, "cyto"))
        return nuclei, cells


@contextlib.contextmanager
def _seeded_global_rngs(seed: int):
    """Cellpose's trainer draws from numpy's and torch's global generators; seed them for the
    duration and restore their previous states afterwards."""
    import torch

    np_state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)


def train_cellpose(dataset_dir: str | os.PathLike, out_dir: str | os.PathLike, target: str = "nuclei",
                   n_images: int = 128, n_epochs: int = 20, seed: int = 0, batch_size: int = 8,
                   learning_rate: float = 0.005, gpu: bool | None = None) -> Path:
    """Train a Cellpose 3 model from scratch (no pretrained weights, no download) on a dataset's
    ground-truth masks.

    Args:
        dataset_dir: a dataset with ``masks/nuclei.npy`` and ``masks/cells.npy`` (``prepare synthetic``).
        out_dir: folder for the weights; the file is ``OUT/cellpose_<target>`` (written atomically).
        target: ``"nuclei"`` (input ``[DNA, 0]``) or ``"cyto"`` (input ``[actin + tubulin, DNA]``,
            labels = whole cells).
        n_images: training crops, drawn at random (seeded) from the train split.
        n_epochs: passes over those crops.
        seed: seed of the crop choice and of Cellpose's trainer.
        batch_size, learning_rate: Cellpose's ``train_seg`` (AdamW) settings.
        gpu: train on CUDA; ``None`` = when available.

    Returns:
        Path of the saved weights, loadable by ``make_segmenter("cellpose", nuclei_model=...)``.

    Raises:
        CellfluxError: Cellpose missing or not 3.x, dataset without masks, bad target or counts.
    """
    from cellfluxrl.data.layout import load_dataset
    from cellfluxrl.images import to_model

    if target not in ("nuclei", "cyto"):
        raise CellfluxError(f"cellpose training target must be 'nuclei' or 'cyto', got {target!r}")
    if n_images < 1 or n_epochs < 1:
        raise CellfluxError(f"cellpose training needs n_images >= 1 and n_epochs >= 1, got {n_images}, {n_epochs}")
    version = cellpose_version()
    if version[0] != 3:
        raise CellfluxError(f"training from scratch needs Cellpose 3.1.x (the ViT of Cellpose {version[0]} "
                            f"cannot be trained from scratch on CPU); pip install 'cellpose>=3.1,<4'")
    import torch
    from cellpose import models, train, utils

    ds = load_dataset(dataset_dir)
    masks = ds.nuclei if target == "nuclei" else ds.cells
    if masks is None:
        raise CellfluxError(f"{dataset_dir}: no ground-truth masks (masks/{target if target == 'nuclei' else 'cells'}.npy); "
                            f"use a synthetic dataset")
    pool = ds.select(split="train")
    if len(pool) == 0:
        raise CellfluxError(f"{dataset_dir}: no training images")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(pool, size=min(n_images, len(pool)), replace=False))
    images = to_model(np.asarray(ds.images[rows]), dequantize=False).numpy()
    data = list(two_channel(images, target))
    labels = [np.asarray(m, dtype=np.int32) for m in masks[rows]]
    keep = [i for i, m in enumerate(labels) if m.max() > 0]
    data, labels = [data[i] for i in keep], [labels[i] for i in keep]
    if not data:
        raise CellfluxError(f"{dataset_dir}: the chosen training crops have no objects")
    # the model's own scale = the mean object diameter, so evaluation needs no rescaling
    diam = float(np.mean([utils.diameters(m)[0] for m in labels]))
    if gpu is None:
        gpu = torch.cuda.is_available()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"cellpose_{target}"
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".cellpose-train-") as tmp, _seeded_global_rngs(seed):
        model = models.CellposeModel(gpu=bool(gpu), pretrained_model=False, nchan=2, mkldnn=False, diam_mean=diam)
        size = int(min(min(m.shape) for m in labels))
        path = train.train_seg(model.net, train_data=data, train_labels=labels, channels=None, channel_axis=None,
                               normalize=True, bsize=size - size % 16 if size >= 32 else size, rescale=False,
                               min_train_masks=1, batch_size=batch_size, n_epochs=n_epochs,
                               learning_rate=learning_rate, save_path=tmp, save_every=max(n_epochs, 1),
                               model_name=final.name)[0]
        shutil.copyfile(path, Path(tmp) / "final")
        os.replace(Path(tmp) / "final", final)
    log.info("trained Cellpose %s model on %d crops for %d epochs -> %s", target, len(data), n_epochs, final)
    return final
