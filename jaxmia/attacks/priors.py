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

from jaxmia.attacks import generator
from jaxmia.errors import JaxmiaError

PRIORS = ("pixels", "linear", "generator")


@dataclasses.dataclass(frozen=True)
class Decoder:
    """How a prior's coefficients become an image, and where a clone's coefficients start."""

    kind: str  # one of PRIORS but "pixels"
    decode: Callable[[Any, jax.Array], jax.Array]  # (params, coef [k]) -> image [h, w, c]
    encode: Callable[[Any, jax.Array, jax.Array], jax.Array]  # (params, seed, key) -> coef [k]


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
