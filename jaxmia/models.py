"""The gray-box paper's face recognizer as a pure functional Flax NNX model.

Khosravy et al. (2021): four conv layers (kernels 5, 5, 3, 3; channels 5, 16, 32, 64), each
followed by ReLU and a 2x2 max-pool, then dense 1024, 1024, n_classes. Inputs are images with
values in [0, 1]; the model normalises them itself, so attacks work in image space and the
checkpointed model config says everything needed to use it.

Use it functionally: ``graphdef, params = nnx.split(model)`` once, then jit
``logits(graphdef, params, x)`` and friends.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything that fixes the recognizer's function besides its weights."""

    num_classes: int
    image_size: tuple[int, int] = (64, 64)  # (height, width)
    channels: int = 1
    conv_features: tuple[int, ...] = (5, 16, 32, 64)
    kernel_sizes: tuple[int, ...] = (5, 5, 3, 3)
    dense_features: tuple[int, ...] = (1024, 1024)
    dropout: float = 0.0
    # Input normalisation: the network sees (x - mean) / std for x in [0, 1].
    mean: float = 0.5
    std: float = 0.5

    def __post_init__(self):
        if len(self.conv_features) != len(self.kernel_sizes):
            raise ValueError("conv_features and kernel_sizes must have the same length")
        h, w = self.image_size
        scale = 2 ** len(self.conv_features)
        if h < scale or w < scale:
            raise ValueError(
                f"image_size {self.image_size} is too small for {len(self.conv_features)} 2x2 pools"
            )

    @property
    def flat_features(self) -> int:
        h, w = self.image_size
        for _ in self.conv_features:
            h, w = h // 2, w // 2
        return h * w * self.conv_features[-1]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown model config fields: {sorted(unknown)}")
        tuples = {"image_size", "conv_features", "kernel_sizes", "dense_features"}
        return cls(**{k: tuple(v) if k in tuples else v for k, v in d.items()})

    def flops_per_image(self) -> int:
        """Multiply-adds x 2 of one forward pass (convolutions and dense layers)."""
        h, w = self.image_size
        cin, total = self.channels, 0
        for cout, k in zip(self.conv_features, self.kernel_sizes, strict=True):
            total += 2 * h * w * k * k * cin * cout
            h, w, cin = h // 2, w // 2, cout
        fin = self.flat_features
        for fout in (*self.dense_features, self.num_classes):
            total += 2 * fin * fout
            fin = fout
        return total


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, VALID, as a reshape and max.

    Same function as ``nnx.max_pool(x, (2, 2), (2, 2))`` but its gradient avoids XLA CPU's slow
    select-and-scatter.
    """
    b, h, w, c = x.shape  # [b, h, w, c]
    x = x[:, : h - h % 2, : w - w % 2, :]
    return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


class Recognizer(nnx.Module):
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
        self.head = nnx.Linear(fin, config.num_classes, rngs=rngs)

    def features(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """Penultimate features.

        Args:
          x: images in [0, 1]. # [b, h, w, c]
          dropout_key: a PRNG key to apply dropout (training); None for inference.

        Returns:
          The last hidden dense layer's ReLU activations. # [b, dense_features[-1]]
        """
        cfg = self.config
        h = (x - cfg.mean) / cfg.std
        for conv in self.convs:
            h = max_pool_2x2(jax.nn.relu(conv(h)))
        h = h.reshape(h.shape[0], -1)
        for i, layer in enumerate(self.dense):
            h = jax.nn.relu(layer(h))
            if dropout_key is not None and cfg.dropout > 0:
                keep = jax.random.bernoulli(
                    jax.random.fold_in(dropout_key, i), 1 - cfg.dropout, h.shape
                )
                h = jnp.where(keep, h / (1 - cfg.dropout), 0)
        return h

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits. # [b, h, w, c] -> [b, num_classes]"""
        return self.head(self.features(x, dropout_key))


def init(config: ModelConfig, key: jax.Array) -> tuple[nnx.GraphDef, nnx.State]:
    """A freshly initialised recognizer, split into (graphdef, params)."""
    return nnx.split(Recognizer(config, rngs=nnx.Rngs(params=key)))


def logits(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, dropout_key=None) -> jax.Array:
    """Pure logits. # [b, h, w, c] -> [b, num_classes]"""
    return nnx.merge(graphdef, params)(x, dropout_key)


def features(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array) -> jax.Array:
    """Pure penultimate features. # [b, h, w, c] -> [b, dense_features[-1]]"""
    return nnx.merge(graphdef, params).features(x)
