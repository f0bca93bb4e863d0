"""Batched gray-box model inversion: many clones of many identities in one compiled program.

The inversion of ONE clone is a pure function of its image ``[h, w, c]``, its PRNG key and its
target label (Khosravy et al. 2021, Eq. 7: ``x <- clip(x - alpha * grad L(R_T(x), onehot))``);
``jax.vmap`` runs it over the flattened identities x clones. Per clone, inside the compiled loop:
stopping (fixed steps, a confidence threshold, or the MI-Face rule the right way round: stop when
the best loss has not improved for ``patience`` steps), freezing (stopped clones keep their image
and optimizer state through masked updates, so shapes never change) and divergence (a NaN or Inf
in a clone's loss, gradient or image freezes that clone at its last finite image; other clones are
untouched).

The program is compiled for its structure only (``ProgramSpec``: loss, optimizer and denoiser
kinds, the filters' and the jitter's sizes, flip, steps per call, which regularisers exist): that
is the cache key of ``make_program``. The numeric settings (learning rate, momentum, margin,
regulariser weights, stopping thresholds, denoising period: ``Hyper``) are traced arguments of
the jitted step, so a sweep over them compiles once; ``check_every`` and ``shard`` only steer the
host loop and placement (but the default steps per call on GPU/TPU is ``check_every``: below).

The steps run as a host loop over a jitted call of ``steps_per_call`` steps (a ``fori_loop``
inside, state donated), or with ``steps_per_call=0`` as one ``while_loop`` over all steps that
also exits once every clone has stopped. The host loop never waits on the device except every
``check_every`` steps, to leave early when all clones have stopped. Measured on the shared
2-core CPU (paper CNN, 64x64x1, 40 classes, batch 128, SGD; ``python -m benchmarks.inversion_cpu``,
``benchmarks/inversion_cpu.md``): a host loop of a jitted single step 397 image-gradients/s, 10
steps per call in a ``fori_loop`` 177/s, one ``while_loop`` 177/s, hence on CPU the default
(``steps_per_call=None``, see ``resolved_steps_per_call``) is 1 step per call. On a GPU or TPU
the default is ``check_every`` steps per call (a ``fori_loop``): one dispatch per host check
rather than one per step, so the device need not wait on the host between steps (a design
choice, not measured in this repository).
Writing one clone and vmapping it costs nothing against a hand-batched step (807-894/s vs
859-876/s at batch 128 in one run).

A batch larger than ``max_batch`` clones (or than an estimate of what fits in memory, or on CPU
in cache: ``CPU_CACHE_BYTES``) runs in equal chunks; the last is padded, so every chunk has one
shape and compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxmia import sharding, transforms
from jaxmia.attacks import priors
from jaxmia.errors import JaxmiaError
from jaxmia.recognizers import fastconv, models

LOSSES = ("least_squares", "cross_entropy", "max_margin", "poincare")
OPTIMIZERS = ("sgd", "momentum", "adam")
DENOISERS = ("none", "median", "gaussian")
# Stop reasons, indexed by the int codes in Records.reason.
STOP_REASONS = ("running", "steps", "confidence", "patience", "diverged")
RUNNING, STEPS, CONFIDENCE, PATIENCE, DIVERGED = range(len(STOP_REASONS))

# On CPU a step over more clones per device than fit this working set (``bytes_per_clone``) runs
# slower per clone, so larger batches run in chunks: per device the largest power of two of
# clones within it. Measured on the 2-core CPU (2 JAX devices, 1024 clones x 20 steps,
# image-gradients/s by chunk): 64x64x1: 112: 3137, 128: 3130, 144: 2331, 256: 2362; 128x128x3
# (512 clones): 24: 579, 32: 628, 34: 492, 48: 492. The cliff sits near 64 MiB per device.
CPU_CACHE_BYTES = 64 * 2**20
# (params, images [b, h, w, c]) -> logits [b, n], or (logits, distances [b]) (feature_weight)
ApplyFn = Callable[[Any, jax.Array], Any]


@dataclasses.dataclass(frozen=True)
class ProgramSpec:
    """What fixes the compiled program's structure: the cache key of ``make_program``.

    Settings a program cannot take as traced values: they choose branches, state structures,
    array shapes or loop lengths. Built by ``InversionConfig.spec``, which drops the settings of
    a denoiser that is off, so e.g. a ``denoise_sigma`` without Gaussian denoising compiles
    nothing new.
    """

    loss: str  # one of LOSSES
    optimizer: str  # one of OPTIMIZERS: decides the optimizer state's structure
    denoise: str  # one of DENOISERS
    denoise_size: int | None  # the median's window (its stack of size**2 shifted images)
    denoise_sigma: float | None  # the Gaussian's kernel: its radius ceil(3 sigma) and its taps
    jitter: int  # the width of the edge padding of the random shift
    flip: bool
    views: int  # random views of the clone per step, their data losses averaged
    zoom: float  # largest zoom range (static: the padding) of a view; 0: none
    blur: float  # largest blur sigma (static: the kernel's radius) of a view; 0: none
    noise: float  # standard deviation of a view's noise; 0: none
    steps_per_call: int  # resolved (``resolved_steps_per_call``): >= 1, or 0: one while_loop
    tv: bool  # the total variation term is in the objective (tv_weight != 0)
    l2: bool  # the squared pixel term is in the objective (l2_weight != 0)
    # What a clone's variables are (jaxmia.attacks.priors): "pixels", or a prior's coefficients
    # with a pixel residual (residual), their Gaussian penalty in the objective (coef_penalty).
    prior: str = "pixels"
    residual: bool = False
    coef_penalty: bool = False
    features: bool = False  # feature-statistics prior: apply_fn returns (logits, distance)
    realism: bool = False  # GMI's realism term: the prior's discriminator scores the clone


class Hyper(NamedTuple):
    """The numeric settings, traced arguments of the program: a new value compiles nothing."""

    learning_rate: jax.Array  # [] float32
    momentum: jax.Array  # [] float32 ("momentum" only)
    margin: jax.Array  # [] float32 (max_margin only)
    tv_weight: jax.Array  # [] float32
    l2_weight: jax.Array  # [] float32
    stop_confidence: jax.Array  # [] float32; 0: off
    min_delta: jax.Array  # [] float32
    patience: jax.Array  # [] int32; 0: off
    denoise_every: jax.Array  # [] int32
    residual_weight: jax.Array  # [] float32: mean squared pixel residual (priors)
    coef_weight: jax.Array  # [] float32: mean squared prior coefficient (priors)
    feature_weight: jax.Array  # [] float32: feature-statistics distance (DeepInversion)
    realism_weight: jax.Array  # [] float32: softplus(-D(clone)) (GMI)


@dataclasses.dataclass(frozen=True)
class InversionConfig:
    """The settings of an inversion, validated.

    The program sees them split: ``spec()``, the structure (a new value compiles a new program),
    and ``hyper()``, the numeric values (traced: a sweep over them compiles once). ``check_every``
    and ``shard`` are in neither: they steer the host loop and the placement of a run. The step
    count is not here either: it is a run-time argument, so changing it does not recompile.
    """

    loss: str = "least_squares"  # one of LOSSES
    optimizer: str = "sgd"  # one of OPTIMIZERS; "sgd" is the paper's x <- x - lr * grad
    learning_rate: float = 0.1
    momentum: float = 0.9  # for "momentum" (heavy ball) only
    margin: float = 5.0  # max_margin: the logit margin beyond which the loss is flat
    tv_weight: float = 0.0  # total variation (mean absolute neighbour difference)
    l2_weight: float = 0.0  # mean squared pixel value
    # One of DENOISERS: "none", "median" (the paper's suggested denoising between steps) or
    # "gaussian" (a blur, which on AT&T makes clones that R_E recognises far more often:
    # benchmarks/attack_levers.md).
    denoise: str = "none"
    # Denoise after the first step and every k-th after it: the first Adam step moves every
    # pixel by +-lr, and removing that pattern at once mattered (benchmarks/attack_levers.md).
    denoise_every: int = 10
    denoise_size: int = 3  # odd filter width (median)
    denoise_sigma: float = 1.0  # standard deviation in pixels (gaussian)
    jitter: int = 0  # random shift of up to this many pixels per step (edge padded)
    flip: bool = False  # random horizontal flip per step
    # A transform-robust objective (the idea of Plug-In Inversion and AlignMI): each step
    # averages the data loss over `views` random views of the clone, each shifted and flipped
    # as above, zoomed by a factor in 1 +- zoom, blurred by a sigma in [0, blur] pixels and
    # given Gaussian noise of std `noise` (as R_E's transformed judge, jaxmia.judges.transformed).
    views: int = 1
    zoom: float = 0.0
    blur: float = 0.0
    noise: float = 0.0
    # Stop a clone once its target confidence >= this (of the image as the step saw it, i.e.
    # transformed when jitter/flip are on, the mean over the views); 0: off.
    stop_confidence: float = 0.0
    patience: int = (
        0  # stop a clone once its best loss has not improved for this many steps; 0: off
    )
    min_delta: float = 0.0  # an improvement must exceed this
    # Steps per jitted call of the host loop; 0: one while_loop; None: by backend (1 on CPU,
    # check_every on GPU/TPU; see resolved_steps_per_call).
    steps_per_call: int | None = None
    check_every: int = 50  # steps between host checks whether every clone has stopped
    # Split the clones over every device JAX sees when there are several (jaxmia.sharding); on
    # CPU, `jaxmia invert` first splits the host into one JAX device per core.
    shard: bool = True
    # The clone's parametrisation (jaxmia.attacks.priors): "pixels" (the paper's), "linear" (the
    # auxiliary pool's first prior_components eigenfaces), "generator" (the latent code of the
    # VAE in the prior_checkpoint folder, written by `jaxmia prior`) or "gan" (the latent of
    # the pretrained face generator: the fetched one, or the weights file prior_checkpoint).
    prior: str = "pixels"
    prior_components: int = 64
    prior_checkpoint: str = ""
    # "gan": draw this many starting latents per clone and keep the one R_T scores best under
    # random shifts and flips (PPA's initial selection; jaxmia.stages.invert); 1: no selection.
    init_candidates: int = 1
    prior_residual: bool = False  # add a pixel residual to the prior's image
    residual_weight: float = 0.0  # x mean squared residual
    coef_weight: float = 0.0  # x mean squared coefficient (a unit Gaussian prior on them)
    # DeepInversion's prior, for an R_T with batch norm (a ResNet): x the distance of the
    # clone's feature statistics from R_T's running ones (models.logits_and_statistics).
    feature_weight: float = 0.0
    # GMI's realism term (Zhang et al. 2020): x softplus(-D(x)), the non-saturating "fake"
    # loss of the clone image by the discriminator of a GAN tuned by `jaxmia prior` (the "gan"
    # prior with prior_checkpoint its folder).
    realism_weight: float = 0.0

    def __post_init__(self):
        choices = {
            "loss": LOSSES,
            "optimizer": OPTIMIZERS,
            "denoise": DENOISERS,
            "prior": priors.PRIORS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise JaxmiaError(
                    f"inversion.{name}={getattr(self, name)!r}: expected one of {allowed}"
                )
        if not 0 < self.learning_rate < math.inf:
            raise JaxmiaError(f"inversion.learning_rate={self.learning_rate}: expected finite > 0")
        if self.denoise_size < 1 or self.denoise_size % 2 == 0:
            raise JaxmiaError(
                f"inversion.denoise_size={self.denoise_size}: expected an odd width >= 1"
            )
        if not 0 < self.denoise_sigma < math.inf:
            raise JaxmiaError(f"inversion.denoise_sigma={self.denoise_sigma}: expected finite > 0")
        for name in ("denoise_every", "check_every"):
            if getattr(self, name) < 1:
                raise JaxmiaError(f"inversion.{name}={getattr(self, name)}: expected >= 1")
        for name in ("jitter", "patience", "steps_per_call"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise JaxmiaError(f"inversion.{name}={value}: expected >= 0")
        if not isinstance(self.views, int) or self.views < 1:
            raise JaxmiaError(f"inversion.views={self.views!r}: expected an integer >= 1")
        if not 0 <= self.zoom < 1:
            raise JaxmiaError(f"inversion.zoom={self.zoom}: expected in [0, 1)")
        weights = ("residual_weight", "coef_weight", "feature_weight", "realism_weight")
        for name in ("blur", "noise", *weights):
            if not 0 <= getattr(self, name) < math.inf:
                raise JaxmiaError(f"inversion.{name}={getattr(self, name)}: expected finite >= 0")
        if not isinstance(self.init_candidates, int) or self.init_candidates < 1:
            raise JaxmiaError(
                f"inversion.init_candidates={self.init_candidates!r}: expected an integer >= 1"
            )
        if self.init_candidates > 1 and self.prior != "gan":
            raise JaxmiaError(
                f"inversion.init_candidates={self.init_candidates}: only the 'gan' prior draws "
                f"its start, not inversion.prior={self.prior!r}; expected 1"
            )
        if self.realism_weight and (self.prior != "gan" or not self.prior_checkpoint):
            raise JaxmiaError(
                f"inversion.realism_weight={self.realism_weight} needs a discriminator: expected "
                "inversion.prior='gan' with inversion.prior_checkpoint=DIR, a GAN tuned by "
                "jaxmia prior (in jaxmia experiment: prior.tune_gan=True), or realism_weight=0"
            )
        if self.prior_components < 1:
            raise JaxmiaError(f"inversion.prior_components={self.prior_components}: expected >= 1")
        if self.prior == "generator" and not self.prior_checkpoint:
            raise JaxmiaError(
                "inversion.prior='generator': expected inversion.prior_checkpoint=DIR, a folder "
                "written by jaxmia prior"
            )
        if self.prior != "pixels" and self.denoise != "none" and not self.prior_residual:
            raise JaxmiaError(
                f"inversion.denoise={self.denoise!r} filters pixels, and inversion.prior="
                f"{self.prior!r} has none: set inversion.denoise=none or "
                "inversion.prior_residual=True (the residual is filtered)"
            )

    @classmethod
    def from_config(cls, section: Any) -> InversionConfig:
        """The engine's fields from a config section (e.g. ``config.inversion``); others ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: section[k] for k in names if k in section})

    def spec(self, backend: str | None = None) -> ProgramSpec:
        """The program's structure for ``backend`` (None: JAX's default; it resolves
        ``steps_per_call``)."""
        return ProgramSpec(
            loss=self.loss,
            optimizer=self.optimizer,
            denoise=self.denoise,
            denoise_size=self.denoise_size if self.denoise == "median" else None,
            denoise_sigma=self.denoise_sigma if self.denoise == "gaussian" else None,
            jitter=self.jitter,
            flip=bool(self.flip),
            views=self.views,
            zoom=float(self.zoom),
            blur=float(self.blur),
            noise=float(self.noise),
            steps_per_call=resolved_steps_per_call(self, backend),
            tv=self.tv_weight != 0,
            l2=self.l2_weight != 0,
            prior=self.prior,
            residual=self.prior != "pixels" and bool(self.prior_residual),
            coef_penalty=self.prior != "pixels" and self.coef_weight != 0,
            features=self.feature_weight != 0,
            realism=self.realism_weight != 0,
        )

    def hyper(self) -> Hyper:
        """The numeric settings as scalars for the program's traced arguments.

        float32 and int32, as the program used them when they were Python constants, so the
        results do not change.
        """
        f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
        i32 = lambda v: jnp.asarray(v, jnp.int32)  # noqa: E731
        return Hyper(
            learning_rate=f32(self.learning_rate),
            momentum=f32(self.momentum),
            margin=f32(self.margin),
            tv_weight=f32(self.tv_weight),
            l2_weight=f32(self.l2_weight),
            stop_confidence=f32(self.stop_confidence),
            min_delta=f32(self.min_delta),
            patience=i32(self.patience),
            denoise_every=i32(self.denoise_every),
            residual_weight=f32(self.residual_weight),
            coef_weight=f32(self.coef_weight),
            feature_weight=f32(self.feature_weight),
            realism_weight=f32(self.realism_weight),
        )


