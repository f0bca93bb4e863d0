"""The recognizer's logits with its small-channel convolutions rewritten for XLA on CPU.

Inversion differentiates to the image, so the first convolutions (1 or 3 channels in, 5 out;
5 in, 16 out) run forward and backward to their input, where XLA CPU's convolution is slow with
so few channels (measured on the 2-core CPU: the first layer took 2/3 of the step, at 3-7
GFLOP/s where the wider layers reach 130-200). Each such convolution is followed by ReLU and a
2x2 max-pool, so it is computed on the space-to-depth image instead: every 2x2 pixel block
becomes one pixel with 4x the channels, the k x k kernel becomes a 3x3 kernel from 4*cin to 4*cout
channels (zeros where a tap falls outside the original kernel; 1.44x the multiply-adds for
k = 5), and the 2x2 pool becomes a max over the 4 output phases. Same function as
``max_pool_2x2(relu(conv_same(x) + b))`` up to float32 summation order (tested); measured 3-5x
faster for the first layer and 1.6-2.3x for the second, slower for wider layers (left as they
are).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmia.recognizers import models

# Rewrite a convolution when its narrower side has fewer channels than this (measured: 16 -> 32
# channels was 3x slower rewritten, 5 -> 16 2x faster).
SMALL_CHANNELS = 8
# Backends where the rewrite was measured faster; elsewhere the plain convolution runs.
BACKENDS = ("cpu",)


def _conv(x: jax.Array, kernel: jax.Array, padding) -> jax.Array:
    return jax.lax.conv_general_dilated(
        x, kernel, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _phase_kernel(kernel: jax.Array) -> tuple[jax.Array, tuple[int, int]]:
    """The space-to-depth kernel of an odd square SAME kernel, and its padding.

    Output phase (a, b) of a 2x2 block at block offset (P, Q) reads input phase (A, B) through
    the original tap (2P + A - a, 2Q + B - b) (centred): a static 0/1 selection of the taps.
    Returns [K, K, 4 * cin, 4 * cout] with channels ordered (phase row, phase col, channel).
    """
    k, _, cin, cout = kernel.shape  # [k, k, cin, cout]
    r = k // 2
    lo, hi = (-r) // 2, (1 + r) // 2
    size = hi - lo + 1
    sel = np.zeros((size, 2, 2, k), np.float32)  # [P, A, a, tap]
    for p in range(size):
        for big in range(2):
            for small in range(2):
                tap = 2 * (p + lo) + big - small + r
                if 0 <= tap < k:
                    sel[p, big, small, tap] = 1.0
    w = jnp.einsum("PAaz,QBbv,zvco->PQABcabo", sel, sel, kernel)
    return w.reshape(size, size, 4 * cin, 4 * cout), (-lo, hi)


def conv_relu_pool(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``max_pool_2x2(relu(conv(x, kernel, SAME) + bias))``. # [b, h, w, cin] -> [b, h/2, w/2, cout]

    Rewritten on the space-to-depth image for small channel counts of odd square kernels and
    even sizes on a ``BACKENDS`` backend; the plain layer otherwise.
    """
    b, h, w, cin = x.shape
    k, k2, _, cout = kernel.shape
    fast = (
        jax.default_backend() in BACKENDS
        and min(cin, cout) < SMALL_CHANNELS
        and k == k2
        and k % 2 == 1
        and h % 2 == 0
        and w % 2 == 0
    )
    if not fast:
        return models.max_pool_2x2(jax.nn.relu(_conv(x, kernel, "SAME") + bias))
    blocks = x.reshape(b, h // 2, 2, w // 2, 2, cin).transpose(0, 1, 3, 2, 4, 5)
    blocks = blocks.reshape(b, h // 2, w // 2, 4 * cin)  # [b, h/2, w/2, (A, B, cin)]
    wk, pad = _phase_kernel(kernel)
    y = _conv(blocks, wk, (pad, pad)) + jnp.tile(bias, 4)  # [b, h/2, w/2, (a, b, cout)]
    return jax.nn.relu(y).reshape(b, h // 2, w // 2, 4, cout).max(axis=3)


def logits(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array) -> jax.Array:
    """``models.logits`` (inference) with ``conv_relu_pool``. # [b, h, w, c] -> [b, classes]

    The paper CNN's; other architectures run as they are.
    """
    model = nnx.merge(graphdef, params)
    cfg = model.config
    if cfg.arch != "paper":
        return model(x)
    h = (x - jnp.asarray(cfg.mean, x.dtype)) / jnp.asarray(cfg.std, x.dtype)
    for conv in model.convs:
        h = conv_relu_pool(h, conv.kernel[...], conv.bias[...])
    h = h.reshape(h.shape[0], -1)
    for layer in model.dense:
        h = jax.nn.relu(layer(h))
    return model.classify(h)[0]
