"""The photometric ops of one crop (colour jitter, grayscale, Gaussian blur, solarize) as
numba kernels over float32 channel planes, uint8 in and out.

torchvision's ColorJitter (DINO's recipe) applies brightness, contrast, saturation and hue in
a random order, each clamped to [0, 255]. All but contrast map a pixel to a pixel, so the
image goes through in tiles that stay in L1 cache, the whole chain applied to a tile before
the next. Each op is a flat, branch-free loop over a tile's planes, which LLVM vectorises;
the blur is two separable passes of such loops.

Compiled on first use and cached in __pycache__ (`cache=True`): a few seconds once, then a
fraction of a second per process. Single-threaded and without the GIL (`nogil=True`), as a
data task runs on one core.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
_LR, _LG, _LB = 0.299, 0.587, 0.114  # luma weights, ITU-R 601, as PIL's "L" conversion and torchvision
_TILE = 2048  # pixels per tile: 24 KB of RGB float32, within a core's L1 cache


@njit(cache=True, nogil=True, fastmath=True)
def _blend(plane, factor, offset):
    """plane <- clamp(offset + factor * plane): brightness (offset 0) and contrast."""
    for p in range(plane.size):
        plane[p] = min(max(offset + factor * plane[p], 0.0), 255.0)


@njit(cache=True, nogil=True, fastmath=True)
def _saturate(r, g, b, factor):
    """Blend each pixel with its luma: 0 gives gray, 1 the pixel."""
    for p in range(r.size):
        gray = (_LR * r[p] + _LG * g[p] + _LB * b[p]) * (1.0 - factor)
        r[p] = min(max(gray + factor * r[p], 0.0), 255.0)
        g[p] = min(max(gray + factor * g[p], 0.0), 255.0)
        b[p] = min(max(gray + factor * b[p], 0.0), 255.0)


@njit(cache=True, nogil=True, fastmath=True)
def _rotate_hue(r, g, b, shift):
    """Rotate the hue by `shift` turns through HSV, as torchvision's adjust_hue.

    HSV keeps each pixel's max V and min m; only the hue t (in sixths of a turn) moves, and
    the channels come back as m + (V - m) * clamp(h_c(t), 0, 1) with the hexcone's ramps
    h_r = |t - 3| - 1, h_g = 2 - |t - 2|, h_b = 2 - |t - 4|.
    """
    for p in range(r.size):
        high = max(max(r[p], g[p]), b[p])
        low = min(min(r[p], g[p]), b[p])
        chroma = high - low
        inverse = 1.0 / max(chroma, 1e-3)  # a gray pixel (chroma 0) keeps m whatever its t
        # t relative to the max channel (ties: red, then green, as torchvision), as selects:
        # a branch per pixel would keep the loop from vectorising.
        t = (b[p] - r[p]) * inverse + 2.0 if g[p] == high else (r[p] - g[p]) * inverse + 4.0
        t = (g[p] - b[p]) * inverse if r[p] == high else t
        t += 6.0 * shift  # t in [-1, 5] and |shift| <= 0.5: one wrap into [0, 6) is enough
        t = t + 6.0 if t < 0.0 else t
        t = t - 6.0 if t >= 6.0 else t
        r[p] = low + chroma * min(max(abs(t - 3.0) - 1.0, 0.0), 1.0)
        g[p] = low + chroma * min(max(2.0 - abs(t - 2.0), 0.0), 1.0)
        b[p] = low + chroma * min(max(2.0 - abs(t - 4.0), 0.0), 1.0)


@njit(cache=True, nogil=True, fastmath=True)
def _luma_sum(r, g, b):
    total = 0.0
    for p in range(r.size):
        total += _LR * r[p] + _LG * g[p] + _LB * b[p]
    return total


@njit(cache=True, nogil=True, fastmath=True)
def _grayscale(r, g, b):
    for p in range(r.size):
        luma = _LR * r[p] + _LG * g[p] + _LB * b[p]
        r[p] = luma
        g[p] = luma
        b[p] = luma


@njit(cache=True, nogil=True, fastmath=True)
def _apply(planes, start, stop, op, factor, mean):
    """One op on pixels [start, stop) of the (C, P) planes. Each plane is sliced on its own:
    a (C, tile) slice has a layout numba cannot prove contiguous, and would not vectorise.
    On one channel saturation and hue change nothing, as in torchvision."""
    if op == BRIGHTNESS or op == CONTRAST:
        offset = mean * (1.0 - factor) if op == CONTRAST else 0.0
        for channel in range(planes.shape[0]):
            _blend(planes[channel, start:stop], factor, offset)
    elif planes.shape[0] == 3:
        r, g, b = planes[0, start:stop], planes[1, start:stop], planes[2, start:stop]
        if op == SATURATION:
            _saturate(r, g, b, factor)
        else:
            _rotate_hue(r, g, b, factor)


@njit(cache=True, nogil=True, fastmath=True)
def jitter_and_gray_(planes, ops, factors, gray):
    """In place on float32 (C, P) planes in [0, 255], C 1 or 3: the colour ops `ops` (op ids,
    in the order applied) with their `factors` (brightness, contrast and saturation factors;
    hue shift in turns), then the luma in every channel if `gray`."""
    channels, pixels = planes.shape
    # Contrast blends with the mean luma the ops before it leave: those ops take a first pass
    # that sums it, contrast and the ops after it a second. Without contrast, one pass does all.
    before, mean = 0, 0.0
    for k in range(len(ops)):
        if ops[k] == CONTRAST:
            before, luma_total = k, 0.0
            for start in range(0, pixels, _TILE):
                stop = min(start + _TILE, pixels)
                for j in range(before):
                    _apply(planes, start, stop, ops[j], factors[j], 0.0)
                if channels == 3:
                    luma_total += _luma_sum(planes[0, start:stop], planes[1, start:stop], planes[2, start:stop])
                else:
                    luma_total += planes[0, start:stop].sum()
            mean = luma_total / pixels
    gray = gray and channels == 3
    for start in range(0, pixels, _TILE):
        stop = min(start + _TILE, pixels)
        for k in range(before, len(ops)):
            _apply(planes, start, stop, ops[k], factors[k], mean)
        if gray:
            _grayscale(planes[0, start:stop], planes[1, start:stop], planes[2, start:stop])


@njit(cache=True, nogil=True, fastmath=True)
def _copy(out, x):
    for j in range(out.size):
        out[j] = x[j]


@njit(cache=True, nogil=True, fastmath=True)
def _scaled(out, weight, x):
    for j in range(out.size):
        out[j] = weight * x[j]


@njit(cache=True, nogil=True, fastmath=True)
def _add_scaled(out, weight, x):
    for j in range(out.size):
        out[j] += weight * x[j]


@njit(cache=True, nogil=True, fastmath=True)
def _reflect(i, size):
    """Index i reflected into [0, size) about the first and last pixel (numpy's 'reflect')."""
    i = abs(i)
    return 2 * (size - 1) - i if i >= size else i


@njit(cache=True, nogil=True, fastmath=True)
def gaussian_blur_(planes, sigma):
    """Blur float32 (C, S, S) planes in place with a Gaussian of std `sigma` pixels, truncated
    at 3 sigma, reflect padding (for PIL's GaussianBlur(radius=sigma), as DINO): a pass down
    the columns, then one along the rows, each a weighted sum of shifted rows."""
    channels, size = planes.shape[0], planes.shape[1]
    radius = max(1, min(int(math.ceil(3 * sigma)), size - 1))
    weights = np.exp(-0.5 * ((np.arange(-radius, radius + 1) / sigma) ** 2)).astype(np.float32)
    weights /= weights.sum()
    columns = np.empty((size, size), np.float32)
    padded = np.empty(size + 2 * radius, np.float32)
    for channel in range(channels):
        image = planes[channel]
        for i in range(size):
            row = columns[i]
            _scaled(row, weights[0], image[_reflect(i - radius, size)])
            for k in range(1, 2 * radius + 1):
                _add_scaled(row, weights[k], image[_reflect(i + k - radius, size)])
        for i in range(size):
            source = columns[i]
            _copy(padded[radius:radius + size], source)  # a slice assignment does not vectorise
            for r in range(1, radius + 1):
                padded[radius - r] = source[r]
                padded[radius + size - 1 + r] = source[size - 1 - r]
            row = image[i]
            _scaled(row, weights[0], padded[:size])
            for k in range(1, 2 * radius + 1):
                _add_scaled(row, weights[k], padded[k:k + size])


@njit(cache=True, nogil=True, fastmath=True)
def photometric(image, out, ops, factors, gray, sigma, solarize):
    """uint8 (C, S, S) `image` -> uint8 `out`: `jitter_and_gray_` with `ops`, `factors` and
    `gray`, then a Gaussian blur of std `sigma` if it is > 0, rounding, and PIL's solarize at
    128 if `solarize`."""
    channels, size = image.shape[0], image.shape[1]
    target = out.reshape(channels * size * size)
    if len(ops) or gray or sigma > 0:
        planes = image.astype(np.float32)
        jitter_and_gray_(planes.reshape(channels, size * size), ops, factors, gray)
        if sigma > 0:
            gaussian_blur_(planes, sigma)
        # Every op keeps [0, 255] (clamped jitter, convex blur): rounding (half up) is all that is left.
        values = planes.reshape(channels * size * size)
        for p in range(values.size):
            target[p] = np.uint8(values[p] + 0.5)
    else:
        out[:] = image
    if solarize:
        for p in range(target.size):
            target[p] = 255 - target[p] if target[p] >= 128 else target[p]
