"""The layers' math made fast: the ops the engine runs, equal to reference.py.

Same pairs and signatures as reference.py (read that first for the math):

    out, cache = x_forward(x, ...);  dx, ... = x_backward(dout, cache)

What makes them fast in NumPy, at one thread:
- convolution with stride 1 runs on the padded input flattened to a matrix of pixels
  ("virtual" output pixels on the padded grid, see _conv_s1): every window's patch is
  then a fixed set of row offsets, the patches of a tile of pixels are copied into a
  buffer that stays in the CPU cache (TILE_BYTES), and each tile is one matrix product
  with the kernel in its Keras layout, patches (pixels, kh*kw*C) @ kernel (kh*kw*C, F),
  the bias as one more kernel row against a column of ones. The input gradient is the
  same kind of correlation (of the output gradient with the flipped kernel), the kernel
  and bias gradients one product per tile;
- strided convolution: im2col/col2im, channels-first so that the copies run along rows;
- conv2d_fft: the convolution theorem (an alternative, tested equal);
- pooling: one strided view per kernel offset and element-wise maximum/sums (no window
  axes), with plain writes instead of additions when the windows tile the input;
- sums over every axis but the channel as a matrix-vector product (channel_sum);
- GELU with a Chebyshev-series erfc (NumPy has no erf).
"""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import as_strided

from . import reference
from .reference import (  # noqa: F401  (already as fast as NumPy allows: re-exported)
    dense_forward,
    dropout_backward,
    dropout_forward,
    flatten_backward,
    flatten_forward,
    global_avgpool_backward,
    global_avgpool_forward,
    global_maxpool_backward,
    global_maxpool_forward,
    log_softmax,
    loss_on_logits,
    mse_loss,
    pair,
    rescaling_backward,
    rescaling_forward,
    resolve_pads,
    sigmoid,
    sigmoid_binary_cross_entropy,
    softmax,
    softmax_cross_entropy,
    softplus,
    unpad2d,
    update_moving,
)

TILE_BYTES = 512 * 1024  # patches per tile of the stride-1 convolution: well inside L2


