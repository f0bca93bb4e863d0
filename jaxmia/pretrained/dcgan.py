"""The DCGAN face generator of ``gan-face-generate`` 1.1.1 as a Flax NNX module.

The package (PyPI, MIT) ships ``weights.tar``, a torch zip checkpoint holding
``{"netG_state_dict": ...}`` of its ``models.Generator`` (PyTorch's DCGAN tutorial network)
trained on DigiFace-1M's synthetic faces (whose own terms apply); no discriminator is shipped.
With the package's settings (``nz=100``, ``ngf=64``, ``nc=3``) the generator is an
``nn.Sequential`` of five ``ConvTranspose2d`` layers without bias (kernel 4; stride 1, padding
0 for the first, stride 2, padding 1 after), each but the last followed by ``BatchNorm2d``
(eval mode: running statistics, epsilon 1e-5) and ReLU, and a final Tanh:
z [n, 100] -> 4x4x512 -> 8x8x256 -> 16x16x128 -> 32x32x64 -> 64x64x3.

A ``ConvTranspose2d`` with stride s, padding p and kernel k is here the convolution of the input
dilated by s (``lhs_dilation``), padded by k - 1 - p on each side, with the kernel flipped in
both spatial axes and its ``[in, out]`` axes kept in that order: output size (i - 1) s + k - 2p.

``__call__(z)`` gives images ``[n, 64, 64, 3]`` in [0, 1] (Tanh's [-1, 1] mapped linearly, as
jaxmia's images are). ``features(z, layer)`` and ``from_features(h, layer)`` split the network
after its ``layer``-th transposed convolution block (1..4), for attacks that optimise the
generator's intermediate features.
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

LATENT = 100
IMAGE_SIZE = 64
# (in, out, stride, padding) of the five ConvTranspose2d layers (kernel 4), Sequential indices
# 0, 3, 6, 9, 12; the batch norms are at 1, 4, 7, 10
LAYERS = ((100, 512, 1, 0), (512, 256, 2, 1), (256, 128, 2, 1), (128, 64, 2, 1), (64, 3, 2, 1))
KERNEL = 4
EPSILON = 1e-5  # torch's BatchNorm2d default


class ConvTranspose(nnx.Module):
    """torch's ``ConvTranspose2d`` without bias, NHWC; ``kernel`` in torch's ``[in, out, k, k]``."""

    def __init__(self, cin: int, cout: int, stride: int, padding: int, *, rngs: nnx.Rngs):
        scale = 1.0 / np.sqrt(cout * KERNEL * KERNEL)
        self.kernel = nnx.Param(
            jax.random.uniform(
                rngs.params(), (cin, cout, KERNEL, KERNEL), minval=-scale, maxval=scale
            )
        )
        self.stride, self.padding = stride, padding

    def __call__(self, x: jax.Array) -> jax.Array:
        # [in, out, kh, kw] -> [kh, kw, in, out], flipped: the transpose of a correlation
        w = jnp.flip(self.kernel[...].transpose(2, 3, 0, 1), axis=(0, 1))
        edge = KERNEL - 1 - self.padding
        return jax.lax.conv_general_dilated(
            x, w, window_strides=(1, 1), padding=((edge, edge), (edge, edge)),
            lhs_dilation=(self.stride, self.stride), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )  # fmt: skip


class DCGANGenerator(nnx.Module):
    """z ``[n, 100]`` -> faces ``[n, 64, 64, 3]`` in [0, 1]; batch norms in eval mode."""

    def __init__(self, *, rngs: nnx.Rngs | None = None):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.convs = nnx.List([ConvTranspose(*spec, rngs=rngs) for spec in LAYERS])
        self.norms = nnx.List(
            [
                nnx.BatchNorm(
                    cout, epsilon=EPSILON, momentum=0.9, use_running_average=True, rngs=rngs
                )
                for _, cout, _, _ in LAYERS[:-1]
            ]
        )

    def features(self, z: jax.Array, layer: int) -> jax.Array:
        """The activations after block ``layer`` (1..4: conv, norm, ReLU), ``[n, s, s, c]``."""
        if z.ndim != 2 or z.shape[-1] != LATENT:
            raise JaxmiaError(
                f"DCGAN generator: latents of shape {tuple(z.shape)}, expected [n, {LATENT}]"
            )
        if layer not in range(1, len(LAYERS)):
            raise JaxmiaError(f"DCGAN generator: layer {layer}, expected 1..{len(LAYERS) - 1}")
        h = jnp.asarray(z, jnp.float32)[:, None, None, :]  # [n, 1, 1, 100]
        for conv, norm in zip(self.convs[:layer], self.norms[:layer], strict=True):
            h = jax.nn.relu(norm(conv(h)))
        return h

    def from_features(self, h: jax.Array, layer: int) -> jax.Array:
        """Images ``[n, 64, 64, 3]`` in [0, 1] from ``features(z, layer)``'s activations."""
        if layer not in range(1, len(LAYERS)):
            raise JaxmiaError(f"DCGAN generator: layer {layer}, expected 1..{len(LAYERS) - 1}")
        for conv, norm in zip(self.convs[layer:-1], self.norms[layer:], strict=True):
            h = jax.nn.relu(norm(conv(h)))
        return (jnp.tanh(self.convs[-1](h)) + 1.0) / 2.0

    def __call__(self, z: jax.Array) -> jax.Array:
        return self.from_features(self.features(z, 1), 1)


def from_state_dict(
    state_dict: Mapping[str, np.ndarray], source: str = "state_dict"
) -> DCGANGenerator:
    """The generator with the weights of the package's ``Generator.state_dict()``.

    Raises:
      JaxmiaError: a tensor is missing, left over or of another shape (the message names it),
        e.g. a generator of another latent size.
    """
    model = nnx.eval_shape(DCGANGenerator)  # shapes only: every value is set below
    tensors = torch_format.StateDictReader(state_dict, f"DCGAN generator {source}")

    def take(name: str, shape: tuple[int, ...]) -> jax.Array:
        return jnp.asarray(tensors.take(name, shape))

    for i, (conv, (cin, cout, _, _)) in enumerate(zip(model.convs, LAYERS, strict=True)):
        conv.kernel.set_value(take(f"main.{3 * i}.weight", (cin, cout, KERNEL, KERNEL)))
        if i < len(model.norms):
            norm, prefix = model.norms[i], f"main.{3 * i + 1}."
            norm.scale.set_value(take(prefix + "weight", (cout,)))
            norm.bias.set_value(take(prefix + "bias", (cout,)))
            norm.mean.set_value(take(prefix + "running_mean", (cout,)))
            norm.var.set_value(take(prefix + "running_var", (cout,)))
            tensors.skip(prefix + "num_batches_tracked")
    tensors.finish("not this generator")
    return model


def load_dcgan(path: str | Path | None = None) -> DCGANGenerator:
    """The pretrained face generator from ``path`` (like ``weights.tar``), else the fetched one.

    Raises:
      JaxmiaError: the file is missing or corrupt, or does not hold this generator's weights.
    """
    if path is None:
        path = fetch.model_files("dcgan_face")["weights.tar"]
    sd = torch_format.load_state_dict(path, None)
    return from_state_dict(sd, str(path))
