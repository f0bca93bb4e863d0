"""Training-time defences against model inversion: what they change in R_T's training step.

The ``train.defence`` section (``jaxmia.config``), off by default:

- label smoothing, positive (known to raise leakage: Struppek et al. 2024) or negative (the
  strongest simple defence known), ramped in linearly (``smoothing_at``);
- DP-SGD (Abadi et al. 2016): each example's gradient clipped to an L2 bound by optax's
  ``per_example_global_norm_clip``, Gaussian noise of std ``noise * clip`` added to their sum,
  divided by the batch (``private_gradients``); the budget epsilon at delta from the RDP
  accountant of ``dp_accounting`` (``epsilon``), recorded with the checkpoint;
- MID (Wang et al. 2021): a variational information bottleneck before the classifier
  (``models.Bottleneck``), its KL divergence weighted in the loss.

Plain weight decay (``train.weight_decay``) and dropout (``model.dropout``) are the
comparison points of the defence sweep (``jaxmia.stages.defend``); they need nothing here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import dp_accounting
import jax
import ml_collections
import optax

from jaxmia.errors import JaxmiaError


@dataclasses.dataclass(frozen=True)
class Defence:
    """The training-time defences of one recognizer (hashable: a static argument of the step).

    The defaults (all off) are the ``train.defence`` config section's (``jaxmia.config``).
    """

    # Label smoothing in (-1, 1): > 0 the usual smoothing (known to *raise* leakage), < 0
    # negative smoothing (Struppek et al. 2024: the strongest simple defence), reached linearly
    # from 0 over the first smoothing_ramp_epochs (negative smoothing from the start does not
    # train). Other than 0, it replaces train.label_smoothing (the recipe's) for R_T.
    label_smoothing: float = 0.0
    smoothing_ramp_epochs: int = 0
    # DP-SGD (Abadi et al. 2016): each example's gradient clipped to L2 norm dp_clip, Gaussian
    # noise of std dp_noise * dp_clip added to their sum; epsilon at dp_delta by an RDP
    # accountant, recorded with the checkpoint. Paper CNN only (batch norm mixes examples).
    dp: bool = False
    dp_clip: float = 1.0
    dp_noise: float = 1.0
    dp_delta: float = 1e-5
    # MID (Wang et al. 2021): a variational bottleneck of this width before the classifier
    # (0: none), its KL divergence weighted by bottleneck_weight in the loss.
    bottleneck: int = 0
    bottleneck_weight: float = 0.0
    # For comparison, the plain regularisers as R_T's own: >= 0 replaces train.weight_decay
    # (decoupled, under adam as adamw) / model.dropout for R_T only; -1: R_T's are R_E's.
    weight_decay: float = -1.0
    dropout: float = -1.0
    # >= 1: R_T's epochs (DP-SGD's are costlier, and usually fewer); -1: train.epochs.
    epochs: int = -1

    @classmethod
    def from_config(cls, train_config: ml_collections.ConfigDict) -> Defence:
        """The ``train.defence`` section (none in an older config: no defence), checked."""
        section = train_config.get("defence")
        d = cls(**section.to_dict()) if section is not None else cls()
        check(d)
        return d

    @property
    def private(self) -> tuple[float, float] | None:
        """(clip bound, noise std) of DP-SGD, or None: the train step's static argument."""
        return (self.dp_clip, self.dp_noise * self.dp_clip) if self.dp else None

    @property
    def active(self) -> bool:
        return bool(
            self.label_smoothing or self.dp or self.bottleneck
            or self.weight_decay >= 0 or self.dropout >= 0 or self.epochs > 0
        )  # fmt: skip


def _field(name: str, why: str) -> JaxmiaError:
    return JaxmiaError(f"config field train.defence.{name}: {why}")


def check(d: Defence) -> None:
    """Refuses nonsensical defence settings, one line naming the field."""
    if not -1 < d.label_smoothing < 1:
        raise _field("label_smoothing", f"expected in (-1, 1), got {d.label_smoothing}")
    if isinstance(d.smoothing_ramp_epochs, bool) or d.smoothing_ramp_epochs < 0:
        raise _field("smoothing_ramp_epochs", f"expected >= 0, got {d.smoothing_ramp_epochs}")
    if d.smoothing_ramp_epochs and not d.label_smoothing:
        raise _field("smoothing_ramp_epochs", "applies to a label_smoothing other than 0")
    if d.dp:
        if not 0 < d.dp_clip < float("inf"):
            raise _field("dp_clip", f"expected a finite L2 bound > 0, got {d.dp_clip}")
        if not 0 <= d.dp_noise < float("inf"):
            raise _field("dp_noise", f"expected a finite noise multiplier >= 0, got {d.dp_noise}")
        if not 0 < d.dp_delta < 1:
            raise _field("dp_delta", f"expected in (0, 1), got {d.dp_delta}")
    else:
        default = Defence()
        for name in ("dp_clip", "dp_noise", "dp_delta"):
            if getattr(d, name) != getattr(default, name):
                raise _field(name, "applies with train.defence.dp=True only")
    if isinstance(d.bottleneck, bool) or not isinstance(d.bottleneck, int) or d.bottleneck < 0:
        raise _field("bottleneck", f"expected a width >= 0 (0: none), got {d.bottleneck!r}")
    if d.bottleneck and not 0 < d.bottleneck_weight < float("inf"):
        raise _field(
            "bottleneck_weight", f"expected > 0 with a bottleneck, got {d.bottleneck_weight}"
        )
    if d.bottleneck_weight and not d.bottleneck:
        raise _field("bottleneck_weight", "applies with train.defence.bottleneck > 0 only")
    if not (d.weight_decay == -1 or 0 <= d.weight_decay < float("inf")):
        raise _field(
            "weight_decay", f"expected >= 0, or -1 for train.weight_decay; got {d.weight_decay}"
        )
    if not (d.dropout == -1 or 0 <= d.dropout < 1):
        raise _field("dropout", f"expected in [0, 1), or -1 for model.dropout; got {d.dropout}")
    if (
        isinstance(d.epochs, bool)
        or not isinstance(d.epochs, int)
        or not (d.epochs == -1 or d.epochs >= 1)
    ):
        raise _field("epochs", f"expected >= 1, or -1 for train.epochs; got {d.epochs!r}")


