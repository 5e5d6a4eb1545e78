"""The segmentation backends by name: :func:`make_segmenter`, the one factory every caller uses.

This module sits above the backends (it imports them, lazily, so numba and Cellpose load only when
asked for); the backends import the contract in :mod:`cellfluxrl.rewards.segmentation.base`, never
this module, so the import graph has no cycle. A new backend is a module beside them plus one entry
in :data:`BACKENDS`.
"""

from __future__ import annotations

from typing import Any, Callable

from cellfluxrl.errors import CellfluxError
from cellfluxrl.rewards.segmentation.base import Segmenter



def _classical() -> type:
    from cellfluxrl.rewards.segmentation.classical import ClassicalSegmenter

    return ClassicalSegmenter


def _cellpose() -> type:
    from cellfluxrl.rewards.segmentation.cellpose_backend import CellposeSegmenter

    return CellposeSegmenter


# name -> loader of the backend class: the registry; a backend module is imported on first use.
BACKENDS: dict[str, Callable[[], type]] = {"classical": _classical, "cellpose": _cellpose}


def make_segmenter(name: str = "classical", **options: Any) -> Segmenter:
    """Build a segmentation backend by name.

    Args:
        name: ``"classical"`` (default, offline, fast) or ``"cellpose"``.
        **options: the backend's parameters (see :class:`~cellfluxrl.rewards.segmentation.classical.ClassicalSegmenter`
            and :class:`~cellfluxrl.rewards.segmentation.cellpose_backend.CellposeSegmenter`).

    Returns:
        A :class:`Segmenter`.

    Raises:
        CellfluxError: unknown backend or option, Cellpose not installed, model file missing.
    """
    if name not in BACKENDS:
        raise CellfluxError(f"unknown segmentation backend {name!r}; choose one of {', '.join(BACKENDS)}")
    backend = BACKENDS[name]()
    try:
        return backend(**options)
    except TypeError as exc:
        raise CellfluxError(f"{name} segmenter: {exc}") from None
