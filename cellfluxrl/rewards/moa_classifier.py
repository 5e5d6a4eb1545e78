"""The MoA classifier behind the MoA reward (paper Eq. 3) and the offline image features.

CellFlux scores generated images with a classifier fitted on *real treated training* images (an
Inception-v3 feature extractor plus an MLP head). Offline, with no pretrained weights, we train a
compact CNN from scratch instead, fast enough to run inside ``prepare`` on a CPU:

    patchify stem (4x4, stride 4 for 96 px crops) -> 3 stages of [conv3x3-BN-ReLU] x 2 (max-pool between)
    -> global average pooling (the features, F = widths[-1]) -> linear (12 MoA logits)

Input: float32 ``(B, 3, H, W)`` in ``[-1, 1]`` with ``H = W`` a multiple of 16 (96 for BBBC021; 48
works for tests, with a stride-2 stem so the first feature map is 24x24 in both cases). Classes:
:data:`cellfluxrl.data.compounds.MOAS` in that order (DMSO is not a class: CellFluxRL scores
treated targets). Checkpoints are ``{"state_dict", "config", "info"}``
with plain Python types only, loadable with ``torch.load(weights_only=True)``.

Robustness. Trained on clean crops only, the CNN reads pixel texture: a 0.75 px blur or a 2x
down/up-sampling of real test crops took its accuracy from 0.99 to about 0.4, so sampler artefacts
of generated images, not their morphology, decided the MoA reward. Training therefore degrades
each batch at random (:func:`cellfluxrl.rewards.degradations.random_degradation`: blur up to 1.2 px,
down/up-sampling by 1.5/2/3, pixel noise; not the gain/contrast jitter, which erased brightness
cues of the MoA), in batches of 32 so that a few hundred crops still get enough optimizer steps
to learn the harder, degraded task; :func:`robustness_report`
measures accuracy under the fixed degradations of ``ROBUSTNESS_CONDITIONS``
(``experiments/classifier_robustness.py`` prints the table).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cellfluxrl.data.compounds import MOAS
from cellfluxrl.rewards.degradations import (DEFAULT_DEGRADATION, ROBUSTNESS_CONDITIONS, DegradationConfig,
                                             random_degradation)
from cellfluxrl.data.layout import follow_umask
from cellfluxrl.errors import CellfluxError

FORMAT = "cellfluxrl-moa-classifier/1"
DEFAULT_WIDTHS = (24, 48, 96)
DEFAULT_BATCH_SIZE = 32
"""Crops per optimizer step. Degradation training of ~900 crops underfits at batch 128 (160 steps of
the demo's 20 epochs: train accuracy 0.76-0.84); batch 32 takes 4x the steps for the same images
(experiments/RESULTS.md, "MoA classifier on clean crops")."""
TARGET_IMAGES = 300 * 128
"""Images seen by default (:func:`default_epochs`): 300 steps of the former batch 128."""

logger = logging.getLogger(__name__)


def _conv_block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class MoAClassifier(nn.Module):
    """Compact CNN: float ``(B, 3, H, W)`` in ``[-1, 1]`` -> MoA logits ``(B, n_classes)``.

    Args:
        n_classes: number of MoA classes (12, the order of ``classes``).
        in_channels: image channels (3: actin, tubulin, DNA).
        widths: channels of the three stages; the feature dimension F is ``widths[-1]``.
        classes: class names, stored in the checkpoint (default :data:`MOAS`).
    """

    def __init__(self, n_classes: int = len(MOAS), in_channels: int = 3, widths: tuple[int, ...] = DEFAULT_WIDTHS,
                 classes: tuple[str, ...] = MOAS, stem_stride: int = 4):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        self.config = {"n_classes": int(n_classes), "in_channels": int(in_channels), "widths": list(widths),
                       "classes": list(classes), "stem_stride": int(stem_stride)}
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], stem_stride, stride=stem_stride, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages, c_in = [], widths[0]
        for i, c_out in enumerate(widths):
            stages.append(nn.Sequential(*([nn.MaxPool2d(2)] if i else []), _conv_block(c_in, c_out),
                                        _conv_block(c_out, c_out)))
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(widths[-1], n_classes)

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.config["classes"])

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features: float ``(B, 3, H, W)`` in [-1, 1] -> float ``(B, F)`` (after GAP)."""
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, n_classes)``."""
        return self.head(self.embed(x))

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor | np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Class probabilities, float64 numpy ``(B, n_classes)``, rows summing to 1 (eval mode)."""
        fn = lambda x: torch.softmax(self(x).float(), dim=1)  # noqa: E731
        return _batched(self, images, batch_size, fn, self.config["n_classes"]).astype(np.float64)

    @torch.no_grad()
    def features(self, images: torch.Tensor | np.ndarray, batch_size: int = 512) -> np.ndarray:
        """Penultimate (GAP) features, float32 numpy ``(B, F)``: the offline substitute for Inception."""
        return _batched(self, images, batch_size, lambda x: self.embed(x).float(), self.config["widths"][-1])


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batched(model: nn.Module, images, batch_size: int, fn, out_dim: int) -> np.ndarray:
    """Apply ``fn`` to float ``(B, C, H, W)`` images in chunks on the model's device (eval mode)."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    x_all = torch.as_tensor(images)
    outs = []
    for start in range(0, x_all.shape[0], batch_size):
        x = x_all[start:start + batch_size].to(device, torch.float32).contiguous(memory_format=torch.channels_last)
        outs.append(fn(x).cpu())
    model.train(was_training)
    if not outs:
        return np.zeros((0, out_dim), dtype=np.float32)
    return torch.cat(outs).numpy()


def predict_proba(model: MoAClassifier, images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Module-level alias of :meth:`MoAClassifier.predict_proba`: float64 ``(B, 12)``."""
    return model.predict_proba(images)


