"""A generative face prior: a convolutional VAE (Kingma & Welling 2014) in Flax NNX.

Trained on the auxiliary pool only (public faces, never R_T's or R_E's photos), its decoder turns
a latent code ``z`` [latent_dim] into a face [h, w, c] in [0, 1]; the inversion then optimises
one code per clone (``jaxmia.attacks.priors``, ``inversion.prior="generator"``). A VAE rather than
a GAN: it trains stably on a few hundred to a few thousand faces on a CPU, and its encoder gives
each clone a start (the code of its seed image), so the attack starts from the same seed as the
pixel attack.

The encoder halves the resolution with a stride-2 3x3 convolution per ``widths`` entry and
maps the result to the posterior's mean and log-variance; the decoder mirrors it with
nearest-neighbour upsampling and 3x3 convolutions (no transposed convolutions, whose uneven
overlap paints checkerboards) and ends in a sigmoid. No normalisation layers: the decoder is
then a pure function of one code, which the inversion vmaps over clones.

Used functionally like ``jaxmia.recognizers.models``: ``init`` gives (graphdef, params pure dict);
``decode`` and ``encode_mean`` take the pure dict; ``fit`` trains in memory (the ``jaxmia prior``
stage, ``jaxmia.stages.prior``, adds the workdir, checkpoints and pictures around it).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from jaxmia.errors import JaxmiaError

# Bounds the posterior's log-variance: a collapsed or exploding variance in the first steps
# would make exp(logvar) overflow or the KL term's gradient blow up.
LOGVAR_RANGE = (-10.0, 10.0)


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Everything that fixes the VAE's function besides its weights (stored in checkpoints)."""

    image_size: tuple[int, int] = (64, 64)  # (height, width), each divisible by 2**len(widths)
    channels: int = 1
    latent_dim: int = 64
    widths: tuple[int, ...] = (16, 32, 64, 128)  # encoder channels per halving; decoder reversed

    def __post_init__(self):
        if self.latent_dim < 1 or self.channels < 1 or not self.widths or min(self.widths) < 1:
            raise JaxmiaError(
                f"generator config {self.to_dict()}: expected latent_dim, channels and every "
                "width >= 1, and at least one width"
            )
        scale = 2 ** len(self.widths)
        if any(s % scale for s in self.image_size):
            raise JaxmiaError(
                f"prior.widths={self.widths}: {len(self.widths)} halvings need an image size "
                f"divisible by {scale}, got {self.image_size}"
            )

    @property
    def bottom(self) -> tuple[int, int]:
        """The (height, width) after the encoder's halvings."""
        scale = 2 ** len(self.widths)
        return self.image_size[0] // scale, self.image_size[1] // scale

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GeneratorConfig:
        """The inverse of ``to_dict`` (JSON lists back to tuples)."""
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown generator config fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How the VAE trains (the ``prior`` section's training fields), validated."""

    epochs: int = 100
    batch_size: int = 32
    learning_rate: float = 1e-3
    # Weight of the KL term against the reconstruction (a beta-VAE): lower gives sharper
    # reconstructions but random codes that look less like faces.
    beta: float = 1.0
    flip: bool = True  # random horizontal flips of the pool's faces

    def __post_init__(self):
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise JaxmiaError(f"prior.{name}={getattr(self, name)}: expected >= 1")
        if not 0 < self.learning_rate < float("inf"):
            raise JaxmiaError(f"prior.learning_rate={self.learning_rate}: expected finite > 0")
        if not 0 <= self.beta < float("inf"):
            raise JaxmiaError(f"prior.beta={self.beta}: expected finite >= 0")


def configs_from(
    section: ml_collections.ConfigDict, image_size: tuple[int, int], channels: int
) -> tuple[GeneratorConfig, TrainConfig]:
    """The generator and its training from a config's ``prior`` section and the faces' shape."""
    model = GeneratorConfig(
        image_size=tuple(int(s) for s in image_size),
        channels=int(channels),
        latent_dim=int(section.latent_dim),
        widths=tuple(int(w) for w in section.widths),
    )
    train = TrainConfig(
        epochs=int(section.epochs),
        batch_size=int(section.batch_size),
        learning_rate=float(section.learning_rate),
        beta=float(section.beta),
        flip=bool(section.flip),
    )
    return model, train


class ConvEncoder(nnx.Module):
    """Images to the posterior's mean and log-variance."""

    def __init__(self, config: GeneratorConfig, *, rngs: nnx.Rngs):
        convs, cin = [], config.channels
        for cout in config.widths:
            convs.append(nnx.Conv(cin, cout, (3, 3), 2, padding="SAME", rngs=rngs))
            cin = cout
        self.convs = nnx.List(convs)
        h, w = config.bottom
        self.head = nnx.Linear(h * w * cin, 2 * config.latent_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """# [b, h, w, c] in [0, 1] -> (mean, logvar), each [b, latent_dim]"""
        h = 2 * x - 1
        for conv in self.convs:
            h = jax.nn.leaky_relu(conv(h), 0.2)
        mean, logvar = jnp.split(self.head(h.reshape(h.shape[0], -1)), 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)


class ConvDecoder(nnx.Module):
    """Latent codes to images' logits (the sigmoid of which is the image)."""

    def __init__(self, config: GeneratorConfig, *, rngs: nnx.Rngs):
        self.bottom = (*config.bottom, config.widths[-1])
        self.stem = nnx.Linear(config.latent_dim, int(np.prod(self.bottom)), rngs=rngs)
        outs = (*reversed(config.widths[:-1]), config.channels)
        convs, cin = [], config.widths[-1]
        for cout in outs:
            convs.append(nnx.Conv(cin, cout, (3, 3), padding="SAME", rngs=rngs))
            cin = cout
        self.convs = nnx.List(convs)

    def __call__(self, z: jax.Array) -> jax.Array:
        """# [b, latent_dim] -> logits [b, h, w, c]"""
        h = jax.nn.leaky_relu(self.stem(z), 0.2).reshape(z.shape[0], *self.bottom)
        last = len(self.convs) - 1
        for i, conv in enumerate(self.convs):
            h = conv(jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2))  # nearest 2x upsampling
            if i < last:
                h = jax.nn.leaky_relu(h, 0.2)
        return h


class VAE(nnx.Module):
    """The encoder and decoder; its pure state dict is ``{"encoder": ..., "decoder": ...}``."""

    def __init__(self, config: GeneratorConfig, *, rngs: nnx.Rngs):
        self.encoder = ConvEncoder(config, rngs=rngs)
        self.decoder = ConvDecoder(config, rngs=rngs)


def init(config: GeneratorConfig, key: jax.Array) -> tuple[nnx.GraphDef, dict]:
    """A freshly initialised VAE: (graphdef, its parameters as a pure dict)."""
    graphdef, state = nnx.split(VAE(config, rngs=nnx.Rngs(params=key)))
    return graphdef, nnx.to_pure_dict(state)


@functools.lru_cache(maxsize=16)
def abstract(config: GeneratorConfig) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, the state's shapes and dtypes) of ``config``, computing nothing (cached)."""
    return nnx.split(nnx.eval_shape(lambda: VAE(config, rngs=nnx.Rngs(params=0))))


def abstract_opt_state(config: GeneratorConfig, train: TrainConfig) -> Any:
    """Shapes and dtypes of the optimizer state of ``fit``, for restoring a checkpoint's."""
    shapes = nnx.to_pure_dict(abstract(config)[1])
    return jax.eval_shape(optimizer(train.learning_rate).init, shapes)


def _model(config: GeneratorConfig, params: dict) -> VAE:
    return nnx.merge(abstract(config)[0], params)


def decode(config: GeneratorConfig, params: dict, z: jax.Array) -> jax.Array:
    """One code's image, usable inside a vmapped, jitted program. # [latent] -> [h, w, c]

    In [0, 1] (a sigmoid).
    """
    return jax.nn.sigmoid(_model(config, params).decoder(z[None])[0])


def encode_mean(config: GeneratorConfig, params: dict, x: jax.Array) -> jax.Array:
    """The posterior mean of one image: its most likely code. # [h, w, c] -> [latent]"""
    return _model(config, params).encoder(x[None])[0][0]


@functools.partial(jax.jit, static_argnums=0)
def reconstruct(config: GeneratorConfig, params: dict, x: jax.Array) -> jax.Array:
    """Images decoded from their posterior means. # [b, h, w, c] -> [b, h, w, c]"""
    model = _model(config, params)
    return jax.nn.sigmoid(model.decoder(model.encoder(x)[0]))


@functools.partial(jax.jit, static_argnums=(0, 3))
def sample(config: GeneratorConfig, params: dict, key: jax.Array, n: int) -> jax.Array:
    """``n`` images decoded from codes drawn from the unit Gaussian prior. # [n, h, w, c]"""
    z = jax.random.normal(key, (n, config.latent_dim))
    return jax.nn.sigmoid(_model(config, params).decoder(z))


def loss_terms(
    graphdef: nnx.GraphDef, params: dict, x: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """A batch's mean reconstruction and KL terms, each summed over an image's pixels or codes.

    The reconstruction is the Bernoulli negative log-likelihood of the pixels (binary cross
    entropy, defined for grey levels in [0, 1]); its floor is the images' own entropy, not 0.

    Args:
      graphdef: the VAE's graph.
      params: its parameters (pure dict).
      x: images in [0, 1]. # [b, h, w, c]
      key: draws the reparameterised codes.

    Returns:
      (reconstruction, KL to the unit Gaussian), scalars.
    """
    model = nnx.merge(graphdef, params)
    mean, logvar = model.encoder(x)  # [b, latent] each
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
    logits = model.decoder(z)  # [b, h, w, c]
    recon = optax.sigmoid_binary_cross_entropy(logits, x).sum(axis=(1, 2, 3))
    kl = 0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1 - logvar, axis=-1)
    return recon.mean(), kl.mean()


def _flip(x: jax.Array, key: jax.Array) -> jax.Array:
    """Each image flipped left-right with probability 1/2. # [b, h, w, c]"""
    coin = jax.random.bernoulli(key, 0.5, (x.shape[0], 1, 1, 1))
    return jnp.where(coin, x[:, :, ::-1], x)


@functools.partial(jax.jit, static_argnames=("graphdef", "tx", "flip"), donate_argnums=(1, 2))
def train_step(graphdef, params, opt_state, x, key, beta, *, tx, flip):
    """One optimizer step on a batch. # x: [b, h, w, c]

    ``beta`` is traced (a new value compiles nothing); ``tx`` and ``flip`` are static.

    Returns:
      (params, opt_state, [loss, reconstruction, KL]); ``params`` and ``opt_state`` are donated.
    """
    k_flip, k_z = jax.random.split(key)
    if flip:
        x = _flip(x, k_flip)

    def loss_fn(p):
        recon, kl = loss_terms(graphdef, p, x, k_z)
        return recon + beta * kl, (recon, kl)

    (loss, (recon, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, jnp.stack([loss, recon, kl])


# Cached: the jitted step takes the transformation as a static argument, so equal settings must
# give the same object or every fit would compile the step anew.
@functools.lru_cache(maxsize=16)
def optimizer(learning_rate: float) -> optax.GradientTransformation:
    """Adam at a constant rate: the usual VAE recipe, no schedule to tune."""
    return optax.adam(learning_rate)


def _epoch_batches(n: int, batch_size: int, key: jax.Array) -> np.ndarray:
    """Index batches of one epoch, wrapped round so every batch is full. # [steps, b]"""
    perm = np.asarray(jax.random.permutation(key, n))
    steps = -(-n // batch_size)
    return np.resize(perm, steps * batch_size).reshape(steps, batch_size)


# (epoch done, params, opt_state, history so far) -> None; e.g. a checkpoint writer.
EpochHook = Callable[[int, dict, Any, list[dict]], None]


def fit(
    config: GeneratorConfig,
    train: TrainConfig,
    images: np.ndarray,
    *,
    key: jax.Array,
    resume: tuple[int, dict, Any, list[dict]] | None = None,
    on_epoch: EpochHook | None = None,
    progress: bool = False,
) -> tuple[dict, list[dict]]:
    """Trains the VAE on ``images``; each epoch draws from its own key, folded from ``key``.

    So a run resumed from the state after epoch ``e`` ends with the same weights as one that was
    never interrupted, and the same key gives the same weights.

    Args:
      config: the architecture; its image size and channels must be the images'.
      train: the training settings.
      images: the faces in [0, 1]. # [n, h, w, c]
      key: PRNG key for the initialisation, the batches, the flips and the codes.
      resume: (epochs done, params, opt_state, history) to continue from, e.g. a checkpoint's.
      on_epoch: called after every epoch with (epochs done, params, opt_state, history).
      progress: show a progress bar over the epochs.

    Returns:
      (params as a pure dict, per-epoch records: epoch, loss, reconstruction, kl, seconds).

    Raises:
      JaxmiaError: no images, or images of another shape than the config's.
    """
    images = np.asarray(images, np.float32)
    shape = (*config.image_size, config.channels)
    if len(images) == 0 or images.shape[1:] != shape:
        raise JaxmiaError(
            f"generator training set: expected faces of shape {shape}, got {len(images)} of "
            f"shape {images.shape[1:]}"
        )
    k_init, k_train = jax.random.split(key)
    tx = optimizer(train.learning_rate)
    if resume is None:
        graphdef, params = init(config, k_init)
        start, opt_state, history = 0, tx.init(params), []
    else:
        graphdef = abstract(config)[0]
        start, params, opt_state, history = resume
        history = list(history)
    n, batch_size = len(images), min(train.batch_size, len(images))
    beta = jnp.float32(train.beta)
    bar = tqdm.trange(
        start, train.epochs, desc="prior", unit="epoch", disable=not progress, leave=False
    )
    for epoch in bar:
        t0 = time.perf_counter()
        k_epoch = jax.random.fold_in(k_train, epoch)
        order = _epoch_batches(n, batch_size, jax.random.fold_in(k_epoch, 0))
        terms = []
        for i, idx in enumerate(order):
            params, opt_state, out = train_step(
                graphdef,
                params,
                opt_state,
                images[idx],
                jax.random.fold_in(k_epoch, i + 1),
                beta,
                tx=tx,
                flip=train.flip,
            )
            terms.append(out)
        loss, recon, kl = np.mean(jax.device_get(terms), axis=0).tolist()
        record = {
            "epoch": epoch + 1,
            "loss": loss,
            "reconstruction": recon,
            "kl": kl,
            "seconds": time.perf_counter() - t0,
        }
        history.append(record)
        bar.set_postfix(loss=f"{loss:.1f}", kl=f"{kl:.1f}")
        if on_epoch is not None:
            on_epoch(epoch + 1, params, opt_state, history)
    return params, history
