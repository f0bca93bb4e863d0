"""Face recognizers as pure functional Flax NNX models: the paper's CNN, a ResNet family, and
heads over pretrained backbones.

``arch="paper"``: Khosravy et al. (2021), four conv layers (kernels 5, 5, 3, 3; channels 5, 16,
32, 64), each followed by ReLU and a 2x2 max-pool, then dense 1024, 1024, n_classes.
``arch="resnet"``: He et al. (2016) in torchvision's layout (so ``jaxmia.recognizers.torch_import``
maps a torchvision ``state_dict`` onto it one to one), with batch normalisation, basic or bottleneck
blocks, and depth, width and stem set by the config (``resnet18`` is blocks (2, 2, 2, 2), widths
(64, 128, 256, 512), the 7x7/2 stem with a 3x3/2 max-pool).

``arch`` one of ``BACKBONES`` (``jaxmia.pretrained``): a pretrained network's pooled features
(faceres: MobileNet-v1 trained on VGGFace2 for identity, 1024-d; EfficientNet-Lite0 on
ImageNet, 1280-d; dlib's ResNet-29 face embedder, 128-d) under a fresh linear head (with the
config's dropout and bottleneck). ``tune="linear"`` keeps the backbone frozen: its weights are
not trainable (``split_trainable`` hands them to the rest, which no optimizer sees);
``"top"`` (faceres) trains the backbone's last ``tune_blocks`` blocks with the head and keeps the
lower ones frozen; ``"finetune"`` trains them all with the head. A recognizer is one network
whatever its tune: ``features`` is ``tuned_part(frozen_part(x))``, so training can compute the
frozen part's output once per image (``frozen_part``) and run the rest on it
(``head_train_outputs``). Each backbone takes [0, 1] RGB images of any size and
resizes and normalises them itself (``mean`` and ``std`` are unused); grey images are tiled to
RGB first, as the backbones saw only colour photos. The backbone always runs in inference mode
(its batch norms, where it has them, on their pretrained statistics), so features do not
depend on the batch and a frozen backbone's features can be computed once per image.

Inputs are images with values in [0, 1]; the model normalises them itself, so attacks work in
image space and the checkpointed model config says everything needed to use it.

Use it functionally: ``graphdef, state = nnx.split(model)`` once, then jit
``logits(graphdef, state, x)`` (inference: batch norm on its running statistics) and friends;
training goes through ``split_trainable`` and ``train_logits``, which also return the updated
batch statistics.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmia.errors import JaxmiaError

# Pretrained backbones: arch -> (module in jaxmia.pretrained, its loader, feature width, the
# fixed input size its network takes or None: any size, through its ``backbone`` method).
_BACKBONES = {
    "faceres": ("faceres", "load_faceres", 1024, None),
    "efficientnet_lite0": ("efficientnet", "load_efficientnet", 1280, None),
    # dlib's embedder takes 150x150 aligned chips only: images are resized to that
    "dlib_resnet": ("dlib_resnet", "load_dlib_resnet", 128, 150),
}
BACKBONES = tuple(_BACKBONES)
ARCHS = ("paper", "resnet", *BACKBONES)
TUNES = ("linear", "top", "finetune")
# Backbones whose trunk splits into blocks (tune="top"): arch -> (the loaded network's attribute
# holding the trunk, with ``map_before`` and ``pooled_from``; its number of blocks).
_TOP = {"faceres": ("backbone", 13)}
BLOCKS = ("basic", "bottleneck")
_PAPER_FIELDS = ("conv_features", "kernel_sizes", "dense_features")
_RESNET_FIELDS = ("widths", "blocks", "block", "stem_kernel", "stem_stride", "stem_pool")
_TUPLES = ("image_size", "conv_features", "kernel_sizes", "dense_features", "widths", "blocks")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the recognizer's function besides its weights."""

    num_classes: int
    image_size: tuple[int, int] = (64, 64)  # (height, width)
    channels: int = 1
    arch: str = "paper"
    # arch="paper"
    conv_features: tuple[int, ...] = (5, 16, 32, 64)
    kernel_sizes: tuple[int, ...] = (5, 5, 3, 3)
    dense_features: tuple[int, ...] = (1024, 1024)
    # arch="resnet": blocks per stage, each stage's width (its 3x3 convolutions' channels),
    # block type, and the stem (torchvision: 7x7 stride 2, then a 3x3 stride 2 max-pool).
    widths: tuple[int, ...] = (64, 128, 256, 512)
    blocks: tuple[int, ...] = (2, 2, 2, 2)
    block: str = "basic"
    stem_kernel: int = 7
    stem_stride: int = 2
    stem_pool: bool = True
    # Dropout on the dense layers (paper) or before the classifier (resnet) in training.
    dropout: float = 0.0
    # MID's defence (Wang et al. 2021): a variational bottleneck of this width between the
    # features and the classifier (``Bottleneck``); 0: none.
    bottleneck: int = 0
    # Input normalisation: the network sees (x - mean) / std for x in [0, 1]; a float, or one
    # value per channel (torchvision's ImageNet models: (0.485, 0.456, 0.406), (0.229, 0.224,
    # 0.225)).
    mean: float | tuple[float, ...] = 0.5
    std: float | tuple[float, ...] = 0.5
    # A pretrained backbone (arch in BACKBONES): "linear" trains the head alone over the frozen
    # backbone, "top" the backbone's last tune_blocks blocks too, "finetune" the whole backbone.
    tune: str = "linear"
    tune_blocks: int = 0

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"arch: expected one of {ARCHS}, got {self.arch!r}")
        if self.tune not in TUNES:
            raise ValueError(f"tune: expected one of {TUNES}, got {self.tune!r}")
        if self.tune == "top":
            if self.arch not in _TOP:
                raise ValueError(f"tune='top': expected arch in {tuple(_TOP)} (a backbone split "
                                 f"into blocks), got {self.arch!r}")  # fmt: skip
            n = _TOP[self.arch][1]
            if isinstance(self.tune_blocks, bool) or not 1 <= self.tune_blocks <= n:
                raise ValueError(f"tune_blocks: expected 1 to {n} of {self.arch}'s blocks with "
                                 f"tune='top', got {self.tune_blocks!r}")  # fmt: skip
        elif self.tune_blocks:
            raise ValueError(f"tune_blocks={self.tune_blocks!r}: applies to tune='top' only, "
                             f"not tune={self.tune!r}")  # fmt: skip
        if isinstance(self.bottleneck, bool) or self.bottleneck < 0:
            raise ValueError(f"bottleneck: expected a width >= 0, got {self.bottleneck!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, (tuple, list)) and len(value) != self.channels:
                raise ValueError(f"{name}: {len(value)} values for {self.channels} channels")
        h, w = self.image_size
        if self.pretrained:
            if self.channels not in (1, 3):
                raise ValueError(f"channels: {self.arch} takes RGB (or grey) images, got "
                                 f"{self.channels} channels")  # fmt: skip
            if min(h, w) < 1:
                raise ValueError(f"image_size {self.image_size}: expected positive sides")
            return
        if self.arch == "paper":
            if len(self.conv_features) != len(self.kernel_sizes):
                raise ValueError("conv_features and kernel_sizes must have the same length")
            scale = 2 ** len(self.conv_features)
            what = f"{len(self.conv_features)} 2x2 pools"
        else:
            if len(self.widths) != len(self.blocks) or not self.widths:
                raise ValueError("widths and blocks: expected the same, non-zero length")
            if self.block not in BLOCKS:
                raise ValueError(f"block: expected one of {BLOCKS}, got {self.block!r}")
            if min(self.blocks) < 1 or self.stem_kernel < 1 or self.stem_stride < 1:
                raise ValueError("blocks, stem_kernel and stem_stride: expected >= 1")
            scale = self.stem_stride * (2 if self.stem_pool else 1) * 2 ** (len(self.widths) - 1)
            what = f"a total stride of {scale}"
        if h < scale or w < scale:
            raise ValueError(f"image_size {self.image_size} is too small for {what}")

    @property
    def pretrained(self) -> bool:
        """Whether ``arch`` is a pretrained backbone (``BACKBONES``)."""
        return self.arch in _BACKBONES

    @property
    def frozen(self) -> bool:
        """Whether a pretrained backbone stays as fetched in training (``tune="linear"``)."""
        return self.pretrained and self.tune == "linear"

    @property
    def cached(self) -> bool:
        """Whether a lower part of a pretrained backbone stays frozen in training (``tune``
        "linear" or "top"), so that its output (``frozen_part``) can be computed once per
        image."""
        return self.pretrained and self.tune in ("linear", "top")

    @property
    def first_tuned(self) -> int:
        """tune="top": the index of the backbone's first trained block."""
        return _TOP[self.arch][1] - self.tune_blocks

    @property
    def expansion(self) -> int:
        return 4 if self.block == "bottleneck" else 1

    @property
    def flat_features(self) -> int:
        """The paper CNN's flattened conv output size."""
        h, w = self.image_size
        for _ in self.conv_features:
            h, w = h // 2, w // 2
        return h * w * self.conv_features[-1]

    @property
    def feature_size(self) -> int:
        """Width of ``features``: the last hidden layer (paper) or the pooled stage (resnet)."""
        if self.arch == "paper":
            return self.dense_features[-1] if self.dense_features else self.flat_features
        if self.pretrained:
            return _BACKBONES[self.arch][2]
        return self.widths[-1] * self.expansion

    def to_dict(self) -> dict[str, Any]:
        """The fields that fix this architecture's function (another arch's are left out, so
        that a settings record or checkpoint does not depend on what the network ignores)."""
        if self.pretrained:
            other = (*_PAPER_FIELDS, *_RESNET_FIELDS, "mean", "std")
        else:
            # "tune": the records and checkpoints of before pretrained backbones, unchanged
            other = (*(_RESNET_FIELDS if self.arch == "paper" else _PAPER_FIELDS), "tune")
        # no bottleneck: the records and checkpoints of before it existed, unchanged
        other += () if self.bottleneck else ("bottleneck",)
        # tune_blocks: only with "top", so the records of before it are unchanged
        other += () if self.tune == "top" else ("tune_blocks",)
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in other}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """The inverse of ``to_dict``; without ``arch`` (older checkpoints): the paper CNN."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        tuples = {*_TUPLES} | {k for k in ("mean", "std") if isinstance(d.get(k), list)}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in d.items()})

    def flops_per_image(self) -> int:
        """Multiply-adds x 2 of one forward pass (convolutions and dense layers).

        A pretrained backbone's by XLA's cost analysis of its forward pass at ``image_size``
        (its resize to the backbone's own input size included), plus the head's.
        """
        if self.pretrained:
            return _backbone_flops(self) + self.classifier_flops(self.feature_size)
        if self.arch == "resnet":
            return _resnet_flops(self)
        h, w = self.image_size
        cin, total = self.channels, 0
        for cout, k in zip(self.conv_features, self.kernel_sizes, strict=True):
            total += 2 * h * w * k * k * cin * cout
            h, w, cin = h // 2, w // 2, cout
        fin = self.flat_features
        for fout in self.dense_features:
            total += 2 * fin * fout
            fin = fout
        return total + self.classifier_flops(fin)

    def classifier_flops(self, fin: int) -> int:
        """The bottleneck's (its means only: inference) and the head's multiply-adds x 2."""
        if self.bottleneck:
            return 2 * fin * 2 * self.bottleneck + 2 * self.bottleneck * self.num_classes
        return 2 * fin * self.num_classes


def _out(size: int, k: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - k) // stride + 1


def _resnet_flops(cfg: ModelConfig) -> int:
    h, w = cfg.image_size
    k, s = cfg.stem_kernel, cfg.stem_stride
    h, w = _out(h, k, s, k // 2), _out(w, k, s, k // 2)
    total = 2 * h * w * k * k * cfg.channels * cfg.widths[0]
    if cfg.stem_pool:
        h, w = _out(h, 3, 2, 1), _out(w, 3, 2, 1)
    cin = cfg.widths[0]
    for stage, (width, n) in enumerate(zip(cfg.widths, cfg.blocks, strict=True)):
        for b in range(n):
            stride = 2 if stage > 0 and b == 0 else 1
            ho, wo = _out(h, 3, stride, 1), _out(w, 3, stride, 1)
            cout = width * cfg.expansion
            if cfg.block == "basic":
                total += 2 * ho * wo * 9 * (cin * width + width * width)
            else:
                total += 2 * (h * w * cin * width + ho * wo * (9 * width * width + width * cout))
            if stride != 1 or cin != cout:
                total += 2 * ho * wo * cin * cout
            h, w, cin = ho, wo, cout
    return total + cfg.classifier_flops(cin)


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, VALID, as a reshape and max.

    Same function as ``nnx.max_pool(x, (2, 2), (2, 2))`` but its gradient avoids XLA CPU's slow
    select-and-scatter.
    """
    b, h, w, c = x.shape  # [b, h, w, c]
    x = x[:, : h - h % 2, : w - w % 2, :]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _normalise(cfg: ModelConfig, x: jax.Array) -> jax.Array:
    return (x - jnp.asarray(cfg.mean, x.dtype)) / jnp.asarray(cfg.std, x.dtype)


def _dropout(h: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if key is None or rate <= 0:
        return h
    keep = jax.random.bernoulli(key, 1 - rate, h.shape)
    return jnp.where(keep, h / (1 - rate), 0)


class Bottleneck(nnx.Module):
    """A variational information bottleneck (Alemi et al. 2017; MID, Wang et al. 2021).

    The features are encoded into a Gaussian N(mu, diag(sigma^2)) of ``width`` dimensions; in
    training the classifier sees a sample of it and the loss adds the KL divergence to N(0, I),
    which bounds the information the code keeps about the input; in inference, ``mu``.
    """

    def __init__(self, fin: int, width: int, *, rngs: nnx.Rngs):
        self.encode = nnx.Linear(fin, 2 * width, rngs=rngs)

    def __call__(self, h: jax.Array, key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(the code [b, width], KL(N(mu, sigma^2) || N(0, I)) per example [b]).

        ``key`` given: a sample of the code (training); None: its mean.
        """
        mu, log_var = jnp.split(self.encode(h), 2, axis=-1)  # [b, width] each
        kl = 0.5 * jnp.sum(mu**2 + jnp.exp(log_var) - 1.0 - log_var, axis=-1)  # [b]
        if key is None:
            return mu, kl
        return mu + jnp.exp(0.5 * log_var) * jax.random.normal(key, mu.shape, mu.dtype), kl


class _Classifier(nnx.Module):
    """The head over the features, through the bottleneck if the config has one."""

    def _init_classifier(self, fin: int, rngs: nnx.Rngs) -> None:
        width = self.config.bottleneck
        self.bottleneck = Bottleneck(fin, width, rngs=rngs) if width else None
        self.head = nnx.Linear(width or fin, self.config.num_classes, rngs=rngs)

    def classify(
        self, h: jax.Array, train_key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """(logits [b, num_classes], the bottleneck's KL [b], zeros without one)."""
        if self.bottleneck is None:
            return self.head(h), jnp.zeros(h.shape[:1], h.dtype)
        # a key of its own: the same key's dropout masks must not correlate with the sample
        key = None if train_key is None else jax.random.fold_in(train_key, 2**20)
        z, kl = self.bottleneck(h, key)
        return self.head(z), kl

    def forward(
        self, x: jax.Array, train_key: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """(logits, the bottleneck's KL per image). # [b, h, w, c] -> ([b, classes], [b])"""
        return self.classify(self._last_hidden(x, train_key), train_key)

    def __call__(self, x: jax.Array, train_key: jax.Array | None = None) -> jax.Array:
        """Logits. # [b, h, w, c] -> [b, num_classes]"""
        return self.forward(x, train_key)[0]


class Recognizer(_Classifier):
    """The paper's CNN face recognizer."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        convs, cin = [], config.channels
        for cout, k in zip(config.conv_features, config.kernel_sizes, strict=True):
            convs.append(nnx.Conv(cin, cout, (k, k), padding="SAME", rngs=rngs))
            cin = cout
        self.convs = nnx.List(convs)
        dense, fin = [], config.flat_features
        for fout in config.dense_features:
            dense.append(nnx.Linear(fin, fout, rngs=rngs))
            fin = fout
        self.dense = nnx.List(dense)
        self._init_classifier(fin, rngs)

    def features(self, x: jax.Array, train_key: jax.Array | None = None) -> jax.Array:
        """Penultimate features.

        Args:
          x: images in [0, 1]. # [b, h, w, c]
          train_key: a PRNG key in training (dropout); None for inference.

        Returns:
          The last hidden dense layer's ReLU activations. # [b, feature_size]
        """
        cfg = self.config
        h = _normalise(cfg, x)
        for conv in self.convs:
            h = max_pool_2x2(jax.nn.relu(conv(h)))
        h = h.reshape(h.shape[0], -1)
        for i, layer in enumerate(self.dense):
            h = jax.nn.relu(layer(h))
            key = None if train_key is None else jax.random.fold_in(train_key, i)
            h = _dropout(h, cfg.dropout, key)
        return h

    def _last_hidden(self, x: jax.Array, train_key: jax.Array | None) -> jax.Array:
        return self.features(x, train_key)


def _conv(cin: int, cout: int, k: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
    # Symmetric padding k // 2, as torchvision's: flax's "SAME" pads strided convolutions of
    # even inputs one pixel more on the far side, a different function.
    pad = ((k // 2, k // 2), (k // 2, k // 2))
    init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision's He init
    return nnx.Conv(
        cin, cout, (k, k), stride, padding=pad, use_bias=False, kernel_init=init, rngs=rngs
    )


def _bn(n: int, rngs: nnx.Rngs, zero: bool = False) -> nnx.BatchNorm:
    # PyTorch's defaults (running = 0.9 running + 0.1 batch, eps 1e-5). A zero scale on each
    # block's last norm starts the residual branches at identity (torchvision's
    # zero_init_residual), which trains small-data models from scratch more reliably.
    init = nnx.initializers.zeros if zero else nnx.initializers.ones
    return nnx.BatchNorm(n, momentum=0.9, epsilon=1e-5, scale_init=init, rngs=rngs)


class Block(nnx.Module):
    """A residual block: basic (two 3x3) or bottleneck (1x1, 3x3, 1x1 x 4), stride on the 3x3."""

    def __init__(self, cin: int, width: int, stride: int, kind: str, *, rngs: nnx.Rngs):
        cout = width * (4 if kind == "bottleneck" else 1)
        if kind == "basic":
            specs = [(cin, width, 3, stride), (width, width, 3, 1)]
        else:
            specs = [(cin, width, 1, 1), (width, width, 3, stride), (width, cout, 1, 1)]
        self.convs = nnx.List([_conv(i, o, k, s, rngs) for i, o, k, s in specs])
        self.norms = nnx.List(
            [_bn(o, rngs, zero=j == len(specs) - 1) for j, (_, o, _, _) in enumerate(specs)]
        )
        self.downsample = stride != 1 or cin != cout
        if self.downsample:
            self.down_conv = _conv(cin, cout, 1, stride, rngs)
            self.down_norm = _bn(cout, rngs)

    def __call__(self, x: jax.Array, train: bool, taps: list | None = None) -> jax.Array:
        h = x
        last = len(self.convs) - 1
        for j, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            h = _norm(norm, conv(h), train, taps)
            if j < last:
                h = jax.nn.relu(h)
        shortcut = x
        if self.downsample:
            shortcut = _norm(self.down_norm, self.down_conv(x), train, taps)
        return jax.nn.relu(h + shortcut)


def _norm(norm: nnx.BatchNorm, h: jax.Array, train: bool, taps: list | None) -> jax.Array:
    """``norm(h)``; with ``taps``, first appends how far each image's statistics of ``h`` are from
    the running ones (DeepInversion's feature-statistics distance). # [b, h, w, c] -> [b]"""
    if taps is not None:
        mean, var = h.mean(axis=(1, 2)), h.var(axis=(1, 2))  # [b, c]
        taps.append(
            jnp.linalg.norm(mean - norm.mean[...], axis=-1)
            + jnp.linalg.norm(var - norm.var[...], axis=-1)
        )
    return norm(h, use_running_average=not train)


class ResNet(_Classifier):
    """A ResNet face recognizer (torchvision's structure; depth, width and stem by config)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.stem = _conv(config.channels, config.widths[0], config.stem_kernel,
                          config.stem_stride, rngs)  # fmt: skip
        self.stem_norm = _bn(config.widths[0], rngs)
        stages, cin = [], config.widths[0]
        for s, (width, n) in enumerate(zip(config.widths, config.blocks, strict=True)):
            blocks = []
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(Block(cin, width, stride, config.block, rngs=rngs))
                cin = width * config.expansion
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self._init_classifier(cin, rngs)

    def features(
        self, x: jax.Array, train_key: jax.Array | None = None, taps: list | None = None
    ) -> jax.Array:
        """Globally average-pooled last stage. # [b, h, w, c] -> [b, feature_size]

        ``train_key`` given: training mode (batch statistics, which also update the running
        ones); None: inference on the running statistics. ``taps``: a list that receives each
        batch norm's feature-statistics distance per image ([b] each, in the order they run).
        """
        train = train_key is not None
        h = jax.nn.relu(_norm(self.stem_norm, self.stem(_normalise(self.config, x)), train, taps))
        if self.config.stem_pool:
            h = nnx.max_pool(h, (3, 3), (2, 2), ((1, 1), (1, 1)))
        for stage in self.stages:
            for block in stage:
                h = block(h, train, taps)
        return h.mean(axis=(1, 2))

    def _last_hidden(self, x: jax.Array, train_key: jax.Array | None) -> jax.Array:
        return _dropout(self.features(x, train_key), self.config.dropout, train_key)


def load_backbone(arch: str) -> nnx.Module:
    """The pretrained network of ``arch`` with its fetched weights, whole (its own heads, which
    the features do not use, included: a few percent of its weights).

    Raises:
      jaxmia.pretrained.fetch.FetchError: the weights are not fetched and cannot be
        (``jaxmia models fetch``).
    """
    module, loader, _, _ = _BACKBONES[arch]
    return getattr(importlib.import_module(f"jaxmia.pretrained.{module}"), loader)()


def backbone_features(arch: str, net: nnx.Module, x: jax.Array) -> jax.Array:
    """The pooled features of ``net``, the pretrained network of ``arch``, for images in [0, 1]
    of any size (resized where the network takes one size only). # [b, h, w, 3] -> [b, d]"""
    size = _BACKBONES[arch][3]
    if size is None:
        return net.backbone(x)
    if x.shape[1:3] != (size, size):
        x = jax.image.resize(x, (x.shape[0], size, size, x.shape[-1]), "linear")
    return net(x)


def to_rgb(x: jax.Array) -> jax.Array:
    """Grey images tiled to three equal channels; RGB as they are.

    # [b, h, w, 1 or 3] -> [b, h, w, 3]
    """
    return jnp.broadcast_to(x, (*x.shape[:-1], 3)) if x.shape[-1] == 1 else x


class Pretrained(_Classifier):
    """A head (dropout, the bottleneck if any, a linear classifier) over a pretrained backbone.

    ``backbone`` is the pretrained network (``load_backbone``; ``backbone_features`` maps [0, 1]
    RGB images of any size to its pooled features); by default (None) the fetched one of
    ``config.arch``.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, backbone: nnx.Module | None = None):
        self.config = config
        self.backbone = load_backbone(config.arch) if backbone is None else backbone
        self._init_classifier(config.feature_size, rngs)

    def features(self, x: jax.Array, train_key: jax.Array | None = None) -> jax.Array:
        """The backbone's pooled features, in inference mode even in training (its batch norm
        statistics are the pretrained ones). # [b, h, w, c] -> [b, feature_size]"""
        del train_key
        return self.tuned_part(self.frozen_part(x))

    def frozen_part(self, x: jax.Array) -> jax.Array:
        """The output of the backbone's part that ``tune`` keeps frozen: the pooled features
        ("linear"; also "finetune", where nothing is frozen), or the map entering the first
        tuned block ("top"). # [b, h, w, c] -> [b, feature_size] or [b, h', w', c']"""
        cfg = self.config
        if cfg.tune == "top":
            trunk = getattr(self.backbone, _TOP[cfg.arch][0])
            return trunk.map_before(to_rgb(x), cfg.first_tuned)
        return backbone_features(cfg.arch, self.backbone, to_rgb(x))

    def tuned_part(self, h: jax.Array) -> jax.Array:
        """The pooled features from ``frozen_part``'s output. # -> [b, feature_size]"""
        cfg = self.config
        if cfg.tune == "top":
            return getattr(self.backbone, _TOP[cfg.arch][0]).pooled_from(h, cfg.first_tuned)
        return h

    def _last_hidden(self, x: jax.Array, train_key: jax.Array | None) -> jax.Array:
        return _dropout(self.features(x), self.config.dropout, train_key)


def build(config: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The NNX module of ``config.arch`` (a pretrained one with its fetched weights)."""
    if config.pretrained:
        return Pretrained(config, rngs=rngs)
    return (ResNet if config.arch == "resnet" else Recognizer)(config, rngs=rngs)


def abstract(config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, the state's shapes and dtypes) of ``config``, allocating and computing nothing.

    A pretrained backbone's structure is read from its fetched files (its loader builds it
    from them), so restoring such a checkpoint needs ``jaxmia models fetch`` of its backbone.
    """
    return nnx.split(nnx.eval_shape(lambda: build(config, nnx.Rngs(params=0))))


@functools.lru_cache(maxsize=32)
def _jitted_init(config: ModelConfig):
    return jax.jit(lambda key: nnx.split(build(config, nnx.Rngs(params=key)))[1])


def init(config: ModelConfig, key: jax.Array) -> tuple[nnx.GraphDef, nnx.State]:
    """A freshly initialised recognizer, split into (graphdef, state: weights and statistics).

    A ResNet is initialised by one compiled program: eagerly, each of its many parameter shapes
    compiles its initialiser on its own (half a minute on a loaded CPU). The paper CNN's few
    shapes initialise faster eagerly (measured: under 1 s once seen, against about 4 s to
    compile the program for each new config).
    """
    if config.arch == "resnet":
        return abstract(config)[0], _jitted_init(config)(key)
    return nnx.split(build(config, nnx.Rngs(params=key)))


@functools.lru_cache(maxsize=8)
def _backbone_flops(config: ModelConfig) -> int:
    graphdef, state = abstract(config)
    one = jax.ShapeDtypeStruct((1, *config.image_size, config.channels), jnp.float32)
    fn = jax.jit(lambda s, x: nnx.merge(graphdef, s).features(x))
    return int(fn.lower(state, one).compile().cost_analysis()["flops"])


def logits(graphdef: nnx.GraphDef, state: nnx.State | dict, x: jax.Array) -> jax.Array:
    """Pure inference logits. # [b, h, w, c] -> [b, num_classes]"""
    return nnx.merge(graphdef, state)(x)


def has_statistics(arch: str) -> bool:
    """Whether a recognizer of ``arch`` keeps batch norm's running statistics (a ResNet)."""
    return arch == "resnet"


def logits_and_statistics(
    graphdef: nnx.GraphDef, state: nnx.State | dict, x: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Inference logits and each image's feature-statistics distance (DeepInversion's prior).

    The distance sums, over every batch norm, ``|mean - running mean| + |var - running var|``
    (Euclidean norms over channels) of the image's own mean and variance over positions of the
    norm's input. Per image rather than over the batch (DeepInversion's): each clone's loss then
    depends on that clone alone, so clones stay independent of how they are batched.

    # [b, h, w, c] -> ([b, classes], [b])
    """
    model = nnx.merge(graphdef, state)
    if not has_statistics(model.config.arch):
        raise JaxmiaError(
            f"feature statistics: the recognizer (model.arch={model.config.arch!r}) has no batch "
            "normalisation; expected model.arch='resnet'"
        )
    taps: list[jax.Array] = []
    out = model.classify(model.features(x, None, taps), None)[0]
    return out, sum(taps)


def features(graphdef: nnx.GraphDef, state: nnx.State | dict, x: jax.Array) -> jax.Array:
    """Pure penultimate features (inference). # [b, h, w, c] -> [b, feature_size]"""
    return nnx.merge(graphdef, state).features(x)


def _trainable(config: ModelConfig):
    """The NNX filter of the variables training updates: the weights, less a frozen backbone
    (or its frozen blocks, and its unused heads, with tune="top")."""
    if config.frozen:
        return nnx.All(nnx.Param, nnx.Not(nnx.PathContains("backbone")))
    if config.tune == "top" and config.pretrained:
        trunk, first = _TOP[config.arch][0], config.first_tuned

        def tuned(path: tuple, _) -> bool:
            # ("backbone", trunk, "blocks", i, ...): the trunk's blocks from the first tuned one
            if path[0] != "backbone":
                return True
            return path[1:3] == (trunk, "blocks") and path[3] >= first

        return nnx.All(nnx.Param, tuned)
    return nnx.Param


def split_trainable(graphdef: nnx.GraphDef, state: nnx.State | dict) -> tuple[dict, dict]:
    """(trainable weights, the rest: batch norm's running statistics and a frozen backbone's
    weights) as pure dicts; the optimizer sees only the first, so the rest can only change by
    the forward pass (running statistics). The paper CNN's rest is empty."""
    model = nnx.merge(graphdef, state)
    _, params, rest = nnx.split(model, _trainable(model.config), ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def join(graphdef: nnx.GraphDef, params: dict, rest: dict) -> dict:
    """The whole state pure dict of (weights, statistics): what checkpoints and ``logits`` take."""
    return nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, params, rest)))


def train_outputs(
    graphdef: nnx.GraphDef, params: dict, rest: dict, x: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array, dict]:
    """``train_logits`` with the bottleneck's KL per image (zeros without one).

    # [b, h, w, c] -> ([b, classes], [b], rest)
    """
    # A fresh copy of the statistics: merged as the closed-over arrays of an outer trace, NNX
    # refuses to update them inside value_and_grad ("Cannot mutate BatchStat").
    model = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))
    out, kl = model.forward(x, key)
    return out, kl, nnx.to_pure_dict(nnx.state(model, nnx.Not(_trainable(model.config))))


def frozen_part(graphdef: nnx.GraphDef, state: nnx.State | dict, x: jax.Array) -> jax.Array:
    """Pure output of a pretrained backbone's frozen part (``Pretrained.frozen_part``): with
    tune="linear" the features. # [b, h, w, c] -> [b, d] or [b, h', w', c']"""
    return nnx.merge(graphdef, state).frozen_part(x)


def head_train_outputs(
    graphdef: nnx.GraphDef, params: dict, rest: dict, h: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array, dict]:
    """``train_outputs`` from the backbone's frozen part's output ``h`` (``frozen_part``: the
    features with tune="linear") instead of images: the same function, the frozen part's pass
    done once beforehand. # [b, ...] -> ([b, classes], [b], rest)"""
    model = nnx.merge(graphdef, params, rest)
    if not model.config.cached:
        raise JaxmiaError(
            f"training on a frozen part's output: needs a pretrained backbone with tune 'linear' "
            f"or 'top', not model.arch={model.config.arch!r} (tune={model.config.tune!r})"
        )
    h = model.tuned_part(h)
    out, kl = model.classify(_dropout(h, model.config.dropout, key), key)
    return out, kl, rest


def head_logits(graphdef: nnx.GraphDef, state: nnx.State | dict, h: jax.Array) -> jax.Array:
    """Inference logits from the frozen part's output ``h`` (``frozen_part``).
    # [b, ...] -> [b, num_classes]"""
    model = nnx.merge(graphdef, state)
    return model.classify(model.tuned_part(h))[0]


def train_logits(
    graphdef: nnx.GraphDef, params: dict, rest: dict, x: jax.Array, key: jax.Array
) -> tuple[jax.Array, dict]:
    """Training-mode logits and the updated statistics. # [b, h, w, c] -> ([b, classes], rest)

    Dropout and batch statistics draw on ``key``'s mode; the returned ``rest`` holds batch
    norm's running statistics after this batch (unchanged for the paper CNN).
    """
    logits_, _, rest = train_outputs(graphdef, params, rest, x, key)
    return logits_, rest
