"""dlib's ResNet-29 face embedder as a Flax NNX module, loaded from dlib's own ``.dat`` file.

The network is ``anet_type`` of dlib's ``dnn_face_recognition_ex.cpp`` (trained by Davis King on
about 3 million faces; 99.38% on LFW), read by ``jaxmia.pretrained.dlib_format``:

    input_rgb_image_sized<150>           (pixel - mean) / 256, mean (122.782, 117.001, 104.298)
    con<32,7,7,2,2>, affine, relu, max_pool<3,3,2,2>
    3 x ares<32>, ares_down<64>, 3 x ares<64>, ares_down<128>, 2 x ares<128>,
    ares_down<256>, 2 x ares<256>, ares_down<256>
    avg_pool_everything, fc_no_bias<128>

    ares<N>(x)      = relu(x + affine(con<N,3,3,1,1>(relu(affine(con<N,3,3,1,1>(x))))))
    ares_down<N>(x) = relu(avg_pool<2,2,2,2>(x) + affine(con<N,3,3,1,1>(relu(affine(
                           con<N,3,3,2,2>(x))))))

``affine`` is batch norm folded into a per-channel scale and shift. dlib pads a convolution or
pool of stride 1 by half its window and one of stride 2 not at all, so a stride-2 branch can
come out one row and column smaller than its pooled shortcut (8x8 -> 3x3 against 4x4), and the
pooled shortcut can have fewer channels than the branch: dlib's ``add_prev`` then adds them as
if the smaller were padded with zeros at its end (bottom, right, last channels), and so does
``_add``. The output is the fc layer's 128 values as they are, which is what dlib's
``face_recognition_model_v1.compute_face_descriptor`` returns (their norm is not 1).

Every convolution runs at ``Precision.HIGHEST``, so accelerators do not drop to TF32 and the
embedding matches dlib's float32 one.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmia.errors import JaxmiaError
from jaxmia.pretrained import dlib_format

INPUT_SIZE = 150
EMBEDDING_DIM = 128
_PRECISION = jax.lax.Precision.HIGHEST


def _conv_params(layer: dlib_format.Layer) -> tuple[np.ndarray, np.ndarray]:
    """A ``con_`` layer's filters as HWIO and its biases. -> [kh, kw, in, out], [out]"""
    f = layer.fields
    shape = f["filters"]  # (out, in, kh, kw)
    size = int(np.prod(shape))
    flat = f["params"].reshape(-1)
    if flat.size != size + shape[0]:
        raise JaxmiaError(f"dlib network: con_ params of {flat.size} values for filters {shape}")
    return flat[:size].reshape(shape).transpose(2, 3, 1, 0), flat[size:]


def _affine_params(layer: dlib_format.Layer) -> tuple[np.ndarray, np.ndarray]:
    """An ``affine_`` layer's per-channel gamma and beta. -> [c], [c]"""
    flat = layer.fields["params"].reshape(-1)
    c = flat.size // 2
    return flat[:c], flat[c:]


class Conv(nnx.Module):
    """A dlib ``con_`` layer (cross-correlation with bias) followed by its ``affine_``."""

    def __init__(self, con: dlib_format.Layer, affine: dlib_format.Layer):
        w, b = _conv_params(con)
        gamma, beta = _affine_params(affine)
        self.w = nnx.Param(jnp.asarray(w))  # [kh, kw, in, out]
        self.b = nnx.Param(jnp.asarray(b))  # [out]
        self.gamma = nnx.Param(jnp.asarray(gamma))  # [out]
        self.beta = nnx.Param(jnp.asarray(beta))  # [out]
        f = con.fields
        self.stride = (f["stride_y"], f["stride_x"])
        self.padding = ((f["padding_y"],) * 2, (f["padding_x"],) * 2)

    def __call__(self, x: jax.Array) -> jax.Array:  # [n, h, w, in] -> [n, h', w', out]
        y = jax.lax.conv_general_dilated(
            x,
            self.w[...],
            window_strides=self.stride,
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            precision=_PRECISION,
        )
        return (y + self.b[...]) * self.gamma[...] + self.beta[...]


