"""Image priors for the inversion: the clone as a point of a face model, not free pixels.

A prior decides what the inversion optimises for each clone and how that becomes its image:

- ``pixels`` (the paper's): the image itself, clipped to [0, 1] after every step.
- ``linear``: coefficients of the auxiliary pool's principal components (eigenfaces of public
  faces, never R_T's or R_E's photos): ``image = clip(mean + sum_k coef_k * basis_k, 0, 1)``,
  each basis image a component scaled by the pool's standard deviation along it, so that the
  pool's own faces have coefficients of unit variance and ``inversion.coef_weight`` is a
  Gaussian prior on them. The start is the seed's projection onto the span.
- ``generator``: the latent code of a VAE trained on the auxiliary pool (``jaxmia prior``,
  ``jaxmia.attacks.generator``): ``image = decoder(code)``. Its codes have a unit Gaussian prior, so
  ``inversion.coef_weight`` penalises them as the linear prior's coefficients. The start is the
  encoder's posterior mean of the seed image: the clone starts from the same seed as a pixel
  attack, as the decoder sees it.
- ``gan``: the latent ``z`` [100] of a pretrained face generator (``jaxmia.pretrained.dcgan``:
  the DCGAN of ``gan-face-generate``, trained on DigiFace-1M's synthetic faces, so no real
  person of any data set; ``inversion.prior_checkpoint`` a weights file of the same network,
  else the fetched one): ``image = resize(G(z))``, the generator's 64x64 RGB converted to the
  recognizer's channels (ITU-R 601 luma, as PIL's "L" that made the grey photos) and resized to
  its input inside the program. A GAN has no encoder: each clone starts from the latent its key
  draws (``gan_latent``), and its seed is G of that latent; ``jaxmia.stages.invert`` may first
  keep, of ``inversion.init_candidates`` keys per clone, the one whose image R_T scores best
  (PPA's initial selection). ``inversion.coef_weight`` is the unit Gaussian prior on ``z``.
  ``inversion.prior_checkpoint`` may instead be a folder of ``jaxmia prior``: the generator
  tuned on the auxiliary pool with a discriminator (``jaxmia.attacks.gan_tuning``), which then
  travels in the params for GMI's realism term (``inversion.realism_weight``; the decoder's
  ``realism``: D's logit of the clone image).

With ``inversion.prior_residual`` a pixel residual is added to the decoded image (starting at
zero, penalised by ``inversion.residual_weight``): the part of the clone outside the prior.

One clone's variables are the image ``[h, w, c]`` for ``pixels``, else a dict ``{"coef": [k]}``
with ``"pixels": [h, w, c]`` for the residual. A ``Decoder`` holds the static half of a prior
(hashable: it keys the compiled program); its parameters are traced arguments, so a prior
fitted again on other faces of the same shape compiles nothing new. The decoder's ``encode``
takes the clone's key, so that a prior that cannot start from the seed image can draw its start.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmia.attacks import generator
from jaxmia.errors import JaxmiaError

PRIORS = ("pixels", "linear", "generator", "gan")
# ITU-R 601-2 luma, PIL's "L" conversion: the grey photos the recognizer was trained on.
LUMA = (0.299, 0.587, 0.114)
_LATENT_STREAM = 0x6A4E  # folded into a clone's key to draw its GAN latent


@dataclasses.dataclass(frozen=True)
class Decoder:
    """How a prior's coefficients become an image, and where a clone's coefficients start."""

    kind: str  # one of PRIORS but "pixels"
    decode: Callable[[Any, jax.Array], jax.Array]  # (params, coef [k]) -> image [h, w, c]
    encode: Callable[[Any, jax.Array, jax.Array], jax.Array]  # (params, seed, key) -> coef [k]
    # (params, image [h, w, c]) -> [] a discriminator's logit (high: realistic); None: none
    realism: Callable[[Any, jax.Array], jax.Array] | None = None


class Prior(NamedTuple):
    """A fitted prior: its static decoder and its parameters (traced)."""

    decoder: Decoder
    params: Any


class LinearParams(NamedTuple):
    """A linear face model: the pool's mean and its scaled principal components."""

    mean: jax.Array  # [h, w, c]
    basis: jax.Array  # [k, h, w, c] component k times the pool's standard deviation along it