def resolved_steps_per_call(cfg: InversionConfig, backend: str | None = None) -> int:
    """Steps per jitted call of the host loop: ``cfg.steps_per_call``, or by backend if None.

    On CPU one step per call (a host loop of a jitted single step measured 2.2x the rate of 10
    steps in a ``fori_loop`` or of one ``while_loop``: the module docstring). On an accelerator
    ``check_every`` steps per call (a ``fori_loop``), so the host dispatches once per check of
    whether every clone has stopped rather than once per step (not measured here). Under this
    default on an accelerator ``check_every`` is thus part of the program's structure.

    Args:
      cfg: the settings.
      backend: "cpu", "gpu", "tpu", ...; None: ``jax.default_backend()``.

    Returns:
      >= 1 steps per call (a ``fori_loop`` when > 1), or 0: one ``while_loop`` over all steps.
    """
    if cfg.steps_per_call is not None:
        return cfg.steps_per_call
    backend = backend or jax.default_backend()
    return 1 if backend == "cpu" else cfg.check_every


class Records(NamedTuple):
    """Per-clone results of an inversion, as host arrays."""

    clones: np.ndarray  # [n, h, w, c] float32 in [0, 1]
    steps: np.ndarray  # [n] int32 updates applied
    loss: np.ndarray  # [n] objective of the final image (no random transforms, no prior penalty)
    confidence: np.ndarray  # [n] softmax target probability of the final image
    reason: np.ndarray  # [n] int32 index into STOP_REASONS

    @property
    def diverged(self) -> np.ndarray:
        return self.reason == DIVERGED


