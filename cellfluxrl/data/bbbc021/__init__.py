"""Real BBBC021 into the cellfluxrl layout: from the IMPA/CellFlux crops or the raw Broad images.

Two entry points, both streaming into a :class:`~cellfluxrl.data.layout.DatasetWriter` (built in a
hidden temporary sibling of ``out`` and renamed into place only when complete), with channels
(actin, tubulin, dna) and one conditions row per compound that appears (DMSO included), embedded
as CellFlux does (:func:`~cellfluxrl.data.fingerprints.resolve_embedding`): RDKit's hashed Morgan
count fingerprint of its SMILES, else its row of CellFlux's shipped BBBC021 table (or, for every
compound, its row of a user's embeddings CSV given as ``embeddings=``):

- :func:`prepare_impa`: the IMPA reproducibility layout that CellFlux trains on (``metadata/
  bbbc021_df_all.csv`` plus one uint8 ``(96, 96, 3)`` ``.npy`` per cell).
- :func:`prepare_raw`: the Broad BBBC021 v1 release (``BBBC021_v1_image.csv``, ``_compound.csv``,
  ``_moa.csv`` and one 16-bit TIFF per channel per field of view): per-plate illumination
  correction, nucleus detection on DAPI, nucleus-centred crops, robust scaling to uint8.

Every problem a user can cause is a one-line :class:`~cellfluxrl.errors.CellfluxError` naming the
file and CSV line; the only silent-but-counted skips are listed in each function's docstring and
recorded under ``"skipped"`` in ``meta.json``.

Modules: ``impa`` (:func:`prepare_impa`), ``raw`` (:func:`prepare_raw`), ``fields`` (image
operations on raw fields of view: magnification, illumination, nuclei, crops), ``tables`` (CSV
streaming and the compound table both readers share). This package may import only the rest of
``cellfluxrl.data`` and the shared plumbing (errors, progress).
"""

from cellfluxrl.data.bbbc021.fields import crop_windows, detect_nuclei, illumination_function, scale_to_uint8
from cellfluxrl.data.bbbc021.impa import prepare_impa
from cellfluxrl.data.bbbc021.raw import prepare_raw, split_fields
from cellfluxrl.data.bbbc021.tables import CHANNELS_BBBC021

__all__ = ["CHANNELS_BBBC021", "crop_windows", "detect_nuclei", "illumination_function", "prepare_impa", "prepare_raw",
           "scale_to_uint8", "split_fields"]