def fit_linear(pool: np.ndarray, components: int) -> LinearParams:
    """The first ``components`` principal components of the pool's faces (a thin SVD).

    Args:
      pool: the auxiliary faces in [0, 1]. # [m, h, w, c]
      components: 1 .. m - 1 (m faces span at most m - 1 directions around their mean).

    Raises:
      JaxmiaError: too few faces for the components.
    """
    pool = np.asarray(pool, np.float64)
    m, shape = pool.shape[0], pool.shape[1:]
    if not 1 <= components <= m - 1:
        raise JaxmiaError(
            f"inversion.prior_components={components}: the auxiliary pool has {m} faces, "
            f"so expected 1 .. {max(m - 1, 0)}"
        )
    rows = pool.reshape(m, -1)
    mean = rows.mean(axis=0)
    _, s, vt = np.linalg.svd(rows - mean, full_matrices=False)
    std = s[:components] / np.sqrt(m - 1)  # [k] the pool's spread along each component
    basis = vt[:components] * std[:, None]
    return LinearParams(
        jnp.asarray(mean.reshape(shape), jnp.float32),
        jnp.asarray(basis.reshape(components, *shape), jnp.float32),
    )


def _linear_decode(params: LinearParams, coef: jax.Array) -> jax.Array:
    return params.mean + jnp.tensordot(coef, params.basis, axes=1)


def _linear_encode(params: LinearParams, seed: jax.Array, key: jax.Array) -> jax.Array:
    del key  # the projection is deterministic
    axes = tuple(range(1, params.basis.ndim))
    inner = jnp.tensordot(params.basis, seed - params.mean, axes=params.basis.ndim - 1)  # [k]
    return inner / jnp.sum(params.basis**2, axis=axes)


LINEAR = Decoder("linear", _linear_decode, _linear_encode)


# One Decoder per generator architecture: equal configs give the same (hashable) object, so a
# program compiled for one trained generator serves every other of that architecture.
@functools.lru_cache(maxsize=16)
def generator_decoder(config: generator.GeneratorConfig) -> Decoder:
    """The ``generator`` prior's decoder for VAEs of ``config`` (params: the VAE's pure dict)."""
    return Decoder(
        "generator",
        functools.partial(generator.decode, config),
        functools.partial(_generator_encode, config),
    )


def _generator_encode(
    config: generator.GeneratorConfig, params: dict, seed: jax.Array, key: jax.Array
) -> jax.Array:
    del key  # the posterior mean is deterministic
    return generator.encode_mean(config, params, seed)


def generator_prior(config: generator.GeneratorConfig, params: dict) -> Prior:
    """A trained generator as a prior: its decoder (static) and its parameters (traced)."""
    return Prior(generator_decoder(config), params)


# --- the pretrained face generator ----------------------------------------------------------


def gan_latent(key: jax.Array) -> jax.Array:
    """The starting latent a clone's key draws for the ``gan`` prior (unit Gaussian). # [100]"""
    from jaxmia.pretrained import dcgan  # noqa: PLC0415 - the generator's module is heavy

    return jax.random.normal(jax.random.fold_in(key, _LATENT_STREAM), (dcgan.LATENT,))


