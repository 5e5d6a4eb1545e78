"""Segmentation of nuclei and cells, the one pass per batch every morphology reward shares.

Owns: the backend contract (``base``: :func:`check_images`, the ``Segmenter`` protocol), the
factory and backend registry (``factory``: :func:`make_segmenter`, ``BACKENDS``), the classical
numba backend (``classical``, with its kernels in ``threshold``, ``declump``, ``labels``,
``cell_seeds``), the Cellpose backend and its offline training (``cellpose_backend``), and
accuracy against ground truth (``accuracy``).

May import: the shared plumbing (``cellfluxrl.errors``, ``cellfluxrl.images``) and
``cellfluxrl.data`` (the Cellpose trainer reads a dataset); nothing from model, rl, evaluation or
the commands. The backends import ``base``; only ``factory`` imports a backend (inside a
loader), and no backend imports ``factory``. This ``__init__`` imports nothing (numba and Cellpose load on demand).
"""