def features(model: MoAClassifier, images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Module-level alias of :meth:`MoAClassifier.features`: float32 ``(B, F)``."""
    return model.features(images)


def stem_stride(size: int) -> int:
    """Patchify stride giving a 24x24 first feature map: 4 for 96 px crops, 2 for 48 px."""
    return int(min(4, max(1, size // 24)))


def default_epochs(n_train: int, batch_size: int = DEFAULT_BATCH_SIZE, target_images: int = TARGET_IMAGES) -> int:
    """Epochs showing the network about ``target_images`` crops, clamped to [3, 30].

    The budget is in images seen, not optimizer steps, so the compute does not depend on
    ``batch_size`` (whole batches per epoch: ``ceil(n_train / batch_size)``). With the defaults
    a 900-crop half set gets 30 epochs and the 9,156-crop 96 px set 5, as before batch 32.
    """
    steps_per_epoch = max(1, math.ceil(n_train / batch_size))
    target_steps = target_images / batch_size
    return int(min(30, max(3, math.ceil(target_steps / steps_per_epoch))))


def _augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random flips and 90-degree rotations (cells have no orientation), per batch."""
    k = int(torch.randint(0, 4, (), generator=generator))
    x = torch.rot90(x, k, dims=(2, 3)) if k else x
    return torch.flip(x, dims=(3,)) if bool(torch.randint(0, 2, (), generator=generator)) else x


def _to_float(images_uint8: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 ``(B, H, W, C)`` -> float32 ``(B, C, H, W)`` in [-1, 1], channels_last, on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).to(device)
    x = x.permute(0, 3, 1, 2).to(torch.float32).mul_(2.0 / 255.0).sub_(1.0)
    return x.contiguous(memory_format=torch.channels_last)


def accuracy_report(model: MoAClassifier, images_uint8: np.ndarray, labels: np.ndarray,
                    batch_size: int = 512) -> dict:
    """Top-1 accuracy and per-class accuracy on uint8 ``(N, H, W, C)`` images with int labels."""
    device = _device_of(model)
    preds = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            x = _to_float(images_uint8[start:start + batch_size], device)
            preds.append(model(x).argmax(dim=1).cpu().numpy())
    pred = np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)
    labels = np.asarray(labels)
    per_class = {model.classes[c]: float(np.mean(pred[labels == c] == c))
                 for c in range(len(model.classes)) if np.any(labels == c)}
    return {"accuracy": float(np.mean(pred == labels)) if labels.size else float("nan"),
            "n": int(labels.size), "per_class": per_class}