def _tile_rows(k, itemsize):
    """Output pixels per tile for patches of k values: TILE_BYTES of them, at least 256
    (fewer make the matrix products slow)."""
    return max(256, TILE_BYTES // (k * itemsize))


# --------------------------------------------------------------------------------------
# Activations: the reference's, with GELU through a fast erfc
# --------------------------------------------------------------------------------------
# Chebyshev coefficients of P(u) = log(erfc(z) / t) + z^2, with t = 2 / (2 + z) and
# u = 2t - 1, fitted at 29 Chebyshev nodes with 50-digit arithmetic (mpmath).
_ERFC_CHEB = np.array([
    -0.6513268598908547, 0.6419697923564902, 0.019476473204185836,
    -0.009561514786808632, -0.0009465953444820369, 0.00036683949785276145,
    4.252332480690777e-05, -2.0278578112534242e-05, -1.6242900046470256e-06,
    1.3036558355805232e-06, 1.5626441722066142e-08, -8.523809591492654e-08,
    6.5290544390988515e-09, 5.059343495551469e-09, -9.91364156493033e-10,
    -2.2736512229318383e-10, 9.646791102015605e-11, 2.3940380830385273e-12,
    -6.886027526503204e-12, 8.944879273357139e-13, 3.130921398955721e-13,
    -1.1270822374970834e-13, 3.810914039373529e-16, 7.106095975064437e-15,
    -1.5230315910907376e-15])


def erfc(x):
    """Complementary error function erfc(x) = 1 - erf(x) (NumPy has none).

    For z = |x|: erfc(z) = t * exp(-z^2 + P(2t - 1)), t = 2 / (2 + z), with P the
    Chebyshev series above (the form used by Numerical Recipes), and
    erfc(-z) = 2 - erfc(z). Relative error < 1e-13 in float64. float32 inputs use the
    first 13 terms (series error < 1e-8): the result is then as good as float32 arithmetic
    allows (absolute error < 3e-7).
    """
    z = np.minimum(np.abs(x), 30)  # erfc(30) < 1e-390: 0 in any float
    t = 2 / (2 + z)
    u = 2 * t - 1
    coeffs = _ERFC_CHEB[:None if x.dtype == np.float64 else 13].astype(x.dtype)
    b1, b2 = np.zeros_like(u), np.zeros_like(u)
    for c in coeffs[:0:-1]:  # Clenshaw: b_k = c_k + 2u b_{k+1} - b_{k+2}
        b1, b2 = 2 * u * b1 - b2 + c, b1
    y = t * np.exp(-z * z + (u * b1 - b2 + coeffs[0]))
    return np.where(x >= 0, y, 2 - y)


# Python floats, not NumPy float64 scalars, so that float32 arrays stay float32.
_SQRT_HALF, _INV_SQRT_2PI = math.sqrt(0.5), 1 / math.sqrt(2 * math.pi)


def gelu(x):
    """Exact GELU: x * Phi(x), Phi the normal CDF = erfc(-x / sqrt 2) / 2."""
    return x * (0.5 * erfc(x * -_SQRT_HALF))


def gelu_backward(dout, x, y):
    """d/dx x Phi(x) = Phi(x) + x phi(x), phi(x) = e^(-x^2/2) / sqrt(2 pi)."""
    phi = np.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return dout * (0.5 * erfc(x * -_SQRT_HALF) + x * phi)


ACTIVATIONS = {**reference.ACTIVATIONS, "gelu": (gelu, gelu_backward)}


def activation_forward(x, name):
    """As reference.activation_forward; GELU with the Chebyshev erfc."""
    return reference.activation_forward(x, name, ACTIVATIONS)


activation_backward = reference.activation_backward


# --------------------------------------------------------------------------------------
# Padding and sums
# --------------------------------------------------------------------------------------
def pad2d(x, pads, value=0.0):
    """x (N, H, W, C) with pads ((top, bottom), (left, right)) of `value` around H and W;
    negative pads crop. x itself when there is nothing to do."""
    (t, b), (l, r) = pads
    if min(t, b, l, r) < 0:
        x = x[:, max(-t, 0):x.shape[1] - max(-b, 0), max(-l, 0):x.shape[2] - max(-r, 0)]
        (t, b), (l, r) = (max(t, 0), max(b, 0)), (max(l, 0), max(r, 0))
    if not (t or b or l or r):
        return x
    n, h, w, c = x.shape
    out = np.full((n, h + t + b, w + l + r, c), value, dtype=x.dtype)
    out[:, t:t + h, l:l + w] = x
    return out


def channel_sum(a):
    """Sum over every axis but the last (the channels): ones @ a.reshape(-1, C). As a
    matrix-vector product this is many times faster than a.sum(axis=(0, 1, 2)) in NumPy."""
    a2 = a.reshape(-1, a.shape[-1])
    return np.ones(a2.shape[0], dtype=a.dtype) @ a2


def _out_size(hp, wp, kernel, stride):
    """Output size per axis from the padded size: floor((n_padded - k) / s) + 1."""
    return (hp - kernel[0]) // stride[0] + 1, (wp - kernel[1]) // stride[1] + 1


def _offset(u, v, out_hw, stride):
    """(rows, cols) slices of the input cells that kernel offset (u, v) sees, one per
    output pixel: rows u, u + sh, ..., u + sh (Ho - 1), and the same for columns."""
    (ho, wo), (sh, sw) = out_hw, stride
    return slice(u, u + sh * (ho - 1) + 1, sh), slice(v, v + sw * (wo - 1) + 1, sw)


# --------------------------------------------------------------------------------------
# Convolution with stride 1 on the flattened padded input
#
# Flatten the padded input xp (N, Hp, Wp, C) to a matrix X of N*Hp*Wp pixel rows. Number
# the output pixels on the padded grid too, p = (n Hp + i) Wp + j: then the window of
# output pixel p is the rows p + u Wp + v of X, for every (u, v) of the kernel:
#
#     out_virtual[p, f] = sum_{u, v, c} X[p + u Wp + v, c] w[u, v, c, f]
#
# and out[n, i, j] = out_virtual[p] for i < Ho, j < Wo (the other "virtual" pixels, whose
# windows wrap around a row or an image, are computed and dropped: 10-25% extra work).
# Each patch is then a fixed set of row offsets of X, so a tile of consecutive pixels is
# a strided view of X (as_strided), copied once into a buffer the size of the CPU cache.
# With few channels (C < 16) the patches are laid out channels-first, (kh, kw, C, rows),
# so that the copies run along long rows of a (C, N*Hp*Wp) matrix.
# --------------------------------------------------------------------------------------
def _flat(x, pads):
    """The padded input as pixel rows (N*Hp*Wp, C), or channels-first (C, N*Hp*Wp) when
    C < 16. Returns (matrix, channels_first)."""
    xp, c = pad2d(x, pads), x.shape[3]
    if c < 16:
        return np.ascontiguousarray(xp.transpose(3, 0, 1, 2)).reshape(c, -1), True
    return np.ascontiguousarray(xp).reshape(-1, c), False


def _tiles(n, size, first, last, tile):
    """(start, rows) of the tiles of virtual pixels to compute: in each image of `size`
    pixels those from `first` to `last` (exclusive), whole images together when they fit in
    `tile` rows, else pieces of one, split evenly."""
    group = max(1, tile // size)
    for n0 in range(0, n, group):
        start, stop = n0 * size + first, (min(n, n0 + group) - 1) * size + last
        step = -(-(stop - start) // -(-(stop - start) // tile))  # equal pieces, <= tile
        for s in range(start, stop, step):
            yield s, min(step, stop - s)


def _patches(flat, start, rows, kernel, wp, buf, ones=False):
    """The patches of virtual pixels start..start+rows as a (rows, kh*kw*C) matrix, columns
    in the kernel's (u, v, c) order, copied into buf (channels-first: a transposed view).
    ones: one more column of ones, so that a bias row on the kernel adds the bias."""
    (xf, channels_first), (kh, kw), it = flat, kernel, flat[0].itemsize
    c = xf.shape[0] if channels_first else xf.shape[1]
    k = kh * kw * c
    if channels_first:
        p = buf[:(k + ones) * rows].reshape(k + ones, rows)
        p[:k].reshape(kh, kw, c, rows)[...] = as_strided(
            xf[:, start:], (kh, kw, c, rows), (wp * it, it, xf.strides[0], it))
        p[k:] = 1
        return p.T
    p = buf[:rows * (k + ones)].reshape(rows, k + ones)
    p[:, :k].reshape(rows, kh, kw * c)[...] = as_strided(
        xf[start:], (rows, kh, kw * c), (c * it, wp * c * it, it))
    p[:, k:] = 1
    return p


def _correlate(flat, w2, kernel, wp, pixels):
    """out[p] = patches(p) @ w2 for the virtual pixels p of pixels = (n, size, first, last)
    (see _tiles); w2 (kh*kw*C [+ 1 bias row], F). Returns out (n*size, F); rows outside
    the tiles are left unset."""
    k, f = w2.shape
    ones = k > kernel[0] * kernel[1] * (flat[0].shape[0] if flat[1] else flat[0].shape[1])
    out = np.empty((pixels[0] * pixels[1], f), w2.dtype)
    tile = _tile_rows(k, out.itemsize)
    buf = np.empty(tile * k, w2.dtype)
    # OpenBLAS (0.3.31, AVX-512) runs (rows, ~290) @ (~290, 16..32) products, a 3x3 kernel
    # over 32 channels, 10-20% faster in pieces of 64 rows (its small-matrix kernel)
    sub = 64 if 16 <= f <= 32 and 256 <= k <= 320 else tile
    for s, rows in _tiles(*pixels, tile):
        p = _patches(flat, s, rows, kernel, wp, buf, ones)
        for r in range(0, rows, sub):
            np.matmul(p[r:r + sub], w2, out=out[s + r:s + min(r + sub, rows)])
    return out


def _conv_s1(x, w, pads, b=None):
    """Stride-1 correlation of x (N, H, W, C) padded by pads (negative: cropped) with w
    (kh, kw, C, F), plus b (as a row of the kernel). Returns (out (N, Ho, Wo, F),
    a view of the virtual output; the flat input)."""
    kh, kw, _, f = w.shape
    n, hp, wp = x.shape[0], x.shape[1] + sum(pads[0]), x.shape[2] + sum(pads[1])
    ho, wo = hp - kh + 1, wp - kw + 1
    flat = _flat(x, pads)
    dtype = np.result_type(x.dtype, w.dtype)
    w2 = w.reshape(-1, f).astype(dtype, copy=False)
    if b is not None:  # patches get a column of ones
        w2 = np.concatenate([w2, b.reshape(1, f).astype(dtype)])
    outv = _correlate(flat, w2, (kh, kw), wp, (n, hp * wp, 0, (ho - 1) * wp + wo))
    return outv.reshape(n, hp, wp, f)[:, :ho, :wo], flat


def _conv_s1_backward(dout, cache, need_dx):
    """Gradients of _conv_s1 as used by conv2d_forward, (dx or None, dw, db or None).
    With D = dout on the input's virtual grid (0 on the dropped virtual pixels):
        [dw; db] = sum over tiles of [patches, 1]^T @ D;
        dx = the transposed convolution, dxp[n, a, b] = sum_{u, v} D[n, a-u, b-v] w[u, v]^T:
             a correlation of D with the flipped kernel w[::-1, ::-1] (in and out channels
             swapped) on the same grid, D's rows shifted by -(u Wp + v) (a margin of zero
             rows in front); with more padding than kw - 1 columns, the same correlation
             on dout padded by (kh-1-top, kh-1-bottom), (kw-1-left, kw-1-right), a
             smaller grid.
    """
    _, flat, x_shape, w, pads, has_bias = cache
    kh, kw, c, f = w.shape
    n, ho, wo = dout.shape[:3]
    (t, b), (l, r) = pads
    h, wd = x_shape[1:3]
    hp, wp = h + t + b, wd + l + r
    margin = (kh - 1) * wp + kw - 1
    dvm = np.zeros((margin + n * hp * wp, f), dout.dtype)
    dvm[margin:].reshape(n, hp, wp, f)[:, :ho, :wo] = dout
    dv = dvm[margin:]
    k = kh * kw * c + has_bias  # with a bias, the column of ones gives db in the last row
    dw2 = np.zeros((k, f), dout.dtype)
    tile = _tile_rows(k, dout.itemsize)
    buf = np.empty(tile * k, dout.dtype)
    for s, rows in _tiles(n, hp * wp, 0, (ho - 1) * wp + wo, tile):
        dw2 += _patches(flat, s, rows, (kh, kw), wp, buf, ones=has_bias).T @ dv[s:s + rows]
    dw, db = dw2[:kh * kw * c].reshape(w.shape), (dw2[-1] if has_bias else None)
    if not need_dx:
        return None, dw, db
    wf = w[::-1, ::-1].transpose(0, 1, 3, 2)  # (kh, kw, F, C)
    if l + r > kw - 1:
        back_pads = ((kh - 1 - t, kh - 1 - b), (kw - 1 - l, kw - 1 - r))
        dx, _ = _conv_s1(dout, wf, back_pads)
        return dx, dw, db
    flat_d = (np.ascontiguousarray(dvm.T), True) if f < 16 else (dvm, False)
    pixels = (n, hp * wp, t * wp + l, (t + h - 1) * wp + l + wd)
    dxv = _correlate(flat_d, wf.reshape(-1, c), (kh, kw), wp, pixels)
    return dxv.reshape(n, hp, wp, c)[:, t:t + h, l:l + wd], dw, db


# --------------------------------------------------------------------------------------
# Strided convolution: im2col
# --------------------------------------------------------------------------------------
def im2col(x, kernel, stride, pads):
    """Every window of the padded input as one column of a matrix:
        cols[(u, v, c), (n, i, j)] = xp[n, i*sh + u, j*sw + v, c],  shape (kh*kw*C, N*Ho*Wo).
    It is filled from a channels-first padded copy xt (C, N, Hp, Wp): for each kernel
    offset (u, v), the cells that offset sees under every output pixel form one strided
    slice xt[:, :, u::sh, v::sw] (C, N, Ho, Wo), copied into rows (u, v, :).
    (Channels-first keeps the copies' inner loops long: whole image rows, not C values.)"""
    (kh, kw), ((t, b), (l, r)) = kernel, pads
    n, h, w, c = x.shape
    xt = np.zeros((c, n, h + t + b, w + l + r), dtype=x.dtype)
    xt[:, :, t:t + h, l:l + w] = x.transpose(3, 0, 1, 2)
    ho, wo = _out_size(h + t + b, w + l + r, kernel, stride)
    cols = np.empty((kh, kw, c, n, ho, wo), dtype=x.dtype)
    for u in range(kh):
        for v in range(kw):
            rows, columns = _offset(u, v, (ho, wo), stride)
            cols[u, v] = xt[:, :, rows, columns]
    return cols.reshape(kh * kw * c, n * ho * wo), (ho, wo)


def col2im(dcols, x_shape, kernel, stride, pads, out_hw):
    """The adjoint of im2col: add each column back onto the cells of its window.
        dxp[n, i*sh + u, j*sw + v, c] += dcols[(u, v, c), (n, i, j)]
    Cells shared by several windows sum their contributions; padding is cropped off.
    Returns dx (N, H, W, C)."""
    (kh, kw), ((t, b), (l, r)) = kernel, pads
    n, h, w, c = x_shape
    dcols = dcols.reshape(kh, kw, c, n, *out_hw)
    dxt = np.zeros((c, n, h + t + b, w + l + r), dtype=dcols.dtype)
    for u in range(kh):
        for v in range(kw):
            rows, columns = _offset(u, v, out_hw, stride)
            dxt[:, :, rows, columns] += dcols[u, v]
    return np.ascontiguousarray(dxt[:, :, t:t + h, l:l + w].transpose(1, 2, 3, 0))




def conv2d_forward(x, w, b=None, stride=1, padding="valid"):
    """As reference.conv2d_forward: out = correlation of the padded x with w, plus b.
    Stride 1: tiles of patches @ kernel (see _conv_s1); other strides: im2col,
    out = im2col(x)^T @ w.reshape(kh*kw*C, F) (column (n, i, j) of im2col is the window
    under output pixel (i, j), in the same (u, v, c) order as the kernel's rows)."""
    kh, kw, _, f = w.shape
    stride = pair(stride)
    pads = resolve_pads(x.shape[1], x.shape[2], (kh, kw), stride, padding)
    if stride == (1, 1):
        out, flat = _conv_s1(x, w, pads, b)
        return out, ("virtual", flat, x.shape, w, pads, b is not None)
    cols, (ho, wo) = im2col(x, (kh, kw), stride, pads)
    out = cols.T @ w.reshape(-1, f)  # (N*Ho*Wo, F): rows in NHWC order
    if b is not None:
        out += b
    return out.reshape(x.shape[0], ho, wo, f), ("im2col", cols, x.shape, w, pads, b is not None, stride)


def conv2d_backward(dout, cache, need_dx=True):
    """As reference.conv2d_backward: returns dx (None unless need_dx), dw, db (None without
    a bias). im2col, with D = dout as an (N*Ho*Wo, F) matrix: dw = cols @ D,
    dcols = w2 @ D^T, then col2im adds each window's gradient back where it came from."""
    if cache[0] == "virtual":
        return _conv_s1_backward(dout, cache, need_dx)
    _, cols, x_shape, w, pads, has_bias, stride = cache
    f = w.shape[3]
    db = channel_sum(dout) if has_bias else None
    d2 = dout.reshape(-1, f)
    dw = (cols @ d2).reshape(w.shape)
    if not need_dx:
        return None, dw, db
    dcols = w.reshape(-1, f) @ d2.T
    return col2im(dcols, x_shape, w.shape[:2], stride, pads, dout.shape[1:3]), dw, db


# --------------------------------------------------------------------------------------
# Convolution through the Fourier transform (tested equal; not used by the engine)
# --------------------------------------------------------------------------------------
def conv2d_fft(x, w, b=None, stride=1, padding="valid"):
    """Convolution through the Fourier transform.

    Cross-correlation with W is convolution with the flipped kernel W[::-1, ::-1], and a
    convolution is a product of spectra: FFT(x conv k) = FFT(x) * FFT(k). With transforms
    of the padded size (Hp, Wp) the convolution is circular, but its entries at rows
    >= kh - 1 and columns >= kw - 1 never wrap around, and entry (kh-1 + i, kw-1 + j) is
    the correlation at (i, j). The input channels are summed in the frequency domain.
    """
    kh, kw = w.shape[:2]
    stride = pair(stride)
    pads = resolve_pads(x.shape[1], x.shape[2], (kh, kw), stride, padding)
    xp = pad2d(x, pads)
    hp, wp = xp.shape[1:3]
    ho, wo = _out_size(hp, wp, (kh, kw), stride)
    spec_x = np.fft.rfft2(xp, axes=(1, 2))                                  # (N, Hp, Wp', C)
    spec_k = np.fft.rfft2(w[::-1, ::-1], s=(hp, wp), axes=(0, 1))           # (Hp, Wp', C, F)
    spec = np.einsum("nhwc,hwcf->nhwf", spec_x, spec_k.astype(spec_x.dtype))
    full = np.fft.irfft2(spec, s=(hp, wp), axes=(1, 2))
    out = full[:, kh - 1::stride[0], kw - 1::stride[1]][:, :ho, :wo].astype(x.dtype)
    return out if b is None else out + b

# --------------------------------------------------------------------------------------
# Pooling. Windows as in convolution: out[n, i, j, c] = reduce_{u, v} xp[n, i*sh+u, j*sw+v, c]
#
# Each op loops over the kh*kw kernel offsets: offset (u, v) sees the strided view
# xp[:, u::sh, v::sw] (one cell per window, no copy), and the windows are reduced with
# element-wise maximum / sums of these views. In NumPy this is several times faster than
# reducing a sliding-window view over its window axes.
# --------------------------------------------------------------------------------------
def _pool_geometry(x, pool, stride, padding):
    """(pool, stride, pads, out_hw, disjoint, tiles): disjoint when windows do not overlap,
    tiles when they also cover every (padded) input cell exactly once."""
    pool = pair(pool)
    stride = pool if stride is None else pair(stride)
    pads = resolve_pads(x.shape[1], x.shape[2], pool, stride, padding)
    hp, wp = x.shape[1] + sum(pads[0]), x.shape[2] + sum(pads[1])
    out_hw = _out_size(hp, wp, pool, stride)
    disjoint = stride[0] >= pool[0] and stride[1] >= pool[1]
    tiles = pool == stride and out_hw[0] * pool[0] == hp and out_hw[1] * pool[1] == wp
    return pool, stride, pads, out_hw, disjoint, tiles


def _add_at(dxp, rows, cols, g, disjoint):
    """dxp[:, rows, cols] += g; a plain write when the windows are disjoint."""
    if disjoint:
        dxp[:, rows, cols] = g
    else:
        dxp[:, rows, cols] += g


def maxpool_forward(x, pool=2, stride=None, padding="valid"):
    """out[n, i, j, c] = max_{u, v} xp[n, i*sh + u, j*sw + v, c], with padded cells -inf
    so that they never win. Output size as in convolution: floor((H + pads - kh) / sh) + 1."""
    geometry = _pool_geometry(x, pool, stride, padding)
    pool, stride, pads, out_hw = geometry[:4]
    xp = pad2d(x, pads, -np.inf)  # x itself when there is no padding
    out = np.full((x.shape[0], *out_hw, x.shape[3]), -np.inf, dtype=x.dtype)
    for u in range(pool[0]):
        for v in range(pool[1]):
            rows, cols = _offset(u, v, out_hw, stride)
            np.maximum(out, xp[:, rows, cols], out=out)
    return out, (xp, out, geometry)


def maxpool_backward(dout, cache):
    """The gradient goes to the cell holding the window's max:
        dx[n, i*sh + u, j*sw + v, c] += dout[n, i, j, c]  for (u, v) = argmax of the window.
    On ties the first max in row-major (u, v) order takes it all (as argmax does):
    `free` marks the windows whose max has not been claimed yet. Overlapping windows add
    their contributions."""
    xp, out, (pool, stride, pads, out_hw, disjoint, tiles) = cache
    dxp = np.empty_like(xp) if tiles else np.zeros_like(xp)  # tiling windows write every cell
    free = np.ones(out.shape, dtype=bool)
    for u in range(pool[0]):
        for v in range(pool[1]):
            rows, cols = _offset(u, v, out_hw, stride)
            hit = (xp[:, rows, cols] == out) & free
            free ^= hit  # hit is a subset of free: this removes it
            _add_at(dxp, rows, cols, dout * hit, disjoint)
    return unpad2d(dxp, pads)


def avgpool_forward(x, pool=2, stride=None, padding="valid"):
    """out[n, i, j, c] = (sum of the window's real cells) / count[i, j], count = their number:
    padded cells count neither in the sum nor in the divisor (Keras 'same'). Without
    padding every window is whole and count = kh * kw."""
    geometry = _pool_geometry(x, pool, stride, padding)
    pool, stride, pads, out_hw = geometry[:4]
    xp = pad2d(x, pads)
    real = pad2d(np.ones((1, *x.shape[1:3], 1), dtype=x.dtype), pads)  # 1 on real cells
    out = np.zeros((x.shape[0], *out_hw, x.shape[3]), dtype=x.dtype)
    count = np.zeros((1, *out_hw, 1), dtype=x.dtype)
    for u in range(pool[0]):
        for v in range(pool[1]):
            rows, cols = _offset(u, v, out_hw, stride)
            out += xp[:, rows, cols]
            count += real[:, rows, cols]
    out /= count
    return out, (xp.shape, count, geometry)


def avgpool_backward(dout, cache):
    """Each real cell of a window receives an equal share of its gradient:
        dx[n, i*sh + u, j*sw + v, c] += dout[n, i, j, c] / count[i, j]
    (padded cells receive shares too, but are cropped off)."""
    xp_shape, count, (pool, stride, pads, out_hw, disjoint, tiles) = cache
    dxp = np.empty(xp_shape, dout.dtype) if tiles else np.zeros(xp_shape, dout.dtype)
    g = dout / count
    for u in range(pool[0]):
        for v in range(pool[1]):
            rows, cols = _offset(u, v, out_hw, stride)
            _add_at(dxp, rows, cols, g, disjoint)
    return unpad2d(dxp, pads)


# --------------------------------------------------------------------------------------
# Dense (the bias gradient as a matrix-vector product)
# --------------------------------------------------------------------------------------
def dense_backward(dout, cache, need_dx=True):
    """As reference.dense_backward: dx = dout @ w^T, dw = x^T @ dout, db = sum_n dout."""
    x, w, has_bias = cache
    dx = dout @ w.T if need_dx else None
    return dx, x.T @ dout, channel_sum(dout) if has_bias else None


# --------------------------------------------------------------------------------------
# Batch normalization: channel sums as products, arrays updated in place
# --------------------------------------------------------------------------------------
def batchnorm_forward(x, gamma, beta, moving_mean, moving_var, epsilon=1e-3,
                      momentum=0.99, training=False):
    """As reference.batchnorm_forward: y = gamma * (x - mu) / sqrt(var + eps) + beta."""
    m = x.size // x.shape[-1]
    if training:
        mu = channel_sum(x) / m
        xc = x - mu
        var = channel_sum(xc * xc) / m
        update_moving(moving_mean, moving_var, mu, var, m, momentum)
    else:
        mu, var = moving_mean.astype(x.dtype), moving_var.astype(x.dtype)
        xc = x - mu
    inv_std = 1 / np.sqrt(var + epsilon)
    x_hat = xc
    x_hat *= inv_std  # in place: xc is not needed any more
    out = x_hat * gamma
    out += beta
    return out, (x_hat, gamma, inv_std, training)


def batchnorm_backward(dout, cache):
    """As reference.batchnorm_backward: returns dx, dgamma, dbeta."""
    x_hat, gamma, inv_std, training = cache
    dbeta = channel_sum(dout)
    dgamma = channel_sum(dout * x_hat)
    if not training:
        return dout * (gamma * inv_std), dgamma, dbeta
    m = dout.size // dout.shape[-1]
    dx = dout * m
    dx -= dbeta
    dx -= x_hat * dgamma
    dx *= gamma * inv_std / m
    return dx, dgamma, dbeta
