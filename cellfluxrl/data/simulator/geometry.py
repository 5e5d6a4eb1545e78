"""Geometry of one crop: star-shaped cells and nuclei, their placement, binucleated cells, fragments
and micronuclei (numba kernels filling the cell and nucleus-object tables)."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from cellfluxrl.data.simulator.columns import (C_AGG, C_AMP, C_FIB, C_INT, C_NUC, C_PC, C_PS, C_R, C_TUB, C_X, C_Y,
                                               KIND_FRAGMENT, KIND_MAIN, KIND_MICRO, MAX_CELLS, MAX_OBJECTS,
                                               MAX_PIECES, N_CELL_COLS, N_OBJ_COLS, O_AMP, O_CELL, O_FIRST, O_KIND,
                                               O_LC, O_LK, O_LOB, O_LS, O_PC, O_PS, O_R, O_X, O_Y, P_BINUC,
                                               P_CELL_IRREG, P_CELL_R, P_FRAG, P_MICRO, P_NEIGHBORS, P_NUC_IRREG,
                                               P_NUC_LOBES, P_NUC_R, P_SIZE_CV, P_SPACING)
from cellfluxrl.data.simulator.hashing import next_normal, next_poisson, next_uniform


@njit(cache=True, nogil=True)
def star_radius(cos_t, sin_t, amp, phase_c, phase_s, n_modes):
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
def lobe_radius(cos_t, sin_t, lobe_amp, lobe_k, lobe_c, lobe_s):
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
def smooth_clip(v):
    return min(max(v, 0.0), 1.0)


@njit(cache=True, nogil=True)
def _sample_modes(state, amplitude, row, col_amp, col_pc, col_ps):
    """Draw 3 Fourier modes (k = 2..4) of total size ~``amplitude`` into ``row``; returns the sum."""
    total = 0.0
    for k in range(3):
        a = amplitude * (0.6 if k == 0 else 0.3) * (0.5 + next_uniform(state))
        ph = 2.0 * math.pi * next_uniform(state)
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
    off_ang = 2.0 * math.pi * next_uniform(state)
    ox, oy = offset * math.cos(off_ang), offset * math.sin(off_ang)
    u = next_uniform(state)
    if u < sig[P_FRAG]:
        k_frag = 2 + int(3.0 * next_uniform(state))
        spread = 1.25 / math.sin(math.pi / k_frag)
        fr = min(0.6 * rn, budget / (1.0 + spread))
        rot = 2.0 * math.pi * next_uniform(state)
        for j in range(k_frag):
            ang = rot + 2.0 * math.pi * j / k_frag
            rel[j, 0] = ox + spread * fr * math.cos(ang)
            rel[j, 1] = oy + spread * fr * math.sin(ang)
            rel[j, 2] = fr * (0.8 + 0.3 * next_uniform(state))
        return k_frag
    if u < sig[P_FRAG] + sig[P_BINUC]:
        r2 = min(0.8 * rn, 0.47 * budget)
        ang = 2.0 * math.pi * next_uniform(state)
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
        px = -0.7 * rc + (size + 1.4 * rc) * next_uniform(state)
        py = -0.7 * rc + (size + 1.4 * rc) * next_uniform(state)
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
    lobe_k = 3 + int(3.0 * next_uniform(state))
    for j in range(n_rel):
        if n_obj >= MAX_OBJECTS:
            break
        row = objs[n_obj]
        row[O_X], row[O_Y], row[O_R] = px + rel[j, 0], py + rel[j, 1], rel[j, 2]
        _sample_modes(state, sig[P_NUC_IRREG] * 1.3, row, O_AMP, O_PC, O_PS)
        lph = 2.0 * math.pi * next_uniform(state)
        row[O_LOB], row[O_LK] = lobes, lobe_k
        row[O_LC], row[O_LS] = math.cos(lobe_k * lph), math.sin(lobe_k * lph)
        row[O_CELL] = c
        row[O_KIND] = KIND_MAIN if n_rel == 1 else KIND_FRAGMENT
        row[O_FIRST] = 1.0 if j == 0 else 0.0
        n_obj += 1
    return n_obj


@njit(cache=True, nogil=True)
def _add_micronuclei(state, sig, objs, n_obj, c, px, py, nuc_extent, inner):
    """Append Poisson(``sig[P_MICRO]``) micronuclei of cell ``c`` in its cytoplasm, clear of the
    nucleus (beyond ``nuc_extent`` px) and of each other; returns the new object count."""
    first = n_obj
    for _ in range(next_poisson(state, sig[P_MICRO])):
        if n_obj >= MAX_OBJECTS:
            break
        mr = 1.3 + 1.1 * next_uniform(state)
        lo, hi = nuc_extent + mr + 1.5, 0.92 * inner - mr
        if hi <= lo:
            break
        ang = 2.0 * math.pi * next_uniform(state)
        dist = lo + (hi - lo) * next_uniform(state)
        mx, my = px + dist * math.cos(ang), py + dist * math.sin(ang)
        clear = True
        for q in range(first, n_obj):
            if (mx - objs[q, O_X]) ** 2 + (my - objs[q, O_Y]) ** 2 < (mr + objs[q, O_R] + 1.5) ** 2:
                clear = False
        if clear:
            row = objs[n_obj]
            row[O_X], row[O_Y], row[O_R] = mx, my, mr
            row[O_CELL], row[O_KIND] = c, KIND_MICRO
            n_obj += 1
    return n_obj


@njit(cache=True, nogil=True)
def sample_layout(state, sig, size):
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
    for _ in range(1 + next_poisson(state, sig[P_NEIGHBORS])):
        if n_cells >= MAX_CELLS:
            break
        c = n_cells
        row = cells[c]
        rc = sig[P_CELL_R] * math.exp(sig[P_SIZE_CV] * next_normal(state))
        rc = min(max(rc, 0.5 * sig[P_CELL_R]), 2.0 * sig[P_CELL_R])
        inner = rc * (1.0 - min(_sample_modes(state, sig[P_CELL_IRREG], row, C_AMP, C_PC, C_PS), 0.6))
        offset = 0.12 * rc * next_uniform(state)
        lobes = sig[P_NUC_LOBES] * (0.6 + 0.8 * next_uniform(state))
        budget = (inner - offset) * 0.9 / (1.0 + 1.5 * n_amp + lobes)
        rn = sig[P_NUC_R] * math.exp(0.6 * sig[P_SIZE_CV] * next_normal(state))
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
        row[C_INT] = math.exp(0.15 * next_normal(state))
        row[C_FIB] = math.pi * next_uniform(state)
        row[C_TUB] = 2.0 * math.pi * next_uniform(state)
        row[C_NUC], row[C_NUC + 1] = px + rel[0, 0], py + rel[0, 1]
        agg_ang = 2.0 * math.pi * next_uniform(state)
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
