"""The math of every layer, in NumPy, as forward/backward pairs.

Each op comes as a pair:

    out, cache = op_forward(x, ...)       # cache holds what the backward pass needs
    dx, ...    = op_backward(dout, cache) # dout = dL/d(out); returns dL/dx and param grads

Images are channels-last, NHWC: x[n, i, j, c]. Weights use Keras layouts: a Conv2D
kernel is (kh, kw, in, out), a Dense kernel (in, out). Every op keeps the dtype of
its input (float32 for speed, float64 for gradient checks).

Sections: activations, padding, convolution, pooling, dense/flatten/dropout,
batch normalization, losses.
"""
from __future__ import annotations

import math

import numpy as np

from ...layers import pad_amounts

LEAKY_RELU_SLOPE = 0.2  # keras.activations.leaky_relu default negative_slope (Keras 3)
ELU_ALPHA = 1.0


# --------------------------------------------------------------------------------------
# Activations
# --------------------------------------------------------------------------------------
def sigmoid(x):
    """s(x) = 1 / (1 + e^-x), without overflow: only e^-|x| <= 1 is ever computed."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e))


def softplus(x):
    """log(1 + e^x) = max(x, 0) + log(1 + e^-|x|), stable for any x."""
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def log_softmax(z, axis=-1):
    """log softmax(z) = (z - max z) - log sum exp(z - max z)."""
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def softmax(z, axis=-1):
    """softmax(z)_k = e^(z_k - max z) / sum_j e^(z_j - max z)."""
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


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


def _gelu_backward(dout, x, y):
    """d/dx x Phi(x) = Phi(x) + x phi(x), phi(x) = e^(-x^2/2) / sqrt(2 pi)."""
    phi = np.exp(-0.5 * x * x) * _INV_SQRT_2PI
    return dout * (0.5 * erfc(x * -_SQRT_HALF) + x * phi)


def _elu(x):
    return np.where(x > 0, x, ELU_ALPHA * np.expm1(np.minimum(x, 0)))


# name -> (f(x), backward(dout, x, y) -> dx) where y = f(x).
_ACTIVATIONS = {
    "linear": (lambda x: x, lambda d, x, y: d),
    "relu": (lambda x: np.maximum(x, 0), lambda d, x, y: d * (x > 0)),
    "leaky_relu": (lambda x: np.where(x > 0, x, x * LEAKY_RELU_SLOPE),
                   lambda d, x, y: np.where(x > 0, d, d * LEAKY_RELU_SLOPE)),
    "elu": (_elu, lambda d, x, y: np.where(x > 0, d, d * (y + ELU_ALPHA))),
    "gelu": (gelu, _gelu_backward),
    "sigmoid": (sigmoid, lambda d, x, y: d * y * (1 - y)),
    "tanh": (np.tanh, lambda d, x, y: d * (1 - y * y)),
    "softplus": (softplus, lambda d, x, y: d * sigmoid(x)),
    # softmax over the last axis: dx = y * (dout - sum_k dout_k y_k)
    "softmax": (softmax, lambda d, x, y: y * (d - (d * y).sum(axis=-1, keepdims=True))),
}


def activation_forward(x, name):
    """y = f(x) element-wise (softmax: over the last, channel, axis).

    linear x; relu max(x, 0); leaky_relu x if x > 0 else 0.2 x; elu x if x > 0 else
    e^x - 1; gelu x Phi(x) (exact, erf form); sigmoid 1 / (1 + e^-x); tanh;
    softplus log(1 + e^x); softmax e^x_k / sum_j e^x_j.
    """
    y = _ACTIVATIONS[name][0](x)
    return y, (name, x, y)


def activation_backward(dout, cache):
    """dx = dout * f'(x) (softmax: the Jacobian-vector product y * (dout - <dout, y>))."""
    name, x, y = cache
    return _ACTIVATIONS[name][1](dout, x, y)