class _State(NamedTuple):
    x: Any  # [b, h, w, c], or a prior's variables per clone (jaxmia.attacks.priors)
    opt_state: Any
    best: jax.Array  # [b] lowest objective seen
    since: jax.Array  # [b] int32 steps since `best` last improved
    steps: jax.Array  # [b] int32 updates applied
    reason: jax.Array  # [b] int32 RUNNING or a stop reason


# ---------------------------------------------------------------------------------------------
# One clone: losses, regularisers, transforms, one step.


def logit_margin(z: jax.Array, label: jax.Array) -> jax.Array:
    """One clone's target logit minus its highest other logit. # [n], [] -> []

    Positive once the recognizer ranks the target first; unlike the softmax score it keeps
    growing (and ordering clones) after that score rounds to 1.
    """
    others = jnp.where(jax.nn.one_hot(label, z.shape[-1]) > 0, -jnp.inf, z)  # [n]
    return z[label] - jnp.max(others)


def data_loss(
    kind: str, z: jax.Array, label: jax.Array, margin: float | jax.Array = 5.0
) -> jax.Array:
    """Loss between one clone's logits and its target's one-hot.

    Args:
      kind: "least_squares" (sum of squares between softmax and one-hot; the paper's default),
        "cross_entropy" (the paper's "Infomax"), "max_margin" (Carlini-Wagner:
        ``max(-logit_margin, -margin)``, i.e. ``max(max_{j != y} z_j - z_y, -margin)``: flat
        once the target leads by ``margin``) or "poincare" (Struppek et al. 2022: the
        Poincare distance between the L1-normalised logits and the one-hot shrunk by 1e-5).
      z: logits. # [n]
      label: the target class, int scalar.
      margin: for "max_margin" (may be traced).
    """
    onehot = jax.nn.one_hot(label, z.shape[-1], dtype=z.dtype)  # [n]
    if kind == "least_squares":
        return jnp.sum((jax.nn.softmax(z) - onehot) ** 2)
    if kind == "cross_entropy":
        return -jax.nn.log_softmax(z)[label]
    if kind == "max_margin":
        return jnp.maximum(-logit_margin(z, label), -margin)
    if kind == "poincare":
        u = z / jnp.sum(jnp.abs(z))
        v = jnp.clip(onehot, 0.0, 1.0 - 1e-5)
        delta = 2 * jnp.sum((u - v) ** 2) / ((1 - jnp.sum(u**2)) * (1 - jnp.sum(v**2)))
        return jnp.arccosh(1 + delta)
    raise ValueError(f"unknown loss {kind!r}")


