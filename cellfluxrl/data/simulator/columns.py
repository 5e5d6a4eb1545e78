"""Column layout of the simulator's tables: per-crop signature (``P_*``), plate (``L_*``), cell
(``C_*``) and nucleus-object (``O_*``) rows, and the table capacities."""

from __future__ import annotations

# Columns of the per-crop signature row (see synthetic.PARAMS for meanings and defaults).
P_CELL_R, P_CELL_IRREG, P_NUC_R, P_NUC_IRREG, P_NUC_LOBES, P_NEIGHBORS, P_SPACING = 0, 1, 2, 3, 4, 5, 6
P_BINUC, P_FRAG, P_MICRO, P_SIZE_CV, P_DNA_GAIN, P_DNA_RING, P_DNA_SPECKLE = 7, 8, 9, 10, 11, 12, 13
P_ACTIN_RIM, P_ACTIN_FIBER, P_ACTIN_PUNCTA, P_TUB_FIL, P_TUB_DIFFUSE, P_TUB_BUNDLE = 14, 15, 16, 17, 18, 19
P_TUB_ASTER, P_AGGREGATE, P_CYTO_GAIN, P_VACUOLES, P_NUCLEOLI = 20, 21, 22, 23, 24
N_PARAMS = 25

# Columns of the plate row: per-channel gain, per-channel background (uint8 units), gradient.
L_GAIN, L_BG, L_GRAD_AMP, L_GRAD_ANGLE, L_NOISE = 0, 3, 6, 7, 8
N_PLATE = 9

MAX_CELLS = 40
MAX_OBJECTS = 160
MAX_PIECES = 8  # nucleus pieces of one cell (fragments or the two nuclei of a binucleated cell)
KIND_MAIN, KIND_FRAGMENT, KIND_MICRO = 0, 1, 2

# Columns of the per-crop cell table: centre (px), mean radius (px), 3 Fourier amplitudes and
# phase cos/sin (modes 2..4), intensity factor, actin-fibre angle, tubulin phase, aggregate centre,
# first-nucleus centre.
C_X, C_Y, C_R, C_AMP, C_PC, C_PS, C_INT, C_FIB, C_TUB, C_AGG, C_NUC = 0, 1, 2, 3, 6, 9, 12, 13, 14, 15, 17
N_CELL_COLS = 19
# Columns of the per-crop nucleus-object table: centre, radius, 3 Fourier modes, lobe amplitude,
# lobe order, lobe phase cos/sin, owning cell, kind (main/fragment/micronucleus), first-of-cell flag.
O_X, O_Y, O_R, O_AMP, O_PC, O_PS, O_LOB, O_LK, O_LC, O_LS, O_CELL, O_KIND, O_FIRST = (
    0, 1, 2, 3, 6, 9, 12, 13, 14, 15, 16, 17, 18)
N_OBJ_COLS = 19
