"""The adversarial control: each clone's seed plus a small targeted PGD pattern against R_T.

A judge of clones must tell a face of the target from an image that only makes R_T say the
target. The control is the cheapest such image: the clone's own seed, moved by a targeted
L-infinity projected gradient ascent (Madry et al., 2018) at most ``epsilon`` per pixel, so it
still looks like the seed. R_T (and often an R_E of the same architecture) accepts it; a robust
judge must not.

The loss is the max-margin loss of Carlini and Wagner (2017): R_T's target logit minus its highest
other logit, maximised by signed-gradient steps, each followed by the projection onto the
``epsilon``-ball around the start and onto [0, 1]. It starts at the seed itself, without the
usual random start: a control must be reproducible, and so it needs no PRNG key.

The attack runs on the device as one jitted program per batch shape (``jaxmia.batching``); each
image's gradient is its own (``pgd_step`` is per image, vmapped over the batch).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxmia import batching
from jaxmia.attacks import inversion as inv
from jaxmia.errors import JaxmiaError
from jaxmia.judges import scores
from jaxmia.recognizers import fastconv

if TYPE_CHECKING:
    from jaxmia.checkpoint import LoadedRecognizer


@dataclasses.dataclass(frozen=True)
class PGDSettings:
    """The attack's budget and schedule (hashable: the jitted attack takes it as static).

    Attributes:
      epsilon: L-infinity budget around the start image, in (0, 1].
      step_size: change of every pixel per step, > 0.
      steps: ascent steps, >= 1.

    The defaults are the ``judges.pgd`` config section's: 16 grey levels in 30 steps, which R_T
    accepts for every control on AT&T (the usual imperceptible 8 levels in 20 steps: 67%).
    """

    epsilon: float = 16 / 255
    step_size: float = 2 / 255
    steps: int = 30

    def __post_init__(self):
        if not 0 < self.epsilon <= 1:
            raise JaxmiaError(f"pgd epsilon={self.epsilon}: expected a budget in (0, 1]")
        if not 0 < self.step_size < np.inf:
            raise JaxmiaError(f"pgd step_size={self.step_size}: expected finite > 0")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise JaxmiaError(f"pgd steps={self.steps!r}: expected an integer >= 1")


def project(x: jax.Array, start: jax.Array, epsilon: float) -> jax.Array:
    """The nearest image to ``x`` within ``epsilon`` of ``start`` and in [0, 1]. # [...]

    Clipping to the ball first and to [0, 1] second stays inside the ball, because ``start`` is
    in [0, 1] and so the two intervals of each pixel meet.
    """
    return jnp.clip(jnp.clip(x, start - epsilon, start + epsilon), 0.0, 1.0)


def pgd_step(
    graphdef: nnx.GraphDef,
    params: nnx.State | dict,
    x: jax.Array,
    start: jax.Array,
    target: jax.Array,
    settings: PGDSettings,
) -> jax.Array:
    """One signed-gradient ascent step of one image's target margin, then the projection.

    Args:
      graphdef: R_T's graph.
      params: R_T's state (inference: batch norm on its running statistics).
      x: the current image. # [h, w, c]
      start: the image the attack started from, in [0, 1]. # [h, w, c]
      target: R_T's label of the target identity, int scalar.
      settings: the budget and step size.

    Returns:
      The next image. # [h, w, c]
    """

    def margin(image):  # [h, w, c] -> []
        return inv.logit_margin(fastconv.logits(graphdef, params, image[None])[0], target)

    x = x + settings.step_size * jnp.sign(jax.grad(margin)(x))
    return project(x, start, settings.epsilon)


@functools.partial(jax.jit, static_argnums=(0, 4))
def pgd(
    graphdef: nnx.GraphDef,
    params: nnx.State | dict,
    start: jax.Array,
    targets: jax.Array,
    settings: PGDSettings,
) -> jax.Array:
    """``settings.steps`` of ``pgd_step`` on every image of a batch.

    Args:
      graphdef: R_T's graph (static).
      params: R_T's state.
      start: the images to start from, in [0, 1]. # [b, h, w, c]
      targets: R_T's label of each image's target. # [b] int
      settings: the budget and schedule (static: one compile per settings and shape).

    Returns:
      The adversarial images, within ``settings.epsilon`` of ``start`` and in [0, 1]. # [b, h, w, c]
    """
    step = jax.vmap(lambda x, s, t: pgd_step(graphdef, params, x, s, t, settings))
    return jax.lax.fori_loop(0, settings.steps, lambda _, x: step(x, start, targets), start)


def adversarial_controls(
    recognizer: LoadedRecognizer,
    seeds: np.ndarray,
    targets: np.ndarray,
    settings: PGDSettings,
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> np.ndarray:
    """The PGD control of every seed, batch by batch (the last batch padded: one compile).

    Args:
      recognizer: R_T (graphdef, params, config).
      seeds: the clones' seed images, in [0, 1]. # [n, h, w, c]
      targets: R_T's label of each seed's target identity. # [n]
      settings: the attack's budget and schedule.
      batch_size: images per compiled call.
      progress: show a progress bar.

    Returns:
      The adversarial images. # [n, h, w, c] float32

    Raises:
      JaxmiaError: images R_T does not take, values outside [0, 1], or targets that do not fit.
    """
    seeds = np.asarray(seeds, np.float32)
    targets = np.asarray(targets, np.int32)
    if seeds.ndim != 4:
        raise JaxmiaError(f"adversarial seeds: shape {seeds.shape}, expected [n, h, w, c]")
    scores.check_image_shape(seeds, recognizer, "adversarial seeds", "target")
    # Outside [0, 1] the projection could not keep both the budget and the image range.
    if seeds.size and not (np.all(seeds >= 0) and np.all(seeds <= 1)):
        raise JaxmiaError("adversarial seeds: expected values in [0, 1] (finite)")
    k = recognizer.config.num_classes
    if targets.shape != (len(seeds),) or np.any((targets < 0) | (targets >= k)):
        raise JaxmiaError(
            f"adversarial targets: expected {len(seeds)} labels in [0, {k}), "
            f"got shape {targets.shape}"
        )
    return batching.map_batches(
        lambda x, t: pgd(recognizer.graphdef, recognizer.params, x, t, settings),
        seeds,
        targets,
        sizes=batching.sizes_for(len(seeds), batch_size),
        progress=progress,
        desc="PGD control",
    )