def total_variation(x: jax.Array) -> jax.Array:
    """Mean absolute difference of vertical and of horizontal neighbours. # [h, w, c] -> []"""
    return jnp.mean(jnp.abs(x[1:] - x[:-1])) + jnp.mean(jnp.abs(x[:, 1:] - x[:, :-1]))


def gaussian_filter(x: jax.Array, sigma: float) -> jax.Array:
    """Per-channel Gaussian blur, kernel radius ceil(3 sigma), edges replicated.

    Separable: a vertical then a horizontal pass of shifted slices. # [h, w, c] -> [h, w, c]
    """
    h, w, _ = x.shape
    r = max(1, math.ceil(3 * sigma))
    t = np.arange(-r, r + 1)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).tolist()
    xp = jnp.pad(x, ((r, r), (r, r), (0, 0)), mode="edge")
    xp = sum(k[i] * xp[i : i + h] for i in range(2 * r + 1))  # [h, w + 2r, c]
    return sum(k[j] * xp[:, j : j + w] for j in range(2 * r + 1))


def median_filter(x: jax.Array, size: int) -> jax.Array:
    """Per-channel median over a size x size window, edges replicated. # [h, w, c] -> [h, w, c]"""
    h, w, _ = x.shape
    r = size // 2
    xp = jnp.pad(x, ((r, r), (r, r), (0, 0)), mode="edge")
    windows = [xp[i : i + h, j : j + w] for i in range(size) for j in range(size)]
    return jnp.median(jnp.stack(windows), axis=0)


def random_transform(
    x: jax.Array,
    key: jax.Array,
    jitter: int,
    flip: bool,
    zoom: float = 0.0,
    blur: float = 0.0,
    noise: float = 0.0,
) -> jax.Array:
    """A random shift of up to ``jitter`` pixels (edges replicated), optional h-flip, and
    optionally a zoom by a factor in ``1 +- zoom``, a blur of sigma in ``[0, blur]`` pixels and
    Gaussian noise of std ``noise`` (then clipped to [0, 1]).

    Optimising through it makes a clone that works under small changes (a robust clone) rather
    than an adversarial pattern tied to exact pixels. The shift and flip take the two halves of
    ``split(key)``; the others ``fold_in(key, 2 | 3 | 4)``, so turning them on leaves the shift
    and flip draws as they were. # [h, w, c] -> [h, w, c]
    """
    kshift, kflip = jax.random.split(key)
    x = transforms.random_shift(x, kshift, jitter)
    if flip:
        x = transforms.random_flip(x, kflip)
    if zoom > 0:
        kzoom = jax.random.fold_in(key, 2)
        factor = jax.random.uniform(kzoom, (), minval=1 - zoom, maxval=1 + zoom)
        x = transforms.zoom(x, factor, zoom)
    if blur > 0:
        sigma = jax.random.uniform(jax.random.fold_in(key, 3), (), maxval=blur)
        x = transforms.gaussian_blur(x, sigma, math.ceil(3 * blur))
    if noise > 0:
        x = x + noise * jax.random.normal(jax.random.fold_in(key, 4), x.shape, x.dtype)
        x = jnp.clip(x, 0.0, 1.0)
    return x


