"""Data: datasets on disk and the pairs the models train on (the bottom layer).

Owns: the on-disk layout and its writer (``layout``, resumable builds in ``resume``), compounds and
MoAs (``compounds``), compound embeddings (``fingerprints``), control/treated pairing for training
(``pairing``), and the dataset sources: the synthetic simulator (``synthetic``, kernels in
``simulator/``) and real BBBC021 (``bbbc021/``: IMPA crops and raw Broad images).

May import: only the shared plumbing (``cellfluxrl.errors``, ``images``, ``progress``) and
``cellfluxrl.__version__``; never model, rewards, rl, evaluation or the commands. A new dataset
source is a module (or folder) here that streams into :class:`~cellfluxrl.data.layout.DatasetWriter`.
This ``__init__`` imports nothing.
"""
