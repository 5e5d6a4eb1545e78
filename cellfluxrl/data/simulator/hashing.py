"""Counter-based randomness of the simulator: SplitMix64 hashing, per-crop streams (uniform, normal,
Poisson) and the textures built on them (value noise, sparse dots). Nothing depends on thread or chunk."""

from __future__ import annotations

import math

import numpy as np
from numba import njit


GOLDEN = np.uint64(0x9E3779B97F4A7C15)
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
    z = mix64(seed ^ mix64(np.uint64(a) * GOLDEN + np.uint64(b)))
    return float(z >> _S11) * (1.0 / 9007199254740992.0)


@njit(cache=True, nogil=True)
def approx_normal(z):
    """Approximately standard-normal value (sum of three 21-bit uniforms) from one uint64 hash."""
    mask = np.uint64(0x1FFFFF)
    u = float(z & mask) + float((z >> np.uint64(21)) & mask) + float((z >> np.uint64(42)) & mask)
    return (u * (1.0 / 2097152.0) - 1.5) * 2.0


@njit(cache=True, nogil=True)
def next_uniform(state):
    """Next uniform in [0, 1) of a SplitMix64 stream held in ``state[0]`` (uint64 array)."""
    state[0] = state[0] + GOLDEN
    return float(mix64(state[0]) >> _S11) * (1.0 / 9007199254740992.0)


@njit(cache=True, nogil=True)
def next_normal(state):
    u1 = next_uniform(state)
    u2 = next_uniform(state)
    return math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(2.0 * math.pi * u2)


@njit(cache=True, nogil=True)
def next_poisson(state, lam):
    limit = math.exp(-lam)
    k, p = 0, next_uniform(state)
    while p > limit and k < 64:
        k += 1
        p *= next_uniform(state)
    return k


@njit(cache=True, nogil=True)
def value_noise(seed, x, y, scale):
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
def dots(seed, x, y, cell, prob, sigma):
    """Sparse bright dots: one possible dot per ``cell``-px grid square; value in [0, 1]."""
    gx, gy = math.floor(x / cell), math.floor(y / cell)
    a, b = int(gx) + 4096, int(gy) + 4096
    if hash_uniform(seed, a, b) >= prob:
        return 0.0
    px = (gx + 0.3 + 0.4 * hash_uniform(seed + np.uint64(1), a, b)) * cell
    py = (gy + 0.3 + 0.4 * hash_uniform(seed + np.uint64(2), a, b)) * cell
    d2 = (x - px) ** 2 + (y - py) ** 2
    return math.exp(-d2 / (2.0 * sigma * sigma))
