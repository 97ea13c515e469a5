"""Every layer's forward and backward pass in plain NumPy, written to be read.

Each op comes as a pair, in the style of Stanford's cs231n assignments:

    out, cache = x_forward(x, ...)       # cache holds what the backward pass needs
    dx, ...    = x_backward(dout, cache) # dout = dL/d(out); returns dL/dx and the param grads

Images are channels-last, NHWC: x[n, i, j, c]. Weights use Keras layouts: a Conv2D
kernel is (kh, kw, in, out), a Dense kernel (in, out). Windows (of a convolution or a
pooling) are taken with `sliding_window_view`, a strided view that copies nothing: for an
input (N, Hp, Wp, C) and a kh x kw window it is (N, Hp-kh+1, Wp-kw+1, C, kh, kw), and
[:, ::sh, ::sw] keeps the windows a stride of (sh, sw) visits.

The engine runs the same math from fast.py (tested equal to this file); the activations
and the losses live here only, as they are already as fast as NumPy allows.

Sections: activations, padding, convolution, pooling, dense/flatten/dropout/rescaling,
batch normalization, losses.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ...layers import pad_amounts

LEAKY_RELU_SLOPE = 0.2  # keras.activations.leaky_relu default negative_slope (Keras 3)
ELU_ALPHA = 1.0


# --------------------------------------------------------------------------------------
# Activations: y = f(x) element-wise (softmax over the last, channel, axis)
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


_erfc = np.vectorize(math.erfc, otypes=[np.float64])


def gelu(x):
    """Exact GELU: x * Phi(x), Phi the normal CDF = erfc(-x / sqrt 2) / 2."""
    return x * (0.5 * _erfc(-x / math.sqrt(2))).astype(x.dtype)


def gelu_backward(dout, x, y):
    """d/dx x Phi(x) = Phi(x) + x phi(x), phi(x) = e^(-x^2/2) / sqrt(2 pi)."""
    phi = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return dout * ((0.5 * _erfc(-x / math.sqrt(2))).astype(x.dtype) + x * phi)


def _elu(x):
    return np.where(x > 0, x, ELU_ALPHA * np.expm1(np.minimum(x, 0)))


# name -> (f(x), backward(dout, x, y) -> dx) where y = f(x).
ACTIVATIONS = {
    "linear": (lambda x: x, lambda d, x, y: d),
    "relu": (lambda x: np.maximum(x, 0), lambda d, x, y: d * (x > 0)),
    "leaky_relu": (lambda x: np.where(x > 0, x, x * LEAKY_RELU_SLOPE),
                   lambda d, x, y: np.where(x > 0, d, d * LEAKY_RELU_SLOPE)),
    "elu": (_elu, lambda d, x, y: np.where(x > 0, d, d * (y + ELU_ALPHA))),
    "gelu": (gelu, gelu_backward),
    "sigmoid": (sigmoid, lambda d, x, y: d * y * (1 - y)),
    "tanh": (np.tanh, lambda d, x, y: d * (1 - y * y)),
    "softplus": (softplus, lambda d, x, y: d * sigmoid(x)),
    # softmax over the last axis: dx = y * (dout - sum_k dout_k y_k)
    "softmax": (softmax, lambda d, x, y: y * (d - (d * y).sum(axis=-1, keepdims=True))),
}


def activation_forward(x, name, table=ACTIVATIONS):
    """Inputs: x, any shape; name: linear, relu, leaky_relu (0.2 x for x < 0), elu
    (e^x - 1 for x < 0), gelu (x Phi(x)), sigmoid, tanh, softplus (log(1 + e^x)), softmax.
    Returns: y = f(x), cache."""
    y = table[name][0](x)
    return y, (table[name][1], x, y)


def activation_backward(dout, cache):
    """Returns dx = dout * f'(x) (softmax: the Jacobian-vector product
    y * (dout - <dout, y>))."""
    backward, x, y = cache
    return backward(dout, x, y)


# --------------------------------------------------------------------------------------
# Padding
# --------------------------------------------------------------------------------------
def pair(v):
    """An int or a pair -> a pair."""
    return (v, v) if isinstance(v, int) else tuple(v)


def resolve_pads(h, w, kernel, stride, padding):
    """((top, bottom), (left, right)) for an h x w input. padding: 'valid', 'same' (Keras:
    the odd pixel goes bottom/right), 'full', an int or a pair (see layers.pad_amounts)."""
    (kh, kw), (sh, sw) = kernel, stride
    return pad_amounts(h, kh, sh, padding, 0), pad_amounts(w, kw, sw, padding, 1)


def pad2d(x, pads, value=0.0):
    """x (N, H, W, C) with pads ((top, bottom), (left, right)) of `value` around H and W."""
    return np.pad(x, ((0, 0), *pads, (0, 0)), constant_values=value)


def unpad2d(xp, pads):
    """The inverse of pad2d: crop the padding off (used on gradients)."""
    (t, b), (l, r) = pads
    return xp[:, t:xp.shape[1] - b, l:xp.shape[2] - r]


def windows(xp, kernel, stride):
    """The windows of xp (N, Hp, Wp, C) a kernel (kh, kw) visits with stride (sh, sw):
    a view (N, Ho, Wo, C, kh, kw) with windows[n, i, j, c, u, v] = xp[n, i*sh + u, j*sw + v, c],
    Ho = floor((Hp - kh) / sh) + 1 (and the same for Wo)."""
    (sh, sw) = stride
    return sliding_window_view(xp, kernel, axis=(1, 2))[:, ::sh, ::sw]


def add_windows(dxp, dwin, stride):
    """The adjoint of windows(): add each window's gradient dwin (N, Ho, Wo, C, kh, kw) back
    onto the cells it was taken from, dxp[n, i*sh + u, j*sw + v, c] += dwin[n, i, j, c, u, v].
    One strided slice per kernel offset (u, v): cells shared by windows add up."""
    (sh, sw), (ho, wo), (kh, kw) = stride, dwin.shape[1:3], dwin.shape[4:]
    for u in range(kh):
        for v in range(kw):
            dxp[:, u:u + sh * (ho - 1) + 1:sh, v:v + sw * (wo - 1) + 1:sw] += dwin[..., u, v]
    return dxp


# --------------------------------------------------------------------------------------
# Convolution (cross-correlation, as Keras and PyTorch: the kernel is not flipped)
# --------------------------------------------------------------------------------------
def conv2d_forward(x, w, b=None, stride=1, padding="valid"):
    """Inputs: x (N, H, W, C); w (kh, kw, C, F); b (F,) or None; stride; padding.
    Returns: out (N, Ho, Wo, F), cache, where with xp the padded input

        out[n, i, j, f] = b[f] + sum_{u, v, c} xp[n, i*sh + u, j*sw + v, c] * w[u, v, c, f]
    """
    stride = pair(stride)
    pads = resolve_pads(x.shape[1], x.shape[2], w.shape[:2], stride, padding)
    win = windows(pad2d(x, pads), w.shape[:2], stride)            # (N, Ho, Wo, C, kh, kw)
    out = np.einsum("nijcuv,uvcf->nijf", win, w, optimize=True)
    if b is not None:
        out = out + b
    return out, (x, w, stride, pads, b is not None)


def conv2d_backward(dout, cache, need_dx=True):
    """Inputs: dout (N, Ho, Wo, F), cache. Returns dx (None unless need_dx), dw, db (None
    without a bias):

        dw[u, v, c, f] = sum_{n, i, j} xp[n, i*sh + u, j*sw + v, c] dout[n, i, j, f]
        dxp[n, i*sh + u, j*sw + v, c] += sum_f w[u, v, c, f] dout[n, i, j, f]
        db[f] = sum_{n, i, j} dout[n, i, j, f]
    """
    x, w, stride, pads, has_bias = cache
    xp = pad2d(x, pads)
    dw = np.einsum("nijcuv,nijf->uvcf", windows(xp, w.shape[:2], stride), dout, optimize=True)
    db = dout.sum(axis=(0, 1, 2)) if has_bias else None
    if not need_dx:
        return None, dw, db
    dwin = np.einsum("nijf,uvcf->nijcuv", dout, w, optimize=True)
    return unpad2d(add_windows(np.zeros_like(xp), dwin, stride), pads), dw, db


# --------------------------------------------------------------------------------------
# Pooling: windows as in convolution, each reduced per channel
# --------------------------------------------------------------------------------------
def _pool_geometry(x, pool, stride, padding):
    pool = pair(pool)
    stride = pool if stride is None else pair(stride)
    return pool, stride, resolve_pads(x.shape[1], x.shape[2], pool, stride, padding)


def maxpool_forward(x, pool=2, stride=None, padding="valid"):
    """Inputs: x (N, H, W, C); pool (kh, kw); stride (default: pool); padding.
    Returns: out[n, i, j, c] = max_{u, v} xp[n, i*sh + u, j*sw + v, c] (padded cells are
    -inf, so they never win), cache."""
    pool, stride, pads = _pool_geometry(x, pool, stride, padding)
    xp = pad2d(x, pads, -np.inf)
    out = windows(xp, pool, stride).max(axis=(4, 5))
    return out, (xp, pool, stride, pads)


def maxpool_backward(dout, cache):
    """Returns dx: each window's gradient goes to the cell holding its max (the first one in
    row-major (u, v) order on ties, as argmax), dx[n, i*sh + u*, j*sw + v*, c] += dout[n, i, j, c]."""
    xp, (kh, kw), stride, pads = cache
    win = windows(xp, (kh, kw), stride)
    first = win.reshape(*win.shape[:4], kh * kw).argmax(axis=-1)     # (N, Ho, Wo, C)
    hit = first[..., None] == np.arange(kh * kw)                      # one-hot over (u, v)
    dwin = (hit * dout[..., None]).reshape(win.shape)
    return unpad2d(add_windows(np.zeros_like(xp), dwin, stride), pads)


def avgpool_forward(x, pool=2, stride=None, padding="valid"):
    """Inputs as maxpool_forward. Returns: out[n, i, j, c] = (sum of the window's real cells)
    / count[i, j], count = their number (padded cells count neither in the sum nor in the
    divisor, as Keras 'same'), cache."""
    pool, stride, pads = _pool_geometry(x, pool, stride, padding)
    xp = pad2d(x, pads)
    real = pad2d(np.ones((1, *x.shape[1:3], 1), dtype=x.dtype), pads)  # 1 on real cells
    count = windows(real, pool, stride).sum(axis=(4, 5))                # (1, Ho, Wo, 1)
    out = windows(xp, pool, stride).sum(axis=(4, 5)) / count
    return out, (xp.shape, count, pool, stride, pads)


def avgpool_backward(dout, cache):
    """Returns dx: each cell of a window receives dout[n, i, j, c] / count[i, j] (padded
    cells too, but they are cropped off)."""
    xp_shape, count, pool, stride, pads = cache
    dwin = np.broadcast_to((dout / count)[..., None, None], (*dout.shape, *pool))
    return unpad2d(add_windows(np.zeros(xp_shape, dout.dtype), dwin, stride), pads)


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
# Dense, Flatten, Dropout, Rescaling
# --------------------------------------------------------------------------------------
def dense_forward(x, w, b=None):
    """Inputs: x (N, in), w (in, out), b (out,) or None. Returns out = x @ w + b, cache."""
    out = x @ w
    if b is not None:
        out += b
    return out, (x, w, b is not None)


def dense_backward(dout, cache, need_dx=True):
    """Returns dx = dout @ w^T (None unless need_dx), dw = x^T @ dout, db = sum_n dout."""
    x, w, has_bias = cache
    dx = dout @ w.T if need_dx else None
    return dx, x.T @ dout, dout.sum(axis=0) if has_bias else None


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


def rescaling_forward(x, scale, offset=0.0):
    """y = x * scale + offset (scale, offset: numbers). Returns y, cache."""
    scale = x.dtype.type(scale)
    return x * scale + x.dtype.type(offset), scale


def rescaling_backward(dout, scale):
    """dx = dout * scale."""
    return dout * scale


# --------------------------------------------------------------------------------------
# Batch normalization (over every axis but the last: N for (N, C), N, H, W for NHWC)
# --------------------------------------------------------------------------------------
def update_moving(moving_mean, moving_var, mu, var, m, momentum):
    """Keras' moving statistics, in place, with the unbiased variance (as PyTorch):
        moving_mean = momentum * moving_mean + (1 - momentum) * mu
        moving_var  = momentum * moving_var  + (1 - momentum) * var * M / (M - 1)"""
    moving_mean[...] = momentum * moving_mean + (1 - momentum) * mu
    moving_var[...] = momentum * moving_var + (1 - momentum) * var * (m / max(m - 1, 1))


def batchnorm_forward(x, gamma, beta, moving_mean, moving_var, epsilon=1e-3,
                      momentum=0.99, training=False):
    """Inputs: x (..., C); gamma, beta, moving_mean, moving_var (C,).
    Returns: y = gamma * x_hat + beta with x_hat = (x - mu) / sqrt(var + eps), cache.

    training: mu, var are the batch mean and biased variance over the M values of each
    channel, and the moving statistics are updated in place (update_moving).
    Inference: mu, var = the moving statistics.
    """
    axes = tuple(range(x.ndim - 1))
    if training:
        mu, var = x.mean(axis=axes), x.var(axis=axes)
        update_moving(moving_mean, moving_var, mu, var, x.size // x.shape[-1], momentum)
    else:
        mu, var = moving_mean.astype(x.dtype), moving_var.astype(x.dtype)
    inv_std = 1 / np.sqrt(var + epsilon)
    x_hat = (x - mu) * inv_std
    return gamma * x_hat + beta, (x_hat, gamma, inv_std, training)


def batchnorm_backward(dout, cache):
    """Returns dx, dgamma = sum dout * x_hat, dbeta = sum dout (sums over all axes but the
    channel). training (mu, var depend on x), with M values per channel:
        dx = gamma * inv_std / M * (M dout - sum dout - x_hat * sum(dout * x_hat))
    inference (mu, var are constants): dx = dout * gamma * inv_std."""
    x_hat, gamma, inv_std, training = cache
    axes = tuple(range(dout.ndim - 1))
    dbeta, dgamma = dout.sum(axis=axes), (dout * x_hat).sum(axis=axes)
    if not training:
        return dout * (gamma * inv_std), dgamma, dbeta
    m = dout.size // dout.shape[-1]
    return gamma * inv_std / m * (m * dout - dbeta - x_hat * dgamma), dgamma, dbeta


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
    sigmoid_bce (one sigmoid unit) or mse_probs (on sigmoid(z) for one unit, else softmax(z)).
    """
    if kind == "softmax_ce":
        return softmax_cross_entropy(z, y, label_smoothing)
    if kind == "sigmoid_bce":
        return sigmoid_binary_cross_entropy(z, y, label_smoothing)
    if kind == "mse_probs":
        return mse_loss(z, y, "sigmoid" if z.shape[1] == 1 else "softmax")
    raise ValueError(f"unknown loss kind {kind!r}")
