"""Images of another channel order, size or intensity scale brought to the dataset's convention, explicitly.

The rewards threshold and count what the segmenter finds, so pixels must mean what the dataset's
pixels mean: uint8 per channel in the dataset's channel order (``actin, tubulin, dna`` for BBBC021,
as IMPA and CellFlux store their crops), at the dataset's size, where 0 and 255 are each plate's 0.1
and 99.9 percentiles of the raw intensities (``prepare bbbc021 --raw``, ``prepare images``). Images
made otherwise are mapped by an :class:`ImageMapping` that the user states; nothing is guessed:

* ``channels``: the names of the source's channels in the order it stores them (a permutation of
  the dataset's channel names); the images are reordered to the dataset's order.
* ``intensity``: how the source scaled its pixels.
  ``dataset`` (the default): already the dataset's uint8 convention; anything but uint8 is refused.
  ``range:LO:HI``: a fixed linear range, LO meaning the dataset's 0 and HI its 255 (``range:0:1``
  for floats in [0, 1], ``range:-1:1`` for [-1, 1], ``range:0:65535`` for 16-bit copies of uint8);
  values outside are clipped.
  ``percentile:PLO:PHI``: each image was scaled per channel by its own PLO/PHI percentiles (what
  many loaders do); each image's own PLO/PHI percentiles are mapped to the median PLO/PHI
  percentiles of the dataset's real training images (per channel), which is the closest the
  dataset's per-plate convention can be reached from one image.
* ``size``: ``resize`` (antialiased bilinear to the dataset's size) or ``crop`` (the centre crop of
  a larger image); without it an image of another size is refused.

Order: intensity (to float in the dataset's 0..255 units), channel order, size, then rounding to
uint8. The identity mapping returns the uint8 input unchanged, and ``range:0:65535`` of ``x * 257``
returns ``x`` exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cellfluxrl.errors import CellfluxError

SIZES = ("resize", "crop")
INTENSITIES = ("dataset", "range:LO:HI", "percentile:PLO:PHI")
REFERENCE_IMAGES = 256  # training images whose per-image percentiles give the percentile mapping's targets


@dataclass(frozen=True)
class ImageMapping:
    """How a source's images map onto the dataset's convention (see the module docstring).

    Attributes:
        channels: the source's channel names in stored order (``None``: the dataset's order).
        size: ``"resize"``, ``"crop"`` or ``None`` (the dataset's size is required).
        intensity: ``"dataset"``, ``"range"`` or ``"percentile"``.
        low, high: LO/HI of ``range`` (pixel values) or PLO/PHI of ``percentile`` (percent).
    """

    channels: tuple[str, ...] | None = None
    size: str | None = None
    intensity: str = "dataset"
    low: float = 0.0
    high: float = 255.0

    @classmethod
    def parse(cls, channels: str | None = None, size: str | None = None, intensity: str | None = None) -> "ImageMapping":
        """From the command-line strings (``"actin,tubulin,dna"``, ``"resize"``, ``"range:0:1"``).

        Raises:
            CellfluxError: one line naming the bad option value.
        """
        names = None
        if channels:
            names = tuple(part.strip().lower() for part in channels.split(","))
            if any(not n for n in names) or len(set(names)) != len(names):
                raise CellfluxError(f"--channels {channels!r}: give distinct channel names separated by commas")
        if size is not None and size not in SIZES:
            raise CellfluxError(f"--size {size!r}: choose {' or '.join(SIZES)}")
        text = (intensity or "dataset").strip()
        kind, _, rest = text.partition(":")
        if kind == "dataset" and not rest:
            return cls(names, size)
        if kind in ("range", "percentile"):
            low, high = _two_numbers(rest, text)
            if not low < high or kind == "percentile" and not 0 <= low < high <= 100:
                raise CellfluxError(f"--intensity {text!r}: need LO < HI" + (" within 0..100" if kind == "percentile" else ""))
            return cls(names, size, kind, low, high)
        raise CellfluxError(f"--intensity {text!r}: choose {', '.join(INTENSITIES)}")

    def describe(self) -> str:
        """One line for the report: what was done to the pixels."""
        what = {"dataset": "pixels used as they are (the dataset's uint8 convention)",
                "range": f"pixels mapped linearly from {self.low:g}..{self.high:g} to 0..255",
                "percentile": f"each image's own {self.low:g}/{self.high:g} percentiles mapped to the dataset's median "
                              f"ones"}[self.intensity]
        order = f"; channels reordered from {','.join(self.channels)}" if self.channels else ""
        size = f"; size by {self.size}" if self.size else ""
        return what + order + size

    def apply(self, raw: np.ndarray, dataset, origin: str) -> np.ndarray:
        """``raw`` ``(N, H, W, C)`` of any numeric dtype -> uint8 ``(N, H', W', C')`` in the dataset's convention.

        Raises:
            CellfluxError: a channel count or name that does not fit, non-uint8 pixels under
                ``dataset``, another size without ``size``, a crop of a smaller image.
        """
        channels = [str(c).lower() for c in dataset.channels]
        order = self._order(raw.shape[3], channels, origin)
        if self.intensity == "dataset" and raw.dtype == np.uint8 and order is None and raw.shape[1:3] == _hw(dataset):
            return raw
        if self.intensity == "dataset" and raw.dtype != np.uint8:
            raise CellfluxError(f"{origin}: {raw.dtype} pixels; say how they were scaled with --intensity "
                                f"range:LO:HI or percentile:PLO:PHI (the dataset's convention is uint8)")
        x = self._intensity(raw, dataset, order, origin)
        if order is not None:
            x = x[..., order]
        return np.clip(np.rint(self._size(x, _hw(dataset), origin)), 0, 255).astype(np.uint8)

    def _order(self, n_channels: int, channels: list[str], origin: str) -> list[int] | None:
        """Indices that put the source's channels in the dataset's order (``None``: already so)."""
        if self.channels is None:
            if n_channels != len(channels):
                raise CellfluxError(f"{origin}: images have {n_channels} channel(s), the dataset has {len(channels)} "
                                    f"({', '.join(channels)})")
            return None
        if len(self.channels) != n_channels:
            raise CellfluxError(f"{origin}: --channels names {len(self.channels)} channel(s), the images have {n_channels}")
        if sorted(self.channels) != sorted(channels):
            raise CellfluxError(f"{origin}: --channels {','.join(self.channels)} must name the dataset's channels "
                                f"{', '.join(channels)} in the order the images store them")
        order = [self.channels.index(c) for c in channels]
        return None if order == list(range(n_channels)) else order

    def _intensity(self, raw: np.ndarray, dataset, order, origin: str) -> np.ndarray:
        """float64 in the dataset's 0..255 units (source channel order)."""
        x = raw.astype(np.float64)
        if not np.isfinite(x).all():
            raise CellfluxError(f"{origin}: images hold NaN or infinite pixels")
        if self.intensity in ("dataset", "range"):
            lo, hi = (0.0, 255.0) if self.intensity == "dataset" else (self.low, self.high)
            return (x - lo) * (255.0 / (hi - lo))
        target = reference_percentiles(dataset, self.low, self.high)  # (2, C) in the dataset's order
        if order is not None:
            target = target[:, np.argsort(order)]
        own = np.percentile(x, (self.low, self.high), axis=(1, 2))  # (2, N, C)
        span = np.maximum(own[1] - own[0], 1e-12)
        return target[0] + (x - own[0][:, None, None, :]) * ((target[1] - target[0]) / span)[:, None, None, :]

    def _size(self, x: np.ndarray, hw: tuple[int, int], origin: str) -> np.ndarray:
        if x.shape[1:3] == hw:
            return x
        if self.size is None:
            raise CellfluxError(f"{origin}: images are {x.shape[1]}x{x.shape[2]} px, the dataset's are {hw[0]}x{hw[1]}; "
                                f"give --size resize or --size crop")
        if self.size == "crop":
            if x.shape[1] < hw[0] or x.shape[2] < hw[1]:
                raise CellfluxError(f"{origin}: cannot crop {x.shape[1]}x{x.shape[2]} px images to {hw[0]}x{hw[1]}; "
                                    f"use --size resize")
            top, left = (x.shape[1] - hw[0]) // 2, (x.shape[2] - hw[1]) // 2
            return x[:, top:top + hw[0], left:left + hw[1]]
        import torch

        t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, 3, 1)))
        out = torch.nn.functional.interpolate(t, size=hw, mode="bilinear", align_corners=False, antialias=True)
        return np.moveaxis(out.numpy(), 1, 3)


def _hw(dataset) -> tuple[int, int]:
    return int(dataset.images.shape[1]), int(dataset.images.shape[2])


def _two_numbers(text: str, whole: str) -> tuple[float, float]:
    parts = text.split(":")
    try:
        low, high = (float(p) for p in parts)
    except ValueError:
        raise CellfluxError(f"--intensity {whole!r}: expected two numbers LO:HI") from None
    if not (np.isfinite(low) and np.isfinite(high)):
        raise CellfluxError(f"--intensity {whole!r}: LO and HI must be finite")
    return low, high


def reference_percentiles(dataset, low: float, high: float) -> np.ndarray:
    """float64 ``(2, C)``: the median over (up to 256 evenly spaced) real training images of each
    image's own ``low``/``high`` percentile per channel, in uint8 units."""
    rows = dataset.select(split="train")
    if rows.size == 0:
        rows = np.arange(len(dataset))
    rows = rows[np.linspace(0, rows.size - 1, min(REFERENCE_IMAGES, rows.size)).astype(np.int64)]
    images = np.asarray(dataset.images[np.unique(rows)], dtype=np.float64)
    return np.median(np.percentile(images, (low, high), axis=(1, 2)), axis=1)