# --------------------------------------------------------------------------------------
# Padding
# --------------------------------------------------------------------------------------
def resolve_pads(h, w, kernel, stride, padding):
    """((top, bottom), (left, right)) for an h x w input. padding: 'valid', 'same' (Keras:
    the odd pixel goes bottom/right), 'full', an int or a pair (see layers.pad_amounts)."""
    (kh, kw), (sh, sw) = kernel, stride
    return pad_amounts(h, kh, sh, padding, 0), pad_amounts(w, kw, sw, padding, 1)


def pad2d(x, pads, value=0.0):
    """x (N, H, W, C) with pads ((top, bottom), (left, right)) of `value` around H and W."""
    (t, b), (l, r) = pads
    if not (t or b or l or r):
        return x
    n, h, w, c = x.shape
    out = np.full((n, h + t + b, w + l + r, c), value, dtype=x.dtype)
    out[:, t:t + h, l:l + w] = x
    return out


def unpad2d(xp, pads):
    """The inverse of pad2d: crop the padding off (used on gradients)."""
    (t, b), (l, r) = pads
    return xp[:, t:xp.shape[1] - b, l:xp.shape[2] - r]


def channel_sum(a):
    """Sum over every axis but the last (the channels): ones @ a.reshape(-1, C). As a
    matrix-vector product this is many times faster than a.sum(axis=(0, 1, 2)) in NumPy."""
    a2 = a.reshape(-1, a.shape[-1])
    return np.ones(a2.shape[0], dtype=a.dtype) @ a2


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _out_size(hp, wp, kernel, stride):
    """Output size per axis from the padded size: floor((n_padded - k) / s) + 1."""
    return (hp - kernel[0]) // stride[0] + 1, (wp - kernel[1]) // stride[1] + 1


def _offset(u, v, out_hw, stride):
    """(rows, cols) slices of the input cells that kernel offset (u, v) sees, one per
    output pixel: rows u, u + sh, ..., u + sh (Ho - 1), and the same for columns."""
    (ho, wo), (sh, sw) = out_hw, stride
    return slice(u, u + sh * (ho - 1) + 1, sh), slice(v, v + sw * (wo - 1) + 1, sw)


# --------------------------------------------------------------------------------------
# Convolution (cross-correlation, as Keras and PyTorch: the kernel is not flipped)
#
#   out[n, i, j, f] = b[f] + sum_{u, v, c} xp[n, i*sh + u, j*sw + v, c] * W[u, v, c, f]
#
# xp is the padded input; Ho = floor((H + pad_top + pad_bottom - kh) / sh) + 1 (same for W).
# Three ways to compute it, giving the same numbers:
#   conv2d_direct  loops over output pixels: the formula as written;
#   conv2d_forward im2col: copy every window into one column of a matrix, then one
#                  matrix product (the default: fast; its backward is two more products
#                  and col2im, which adds the columns back onto the windows);
#   conv2d_fft     the convolution theorem: a product of Fourier transforms.
# --------------------------------------------------------------------------------------
def conv2d_direct(x, w, b=None, stride=1, padding="valid"):
    """Reference convolution: for each output pixel (i, j), the window of the padded input
    it sees, (N, kh, kw, C), is contracted with the kernel (kh, kw, C, F) over u, v, c."""
    kh, kw, _, f = w.shape
    stride = _pair(stride)
    pads = resolve_pads(x.shape[1], x.shape[2], (kh, kw), stride, padding)
    xp = pad2d(x, pads)
    ho, wo = _out_size(*xp.shape[1:3], (kh, kw), stride)
    out = np.zeros((x.shape[0], ho, wo, f), dtype=x.dtype)
    for i in range(ho):
        for j in range(wo):
            r, c = i * stride[0], j * stride[1]
            window = xp[:, r:r + kh, c:c + kw, :]
            out[:, i, j, :] = np.tensordot(window, w, axes=3)
    return out if b is None else out + b


