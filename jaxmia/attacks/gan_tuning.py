"""The face generator tuned to the attacker's public photos, and its discriminator.

GMI (Zhang et al., CVPR 2020) trains its GAN on public faces of the target's domain, and
PPDG-MI (Peng et al. 2024) tunes a pretrained one towards them: the prior then makes the
target's kind of photo (grey studio faces on AT&T, in-the-wild crops on CelebA) rather than the
generator's own. Here the pretrained DCGAN (``jaxmia.pretrained.dcgan``, DigiFace-1M's synthetic
faces) is fine-tuned together with a new DCGAN discriminator on the auxiliary pool only (the
inversion's seed pool: never R_T's or R_E's photos), with the non-saturating GAN loss and Adam
(DCGAN's 2e-4, beta1 0.5). The discriminator judges faces as the recognizer takes them: G's
64x64 RGB converted to its channels and size by ``priors.to_recognizer``, the pool's photos as
they are. GMI's realism term (``inversion.realism_weight``) reuses it: the tuned D scores each
clone inside the inversion's program.

The discriminator (Radford et al. 2016's): strided 4x4 convolutions of 64, 128, 256 and 512
channels, each halving the image, LeakyReLU 0.2, and a linear logit over the last map (at 64x64
the DCGAN's final 4x4 valid convolution). No normalisation layers, unlike DCGAN's batch norm:
the realism term evaluates D on one clone at a time, vmapped over clones, where batch
statistics do not exist and running averages of D's training batches (real and fake apart)
would score another function than the one trained; spectral norm would add power-iteration
state to carry and store. On AT&T's 70 pool photos (split seed 0) 200 steps at DCGAN's 2e-4
turned G's faces into checkerboard-textured blobs, and 60 steps at 2e-5 still added faint
grids: the fine-tuning's recipe (rates, steps, augmentation, a penalty) is not settled.

G's batch norms tune in train mode (batch statistics, the DCGAN way, as the package trained
it), their running averages updated at every step (momentum 0.9); the tuned G is then used in
eval mode (those running averages) everywhere: the samples, the checkpoint, the inversion.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from jaxmia import transforms
from jaxmia.attacks import priors
from jaxmia.errors import JaxmiaError
from jaxmia.pretrained import dcgan

WIDTHS = (64, 128, 256, 512)  # DCGAN's discriminator
KERNEL = 4
BETA1 = 0.5  # DCGAN's Adam
SLOPE = 0.2  # LeakyReLU
INIT_STD = 0.02  # DCGAN's weight initialisation
RECORDS = 20  # history records over a tuning (means over the steps since the last)


@dataclasses.dataclass(frozen=True)
class DiscriminatorConfig:
    """What fixes the discriminator's function besides its weights (stored in checkpoints)."""

    shape: tuple[int, int, int]  # (height, width, channels): the recognizer's input
    widths: tuple[int, ...] = WIDTHS

    def __post_init__(self):
        h, w, c = self.shape
        scale = 2 ** len(self.widths)
        if h % scale or w % scale or h < scale or w < scale or c < 1:
            raise JaxmiaError(
                f"GAN discriminator: images of shape {self.shape}; its {len(self.widths)} "
                f"halvings need a height and width divisible by {scale}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DiscriminatorConfig:
        """The inverse of ``to_dict`` (JSON lists back to tuples)."""
        return cls(shape=tuple(int(s) for s in d["shape"]), widths=tuple(d["widths"]))


class Discriminator(nnx.Module):
    """Faces ``[n, h, w, c]`` in [0, 1] -> logits ``[n]`` (high: a photo of the pool)."""

    def __init__(self, config: DiscriminatorConfig, *, rngs: nnx.Rngs):
        self.config = config
        init = nnx.initializers.normal(INIT_STD)
        convs, cin = [], config.shape[2]
        for cout in config.widths:
            convs.append(
                nnx.Conv(cin, cout, (KERNEL, KERNEL), 2, padding=((1, 1), (1, 1)),
                         kernel_init=init, rngs=rngs)
            )  # fmt: skip
            cin = cout
        self.convs = nnx.List(convs)
        h, w, _ = config.shape
        scale = 2 ** len(config.widths)
        self.head = nnx.Linear((h // scale) * (w // scale) * cin, 1, kernel_init=init, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = 2 * x - 1  # G's tanh range, as DCGAN's discriminator sees images
        for conv in self.convs:
            h = jax.nn.leaky_relu(conv(h), SLOPE)
        return self.head(h.reshape(h.shape[0], -1))[:, 0]


@dataclasses.dataclass(frozen=True)
class TuneConfig:
    """How the GAN prior tunes (the ``prior`` section's ``gan_*`` fields and ``tune_gan``)."""

    # jaxmia experiment's stage "prior" tunes the GAN (inversion.prior="gan" without
    # inversion.prior_checkpoint); `jaxmia prior` tunes it whenever inversion.prior="gan".
    tune_gan: bool = False
    gan_steps: int = 200  # updates of D then G, one batch of the pool each
    gan_learning_rate: float = 2e-4  # Adam's, for G and D (DCGAN's)

    def __post_init__(self):
        if self.gan_steps < 1:
            raise JaxmiaError(f"prior.gan_steps={self.gan_steps}: expected >= 1")
        if not 0 < self.gan_learning_rate < float("inf"):
            raise JaxmiaError(
                f"prior.gan_learning_rate={self.gan_learning_rate}: expected finite > 0"
            )

    @classmethod
    def from_config(cls, section: ml_collections.ConfigDict) -> TuneConfig:
        """The tuning's fields of the config's ``prior`` section."""
        return cls(**{f.name: section[f.name] for f in dataclasses.fields(cls)})


class State(NamedTuple):
    """Everything a tuning step changes."""

    g_params: nnx.State  # G's nnx.Param
    g_stats: nnx.State  # G's batch norms' running averages (nnx.BatchStat)
    d_params: nnx.State
    g_opt: Any
    d_opt: Any


@functools.lru_cache(maxsize=16)
def optimizer(learning_rate: float) -> optax.GradientTransformation:
    """DCGAN's Adam (beta1 0.5), the same for G and D (their states apart)."""
    return optax.adam(learning_rate, b1=BETA1)


def init(
    generator: dcgan.DCGANGenerator, config: DiscriminatorConfig, key: jax.Array, lr: float
) -> tuple[nnx.GraphDef, nnx.GraphDef, State]:
    """(G's graphdef in train mode, D's graphdef, the state) to tune ``generator`` from."""
    train_g = nnx.view(generator, use_running_average=False)
    g_def, g_params, g_stats = nnx.split(train_g, nnx.Param, nnx.BatchStat)
    d_def, d_params = nnx.split(Discriminator(config, rngs=nnx.Rngs(params=key)))
    tx = optimizer(lr)
    return g_def, d_def, State(g_params, g_stats, d_params, tx.init(g_params), tx.init(d_params))


def conv_transpose(conv: dcgan.ConvTranspose, x: jax.Array) -> jax.Array:
    """``conv(x)`` for a stride-2 layer as four stride-1 convolutions, one per output phase.

    The output pixel (2i + a, 2j + b) sees only the kernel taps of parity (a, b), so each phase
    is a 2x2 convolution of the input, and the four interleave. The same function as the
    dilated convolution of ``dcgan.ConvTranspose`` (to float32 rounding), whose kernel gradient
    XLA computes about 9x slower on CPU (8x8x256 -> 16x16x128, batch 16: 0.77 s against 0.09 s
    for the gradient). # [n, h, w, cin] -> [n, 2h, 2w, cout]
    """
    if (conv.stride, conv.padding) != (2, 1):
        return conv(x)
    w = jnp.flip(conv.kernel[...].transpose(2, 3, 0, 1), axis=(0, 1))  # [4, 4, in, out]
    n, h, wd, _ = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    rows = []
    for a in range(2):
        cols = []
        for b in range(2):
            # in the dilated input padded by 2, output o = 2i + a reads taps t with o + t even
            ta, tb = (
                [t for t in range(4) if (a + t) % 2 == 0],
                [t for t in range(4) if (b + t) % 2 == 0],
            )
            oa, ob = (a + ta[0]) // 2, (b + tb[0]) // 2  # where the phase's window starts in xp
            window = xp[:, oa : oa + h + 1, ob : ob + wd + 1]
            y = jax.lax.conv_general_dilated(
                window, w[np.ix_(ta, tb)], (1, 1), "VALID",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )  # fmt: skip
            cols.append(y[:, :h, :wd])
        rows.append(jnp.stack(cols, axis=3))  # [n, h, w, 2, c]
    return jnp.stack(rows, axis=2).reshape(n, 2 * h, 2 * wd, -1)  # [n, h, 2, w, 2, c] interleaved


def generate_fast(model: dcgan.DCGANGenerator, z: jax.Array) -> jax.Array:
    """``model(z)`` with its stride-2 layers as ``conv_transpose``: faster to differentiate in
    the weights. # [n, 100] -> [n, 64, 64, 3]"""
    h = jnp.asarray(z, jnp.float32)[:, None, None, :]
    for conv, norm in zip(model.convs[:-1], model.norms, strict=True):
        h = jax.nn.relu(norm(conv_transpose(conv, h)))
    return (jnp.tanh(conv_transpose(model.convs[-1], h)) + 1.0) / 2.0


@functools.partial(jax.jit, static_argnames=("g_def", "d_def", "tx", "flip"))
def train_step(
    g_def: nnx.GraphDef,
    d_def: nnx.GraphDef,
    state: State,
    real: jax.Array,
    key: jax.Array,
    *,
    tx: optax.GradientTransformation,
    flip: bool,
) -> tuple[State, jax.Array]:
    """One DCGAN iteration: D on the real batch and G's batch, then G against the updated D.

    As PyTorch's DCGAN: G runs once (batch statistics, running averages updated once), D's
    step sees its images detached, G's step backpropagates D's verdict on those same images.

    Args:
      g_def, d_def: from ``init``.
      state: the tuning state.
      real: a batch of the pool's faces in [0, 1], the recognizer's shape. # [b, h, w, c]
      key: this step's key (latents and flips).
      tx: ``optimizer(lr)``.
      flip: flip each real face left-right with probability 1/2.

    Returns:
      (the new state, [D loss, G loss, D's mean P(real) of the real and of G's faces]) # [4]
    """
    k_z, k_flip = jax.random.split(key)
    b = real.shape[0]
    if flip:
        real = jax.vmap(transforms.random_flip)(real, jax.random.split(k_flip, b))
    z = jax.random.normal(k_z, (b, dcgan.LATENT))

    def generate(g_params, g_stats):
        model = nnx.merge(g_def, g_params, g_stats)
        fake = priors.to_recognizer(generate_fast(model, z), real.shape[1:])  # [b, h, w, c]
        return fake, nnx.state(model, nnx.BatchStat)

    # The running averages go in as inputs (nnx mutates them only within their own trace);
    # in train mode the output does not depend on them, so their cotangent is zero.
    fake, g_vjp, g_stats = jax.vjp(generate, state.g_params, state.g_stats, has_aux=True)

    def d_loss(d_params):
        d = nnx.merge(d_def, d_params)
        on_real, on_fake = d(real), d(jax.lax.stop_gradient(fake))
        loss = jnp.mean(jax.nn.softplus(-on_real)) + jnp.mean(jax.nn.softplus(on_fake))
        return loss, (on_real, on_fake)

    (dl, (on_real, on_fake)), d_grad = jax.value_and_grad(d_loss, has_aux=True)(state.d_params)
    updates, d_opt = tx.update(d_grad, state.d_opt, state.d_params)
    d_params = optax.apply_updates(state.d_params, updates)

    d_new = nnx.merge(d_def, d_params)
    gl, image_grad = jax.value_and_grad(lambda x: jnp.mean(jax.nn.softplus(-d_new(x))))(fake)
    g_grad, _ = g_vjp(image_grad)
    updates, g_opt = tx.update(g_grad, state.g_opt, state.g_params)
    g_params = optax.apply_updates(state.g_params, updates)
    metrics = jnp.stack(
        [dl, gl, jnp.mean(jax.nn.sigmoid(on_real)), jnp.mean(jax.nn.sigmoid(on_fake))]
    )
    return State(g_params, g_stats, d_params, g_opt, d_opt), metrics


class Tuned(NamedTuple):
    """A tuned GAN: G in eval mode (its running averages) and D."""

    generator: dcgan.DCGANGenerator
    discriminator: Discriminator


def merge(g_def: nnx.GraphDef, d_def: nnx.GraphDef, state: State) -> Tuned:
    """The modules of a tuning state, G back in eval mode."""
    g = nnx.merge(g_def, state.g_params, state.g_stats)
    return Tuned(nnx.view(g, use_running_average=True), nnx.merge(d_def, state.d_params))


def tune(
    generator: dcgan.DCGANGenerator,
    pool: np.ndarray,
    config: TuneConfig,
    *,
    batch_size: int,
    flip: bool,
    key: jax.Array,
    progress: bool = False,
) -> tuple[Tuned, list[dict[str, float]]]:
    """Fine-tunes ``generator`` with a new discriminator on the faces ``pool``.

    Step t draws its batch (without replacement) and its latents from ``fold_in(key, t + 1)``,
    D's initialisation from ``fold_in(key, 0)``: the same key gives the same weights.

    Args:
      generator: the pretrained G (not changed).
      pool: the public faces in [0, 1], the recognizer's shape. # [m, h, w, c]
      config: steps and learning rate.
      batch_size: faces per step (at most the pool's).
      flip: random left-right flips of the pool's faces.
      key: PRNG key.
      progress: a progress bar over the steps.

    Returns:
      (the tuned G and D, history: per stretch of steps the means of d_loss, g_loss, d_real,
      d_fake (D's P(real) of the pool's and of G's faces), the last step and seconds).
    """
    pool = np.asarray(pool, np.float32)
    if len(pool) == 0:
        raise JaxmiaError("GAN tuning: expected at least one face in the pool")
    d_cfg = DiscriminatorConfig(tuple(pool.shape[1:]))
    g_def, d_def, state = init(
        generator, d_cfg, jax.random.fold_in(key, 0), config.gan_learning_rate
    )
    tx = optimizer(config.gan_learning_rate)
    b = min(batch_size, len(pool))
    every = max(1, config.gan_steps // RECORDS)
    history, window, t0 = [], [], time.perf_counter()
    bar = tqdm.trange(config.gan_steps, desc="tune GAN", unit="step", disable=not progress,
                      leave=False)  # fmt: skip
    for t in bar:
        k = jax.random.fold_in(key, t + 1)
        idx = np.asarray(jax.random.choice(jax.random.fold_in(k, 1), len(pool), (b,), False))
        state, metrics = train_step(g_def, d_def, state, pool[idx], k, tx=tx, flip=flip)
        window.append(metrics)
        if (t + 1) % every == 0 or t + 1 == config.gan_steps:
            means = np.mean(jax.device_get(window), axis=0).tolist()
            names = ("d_loss", "g_loss", "d_real", "d_fake")
            history.append({"step": t + 1, **dict(zip(names, means, strict=True)),
                            "seconds": time.perf_counter() - t0})  # fmt: skip
            bar.set_postfix(d=f"{means[0]:.2f}", g=f"{means[1]:.2f}")
            window = []
    return merge(g_def, d_def, state), history