def _add(a: jax.Array, b: jax.Array) -> jax.Array:
    """dlib's add_prev: the sum over the larger shape, the smaller zero-padded at its end."""
    shape = [max(p, q) for p, q in zip(a.shape, b.shape, strict=True)]

    def pad(x):
        return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape, strict=True)])

    return pad(a) + pad(b)


def _pool(x: jax.Array, window: int, stride: int, reduce: str) -> jax.Array:
    """dlib's max or average pool without padding. # [n, h, w, c] -> [n, h', w', c]"""
    dims, strides = (1, window, window, 1), (1, stride, stride, 1)
    if reduce == "max":
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, dims, strides, "VALID")
    return jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, "VALID") / (window * window)


class Block(nnx.Module):
    """A residual block, ``ares`` or (``down``) ``ares_down``."""

    def __init__(self, layers: list, down: bool):
        self.conv1 = Conv(layers[0], layers[1])
        self.conv2 = Conv(layers[3], layers[4])
        self.down = down

    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv2(jax.nn.relu(self.conv1(x)))
        return jax.nn.relu(_add(_pool(x, 2, 2, "avg") if self.down else x, y))


# The file's layers from the input outwards, as names ("T" a tag or skip): the stem, each block
# and the head. Checked against the file, with the strides and pads that go with them.
_STEM = ("con_4", "affine_", "relu_", "max_pool_2")
_BLOCK = ("T", "con_4", "affine_", "relu_", "con_4", "affine_", "add_prev_", "relu_")
_DOWN = ("T", "con_4", "affine_", "relu_", "con_4", "affine_", "T", "T", "avg_pool_2", "add_prev_")
_DOWN = (*_DOWN, "relu_")
_HEAD = ("avg_pool_2", "fc_2")
_WIDTHS = (32, 32, 32, 64, 64, 64, 64, 128, 128, 128, 256, 256, 256, 256)
_DOWNS = (False, False, False, True, False, False, False, True, False, False, True, False, False)
_DOWNS = (*_DOWNS, True)


def _fail(path, what: str) -> JaxmiaError:
    return JaxmiaError(f"{path}: {what}; expected dlib's ResNet-29 face embedder (anet_type)")