def conv2d_direct_backward(dout, x, w, stride=1, padding="valid"):
    """The same loops run backwards: each output pixel sends dout[:, i, j] back
    through the window it came from.
        dW[u, v, c, f] = sum_{n, i, j} xp[n, i*sh + u, j*sw + v, c] dout[n, i, j, f]
        dxp[n, i*sh + u, j*sw + v, c] += sum_f W[u, v, c, f] dout[n, i, j, f]
        db[f] = sum_{n, i, j} dout[n, i, j, f]
    Returns dx, dW, db."""
    kh, kw = w.shape[:2]
    stride = _pair(stride)
    pads = resolve_pads(x.shape[1], x.shape[2], (kh, kw), stride, padding)
    xp = pad2d(x, pads)
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    for i in range(dout.shape[1]):
        for j in range(dout.shape[2]):
            r, c = i * stride[0], j * stride[1]
            g = dout[:, i, j, :]  # (N, F)
            dw += np.tensordot(xp[:, r:r + kh, c:c + kw, :], g, axes=(0, 0))
            dxp[:, r:r + kh, c:c + kw, :] += np.tensordot(g, w, axes=(1, 3))
    return unpad2d(dxp, pads), dw, dout.sum(axis=(0, 1, 2))


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
    """Convolution as one matrix product (im2col):
        out = im2col(x)^T @ W.reshape(kh*kw*C, F) + b, reshaped to (N, Ho, Wo, F).
    Column (n, i, j) of im2col is the window under output pixel (i, j), flattened in the
    same (u, v, c) order as the kernel's rows, so the product is exactly the sum above."""
    kh, kw, _, f = w.shape
    stride = _pair(stride)
    pads = resolve_pads(x.shape[1], x.shape[2], (kh, kw), stride, padding)
    cols, (ho, wo) = im2col(x, (kh, kw), stride, pads)
    out = cols.T @ w.reshape(-1, f)  # (N*Ho*Wo, F): rows are NHWC order already
    if b is not None:
        out += b
    cache = (cols, x.shape, w, pads, stride, b is not None)
    return out.reshape(x.shape[0], ho, wo, f), cache


def conv2d_backward(dout, cache, need_dx=True):
    """Gradients of out = cols^T @ W2 + b, with D = dout as an (N*Ho*Wo, F) matrix:
        dW = cols @ D  (reshaped to (kh, kw, C, F)),   db = sum of D's rows,
        dcols = W2 @ D^T, then col2im adds each window's gradient back where the window
        was taken from (a loop over the kh*kw kernel offsets only).
    Returns dx (None if not need_dx), dW, db (None without a bias)."""
    cols, x_shape, w, pads, stride, has_bias = cache
    f = w.shape[3]
    d2 = dout.reshape(-1, f)
    dw = (cols @ d2).reshape(w.shape)
    db = channel_sum(d2) if has_bias else None
    if not need_dx:
        return None, dw, db
    dcols = w.reshape(-1, f) @ d2.T
    return col2im(dcols, x_shape, w.shape[:2], stride, pads, dout.shape[1:3]), dw, db


def conv2d_fft(x, w, b=None, stride=1, padding="valid"):
    """Convolution through the Fourier transform.

    Cross-correlation with W is convolution with the flipped kernel W[::-1, ::-1], and a
    convolution is a product of spectra: FFT(x conv k) = FFT(x) * FFT(k). With transforms
    of the padded size (Hp, Wp) the convolution is circular, but its entries at rows
    >= kh - 1 and columns >= kw - 1 never wrap around, and entry (kh-1 + i, kw-1 + j) is
    the correlation at (i, j). The input channels are summed in the frequency domain.
    """
    kh, kw, _, f = w.shape
    stride = _pair(stride)
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
# reshaping to (N, Ho, kh, Wo, kw, C) and reducing over the kh and kw axes.
# --------------------------------------------------------------------------------------
def _pool_geometry(x, pool, stride, padding):
    """(pool, stride, pads, out_hw, disjoint, tiles): disjoint when windows do not overlap,
    tiles when they also cover every (padded) input cell exactly once."""
    pool = _pair(pool)
    stride = pool if stride is None else _pair(stride)
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


def global_avgpool_forward(x):
    """(N, H, W, C) -> (N, C): out[n, c] = mean_{i, j} x[n, i, j, c]."""
    return x.mean(axis=(1, 2)), x.shape