def objective(
    cfg: InversionConfig,
    apply_fn: ApplyFn,
    params: Any,
    x: Any,
    key: jax.Array | None,
    label: jax.Array,
    decoder: priors.Decoder | None = None,
    prior_params: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """One clone's objective and target confidence (``cfg``'s numbers as constants).

    Args:
      x: the clone: its image [h, w, c], or with a prior its variables (``jaxmia.attacks.priors``).
      key: the step's key for the random transforms; None evaluates the image as it is.
      label: the target class, int scalar.
      decoder, prior_params: the prior (None: pixels).

    Returns:
      (data loss + regularisers, softmax probability of ``label``), scalars.
    """
    return _objective(
        cfg.spec(), cfg.hyper(), apply_fn, params, x, key, label, decoder, prior_params
    )


def _objective(
    spec: ProgramSpec,
    hyper: Hyper,
    apply_fn: ApplyFn,
    params: Any,
    w: Any,
    key: jax.Array | None,
    label: jax.Array,
    decoder: priors.Decoder | None = None,
    prior_params: Any = None,
) -> tuple[jax.Array, jax.Array]:
    """``objective`` with the numeric settings as (possibly traced) ``hyper``."""
    x = priors.image(decoder, prior_params, w)  # [h, w, c]
    if key is None:
        seen = x[None]
    else:
        # One view draws from the step's key itself, as before views existed.
        keys = key[None] if spec.views == 1 else jax.random.split(key, spec.views)
        view = lambda k: random_transform(  # noqa: E731
            x, k, spec.jitter, spec.flip, spec.zoom, spec.blur, spec.noise
        )
        seen = jax.vmap(view)(keys)  # [views, h, w, c]
    z, distance = apply_fn(params, seen), None  # [views, n]
    if isinstance(z, tuple):  # a feature-statistics apply_fn: with the distances [views]
        z, distance = z
    if spec.features and distance is None:
        raise JaxmiaError(
            "inversion.feature_weight: expected an apply_fn that returns (logits, distances), "
            "e.g. recognizer_apply(graphdef, statistics=True)"
        )
    loss = jnp.mean(jax.vmap(lambda zi: data_loss(spec.loss, zi, label, hyper.margin))(z))
    if spec.tv:
        loss = loss + hyper.tv_weight * total_variation(x)
    if spec.l2:
        loss = loss + hyper.l2_weight * jnp.mean(x**2)
    if spec.residual:
        loss = loss + hyper.residual_weight * jnp.mean(w["pixels"] ** 2)
    if spec.coef_penalty:
        loss = loss + hyper.coef_weight * jnp.mean(w["coef"] ** 2)
    if spec.features:
        loss = loss + hyper.feature_weight * jnp.mean(distance)
    if spec.realism:  # D judges the clone as it is, not the views
        loss = loss + hyper.realism_weight * jax.nn.softplus(-decoder.realism(prior_params, x))
    return loss, jnp.mean(jax.nn.softmax(z)[:, label])


def optimizer(
    kind: str, learning_rate: float | jax.Array, momentum: float | jax.Array = 0.9
) -> optax.GradientTransformation:
    """The optax optimizer of ``kind`` (one of OPTIMIZERS); the values may be traced.

    The kind alone fixes the state's structure (none for "sgd", a trace for "momentum", two
    moments and a count for "adam"), so a state made with any values serves every value.
    """
    if kind == "sgd":
        return optax.sgd(learning_rate)
    if kind == "momentum":
        return optax.sgd(learning_rate, momentum=momentum)
    return optax.adam(learning_rate)


def make_optimizer(cfg: InversionConfig) -> optax.GradientTransformation:
    """``cfg``'s optimizer with its values as constants."""
    return optimizer(cfg.optimizer, cfg.learning_rate, cfg.momentum)


def clone_step(
    cfg: InversionConfig,
    apply_fn: ApplyFn,
    params: Any,
    state: _State,
    key: jax.Array,
    label: jax.Array,
    step: jax.Array,
    max_steps: jax.Array,
    decoder: priors.Decoder | None = None,
    prior_params: Any = None,
) -> _State:
    """One step of one clone (state fields without the batch axis; ``cfg``'s numbers as
    constants).

    The objective and confidence are those of the current image: a clone that meets a stopping
    rule is frozen at that image, before any update.
    """
    return _step(
        cfg.spec(),
        cfg.hyper(),
        apply_fn,
        params,
        state,
        key,
        label,
        step,
        max_steps,
        decoder,
        prior_params,
    )


def _step(
    spec: ProgramSpec,
    hyper: Hyper,
    apply_fn: ApplyFn,
    params: Any,
    state: _State,
    key: jax.Array,
    label: jax.Array,
    step: jax.Array,
    max_steps: jax.Array,
    decoder: priors.Decoder | None = None,
    prior_params: Any = None,
) -> _State:
    """``clone_step`` with the numeric settings as (possibly traced) ``hyper``."""
    opt = optimizer(spec.optimizer, hyper.learning_rate, hyper.momentum)
    running = (state.reason == RUNNING) & (step < max_steps)
    step_key = jax.random.fold_in(key, step)
    (loss, conf), grad = jax.value_and_grad(
        lambda w: _objective(
            spec, hyper, apply_fn, params, w, step_key, label, decoder, prior_params
        ),
        has_aux=True,
    )(state.x)
    finite = jnp.isfinite(loss) & _all_finite(grad)

    improved = loss < state.best - hyper.min_delta
    best = jnp.where(running & finite & improved, loss, state.best)
    since = jnp.where(running & finite, jnp.where(improved, 0, state.since + 1), state.since)
    confident = (hyper.stop_confidence > 0) & (conf >= hyper.stop_confidence)
    patient = (hyper.patience > 0) & (since >= hyper.patience)

    updates, opt_state = opt.update(grad, state.opt_state, state.x)
    x = optax.apply_updates(state.x, updates)
    if spec.prior == "pixels":
        x = _denoised(spec, hyper, step, jnp.clip(x, 0.0, 1.0))
    elif spec.residual:
        # A prior's image is clipped as a whole when decoded; its residual is what is filtered.
        x = {**x, "pixels": _denoised(spec, hyper, step, x["pixels"])}
    finite = finite & _all_finite(x)

    reason = jnp.select(
        [~running, ~finite, confident, patient],
        [state.reason, DIVERGED, CONFIDENCE, PATIENCE],
        RUNNING,
    )
    move = running & (reason == RUNNING)
    keep = lambda new, old: jnp.where(move, new, old)  # noqa: E731
    return _State(
        x=jax.tree.map(keep, x, state.x),
        opt_state=jax.tree.map(keep, opt_state, state.opt_state),
        best=best,
        since=since,
        steps=state.steps + move.astype(jnp.int32),
        reason=reason.astype(jnp.int32),
    )


def _denoised(spec: ProgramSpec, hyper: Hyper, step: jax.Array, pixels: jax.Array) -> jax.Array:
    """``pixels`` through the denoiser at its steps (after the first and every k-th). # [h, w, c]"""
    if spec.denoise == "none":
        return pixels
    denoise = {
        "median": lambda v: median_filter(v, spec.denoise_size),
        "gaussian": lambda v: gaussian_filter(v, spec.denoise_sigma),
    }[spec.denoise]
    return jax.lax.cond(step % hyper.denoise_every == 0, denoise, lambda v: v, pixels)


def _all_finite(tree: Any) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(tree)]))