def _check_conv(path, con: dlib_format.Layer, k: int, stride: int, width: int) -> None:
    f = con.fields
    got = (f["nr"], f["nc"], f["stride_y"], f["stride_x"], f["num_filters"])
    if got != (k, k, stride, stride, width) or (f["padding_y"], f["padding_x"]) != (
        (k // 2,) * 2 if stride == 1 else (0, 0)
    ):
        raise _fail(path, f"a con_ layer of window, stride, filters {got}")


class DlibResNet(nnx.Module):
    """dlib's face embedder: aligned 150x150 RGB chips in [0, 1] -> 128-d descriptors."""

    def __init__(self, network: dlib_format.Network, path: str | Path = "dlib network"):
        names = tuple("T" if layer is None else layer.name for layer in network.layers)
        want = _STEM + sum((_DOWN if d else _BLOCK for d in _DOWNS), ()) + _HEAD
        if names != want:
            raise _fail(path, f"{len(names)} layers that differ from anet_type's {len(want)}")
        inp = network.input.fields
        if network.input.name != "input_rgb_image_sized" or (inp["nr"], inp["nc"]) != (
            INPUT_SIZE,
            INPUT_SIZE,
        ):
            raise _fail(path, f"input layer {network.input.name} {inp}")
        layers = list(network.layers)
        _check_conv(path, layers[0], 7, 2, 32)
        pool = layers[3].fields
        if (pool["nr"], pool["stride_y"], pool["padding_y"]) != (3, 2, 0):
            raise _fail(path, f"a first max_pool of {pool}")
        # the input's mean, RGB, on dlib's 0..255 scale; dlib divides by 256 after subtracting
        self.mean = (inp["avg_red"], inp["avg_green"], inp["avg_blue"])
        self.stem = Conv(layers[0], layers[1])
        blocks, at = [], len(_STEM)
        for down, width in zip(_DOWNS, _WIDTHS, strict=True):
            span = len(_DOWN if down else _BLOCK)
            chunk = layers[at + 1 : at + span]  # without the leading tag
            _check_conv(path, chunk[0], 3, 2 if down else 1, width)
            _check_conv(path, chunk[3], 3, 1, width)
            blocks.append(Block(chunk, down))
            at += span
        self.blocks = nnx.List(blocks)
        everything, fc = layers[at], layers[at + 1]
        if (everything.fields["nr"], everything.fields["nc"]) != (0, 0):
            raise _fail(path, "a last pool that is not avg_pool_everything")
        f = fc.fields
        if (f["num_inputs"], f["num_outputs"], f["bias_mode"]) != (256, EMBEDDING_DIM, 1):
            raise _fail(path, f"an fc layer {f['num_inputs']} -> {f['num_outputs']}")
        self.fc = nnx.Param(jnp.asarray(f["params"].reshape(256, EMBEDDING_DIM)))  # [in, out]

    def __call__(self, chips: jax.Array) -> jax.Array:
        """Descriptors of aligned face chips. # [n, 150, 150, 3 or 1] in [0, 1] -> [n, 128]

        Grey chips (1 channel) are converted to RGB (the grey value on all three channels).

        Raises:
          JaxmiaError: chips of another size than 150x150 (dlib's input layer takes no other).
        """
        if (
            chips.ndim != 4
            or chips.shape[1:3] != (INPUT_SIZE, INPUT_SIZE)
            or (chips.shape[3] not in (1, 3))
        ):
            raise JaxmiaError(
                f"dlib face embedder: input of shape {chips.shape}; expected [n, 150, 150, 3] "
                "aligned face chips (face_judge.face_chips)"
            )
        if chips.shape[3] == 1:
            chips = jnp.repeat(chips, 3, axis=3)
        x = (chips * 255.0 - jnp.asarray(self.mean, chips.dtype)) / 256.0
        x = _pool(jax.nn.relu(self.stem(x)), 3, 2, "max")
        for block in self.blocks:
            x = block(x)
        return jnp.mean(x, axis=(1, 2)) @ self.fc[...]


def load_dlib_resnet() -> DlibResNet:
    """The embedder, from the fetched ``dlib_resnet`` model (fetched now if need be).

    Raises:
      JaxmiaError: the model cannot be fetched, or its file is not the expected network.
    """
    from jaxmia.pretrained import fetch  # noqa: PLC0415 - fetch pulls in subprocess machinery

    path = fetch.model_files("dlib_resnet")["dlib_face_recognition_resnet_model_v1.dat"]
    return DlibResNet(dlib_format.read_network(path), path)


@nnx.jit
def _apply(model: DlibResNet, x: jax.Array) -> jax.Array:
    return model(x)


def embed_chips(model: DlibResNet, chips, batch_size: int = 32) -> np.ndarray:
    """Descriptors of many chips, in batches of one shape (the last padded: one compile).

    Args:
      model: the embedder.
      chips: ``face_judge.Chips`` or their images. # [n, 150, 150, 3] in [0, 1]
      batch_size: chips per forward pass.

    Returns:
      float32 descriptors. # [n, 128]
    """
    images = np.asarray(getattr(chips, "images", chips), np.float32)
    n = len(images)
    out = np.empty((n, EMBEDDING_DIM), np.float32)
    for lo in range(0, n, batch_size):
        batch = images[lo : lo + batch_size]
        padded = np.concatenate([batch, np.zeros((batch_size - len(batch), *batch.shape[1:]))])
        out[lo : lo + len(batch)] = np.asarray(_apply(model, jnp.asarray(padded, jnp.float32)))[
            : len(batch)
        ]
    return out