def global_avgpool_backward(dout, cache):
    """dx[n, i, j, c] = dout[n, c] / (H W)."""
    n, h, w, c = cache
    dx = np.empty(cache, dtype=dout.dtype)
    dx[...] = (dout * (1 / (h * w)))[:, None, None, :]
    return dx


def global_maxpool_forward(x):
    """(N, H, W, C) -> (N, C): out[n, c] = max_{i, j} x[n, i, j, c]."""
    n, h, w, c = x.shape
    arg = x.reshape(n, h * w, c).argmax(axis=1)  # first max in row-major order
    out = np.take_along_axis(x.reshape(n, h * w, c), arg[:, None, :], axis=1)[:, 0]
    return out, (x.shape, arg)


def global_maxpool_backward(dout, cache):
    """dx = dout at each channel's (first) argmax position, 0 elsewhere."""
    (n, h, w, c), arg = cache
    dx = np.zeros((n, h * w, c), dtype=dout.dtype)
    np.put_along_axis(dx, arg[:, None, :], dout[:, None, :], axis=1)
    return dx.reshape(n, h, w, c)


# --------------------------------------------------------------------------------------
# Dense, Flatten, Dropout
# --------------------------------------------------------------------------------------
def dense_forward(x, w, b=None):
    """out = x @ W + b, x (N, in), W (in, out)."""
    out = x @ w
    if b is not None:
        out += b
    return out, (x, w, b is not None)


def dense_backward(dout, cache, need_dx=True):
    """dx = dout @ W^T, dW = x^T @ dout, db = sum_n dout. Returns dx, dW, db."""
    x, w, has_bias = cache
    dx = dout @ w.T if need_dx else None
    return dx, x.T @ dout, channel_sum(dout) if has_bias else None


def flatten_forward(x):
    """(N, H, W, C) -> (N, H*W*C) in channels-last order (as Keras): a reshape."""
    return x.reshape(x.shape[0], -1), x.shape


def flatten_backward(dout, shape):
    return dout.reshape(shape)


def dropout_forward(x, rate, training, rng):
    """Inverted dropout: y = x * m / (1 - rate), m_i ~ Bernoulli(1 - rate) drawn from rng
    (kept where u >= rate, u uniform in [0, 1)); so E[y] = x and inference is y = x."""
    if not training or rate == 0:
        return x, None
    mask = (rng.random(x.shape, dtype=x.dtype) >= rate) * x.dtype.type(1 / (1 - rate))
    return x * mask, mask


def dropout_backward(dout, mask):
    """dx = dout * m / (1 - rate) (the same scaled mask)."""
    return dout if mask is None else dout * mask


# --------------------------------------------------------------------------------------
# Batch normalization (over every axis but the last: N for (N, C), N, H, W for NHWC)
# --------------------------------------------------------------------------------------
def batchnorm_forward(x, gamma, beta, moving_mean, moving_var, epsilon=1e-3,
                      momentum=0.99, training=False):
    """y = gamma * x_hat + beta, x_hat = (x - mu) / sqrt(var + eps).

    training: mu, var are the batch mean and biased variance over the M = N*H*W values
    of each channel, and the moving statistics are updated in place (Keras momentum):
        moving_mean = momentum * moving_mean + (1 - momentum) * mu
        moving_var  = momentum * moving_var  + (1 - momentum) * var * M / (M - 1)
    (the unbiased variance, as PyTorch). Inference: mu, var = the moving statistics.
    """
    m = x.size // x.shape[-1]
    if training:
        mu = channel_sum(x) / m
        xc = x - mu
        var = channel_sum(xc * xc) / m
        moving_mean[...] = momentum * moving_mean + (1 - momentum) * mu
        moving_var[...] = momentum * moving_var + (1 - momentum) * var * (m / max(m - 1, 1))
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
    """dgamma = sum dout * x_hat, dbeta = sum dout (sums over all axes but the channel).
    training (mu, var depend on x):
        dx = gamma * inv_std / M * (M dout - sum dout - x_hat * sum(dout * x_hat))
    inference (mu, var are constants): dx = dout * gamma * inv_std.
    Returns dx, dgamma, dbeta."""
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


