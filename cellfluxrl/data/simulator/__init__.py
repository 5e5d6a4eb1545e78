"""The synthetic cell-painting simulator's numba kernels (driven by :mod:`cellfluxrl.data.synthetic`).

One crop is rendered from three inputs only: a 64-bit crop seed, a row of per-crop signature
parameters (``P_*`` columns, already interpolated for MoA, dose and compound) and a row of plate
parameters (``L_*`` columns). All randomness inside a crop comes from a counter-based hash of the
crop seed, so a crop does not depend on the chunk or thread that renders it.

Geometry: every cell is a smooth star-shaped polygon, radius ``r(theta) = R (1 + sum_k a_k
cos(k (theta - phi_k)))`` for k = 2..4; nuclei are star shapes too (plus an optional lobe mode),
fragments and micronuclei are further nucleus objects. A pixel belongs to the cell with the
smallest normalised radius ``|p - c| / r(theta)`` below 1 (so touching cells split along a smooth
border); a nucleus pixel must also belong to its own cell, which makes nucleus-in-cell containment
exact on the ground truth.

Modules, bottom up: ``columns`` (table layouts), ``hashing`` (counter-based randomness, textures),
``geometry`` (cells and nuclei of a crop), ``paint`` (pixels, labels, :func:`~.paint.render_crops`).
They import numpy and numba only; this ``__init__`` imports nothing.
"""
