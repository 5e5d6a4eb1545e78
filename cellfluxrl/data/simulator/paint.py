"""Painting one crop from its geometry: pixel ownership, the three stains (actin, tubulin, DNA) with
their textures, plate effects, ground-truth labels; and the parallel batch entry point."""

from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from cellfluxrl.data.simulator.columns import (C_AGG, C_AMP, C_FIB, C_INT, C_NUC, C_PC, C_PS, C_R, C_TUB, C_X, C_Y,
                                               KIND_MICRO, L_BG, L_GAIN, L_GRAD_AMP, L_GRAD_ANGLE, L_NOISE,
                                               O_AMP, O_CELL, O_FIRST, O_KIND, O_LC, O_LK, O_LOB, O_LS, O_PC,
                                               O_PS, O_R, O_X, O_Y, P_ACTIN_FIBER, P_ACTIN_PUNCTA, P_ACTIN_RIM,
                                               P_AGGREGATE, P_CYTO_GAIN, P_DNA_GAIN, P_DNA_RING, P_DNA_SPECKLE,
                                               P_NUCLEOLI, P_TUB_ASTER, P_TUB_BUNDLE, P_TUB_DIFFUSE, P_TUB_FIL,
                                               P_VACUOLES)
from cellfluxrl.data.simulator.geometry import lobe_radius, sample_layout, smooth_clip, star_radius
from cellfluxrl.data.simulator.hashing import (GOLDEN, approx_normal, dots, mix64, next_normal, next_uniform,
                                               value_noise)


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
                d = 0.0 if r < 1e-6 else r / (row[C_R] * star_radius(dx / r, dy / r, amp, pc, ps, 3))
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
        c, micro = int(row[O_CELL]), int(row[O_KIND]) == KIND_MICRO
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
                    rad = star_radius(ct, st, amp, pc, ps, 3)
                    rad += lobe_radius(ct, st, row[O_LOB], int(row[O_LK]), row[O_LC], row[O_LS])
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
    mottle = value_noise(tex_seed, fx, fy, 5.0)
    # Actin: cortical rim, stress fibres, punctate aggregates.
    rim = math.exp(-((d - 0.88) / 0.09) ** 2)
    proj = (fx - row[C_X]) * math.cos(row[C_FIB]) + (fy - row[C_Y]) * math.sin(row[C_FIB])
    fib = (0.5 + 0.5 * math.cos(2.0 * math.pi * proj / 4.5 + 2.0 * mottle)) ** 4
    actin = cg * (0.2 + 0.1 * mottle + 0.42 * sig[P_ACTIN_RIM] * rim
                  + 0.35 * sig[P_ACTIN_FIBER] * fib * (1.0 - 0.4 * d))
    if sig[P_ACTIN_PUNCTA] > 0.0:
        actin += 1.1 * sig[P_ACTIN_PUNCTA] * dots(tex_seed + np.uint64(11), fx, fy, 5.0, 0.7, 1.1)
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
        keep = 1.0 - 0.75 * sig[P_VACUOLES] * dots(tex_seed + np.uint64(23), fx, fy, 5.0, 0.7, 1.3)
        actin *= keep
        tub *= keep
    edge = smooth_clip((1.0 - d) / 0.12)
    return actin * edge, tub * edge


@njit(cache=True, nogil=True)
def _dna_signal(sig, intensity, kind, fx, fy, dn, tex_seed):
    """DNA intensity (about 0-1) at a nucleus pixel; ``dn`` = normalised radius in the object."""
    nedge = max(smooth_clip((1.0 - dn) / 0.25), 0.35)
    if kind == KIND_MICRO:
        return 0.7 * sig[P_DNA_GAIN] * intensity * nedge
    chrom = value_noise(tex_seed + np.uint64(5), fx, fy, 2.5)
    v = 0.5 + 0.08 * (1.0 - dn * dn) + 0.14 * (chrom - 0.5)
    v += sig[P_DNA_RING] * (0.45 * math.exp(-((dn - 0.72) / 0.14) ** 2) - 0.3 * (1.0 - dn))
    if sig[P_DNA_SPECKLE] > 0.0:
        v += 0.55 * sig[P_DNA_SPECKLE] * dots(tex_seed + np.uint64(31), fx, fy, 3.5, 0.6, 0.7)
    if sig[P_NUCLEOLI] > 0.0:
        v -= 0.4 * sig[P_NUCLEOLI] * dots(tex_seed + np.uint64(41), fx, fy, 5.0, 0.55, 1.2)
    return sig[P_DNA_GAIN] * intensity * v * nedge


@njit(cache=True, nogil=True)
def _shade(state, crop_seed, sig, plate, cells, objs, owner, best, nobj, nbest, image):
    """Fill uint8 ``image`` (S, S, 3): cell signals, then plate gain, illumination, background, noise."""
    size = image.shape[0]
    half = 0.5 * size
    tex_seed = mix64(crop_seed ^ np.uint64(0xA5A5A5A5))
    noise_seed = mix64(crop_seed ^ np.uint64(0x5A5A5A5A))
    gain_jit = math.exp(0.04 * next_normal(state))
    gcos, gsin = math.cos(plate[L_GRAD_ANGLE]), math.sin(plate[L_GRAD_ANGLE])
    u0 = next_uniform(state) - 0.5  # where this crop sits along the field's gradient
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
                n = approx_normal(mix64(noise_seed + np.uint64(3 * p + ch) * GOLDEN))
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
    cell_table, n_cells, objs, n_obj = sample_layout(state, sig, size)
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
        out[i] = mix64(base ^ mix64(np.uint64(start + i) * GOLDEN + np.uint64(1)))
    return out