def robustness_report(model: MoAClassifier, images_uint8: np.ndarray, labels: np.ndarray,
                      batch_size: int = 512, seed: int = 0) -> dict[str, float]:
    """Top-1 accuracy under each fixed degradation of :data:`~cellfluxrl.rewards.degradations.ROBUSTNESS_CONDITIONS`.

    Args:
        model: the classifier (evaluated in eval mode; its mode is restored).
        images_uint8: uint8 ``(N, H, W, C)`` crops; labels: int ``(N,)`` class indices.
        batch_size: images per forward pass.
        seed: seed of the noise condition (a fresh generator per call, so the report is deterministic
            for a given ``batch_size``).

    Returns:
        ``{condition name: accuracy in [0, 1]}`` in the order of ``ROBUSTNESS_CONDITIONS``
        (``clean``, ``blur 0.5 px``, ..., ``down/up 2x``); NaN for an empty set.
    """
    device = _device_of(model)
    labels = np.asarray(labels)
    was_training = model.training
    model.eval()
    report = {}
    with torch.no_grad():
        for name, degrade in ROBUSTNESS_CONDITIONS.items():
            generator = torch.Generator().manual_seed(seed)
            correct = 0
            for start in range(0, len(labels), batch_size):
                x = degrade(_to_float(images_uint8[start:start + batch_size], device).contiguous(), generator)
                pred = model(x.contiguous(memory_format=torch.channels_last)).argmax(dim=1).cpu().numpy()
                correct += int(np.sum(pred == labels[start:start + batch_size]))
            report[name] = correct / labels.size if labels.size else float("nan")
    model.train(was_training)
    return report