# ---------------------------------------------------------------------------------------------
# The batched program.


@dataclasses.dataclass(frozen=True)
class Program:
    """The jitted pieces for one (apply_fn, spec, decoder); each compiles once per input shape."""

    spec: ProgramSpec
    # (seeds [b,h,w,c], keys [b], prior params) -> _State: the clones' starting variables
    init: Callable
    # (params, state, keys [b], labels [b], step0, max_steps, hyper, prior params) -> _State
    # (state donated)
    steps: Callable
    decode: Callable  # (variables [b, ...], prior params) -> images [b,h,w,c]
    # (params, images [b,h,w,c], labels [b], hyper) -> (loss [b], confidence [b]): the image's
    # objective, without a prior's penalties (so seeds and clones compare)
    evaluate: Callable
    compiled: dict = dataclasses.field(default_factory=dict, compare=False, hash=False)


def make_program(
    apply_fn: ApplyFn, cfg: InversionConfig, decoder: priors.Decoder | None = None
) -> Program:
    """The program for ``apply_fn``, ``cfg``'s structure (``cfg.spec()``) and the prior.

    Cached (``build_program``): configs that differ only in numeric settings, ``check_every`` or
    ``shard`` share one program and its compilations; its jitted pieces take ``cfg.hyper()``.
    """
    spec = cfg.spec()
    if (decoder is None) != (spec.prior == "pixels") or (
        decoder is not None and decoder.kind != spec.prior
    ):
        raise JaxmiaError(
            f"inversion.prior={spec.prior!r}: expected "
            f"{'no prior' if spec.prior == 'pixels' else 'its fitted prior'}, got "
            f"{decoder.kind if decoder else 'none'}"
        )
    if spec.realism and (decoder is None or decoder.realism is None):
        raise JaxmiaError(
            f"inversion.realism_weight={cfg.realism_weight}: the prior has no discriminator; "
            "expected the gan prior of a GAN tuned by jaxmia prior"
        )
    return build_program(apply_fn, spec, decoder)


@functools.lru_cache(maxsize=32)
def build_program(
    apply_fn: ApplyFn, spec: ProgramSpec, decoder: priors.Decoder | None = None
) -> Program:
    """The program for ``apply_fn``, ``spec`` and ``decoder`` (cached: the same triple reuses
    its compilations)."""
    # The state's structure depends on the optimizer's kind alone: the values are placeholders.
    opt = optimizer(spec.optimizer, 1.0, 0.0)

    def init(seeds, keys, prior_params):
        b = seeds.shape[0]
        x = jax.vmap(lambda s, k: priors.start(decoder, prior_params, s, k, spec.residual))(
            seeds, keys
        )
        return _State(
            x=x,
            opt_state=jax.vmap(opt.init)(x),
            best=jnp.full((b,), jnp.inf, seeds.dtype),
            since=jnp.zeros((b,), jnp.int32),
            steps=jnp.zeros((b,), jnp.int32),
            reason=jnp.full((b,), RUNNING, jnp.int32),
        )

    step_all = jax.vmap(
        lambda hyper, params, s, k, y, t, n, pp: _step(
            spec, hyper, apply_fn, params, s, k, y, t, n, decoder, pp
        ),
        in_axes=(None, None, 0, 0, 0, None, None, None),
    )

    def steps(params, state, keys, labels, step0, max_steps, hyper, prior_params):
        def body(i, s):
            return step_all(hyper, params, s, keys, labels, step0 + i, max_steps, prior_params)

        if spec.steps_per_call == 1:
            return body(0, state)
        if spec.steps_per_call > 1:
            return jax.lax.fori_loop(0, spec.steps_per_call, body, state)

        def cond(carry):
            i, s = carry
            return (step0 + i < max_steps) & jnp.any(s.reason == RUNNING)

        return jax.lax.while_loop(cond, lambda c: (c[0] + 1, body(*c)), (0, state))[1]

    def decode(x, prior_params):
        return jax.vmap(lambda v: priors.image(decoder, prior_params, v))(x)

    image_spec = _image_spec(spec)

    def evaluate(params, x, labels, hyper):
        one = lambda xi, yi: _objective(image_spec, hyper, apply_fn, params, xi, None, yi)  # noqa: E731
        return jax.vmap(one)(x, labels)

    return Program(
        spec,
        jax.jit(init),
        jax.jit(steps, donate_argnums=1),
        jax.jit(decode),
        jax.jit(evaluate),
    )