def effective_train(train_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The train section R_T trains with: the defence's weight decay and epochs in place of the
    recipe's.

    Decoupled decay under adam is adamw (optax's adamw at decay 0 is adam). DP-SGD is usually
    run for fewer (and costlier) epochs than the recipe's, hence its own count.
    """
    d = Defence.from_config(train_config)
    if d.weight_decay < 0 and d.epochs < 0:
        return train_config
    out = ml_collections.ConfigDict(train_config.to_dict())
    if d.epochs > 0:
        out.epochs = int(d.epochs)
    if d.weight_decay >= 0:
        out.weight_decay = float(d.weight_decay)
        if out.optimizer == "adam" and d.weight_decay > 0:
            out.optimizer = "adamw"
    return out


def check_model(d: Defence, arch: str) -> None:
    """DP-SGD's per-example gradients exist only where no batch norm mixes the examples."""
    if d.dp and arch != "paper":
        raise _field(
            "dp", f"DP-SGD needs per-example gradients, which batch norm ({arch}) mixes; "
            "expected model.arch=paper",
        )  # fmt: skip


def smoothing_at(d: Defence, step: int, steps_per_epoch: int) -> float:
    """The label smoothing of (0-based) step: linear from 0 to ``label_smoothing`` over the ramp."""
    ramp = d.smoothing_ramp_epochs * steps_per_epoch
    if ramp == 0:
        return float(d.label_smoothing)
    return float(d.label_smoothing) * min(1.0, (step + 1) / ramp)


def private_gradients(
    loss_fn: Callable, params, batch: tuple, key: jax.Array, clip: float, noise_std: float
):
    """DP-SGD's gradient of a batch: per-example gradients clipped, summed, noised, averaged.

    Args:
      loss_fn: ``loss_fn(params, *example) -> (loss, aux)`` of one example (its arrays
        without the batch axis).
      params: the weights.
      batch: arrays with the batch axis first, one example each. # ([b, ...], ...)
      key: the noise's PRNG key.
      clip: each example's gradient is scaled to L2 norm <= clip (over all weights).
      noise_std: std of the Gaussian added to the sum of the clipped gradients.

    Returns:
      (the per-example losses [b], the private gradient (a pytree like params)).
    """
    (losses, _), grads = jax.vmap(
        jax.value_and_grad(loss_fn, has_aux=True), in_axes=(None, *([0] * len(batch)))
    )(params, *batch)
    flat, tree = jax.tree.flatten(grads)
    size = flat[0].shape[0]
    summed, _ = optax.per_example_global_norm_clip(flat, clip)
    keys = jax.random.split(key, len(summed))
    noised = [
        (g + noise_std * jax.random.normal(k, g.shape, g.dtype)) / size
        for g, k in zip(summed, keys, strict=True)
    ]
    return losses, jax.tree.unflatten(tree, noised)


_ORDERS = (*range(2, 65), 80, 96, 128, 192, 256, 512, 1024)


def epsilon(noise: float, batch_size: int, examples: int, steps: int, delta: float) -> float:
    """DP-SGD's epsilon at delta by Renyi DP accounting (``dp_accounting``).

    Each step is a Gaussian mechanism of noise multiplier ``noise`` on a Poisson sample of
    rate batch_size / examples, composed ``steps`` times: the accounting of Abadi et al. and of
    Opacus / TF Privacy. jaxmia's batches are shuffled, not Poisson-sampled; this is the usual
    approximation for that. inf for no noise.
    """
    if noise == 0:
        return float("inf")
    q = min(1.0, batch_size / examples)
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(noise)), steps
    )
    # integer orders: computed exactly (fractional ones need a series that may not converge)
    accountant = dp_accounting.rdp.RdpAccountant(orders=_ORDERS)
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def record(d: Defence, *, batch_size: int, examples: int, steps: int) -> dict:
    """The defence as recorded with a checkpoint, with DP-SGD's epsilon for ``steps`` steps."""
    out = {k: v for k, v in dataclasses.asdict(d).items() if v != getattr(Defence(), k)}
    if d.dp:
        out["privacy"] = {
            "epsilon": epsilon(d.dp_noise, batch_size, examples, steps, d.dp_delta),
            "delta": d.dp_delta,
            "noise_multiplier": d.dp_noise,
            "clip": d.dp_clip,
            "steps": steps,
            "batch_size": batch_size,
            "examples": examples,
            "accountant": "dp_accounting RDP, Poisson sampling at rate batch_size / examples",
        }
    return out


def kl_weight(d: Defence) -> float:
    return float(d.bottleneck_weight) if d.bottleneck else 0.0


def undefended(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of a jaxmia config without training-time defences: R_E's and the judges'."""
    out = ml_collections.ConfigDict(config.to_dict())
    if "defence" in out.train:
        out.train.defence = ml_collections.ConfigDict(dataclasses.asdict(Defence()))
    return out