def train_moa_classifier(images: np.ndarray, labels: np.ndarray, *, epochs: int | None = None,
                         batch_size: int = DEFAULT_BATCH_SIZE, lr: float = 3e-3, weight_decay: float = 0.05,
                         widths: tuple[int, ...] = DEFAULT_WIDTHS, seed: int = 0, device: str = "cpu",
                         progress: bool = False, degrade: bool = True,
                         degradation: DegradationConfig = DEFAULT_DEGRADATION) -> tuple[MoAClassifier, dict]:
    """Fit a :class:`MoAClassifier` on real treated images.

    AdamW with a one-cycle (warm-up then cosine) learning rate, cross-entropy, random flips and
    90-degree rotations, random degradations (``degrade=True``), batch 32; seeded (initialisation,
    shuffling, augmentation and degradations depend only on ``seed``; global RNG state is left
    untouched). With ``degrade=False`` the run is exactly the earlier recipe (same random stream).

    Args:
        images: uint8 ``(N, H, W, 3)`` training crops (H = W, a multiple of 16).
        labels: int64 ``(N,)`` class index in :data:`MOAS`.
        epochs: passes over the data (``None``: :func:`default_epochs`, about 38,400 images).
        batch_size, lr, weight_decay: optimiser settings.
        widths: the CNN stage widths.
        seed: seed of all randomness.
        device: ``"cpu"`` or ``"cuda[:k]"``.
        progress: draw a tqdm bar (commands only).
        degrade: also apply :func:`~cellfluxrl.rewards.degradations.random_degradation` (blur, down/up-sampling,
            pixel noise, gain/contrast jitter, per image) to every training batch, so the classifier
            reads morphology rather than the pixel texture a generator may not reproduce.
        degradation: the probabilities and ranges of those degradations.

    Returns:
        ``(model, info)``: the model in eval mode and a dict with ``epochs``, ``steps``,
        ``train_accuracy`` (last epoch, running, on the augmented/degraded batches), ``seconds``,
        ``degrade`` and ``degradation`` (the config as a plain dict, or None).
    """
    labels = np.asarray(labels, dtype=np.int64)
    n = len(labels)
    if images.ndim != 4 or images.shape[0] != n or images.dtype != np.uint8:
        raise ValueError(f"expected uint8 (N, H, W, C) images and N labels, got {images.dtype} {images.shape}, {n}")
    if images.shape[1] % 16 or images.shape[1] != images.shape[2]:
        raise CellfluxError(f"MoA classifier needs square crops with a side that is a multiple of 16, "
                            f"got {images.shape[1:3]}")
    if n < 2 or len(np.unique(labels)) < 2:
        raise CellfluxError(f"MoA classifier needs treated training images of at least 2 MoAs, got {n} images")
    epochs = default_epochs(n, batch_size) if epochs is None else int(epochs)
    device_t = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MoAClassifier(widths=widths, stem_stride=stem_stride(images.shape[1]))
    model = model.to(device_t).to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(seed + 1)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total, pct_start=0.15)
    bar = None
    if progress:
        from cellfluxrl.progress import progress as progress_bar

        bar = progress_bar(total=total, desc="MoA classifier", unit="step", leave=False)
    start, correct, seen = time.perf_counter(), 0, 0
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=generator).numpy()
        correct, seen = 0, 0
        for step in range(steps_per_epoch):
            # Draw a batch (sorted indices read a memmap faster), augment, step.
            idx = np.sort(order[step * batch_size:(step + 1) * batch_size])
            x = _augment(_to_float(images[idx], device_t), generator)
            if degrade:
                x = random_degradation(x.contiguous(), generator, degradation).contiguous(
                    memory_format=torch.channels_last)
            y = torch.from_numpy(labels[idx]).to(device_t)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            correct += int((logits.argmax(1) == y).sum())
            seen += len(idx)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.3f}")
        logger.info("MoA classifier epoch %d/%d: train accuracy %.3f", epoch + 1, epochs, correct / max(seen, 1))
    if bar is not None:
        bar.close()
    model.eval()
    info = {"epochs": epochs, "steps": total, "batch_size": batch_size, "lr": lr, "seed": seed,
            "degrade": bool(degrade), "degradation": _config_dict(degradation) if degrade else None,
            "train_accuracy": correct / max(seen, 1), "seconds": time.perf_counter() - start}
    return model, info


def _config_dict(config: DegradationConfig) -> dict:
    """A degradation config as plain Python types (checkpoints are loaded with weights_only=True)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def save_moa_classifier(model: MoAClassifier, path: str | os.PathLike, info: dict | None = None) -> Path:
    """Write ``{"format", "state_dict", "config", "info"}`` atomically (temp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    payload = {"format": FORMAT, "state_dict": state, "config": dict(model.config), "info": dict(info or {})}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        follow_umask(tmp)  # mkstemp files are private whatever the umask
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load_moa_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> MoAClassifier:
    """Load a classifier written by :func:`save_moa_classifier` (``weights_only=True``), eval mode.

    Raises:
        CellfluxError: missing, corrupt or incompatible checkpoint (naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise CellfluxError(f"{path}: MoA classifier checkpoint not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CellfluxError(f"{path}: not a loadable MoA classifier checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CellfluxError(f"{path}: not a cellfluxrl MoA classifier (format {FORMAT} expected)")
    config = payload["config"]
    model = MoAClassifier(n_classes=config["n_classes"], in_channels=config["in_channels"],
                          widths=tuple(config["widths"]), classes=tuple(config["classes"]),
                          stem_stride=int(config.get("stem_stride", 4)))
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:200]
        raise CellfluxError(f"{path}: weights do not fit the stored config ({detail})") from exc
    return model.to(device).to(memory_format=torch.channels_last).eval()
