"""Numba kernels of the synthetic cell-painting simulator (see :mod:`cellfluxrl.data.synthetic`).

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
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

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
_KIND_MAIN, _KIND_FRAGMENT, _KIND_MICRO = 0, 1, 2

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

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31, _S11 = np.uint64(30), np.uint64(27), np.uint64(31), np.uint64(11)


@njit(cache=True, nogil=True)
def mix64(z):
    """SplitMix64 finaliser: uint64 -> well-mixed uint64."""
    z = (z ^ (z >> _S30)) * _M1
    z = (z ^ (z >> _S27)) * _M2
    return z ^ (z >> _S31)


@njit(cache=True, nogil=True)
def hash_uniform(seed, a, b):
    """Uniform float in [0, 1) from a uint64 seed and two int counters."""
    z = mix64(seed ^ mix64(np.uint64(a) * _GOLDEN + np.uint64(b)))
    return float(z >> _S11) * (1.0 / 9007199254740992.0)


@njit(cache=True, nogil=True)
def _approx_normal(z):
    """Approximately standard-normal value (sum of three 21-bit uniforms) from one uint64 hash."""
    mask = np.uint64(0x1FFFFF)
    u = float(z & mask) + float((z >> np.uint64(21)) & mask) + float((z >> np.uint64(42)) & mask)
    return (u * (1.0 / 2097152.0) - 1.5) * 2.0


@njit(cache=True, nogil=True)
def _next_uniform(state):
    """Next uniform in [0, 1) of a SplitMix64 stream held in ``state[0]`` (uint64 array)."""
    state[0] = state[0] + _GOLDEN
    return float(mix64(state[0]) >> _S11) * (1.0 / 9007199254740992.0)


@njit(cache=True, nogil=True)
def _next_normal(state):
    u1 = _next_uniform(state)
    u2 = _next_uniform(state)
    return math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(2.0 * math.pi * u2)


@njit(cache=True, nogil=True)
def _next_poisson(state, lam):
    limit = math.exp(-lam)
    k, p = 0, _next_uniform(state)
    while p > limit and k < 64:
        k += 1
        p *= _next_uniform(state)
    return k


@njit(cache=True, nogil=True)
def _value_noise(seed, x, y, scale):
    """Smooth value noise in [0, 1] with feature size ``scale`` px."""
    fx, fy = x / scale, y / scale
    ix, iy = math.floor(fx), math.floor(fy)
    tx, ty = fx - ix, fy - iy
    tx = tx * tx * (3.0 - 2.0 * tx)
    ty = ty * ty * (3.0 - 2.0 * ty)
    a = int(ix) + 4096
    b = int(iy) + 4096
    v00 = hash_uniform(seed, a, b)
    v10 = hash_uniform(seed, a + 1, b)
    v01 = hash_uniform(seed, a, b + 1)
    v11 = hash_uniform(seed, a + 1, b + 1)
    return (v00 * (1 - tx) + v10 * tx) * (1 - ty) + (v01 * (1 - tx) + v11 * tx) * ty


@njit(cache=True, nogil=True)
def _dots(seed, x, y, cell, prob, sigma):
    """Sparse bright dots: one possible dot per ``cell``-px grid square; value in [0, 1]."""
    gx, gy = math.floor(x / cell), math.floor(y / cell)
    a, b = int(gx) + 4096, int(gy) + 4096
    if hash_uniform(seed, a, b) >= prob:
        return 0.0
    px = (gx + 0.3 + 0.4 * hash_uniform(seed + np.uint64(1), a, b)) * cell
    py = (gy + 0.3 + 0.4 * hash_uniform(seed + np.uint64(2), a, b)) * cell
    d2 = (x - px) ** 2 + (y - py) ** 2
    return math.exp(-d2 / (2.0 * sigma * sigma))


@njit(cache=True, nogil=True)
def _star_radius(cos_t, sin_t, amp, phase_c, phase_s, n_modes):
    """1 + sum_k amp_k cos(k (theta - phi_k)) for k = 2..n_modes+1, from cos/sin of theta."""
    # cos(k theta), sin(k theta) by the angle-addition recurrence.
    ck, sk = cos_t, sin_t
    total = 1.0
    for k in range(n_modes):
        c2 = ck * cos_t - sk * sin_t
        s2 = sk * cos_t + ck * sin_t
        ck, sk = c2, s2
        total += amp[k] * (ck * phase_c[k] + sk * phase_s[k])
    return total


@njit(cache=True, nogil=True)
def _lobe_radius(cos_t, sin_t, lobe_amp, lobe_k, lobe_c, lobe_s):
    """Extra lobe term lobe_amp * cos(k (theta - phi)) for an integer k >= 2."""
    if lobe_amp == 0.0:
        return 0.0
    ck, sk = cos_t, sin_t
    for _ in range(lobe_k - 1):
        c2 = ck * cos_t - sk * sin_t
        s2 = sk * cos_t + ck * sin_t
        ck, sk = c2, s2
    return lobe_amp * (ck * lobe_c + sk * lobe_s)


@njit(cache=True, nogil=True)
def _smooth_clip(v):
    return min(max(v, 0.0), 1.0)


@njit(cache=True, nogil=True)
def _sample_modes(state, amplitude, row, col_amp, col_pc, col_ps):
    """Draw 3 Fourier modes (k = 2..4) of total size ~``amplitude`` into ``row``; returns the sum."""
    total = 0.0
    for k in range(3):
        a = amplitude * (0.6 if k == 0 else 0.3) * (0.5 + _next_uniform(state))
        ph = 2.0 * math.pi * _next_uniform(state)
        row[col_amp + k] = a
        row[col_pc + k] = math.cos((k + 2) * ph)
        row[col_ps + k] = math.sin((k + 2) * ph)
        total += a
    return total


@njit(cache=True, nogil=True)
def _nuclear_layout(state, sig, rn, budget, offset, rel):
    """Nucleus pieces of one cell, relative to the cell centre, into ``rel`` (x, y, r rows).

    One nucleus (offset from the cell centre), a fragmented nucleus (2-4 separate pieces, with
    probability ``sig[P_FRAG]``) or two nuclei (binucleated, ``sig[P_BINUC]``), all within
    ``budget`` px of the nuclear centre. Returns the number of pieces.
    """
    off_ang = 2.0 * math.pi * _next_uniform(state)
    ox, oy = offset * math.cos(off_ang), offset * math.sin(off_ang)
    u = _next_uniform(state)
    if u < sig[P_FRAG]:
        k_frag = 2 + int(3.0 * _next_uniform(state))
        spread = 1.25 / math.sin(math.pi / k_frag)
        fr = min(0.6 * rn, budget / (1.0 + spread))
        rot = 2.0 * math.pi * _next_uniform(state)
        for j in range(k_frag):
            ang = rot + 2.0 * math.pi * j / k_frag
            rel[j, 0] = ox + spread * fr * math.cos(ang)
            rel[j, 1] = oy + spread * fr * math.sin(ang)
            rel[j, 2] = fr * (0.8 + 0.3 * _next_uniform(state))
        return k_frag
    if u < sig[P_FRAG] + sig[P_BINUC]:
        r2 = min(0.8 * rn, 0.47 * budget)
        ang = 2.0 * math.pi * _next_uniform(state)
        for j in range(2):
            sgn = 1.0 if j == 0 else -1.0
            rel[j, 0] = sgn * (r2 + 1.0) * math.cos(ang)
            rel[j, 1] = sgn * (r2 + 1.0) * math.sin(ang)
            rel[j, 2] = r2
        return 2
    rel[0, 0], rel[0, 1], rel[0, 2] = ox, oy, rn
    return 1


@njit(cache=True, nogil=True)
def _place_cell(state, sig, size, cells, n_cells, rc):
    """Random centre for a neighbour cell, clear of the others; returns (ok, x, y)."""
    for _ in range(30):
        px = -0.7 * rc + (size + 1.4 * rc) * _next_uniform(state)
        py = -0.7 * rc + (size + 1.4 * rc) * _next_uniform(state)
        ok = True
        for j in range(n_cells):
            dmin = sig[P_SPACING] * 0.85 * (rc + cells[j, C_R])
            if (px - cells[j, C_X]) ** 2 + (py - cells[j, C_Y]) ** 2 < dmin * dmin:
                ok = False
                break
        if ok:
            return True, px, py
    return False, 0.0, 0.0


@njit(cache=True, nogil=True)
def _add_pieces(state, sig, objs, n_obj, c, px, py, rel, n_rel, lobes):
    """Append the nucleus pieces of cell ``c`` (centre px, py) to ``objs``; returns the new count."""
    lobe_k = 3 + int(3.0 * _next_uniform(state))
    for j in range(n_rel):
        if n_obj >= MAX_OBJECTS:
            break
        row = objs[n_obj]
        row[O_X], row[O_Y], row[O_R] = px + rel[j, 0], py + rel[j, 1], rel[j, 2]
        _sample_modes(state, sig[P_NUC_IRREG] * 1.3, row, O_AMP, O_PC, O_PS)
        lph = 2.0 * math.pi * _next_uniform(state)
        row[O_LOB], row[O_LK] = lobes, lobe_k
        row[O_LC], row[O_LS] = math.cos(lobe_k * lph), math.sin(lobe_k * lph)
        row[O_CELL] = c
        row[O_KIND] = _KIND_MAIN if n_rel == 1 else _KIND_FRAGMENT
        row[O_FIRST] = 1.0 if j == 0 else 0.0
        n_obj += 1
    return n_obj


@njit(cache=True, nogil=True)
def _add_micronuclei(state, sig, objs, n_obj, c, px, py, nuc_extent, inner):
    """Append Poisson(``sig[P_MICRO]``) micronuclei of cell ``c`` in its cytoplasm, clear of the
    nucleus (beyond ``nuc_extent`` px) and of each other; returns the new object count."""
    first = n_obj
    for _ in range(_next_poisson(state, sig[P_MICRO])):
        if n_obj >= MAX_OBJECTS:
            break
        mr = 1.3 + 1.1 * _next_uniform(state)
        lo, hi = nuc_extent + mr + 1.5, 0.92 * inner - mr
        if hi <= lo:
            break
        ang = 2.0 * math.pi * _next_uniform(state)
        dist = lo + (hi - lo) * _next_uniform(state)
        mx, my = px + dist * math.cos(ang), py + dist * math.sin(ang)
        clear = True
        for q in range(first, n_obj):
            if (mx - objs[q, O_X]) ** 2 + (my - objs[q, O_Y]) ** 2 < (mr + objs[q, O_R] + 1.5) ** 2:
                clear = False
        if clear:
            row = objs[n_obj]
            row[O_X], row[O_Y], row[O_R] = mx, my, mr
            row[O_CELL], row[O_KIND] = c, _KIND_MICRO
            n_obj += 1
    return n_obj


@njit(cache=True, nogil=True)
def _sample_layout(state, sig, size):
    """Cells and nucleus objects of one crop.

    Cell 0 is placed so that its first nucleus piece sits at the crop centre; Poisson
    (``sig[P_NEIGHBORS]``) more cells are scattered over a window reaching 0.7 radii past the border.

    Returns:
        cells float64 ``(MAX_CELLS, N_CELL_COLS)``, n_cells, objs float64 ``(MAX_OBJECTS,
        N_OBJ_COLS)``, n_obj.
    """
    cells = np.zeros((MAX_CELLS, N_CELL_COLS))
    objs = np.zeros((MAX_OBJECTS, N_OBJ_COLS))
    rel = np.zeros((MAX_PIECES, 3))
    n_cells, n_obj = 0, 0
    n_amp = sig[P_NUC_IRREG]
    for _ in range(1 + _next_poisson(state, sig[P_NEIGHBORS])):
        if n_cells >= MAX_CELLS:
            break
        c = n_cells
        row = cells[c]
        rc = sig[P_CELL_R] * math.exp(sig[P_SIZE_CV] * _next_normal(state))
        rc = min(max(rc, 0.5 * sig[P_CELL_R]), 2.0 * sig[P_CELL_R])
        inner = rc * (1.0 - min(_sample_modes(state, sig[P_CELL_IRREG], row, C_AMP, C_PC, C_PS), 0.6))
        offset = 0.12 * rc * _next_uniform(state)
        lobes = sig[P_NUC_LOBES] * (0.6 + 0.8 * _next_uniform(state))
        budget = (inner - offset) * 0.9 / (1.0 + 1.5 * n_amp + lobes)
        rn = sig[P_NUC_R] * math.exp(0.6 * sig[P_SIZE_CV] * _next_normal(state))
        rn = max(min(rn, budget), 1.5)
        n_rel = _nuclear_layout(state, sig, rn, budget, offset, rel)
        if c == 0:
            ok, px, py = True, 0.5 * size - rel[0, 0], 0.5 * size - rel[0, 1]
        else:
            ok, px, py = _place_cell(state, sig, size, cells, n_cells, rc)
        if not ok:
            row[:] = 0.0
            continue
        row[C_X], row[C_Y], row[C_R] = px, py, rc
        row[C_INT] = math.exp(0.15 * _next_normal(state))
        row[C_FIB] = math.pi * _next_uniform(state)
        row[C_TUB] = 2.0 * math.pi * _next_uniform(state)
        row[C_NUC], row[C_NUC + 1] = px + rel[0, 0], py + rel[0, 1]
        agg_ang = 2.0 * math.pi * _next_uniform(state)
        row[C_AGG] = row[C_NUC] + (rel[0, 2] + 2.5) * math.cos(agg_ang)
        row[C_AGG + 1] = row[C_NUC + 1] + (rel[0, 2] + 2.5) * math.sin(agg_ang)
        n_cells += 1
        n_obj = _add_pieces(state, sig, objs, n_obj, c, px, py, rel, n_rel, lobes)
        nuc_extent = 0.0
        for j in range(n_rel):
            reach = math.sqrt(rel[j, 0] ** 2 + rel[j, 1] ** 2) + rel[j, 2] * (1.0 + 1.5 * n_amp + lobes)
            nuc_extent = max(nuc_extent, reach)
        n_obj = _add_micronuclei(state, sig, objs, n_obj, c, px, py, nuc_extent, inner)
    return cells, n_cells, objs, n_obj


@njit(cache=True, nogil=True)
def _paint_cells(cells, n_cells, size):
    """Owner cell of every pixel (-1 = background) and its normalised radius in [0, 1).

    Returns:
        owner int64 ``(S, S)``, best float64 ``(S, S)`` (2.0 on background).
    """
    best = np.full((size, size), 2.0)
    owner = np.full((size, size), -1, dtype=np.int64)
    for c in range(n_cells):
        row = cells[c]
        amp, pc, ps = row[C_AMP:C_AMP + 3], row[C_PC:C_PC + 3], row[C_PS:C_PS + 3]
        ext = row[C_R] * 1.7
        y0, y1 = max(0, int(row[C_Y] - ext)), min(size, int(row[C_Y] + ext) + 1)
        x0, x1 = max(0, int(row[C_X] - ext)), min(size, int(row[C_X] + ext) + 1)
        for y in range(y0, y1):
            dy = y + 0.5 - row[C_Y]
            for x in range(x0, x1):
                dx = x + 0.5 - row[C_X]
                r = math.sqrt(dx * dx + dy * dy)
                d = 0.0 if r < 1e-6 else r / (row[C_R] * _star_radius(dx / r, dy / r, amp, pc, ps, 3))
                if d < 1.0 and d < best[y, x]:
                    best[y, x] = d
                    owner[y, x] = c
    return owner, best


@njit(cache=True, nogil=True)
def _paint_nuclei(objs, n_obj, owner, size):
    """Nucleus object of every pixel (-1 = none), restricted to pixels of the object's own cell.

    Returns:
        nobj int64 ``(S, S)``, nbest float64 ``(S, S)`` normalised radius within the object.
    """
    nbest = np.full((size, size), 2.0)
    nobj = np.full((size, size), -1, dtype=np.int64)
    for o in range(n_obj):
        row = objs[o]
        c, micro = int(row[O_CELL]), int(row[O_KIND]) == _KIND_MICRO
        amp, pc, ps = row[O_AMP:O_AMP + 3], row[O_PC:O_PC + 3], row[O_PS:O_PS + 3]
        ext = row[O_R] * 1.9 + 1.0
        y0, y1 = max(0, int(row[O_Y] - ext)), min(size, int(row[O_Y] + ext) + 1)
        x0, x1 = max(0, int(row[O_X] - ext)), min(size, int(row[O_X] + ext) + 1)
        for y in range(y0, y1):
            dy = y + 0.5 - row[O_Y]
            for x in range(x0, x1):
                if owner[y, x] != c:
                    continue
                dx = x + 0.5 - row[O_X]
                r = math.sqrt(dx * dx + dy * dy)
                if r < 1e-6:
                    d = 0.0
                elif micro:
                    d = r / row[O_R]
                else:
                    ct, st = dx / r, dy / r
                    rad = _star_radius(ct, st, amp, pc, ps, 3)
                    rad += _lobe_radius(ct, st, row[O_LOB], int(row[O_LK]), row[O_LC], row[O_LS])
                    d = r / (row[O_R] * max(rad, 0.3))
                if d < 1.0 and d < nbest[y, x]:
                    nbest[y, x] = d
                    nobj[y, x] = o
    return nobj, nbest


@njit(cache=True, nogil=True)
def _cytoplasm_signal(sig, row, fx, fy, d, tex_seed):
    """Actin and tubulin intensity (about 0-1) at pixel centre (fx, fy) of cell ``row``.

    ``d`` is the pixel's normalised radius in the cell (0 centre, 1 outline).
    """
    cg = sig[P_CYTO_GAIN] * row[C_INT]
    mottle = _value_noise(tex_seed, fx, fy, 5.0)
    # Actin: cortical rim, stress fibres, punctate aggregates.
    rim = math.exp(-((d - 0.88) / 0.09) ** 2)
    proj = (fx - row[C_X]) * math.cos(row[C_FIB]) + (fy - row[C_Y]) * math.sin(row[C_FIB])
    fib = (0.5 + 0.5 * math.cos(2.0 * math.pi * proj / 4.5 + 2.0 * mottle)) ** 4
    actin = cg * (0.2 + 0.1 * mottle + 0.42 * sig[P_ACTIN_RIM] * rim
                  + 0.35 * sig[P_ACTIN_FIBER] * fib * (1.0 - 0.4 * d))
    if sig[P_ACTIN_PUNCTA] > 0.0:
        actin += 1.1 * sig[P_ACTIN_PUNCTA] * _dots(tex_seed + np.uint64(11), fx, fy, 5.0, 0.7, 1.1)
    # Tubulin: fine radial filaments around the nucleus, diffuse, wavy bundles, monopolar aster.
    ndx, ndy = fx - row[C_NUC], fy - row[C_NUC + 1]
    nr = math.sqrt(ndx * ndx + ndy * ndy)
    theta = math.atan2(ndy, ndx)
    fil = (0.5 + 0.5 * math.cos(28.0 * theta + 0.15 * nr + row[C_TUB] + 1.5 * mottle)) ** 6
    bund = (0.5 + 0.5 * math.cos(7.0 * theta + 0.35 * nr + row[C_TUB])) ** 2
    tub = cg * (0.14 + 0.07 * mottle + 0.45 * sig[P_TUB_DIFFUSE] * (0.7 + 0.6 * mottle)
                + 0.6 * sig[P_TUB_FIL] * fil * (1.0 - 0.5 * d) + 0.8 * sig[P_TUB_BUNDLE] * bund)
    if sig[P_TUB_ASTER] > 0.0:
        star = (0.5 + 0.5 * math.cos(14.0 * theta + row[C_TUB])) ** 3
        tub += cg * 0.9 * sig[P_TUB_ASTER] * (0.4 + 0.6 * star) * math.exp(-nr / 7.0)
    if sig[P_AGGREGATE] > 0.0:
        blob = math.exp(-((fx - row[C_AGG]) ** 2 + (fy - row[C_AGG + 1]) ** 2) / (2.0 * 3.2 * 3.2))
        tub += 0.95 * sig[P_AGGREGATE] * blob
        actin += 0.5 * sig[P_AGGREGATE] * blob
    if sig[P_VACUOLES] > 0.0:
        keep = 1.0 - 0.75 * sig[P_VACUOLES] * _dots(tex_seed + np.uint64(23), fx, fy, 5.0, 0.7, 1.3)
        actin *= keep
        tub *= keep
    edge = _smooth_clip((1.0 - d) / 0.12)
    return actin * edge, tub * edge


@njit(cache=True, nogil=True)
def _dna_signal(sig, intensity, kind, fx, fy, dn, tex_seed):
    """DNA intensity (about 0-1) at a nucleus pixel; ``dn`` = normalised radius in the object."""
    nedge = max(_smooth_clip((1.0 - dn) / 0.25), 0.35)
    if kind == _KIND_MICRO:
        return 0.7 * sig[P_DNA_GAIN] * intensity * nedge
    chrom = _value_noise(tex_seed + np.uint64(5), fx, fy, 2.5)
    v = 0.5 + 0.08 * (1.0 - dn * dn) + 0.14 * (chrom - 0.5)
    v += sig[P_DNA_RING] * (0.45 * math.exp(-((dn - 0.72) / 0.14) ** 2) - 0.3 * (1.0 - dn))
    if sig[P_DNA_SPECKLE] > 0.0:
        v += 0.55 * sig[P_DNA_SPECKLE] * _dots(tex_seed + np.uint64(31), fx, fy, 3.5, 0.6, 0.7)
    if sig[P_NUCLEOLI] > 0.0:
        v -= 0.4 * sig[P_NUCLEOLI] * _dots(tex_seed + np.uint64(41), fx, fy, 5.0, 0.55, 1.2)
    return sig[P_DNA_GAIN] * intensity * v * nedge


@njit(cache=True, nogil=True)
def _shade(state, crop_seed, sig, plate, cells, objs, owner, best, nobj, nbest, image):
    """Fill uint8 ``image`` (S, S, 3): cell signals, then plate gain, illumination, background, noise."""
    size = image.shape[0]
    half = 0.5 * size
    tex_seed = mix64(crop_seed ^ np.uint64(0xA5A5A5A5))
    noise_seed = mix64(crop_seed ^ np.uint64(0x5A5A5A5A))
    gain_jit = math.exp(0.04 * _next_normal(state))
    gcos, gsin = math.cos(plate[L_GRAD_ANGLE]), math.sin(plate[L_GRAD_ANGLE])
    u0 = _next_uniform(state) - 0.5  # where this crop sits along the field's gradient
    for y in range(size):
        for x in range(size):
            fx, fy = x + 0.5, y + 0.5
            actin, tub, dna = 0.0, 0.0, 0.0
            c = owner[y, x]
            if c >= 0:
                actin, tub = _cytoplasm_signal(sig, cells[c], fx, fy, best[y, x], tex_seed)
                o = nobj[y, x]
                if o >= 0:
                    actin *= 0.55
                    tub *= 0.55
                    dna = _dna_signal(sig, cells[c, C_INT], int(objs[o, O_KIND]), fx, fy, nbest[y, x], tex_seed)
            illum = 1.0 + plate[L_GRAD_AMP] * (u0 + ((fx - half) * gcos + (fy - half) * gsin) / size)
            p = y * size + x
            for ch in range(3):
                v = actin if ch == 0 else (tub if ch == 1 else dna)
                n = _approx_normal(mix64(noise_seed + np.uint64(3 * p + ch) * _GOLDEN))
                val = 255.0 * plate[L_GAIN + ch] * gain_jit * illum * v
                val = val / (1.0 + val / 600.0) + plate[L_BG + ch] * illum  # soft detector knee
                val += plate[L_NOISE] * (1.0 + 0.01 * val) * n
                image[y, x, ch] = np.uint8(min(max(val + 0.5, 0.0), 255.0))


@njit(cache=True, nogil=True)
def _relabel(owner, n_cells, nobj, objs, n_obj, cells_out, nuclei_out):
    """Contiguous int32 labels of the visible objects.

    Cells whose (first) nucleus is visible come first, in placement order (the centred cell is
    label 1), then the cells cut off from their nucleus by the border. Nuclei: the first piece of
    every cell in the same order, then the other pieces and micronuclei. So nucleus k lies in cell
    k for k = 1..(number of cells with a visible nucleus).
    """
    size = owner.shape[0]
    cell_seen = np.zeros(n_cells + 1, dtype=np.int32)
    obj_seen = np.zeros(n_obj + 1, dtype=np.int32)
    for y in range(size):
        for x in range(size):
            if owner[y, x] >= 0:
                cell_seen[owner[y, x]] = 1
            if nobj[y, x] >= 0:
                obj_seen[nobj[y, x]] = 1
    first_seen = np.zeros(n_cells + 1, dtype=np.int32)
    for o in range(n_obj):
        if objs[o, O_FIRST] == 1.0 and obj_seen[o]:
            first_seen[int(objs[o, O_CELL])] = 1
    cell_label = np.zeros(n_cells + 1, dtype=np.int32)
    k = 0
    for with_nucleus in (1, 0):
        for c in range(n_cells):
            if cell_seen[c] and first_seen[c] == with_nucleus:
                k += 1
                cell_label[c] = k
    obj_label = np.zeros(n_obj + 1, dtype=np.int32)
    k = 0
    for first in (1.0, 0.0):
        for o in range(n_obj):
            if objs[o, O_FIRST] == first and obj_seen[o]:
                k += 1
                obj_label[o] = k
    for y in range(size):
        for x in range(size):
            c, o = owner[y, x], nobj[y, x]
            cells_out[y, x] = cell_label[c] if c >= 0 else 0
            nuclei_out[y, x] = obj_label[o] if o >= 0 else 0


@njit(cache=True, nogil=True)
def render_crop(crop_seed, sig, plate, size, image, nuclei, cells):
    """Render one crop in place.

    Args:
        crop_seed: uint64 seed of this crop.
        sig: float64 ``(N_PARAMS,)`` signature row (``P_*`` columns).
        plate: float64 ``(N_PLATE,)`` plate row (``L_*`` columns).
        size: crop side S (px).
        image: uint8 ``(S, S, 3)`` output (actin, tubulin, DNA).
        nuclei: int32 ``(S, S)`` output nucleus labels, 0 = background, 1..Kn contiguous.
        cells: int32 ``(S, S)`` output cell labels, 0 = background, 1..Kc contiguous.
    """
    state = np.empty(1, dtype=np.uint64)
    state[0] = crop_seed
    cell_table, n_cells, objs, n_obj = _sample_layout(state, sig, size)
    owner, best = _paint_cells(cell_table, n_cells, size)
    nobj, nbest = _paint_nuclei(objs, n_obj, owner, size)
    _shade(state, crop_seed, sig, plate, cell_table, objs, owner, best, nobj, nbest, image)
    _relabel(owner, n_cells, nobj, objs, n_obj, cells, nuclei)


@njit(cache=True, nogil=True, parallel=True)
def render_crops(crop_seeds, sigs, plates, size, images, nuclei, cells):
    """Render ``n`` crops in parallel (``prange``); see :func:`render_crop` for the arguments.

    Args:
        crop_seeds: uint64 ``(n,)``.
        sigs: float64 ``(n, N_PARAMS)``.
        plates: float64 ``(n, N_PLATE)``.
        size: crop side S (px).
        images: uint8 ``(n, S, S, 3)`` output.
        nuclei: int32 ``(n, S, S)`` output.
        cells: int32 ``(n, S, S)`` output.
    """
    for i in prange(crop_seeds.shape[0]):
        render_crop(crop_seeds[i], sigs[i], plates[i], size, images[i], nuclei[i], cells[i])


@njit(cache=True, nogil=True)
def crop_seeds_for(seed, start, n):
    """uint64 ``(n,)`` seeds of crops ``start .. start+n-1`` of the stream ``seed``."""
    out = np.empty(n, dtype=np.uint64)
    base = mix64(np.uint64(seed) ^ np.uint64(0xC3E11F1E1D))
    for i in range(n):
        out[i] = mix64(base ^ mix64(np.uint64(start + i) * _GOLDEN + np.uint64(1)))
    return out