# --------------------------------------------------------------------------------------
# Losses on logits z (before the final softmax / sigmoid), fused with their gradient:
# each returns (loss as a float, dloss/dz). Batch means, as Keras and PyTorch.
# --------------------------------------------------------------------------------------
def _targets(y, k, dtype):
    """Integer labels (N,) -> one-hot (N, K); a (N, K) array is taken as the targets."""
    y = np.asarray(y)
    if y.ndim == 2:
        return y.astype(dtype)
    if y.size and (y.min() < 0 or y.max() >= k):
        raise ValueError(f"labels must be in 0..{k - 1} for {k} outputs, got {y.min()}..{y.max()}")
    return (y.astype(np.int64)[:, None] == np.arange(k)).astype(dtype)


def softmax_cross_entropy(z, y, label_smoothing=0.0):
    """loss = -1/N sum_n sum_k t[n, k] log softmax(z)[n, k], with PyTorch's label smoothing
    t = (1 - ls) onehot(y) + ls / K. The gradient is dz = (softmax(z) - t) / N."""
    n, k = z.shape
    t = _targets(y, k, z.dtype)
    if label_smoothing:
        t = (1 - label_smoothing) * t + label_smoothing / k
    logp = log_softmax(z)
    loss = -(t * logp).sum() / n
    return float(loss), (np.exp(logp) - t) / n


def sigmoid_binary_cross_entropy(z, y, label_smoothing=0.0):
    """loss = mean of -[t log s(z) + (1 - t) log(1 - s(z))] over all entries, computed as
    max(z, 0) - z t + log(1 + e^-|z|). z is (N, 1) with y (N,) in {0, 1}, or (N, K) with
    (N, K) targets. Smoothing as Keras: t = y (1 - ls) + ls / 2. dz = (s(z) - t) / z.size."""
    t = np.asarray(y).reshape(z.shape).astype(z.dtype)
    if label_smoothing:
        t = t * (1 - label_smoothing) + 0.5 * label_smoothing
    loss = (np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))).mean()
    return float(loss), (sigmoid(z) - t) / z.size


def mse_loss(z, y, output="softmax"):
    """PyTorch's F.mse_loss(p, t): mean over all N*K entries of (p - t)^2, where p is the
    probability output (softmax(z), or sigmoid(z) for output='sigmoid') and t the one-hot
    targets (for one sigmoid unit, t = y). dp = 2 (p - t) / (N K), then back through the
    softmax (p * (dp - <dp, p>)) or the sigmoid (dp * p (1 - p))."""
    if output == "sigmoid":
        p = sigmoid(z)
        t = np.asarray(y).reshape(z.shape).astype(z.dtype) if z.shape[1] == 1 \
            else _targets(y, z.shape[1], z.dtype)
    else:
        p, t = softmax(z), _targets(y, z.shape[1], z.dtype)
    diff = p - t
    dp = diff * (2 / diff.size)
    if output == "sigmoid":
        return float((diff * diff).mean()), dp * p * (1 - p)
    return float((diff * diff).mean()), p * (dp - (dp * p).sum(axis=1, keepdims=True))


def loss_on_logits(kind, z, y, label_smoothing=0.0):
    """(loss, dloss/dz) for a loss kind of `cnnlab.losses.resolve_loss`: softmax_ce,
    sigmoid_bce (one sigmoid unit) or mse_probs (on sigmoid(z) for one unit, else softmax(z))."""
    if kind == "softmax_ce":
        return softmax_cross_entropy(z, y, label_smoothing)
    if kind == "sigmoid_bce":
        return sigmoid_binary_cross_entropy(z, y, label_smoothing)
    if kind == "mse_probs":
        return mse_loss(z, y, "sigmoid" if z.shape[1] == 1 else "softmax")
    raise ValueError(f"unknown loss kind {kind!r}")