def _image_spec(spec: ProgramSpec) -> ProgramSpec:
    """The spec of an image's own objective: a prior's penalties left out."""
    return dataclasses.replace(
        spec, prior="pixels", residual=False, coef_penalty=False, features=False, realism=False
    )


@functools.lru_cache(maxsize=32)
def recognizer_apply(graphdef: Any, statistics: bool = False) -> ApplyFn:
    """``apply_fn`` of a ``models`` recognizer; the same arguments give the same (cached) fn.

    Its logits with the small-channel convolutions rewritten for speed (``fastconv``; the same
    function to float32 rounding); with ``statistics`` (for ``feature_weight``; a ResNet) the
    logits and each image's feature-statistics distance (``models.logits_and_statistics``).
    """
    if statistics:
        return functools.partial(models.logits_and_statistics, graphdef)
    return functools.partial(fastconv.logits, graphdef)


def _compiled(program: Program, name: str, *args) -> tuple[Callable, float]:
    """A jitted piece compiled ahead of time once per input shape; returns (fn, compile seconds)."""
    leaves, treedef = jax.tree.flatten(args)
    sig = (name, treedef, tuple((jnp.shape(a), jnp.result_type(a), _sharding(a)) for a in leaves))
    if sig in program.compiled:
        return program.compiled[sig], 0.0
    t = time.perf_counter()
    program.compiled[sig] = getattr(program, name).lower(*args).compile()
    return program.compiled[sig], time.perf_counter() - t


def _sharding(a: Any) -> Any:
    # Committed arrays compile for their placement; Python scalars and uncommitted arrays follow.
    return a.sharding if isinstance(a, jax.Array) and a.committed else None


@dataclasses.dataclass
class Timing:
    """Seconds spent compiling apart from running, and the image-gradients computed."""

    compile_s: float = 0.0
    run_s: float = 0.0
    gradients: int = 0  # clones x steps executed (frozen clones included: they cost the same)

    @property
    def gradients_per_s(self) -> float:
        return self.gradients / self.run_s if self.run_s > 0 else 0.0