def to_recognizer(images: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """Generator images in the recognizer's input: channels converted, then resized.

    Args:
      images: RGB in [0, 1]. # [..., gh, gw, 3]
      shape: the recognizer's (height, width, channels), channels 1 or 3.

    Returns:
      # [..., h, w, c] in [0, 1]
    """
    h, w, c = shape
    if c == 1:
        images = jnp.tensordot(images, jnp.asarray(LUMA, images.dtype), axes=1)[..., None]
    if images.shape[-3:-1] != (h, w):
        lead = images.shape[:-3]
        images = jax.image.resize(images, (*lead, h, w, c), "linear", antialias=True)
    return images


class GanParams(NamedTuple):
    """The ``gan`` prior's traced params: the generator's state, a tuned discriminator's."""

    generator: nnx.State
    discriminator: nnx.State | None = None  # with ``realism``: gan_tuning.Discriminator's


@functools.lru_cache(maxsize=16)
def gan_decoder(shape: tuple[int, int, int], discriminator: nnx.GraphDef | None = None) -> Decoder:
    """The ``gan`` prior's decoder for a recognizer of input ``shape`` (h, w, c); its params
    are ``GanParams`` (``gan_prior``). With a discriminator's graphdef (``[n, h, w, c] ->
    [n]`` logits) it has ``realism``: that discriminator's logit of the clone image."""
    from jaxmia.pretrained import dcgan  # noqa: PLC0415

    graphdef = nnx.graphdef(nnx.eval_shape(dcgan.DCGANGenerator))
    realism = None if discriminator is None else functools.partial(_gan_realism, discriminator)
    return Decoder("gan", functools.partial(_gan_decode, graphdef, shape), _gan_encode, realism)


def _gan_decode(graphdef: nnx.GraphDef, shape, params: GanParams, z: jax.Array) -> jax.Array:
    return to_recognizer(nnx.merge(graphdef, params.generator)(z[None])[0], shape)


def _gan_realism(graphdef: nnx.GraphDef, params: GanParams, image: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, params.discriminator)(image[None])[0]


def _gan_encode(params: Any, seed: jax.Array, key: jax.Array) -> jax.Array:
    del params, seed  # a GAN has no encoder: the start is the latent the key draws
    return gan_latent(key)


def gan_prior(model: Any, shape: tuple[int, int, int], discriminator: Any = None) -> Prior:
    """A loaded generator (``dcgan.load_dcgan``) as the prior of a recognizer of input ``shape``,
    with a tuned ``gan_tuning.Discriminator`` of that input for the realism term if given.

    Raises:
      JaxmiaError: the recognizer's channels are neither 1 nor 3, or the discriminator takes
        another shape than the recognizer.
    """
    shape = tuple(shape)
    if shape[2] not in (1, 3):
        raise JaxmiaError(
            f"inversion.prior='gan': the generator makes RGB faces; expected a recognizer of 1 "
            f"or 3 channels, got {shape[2]}"
        )
    if discriminator is None:
        return Prior(gan_decoder(shape), GanParams(nnx.state(model)))
    if discriminator.config.shape != shape:
        raise JaxmiaError(
            f"inversion.prior='gan': the discriminator judges images of shape "
            f"{discriminator.config.shape}, the recognizer takes {shape}; expected a GAN tuned "
            "for this recognizer (jaxmia prior --checkpoint R_T)"
        )
    params = GanParams(nnx.state(model), nnx.state(discriminator))
    return Prior(gan_decoder(shape, nnx.graphdef(discriminator)), params)


def image(decoder: Decoder | None, params: Any, variables: Any) -> jax.Array:
    """One clone's image from its variables (``decoder`` None: the variables are the image).

    # [h, w, c] in [0, 1]
    """
    if decoder is None:
        return variables
    x = decoder.decode(params, variables["coef"])
    if "pixels" in variables:
        x = x + variables["pixels"]
    return jnp.clip(x, 0.0, 1.0)


def start(
    decoder: Decoder | None, params: Any, seed: jax.Array, key: jax.Array, residual: bool
) -> Any:
    """One clone's starting variables: the seed, or its coefficients (and a zero residual)."""
    if decoder is None:
        return seed
    variables = {"coef": decoder.encode(params, seed, key)}
    if residual:
        variables["pixels"] = jnp.zeros_like(seed)
    return variables