def invert_batch(
    apply_fn: ApplyFn,
    params: Any,
    seeds: jax.Array,
    labels: jax.Array,
    keys: jax.Array,
    cfg: InversionConfig,
    steps: int,
    timing: Timing | None = None,
    prior: priors.Prior | None = None,
) -> Records:
    """Inverts one batch of clones as one program (no chunking).

    Args:
      apply_fn: ``(params, images [b, h, w, c]) -> logits [b, n]``; pass the same function
        object again to reuse compilations (see ``recognizer_apply``).
      params: the recognizer's parameters.
      seeds: start images in [0, 1]. # [b, h, w, c]
      labels: target classes. # [b] int
      keys: one PRNG key per clone. # [b]
      cfg: the settings (its ``spec()`` picks the program, its ``hyper()`` goes in traced).
      steps: the most updates per clone (> 0).
      timing: accumulates compile and run seconds if given.
      prior: the fitted prior ``cfg.prior`` names (None for pixels).

    Returns:
      Records with the final images and their per-clone results.
    """
    if steps < 1:
        raise JaxmiaError(f"steps={steps}: expected a positive number of steps")
    decoder, prior_params = prior if prior is not None else (None, None)
    program = make_program(apply_fn, cfg, decoder)
    hyper = cfg.hyper()
    seeds = jnp.asarray(seeds, jnp.float32)
    labels = jnp.asarray(labels, jnp.int32)
    n = seeds.shape[0]
    mesh = sharding.clone_mesh(n) if cfg.shard else None
    if mesh is not None:  # padded to a multiple of the devices; the padding is dropped below
        seeds, labels, keys = sharding.shard_clones(mesh, (seeds, labels, keys))
        params, prior_params = sharding.replicate(mesh, (params, prior_params))
    max_steps = jnp.int32(steps)
    per_call = program.spec.steps_per_call or steps

    init, c0 = _compiled(program, "init", seeds, keys, prior_params)
    state = init(seeds, keys, prior_params)
    if mesh is not None:  # constants such as `best` would otherwise come out replicated
        state = sharding.shard_clones(mesh, state)
    step0 = jnp.int32(0)
    run_args = (params, state, keys, labels, step0, max_steps, hyper, prior_params)
    run, c1 = _compiled(program, "steps", *run_args)
    decode, c2 = _compiled(program, "decode", state.x, prior_params)
    evaluate, c3 = _compiled(program, "evaluate", params, seeds, labels, hyper)
    jax.block_until_ready(state)

    t = time.perf_counter()
    calls_per_check = max(1, cfg.check_every // per_call)
    done = 0
    while done < steps:
        state = run(params, state, keys, labels, jnp.int32(done), max_steps, hyper, prior_params)
        done += per_call
        if (done // per_call) % calls_per_check == 0 and not bool(jnp.any(state.reason == RUNNING)):
            break
    final = decode(state.x, prior_params)
    loss, conf = evaluate(params, final, labels, hyper)
    out = sharding.to_host((final, state.steps, loss, conf, state.reason))
    x, taken, loss, conf, reason = (np.asarray(a)[:n] for a in out)
    if timing is not None:
        timing.run_s += time.perf_counter() - t
        timing.compile_s += c0 + c1 + c2 + c3
        # A while_loop program runs until every clone stopped, so its longest clone counts.
        executed = min(done, steps) if program.spec.steps_per_call else int(taken.max())
        timing.gradients += n * executed
    reason = np.where(reason == RUNNING, STEPS, reason).astype(np.int32)
    return Records(np.asarray(x), taken, loss, conf, reason)


def evaluate(
    apply_fn: ApplyFn,
    params: Any,
    images: jax.Array,
    labels: jax.Array,
    cfg: InversionConfig,
    timing: Timing | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Objective and target confidence of images as they are (e.g. seeds). # [b] each"""
    program = build_program(apply_fn, _image_spec(cfg.spec()))
    images, labels = jnp.asarray(images, jnp.float32), jnp.asarray(labels, jnp.int32)
    args = (params, images, labels, cfg.hyper())
    fn, compile_s = _compiled(program, "evaluate", *args)
    if timing is not None:
        timing.compile_s += compile_s
    loss, conf = jax.device_get(fn(*args))
    return loss, conf


def bytes_per_clone(model_config: models.ModelConfig, cfg: InversionConfig) -> int:
    """A rough upper estimate of the memory one clone needs during a step.

    The image, its gradient and up to two optimizer moments, plus every activation of the
    forward pass kept for the backward pass and its cotangent (x 4 for pre-/post-ReLU and pooling).
    """
    h, w = model_config.image_size
    image = h * w * model_config.channels
    act = 0
    if model_config.arch == "paper":
        for cout in model_config.conv_features:
            act += h * w * cout
            h, w = h // 2, w // 2
        act += sum(model_config.dense_features) + model_config.num_classes
    else:
        # Each stage at its resolution: every convolution's output and its norm's (x 2 per conv).
        h, w = -(-h // model_config.stem_stride), -(-w // model_config.stem_stride)
        act += 2 * h * w * model_config.widths[0]
        if model_config.stem_pool:
            h, w = -(-h // 2), -(-w // 2)
        for s, (width, n) in enumerate(zip(model_config.widths, model_config.blocks, strict=True)):
            if s:
                h, w = -(-h // 2), -(-w // 2)
            convs = 2 if model_config.block == "basic" else 3
            act += 2 * n * (convs + 1) * h * w * width * model_config.expansion
    if cfg.prior == "gan":  # the generator's activations: 4x4x512 ... 32x32x64, then 64x64x3
        act += sum(s * s * c for s, c in ((4, 512), (8, 256), (16, 128), (32, 64), (64, 3)))
    if cfg.realism_weight:  # the discriminator's: each of its 4 layers halves the image
        h, w = model_config.image_size
        act += sum(h * w * c // 4 ** (i + 1) for i, c in enumerate((64, 128, 256, 512)))
    moments = {"sgd": 0, "momentum": 1, "adam": 2}[cfg.optimizer]
    return 4 * (image * (4 + moments) + 4 * act)


def chunk_size(
    total: int,
    max_batch: int,
    per_clone_bytes: int,
    memory_bytes: int | None = None,
    cpu_cache: bool = True,
) -> int:
    """Clones per chunk: at most ``max_batch``, a quarter of the memory and (on CPU) what stays
    in cache; chunks equal-sized.

    Args:
      total: clones to invert.
      max_batch: the configured cap (> 0).
      per_clone_bytes: from ``bytes_per_clone``.
      memory_bytes: memory available to the program; None reads the device's limit or, on CPU,
        the host's available memory.
      cpu_cache: on CPU, also cap each device's share at the largest power of two of clones
        within ``CPU_CACHE_BYTES``.
    """
    if memory_bytes is None:
        memory_bytes = _available_memory()
    per = max(1, per_clone_bytes)
    cap = min(max_batch, memory_bytes // 4 // per)
    if cpu_cache and jax.default_backend() == "cpu":
        fit = max(1, CPU_CACHE_BYTES // per)
        cap = min(cap, 2 ** (fit.bit_length() - 1) * len(jax.devices()))
    chunks = math.ceil(total / max(1, cap))
    return math.ceil(total / chunks)


def _available_memory() -> int:
    stats = jax.local_devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def chunks(total: int, size: int) -> Iterator[tuple[int, slice]]:
    """(chunk index, slice) over ``total`` items in chunks of ``size`` (the last may be short)."""
    for i, start in enumerate(range(0, total, size)):
        yield i, slice(start, min(start + size, total))


def pad_to(a: Any, size: int) -> Any:
    """Pads every leaf's leading axis to ``size`` by repeating its last row (a full-shape chunk)."""
    return jax.tree.map(lambda v: jnp.concatenate([v, jnp.repeat(v[-1:], size - v.shape[0], 0)]), a)


def invert(
    apply_fn: ApplyFn,
    params: Any,
    seeds: jax.Array,
    labels: jax.Array,
    keys: jax.Array,
    cfg: InversionConfig,
    steps: int,
    *,
    size: int,
    timing: Timing | None = None,
    prior: priors.Prior | None = None,
) -> Records:
    """``invert_batch`` over chunks of ``size`` clones (see ``chunk_size``), results concatenated.

    Per-clone keys fix the randomness, so the result does not depend on the chunking.
    """
    total = seeds.shape[0]
    parts = []
    for _, sl in chunks(total, size):
        n = sl.stop - sl.start
        batch = pad_to((jnp.asarray(seeds[sl]), jnp.asarray(labels[sl]), keys[sl]), size)
        rec = invert_batch(apply_fn, params, *batch, cfg, steps, timing, prior)
        parts.append(Records(*(f[:n] for f in rec)))
    return Records(*(np.concatenate(f) for f in zip(*parts, strict=True)))
