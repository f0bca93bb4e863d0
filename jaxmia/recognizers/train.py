"""Training recognizers with optax: a jitted step, test accuracy per epoch, orbax checkpoints.

``fit`` trains one recognizer in memory (and, given a workdir, claims it for its settings,
checkpoints every few epochs and resumes from the latest checkpoint). With ``train.stream`` it
reads its batches from a ``stream.Source`` through grain instead (the array_record cache, or
arrays) and splits each over every device (``jaxmia.data.stream``): data-parallel, memory flat in
the data set's size (the per-epoch accuracies stream the sets once more, in order). The
``jaxmia train`` stage (``jaxmia.stages.train``) loads faces, makes the paper's split, and trains
the recognizer(s) the config asks for through ``make_job`` and ``run_job``, as the experiment
trains R_T and R_E.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from flax import nnx

from jaxmia import batching, checkpoint, files, sharding, transforms
from jaxmia import workdir as workdir_lib
from jaxmia.data import faces as faces_lib
from jaxmia.data import splits, stream
from jaxmia.errors import JaxmiaError
from jaxmia.recognizers import defences, models

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")
RECOGNIZERS = ("all", "target", "evaluation", "both")
# Every role a checkpoint may have; its position keys the initialisation.
KEYED_ROLES = (*RECOGNIZERS, "evaluation_other")
# The roles train.defence applies to: the recognizer under attack, never the judges.
DEFENDED = ("all", "target")
ROLES = {
    "all": ("all",),
    "target": ("target",),
    "evaluation": ("evaluation",),
    "both": ("target", "evaluation"),
}
EVAL_BATCH = 256
# A recognizer folder's settings record (jaxmia.workdir): a rerun resumes only with equal ones.
RECORD = "training.json"


def check_train_config(cfg: ml_collections.ConfigDict) -> None:
    """Refuses a ``train`` section with a setting that would have no effect or no meaning."""
    if cfg.optimizer not in OPTIMIZERS:
        raise JaxmiaError(
            f"config field train.optimizer: expected one of {OPTIMIZERS}, got {cfg.optimizer!r}"
        )
    if cfg.schedule not in SCHEDULES:
        raise JaxmiaError(
            f"config field train.schedule: expected one of {SCHEDULES}, got {cfg.schedule!r}"
        )
    if not 0 < cfg.learning_rate < float("inf"):
        raise JaxmiaError(
            f"config field train.learning_rate: expected a finite rate > 0, got {cfg.learning_rate}"
        )
    if cfg.weight_decay < 0:
        raise JaxmiaError(f"config field train.weight_decay: expected >= 0, got {cfg.weight_decay}")
    if cfg.weight_decay and cfg.optimizer == "adam":
        # optax.adam has no decay term, and an L2 term under Adam's scaling is not weight decay.
        raise JaxmiaError(
            f"config field train.weight_decay={cfg.weight_decay}: adam has no weight decay; use "
            "train.optimizer=adamw (decoupled decay) or sgd (L2)"
        )
    if not 0 <= cfg.momentum < 1:
        raise JaxmiaError(f"config field train.momentum: expected in [0, 1), got {cfg.momentum}")
    if (cfg.momentum or cfg.nesterov) and cfg.optimizer != "sgd":
        raise JaxmiaError(
            f"config fields train.momentum/nesterov: apply to train.optimizer=sgd only, not "
            f"{cfg.optimizer!r} (its moments are b1/b2 of optax.{cfg.optimizer})"
        )
    if cfg.nesterov and not cfg.momentum:
        raise JaxmiaError("config field train.nesterov: needs train.momentum > 0")
    for name in ("epochs", "batch_size", "checkpoint_every"):
        if cfg[name] < 1:
            raise JaxmiaError(f"config field train.{name}: expected >= 1, got {cfg[name]}")
    if not 0 <= cfg.label_smoothing < 1:
        raise JaxmiaError(
            f"config field train.label_smoothing: expected in [0, 1), got {cfg.label_smoothing}"
        )
    if not 0 < cfg.crop_scale <= 1:
        raise JaxmiaError(
            f"config field train.crop_scale: expected in (0, 1] (1: shifts, no crops), "
            f"got {cfg.crop_scale}"
        )
    if not 0 <= cfg.saturation <= 1:
        raise JaxmiaError(
            f"config field train.saturation: expected in [0, 1], got {cfg.saturation}"
        )
    if cfg.warmup_epochs < 0:
        raise JaxmiaError(
            f"config field train.warmup_epochs: expected >= 0, got {cfg.warmup_epochs}"
        )
    if cfg.get("flip_copies", False) and cfg.get("stream", False):
        raise JaxmiaError(
            "config field train.flip_copies: applies to images in memory, not train.stream=True"
        )
    if cfg.get("flip_copies", False) and defences.Defence.from_config(cfg).private is not None:
        # DP-SGD's accounting counts examples: a photo and its copy would be two
        raise JaxmiaError(
            "config field train.flip_copies: DP-SGD's guarantee is per example, and a photo's "
            "copy is another; expected train.flip_copies=False with train.defence.dp"
        )
    defences.Defence.from_config(cfg)


def make_optimizer(
    cfg: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """The optimizer and learning-rate schedule the train config names (checked first)."""
    check_train_config(cfg)
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
    return _optimizer(
        cfg.optimizer,
        cfg.schedule,
        float(cfg.learning_rate),
        warmup,
        total,
        float(cfg.weight_decay),
        float(cfg.momentum),
        bool(cfg.nesterov),
    )


# Cached so that equal settings give the same (hashable) transformation: the jitted train step
# takes it as a static argument, and a fresh one per fit() would recompile the step every time.
@functools.lru_cache(maxsize=64)
def _optimizer(optimizer, schedule, learning_rate, warmup, total, weight_decay, momentum, nesterov):
    if schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, total)
    else:
        lr = optax.join_schedules(
            [
                optax.linear_schedule(0.0, learning_rate, warmup),
                optax.constant_schedule(learning_rate),
            ],
            [warmup],
        )
    if optimizer == "adam":
        return optax.adam(lr)
    if optimizer == "adamw":
        return optax.adamw(lr, weight_decay=weight_decay)
    sgd = optax.sgd(lr, momentum=momentum or None, nesterov=nesterov)
    return optax.chain(optax.add_decayed_weights(weight_decay), sgd) if weight_decay else sgd


@dataclasses.dataclass(frozen=True)
class Augment:
    """Training augmentation (static: one compiled step per setting)."""

    max_shift: int = 4  # pixels, when crop_scale is 1
    crop_scale: float = 1.0  # < 1: random resized crops of [crop_scale, 1] of the area
    saturation: float = 0.0  # RGB: saturation factor in [1 - s, 1 + s]

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> Augment | None:
        if not cfg.augment:
            return None
        return cls(crop_scale=float(cfg.crop_scale), saturation=float(cfg.saturation))


def augment(x: jax.Array, key: jax.Array, aug: Augment = Augment()) -> jax.Array:
    """A random shift (or resized crop), horizontal flip, brightness, contrast and saturation
    of one image. # [h, w, c]"""
    k_shift, k_flip, k_bright, k_contrast = jax.random.split(key, 4)
    if aug.crop_scale < 1:
        x = transforms.random_resized_crop(x, k_shift, aug.crop_scale)
    else:
        x = transforms.random_shift(x, k_shift, aug.max_shift)
    x = transforms.random_flip(x, k_flip)
    mean = x.mean()
    x = (x - mean) * jax.random.uniform(k_contrast, (), minval=0.8, maxval=1.2) + mean
    x = x + jax.random.uniform(k_bright, (), minval=-0.1, maxval=0.1)
    if aug.saturation > 0:
        s, k_sat = aug.saturation, jax.random.fold_in(key, 4)  # earlier draws as without it
        x = transforms.saturate(x, jax.random.uniform(k_sat, (), minval=1 - s, maxval=1 + s))
    return jnp.clip(x, 0.0, 1.0)


def _loss(graphdef, params, rest, x, y, key, smoothing, kl_weight=0.0, on_features=False):
    outputs = models.head_train_outputs if on_features else models.train_outputs
    logits, kl, rest = outputs(graphdef, params, rest, x, key)
    # smoothing is traced: 0 leaves the one-hot targets exactly as they are
    targets = optax.smooth_labels(jax.nn.one_hot(y, logits.shape[-1]), smoothing)
    loss = optax.softmax_cross_entropy(logits, targets).mean()
    if kl_weight:
        loss = loss + kl_weight * kl.mean()
    return loss, rest


@functools.partial(
    jax.jit,
    static_argnames=("graphdef", "tx", "aug", "kl_weight", "dp", "on_features"),
    donate_argnums=(1, 2, 3),
)
def train_step(
    graphdef,
    params,
    rest,
    opt_state,
    x,
    y,
    key,
    smoothing=0.0,
    *,
    tx,
    aug,
    kl_weight=0.0,
    dp=None,
    on_features=False,
):
    """One optimizer step on a batch. # x: [b, h, w, c], y: [b]

    ``params`` are the trainable weights, ``rest`` batch norm's statistics and a frozen
    backbone's weights (``models.split_trainable``); ``aug`` an ``Augment`` or None;
    ``smoothing`` the label smoothing (traced: a schedule does not recompile); ``kl_weight`` the
    bottleneck's KL weight; ``dp`` DP-SGD's (clip bound, noise std) or None
    (``defences.Defence.private``); ``on_features``: ``x`` holds the output of the backbone's
    frozen part (``models.frozen_part``: a frozen backbone's features [b, d]) for the batch's
    images, not the images (``aug`` and ``dp`` None).
    """
    k_aug, k_model = jax.random.split(key)
    if aug is not None:
        x = jax.vmap(functools.partial(augment, aug=aug))(x, jax.random.split(k_aug, x.shape[0]))
    smoothing = jnp.asarray(smoothing, jnp.float32)
    if dp is None:
        (loss, rest), grads = jax.value_and_grad(_loss, argnums=1, has_aux=True)(
            graphdef, params, rest, x, y, k_model, smoothing, kl_weight, on_features
        )
    else:
        # one example at a time (own dropout key); no batch norm, so rest stays as it is
        def one(p, xi, yi, ki):
            return _loss(graphdef, p, rest, xi[None], yi[None], ki, smoothing, kl_weight)

        keys = jax.random.split(k_model, x.shape[0])
        k_noise = jax.random.fold_in(key, 3)
        losses, grads = defences.private_gradients(one, params, (x, y, keys), k_noise, *dp)
        loss = losses.mean()
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), rest, opt_state, loss


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _predict(graphdef, params, x):
    return models.logits(graphdef, params, x).argmax(-1)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _predict_from_features(graphdef, params, h):
    return models.head_logits(graphdef, params, h).argmax(-1)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _features(graphdef, params, x):
    return models.features(graphdef, params, x)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _frozen_part(graphdef, params, x):
    return models.frozen_part(graphdef, params, x)


def predict(
    graphdef: nnx.GraphDef,
    params,
    images: np.ndarray,
    batch_size: int = EVAL_BATCH,
    *,
    on_features: bool = False,
) -> np.ndarray:
    """The top-1 label of each image, in fixed-size batches. # [n, h, w, c] -> [n] int

    ``on_features``: ``images`` are the outputs of the backbone's frozen part
    (``frozen_outputs``; with tune="linear" the features [n, d], ``features``).
    """
    fn = _predict_from_features if on_features else _predict
    return batching.map_batches(
        lambda x: fn(graphdef, params, x),
        images,
        sizes=batching.sizes_for(len(images), batch_size),
    )


def accuracy(
    graphdef: nnx.GraphDef,
    params,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    on_features: bool = False,
) -> float:
    """Top-1 accuracy (NaN for no images); ``on_features`` as ``predict``'s."""
    if len(images) == 0:
        return float("nan")
    predicted = predict(graphdef, params, images, on_features=on_features)
    return float(np.mean(predicted == np.asarray(labels)))


def features(
    graphdef: nnx.GraphDef,
    params,
    images: np.ndarray,
    batch_size: int = 64,
    *,
    progress: bool = False,
) -> np.ndarray:
    """Each image's penultimate features (inference), in fixed-size batches. # [n, h, w, c] ->
    [n, d]"""
    return batching.map_batches(
        lambda x: _features(graphdef, params, x),
        images,
        sizes=batching.sizes_for(len(images), batch_size),
        progress=progress,
        desc="backbone features",
    )


def frozen_outputs(
    graphdef: nnx.GraphDef,
    params,
    images: np.ndarray,
    batch_size: int = 64,
    *,
    progress: bool = False,
) -> np.ndarray:
    """Each image's output of the backbone's frozen part (``models.frozen_part``), in
    fixed-size batches. # [n, h, w, c] -> [n, d] (tune="linear") or [n, h', w', c'] ("top")"""
    return batching.map_batches(
        lambda x: _frozen_part(graphdef, params, x),
        images,
        sizes=batching.sizes_for(len(images), batch_size),
        progress=progress,
        desc="backbone's frozen part",
    )


def _epoch_batches(n: int, batch_size: int, key: jax.Array) -> np.ndarray:
    """Index batches of one epoch, wrapped round so every batch is full. # [steps, b]"""
    perm = np.asarray(jax.random.permutation(key, n))
    steps = -(-n // batch_size)
    return np.resize(perm, steps * batch_size).reshape(steps, batch_size)


def fit_settings(
    model_config: models.ModelConfig,
    train_config: ml_collections.ConfigDict,
    images: np.ndarray | stream.Source,
    labels: np.ndarray | None,
    key: jax.Array,
    names: tuple[str, ...],
) -> dict[str, Any]:
    """What a trained recognizer depends on, flat (``jaxmia.workdir``): a resume needs equal ones.

    The images enter by a digest of their bytes and labels, so other data (another folder, size,
    split or augmentation-free copy) is refused as surely as another learning rate. A streamed
    source enters by its digest (the cache folder's name) and its record positions and labels.
    """
    digest = hashlib.sha256()
    if isinstance(images, stream.Source):
        digest.update(images.digest.encode())
        digest.update(np.ascontiguousarray(images.index, np.int64).tobytes())
        digest.update(repr(sorted(images.label_of.items())).encode())
        what = f"{len(images)} records of {images.digest}"
    else:
        digest.update(np.ascontiguousarray(images, np.float32).tobytes())
        digest.update(np.ascontiguousarray(labels, np.int32).tobytes())
        what = f"{len(images)} images"
    return {
        **{f"model.{k}": v for k, v in model_config.to_dict().items()},
        **workdir_lib.flatten(train_config, "train"),
        "key": np.asarray(jax.random.key_data(key)).tolist(),
        "data.images": f"{what}, sha256 {digest.hexdigest()[:16]}",
        "names": list(names),
    }


def fit(
    model_config: models.ModelConfig,
    train_config: ml_collections.ConfigDict,
    images: np.ndarray | stream.Source,
    labels: np.ndarray | None,
    *,
    key: jax.Array,
    test: tuple[np.ndarray, np.ndarray] | stream.Source | None = None,
    workdir: str | Path | None = None,
    names: tuple[str, ...] | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = False,
) -> tuple[nnx.GraphDef, dict, list[dict]]:
    """Trains a recognizer on (images, labels).

    Args:
      model_config: the recognizer; its num_classes must exceed every label.
      train_config: the ``train`` section of a jaxmia config.
      images: training images in [0, 1]. # [n, h, w, c]
        With ``train_config.stream``: a ``stream.Source`` (labels None), or arrays to stream.
      labels: integer labels. # [n]
      key: PRNG key for init, shuffling, augmentation and dropout.
      test: held-out (images, labels) (or a ``stream.Source``) for the per-epoch test accuracy.
      workdir: if given, it is claimed for these settings (``fit_settings`` into
        ``workdir/training.json``; a workdir trained with other settings is an error naming
        them), checkpoints go to ``workdir/checkpoints`` every ``checkpoint_every`` epochs and
        at the end, metrics to ``workdir/metrics.jsonl``, and a rerun resumes from the latest
        checkpoint.
      names: identity names in label order, stored with each checkpoint (default "0", "1", ...).
      meta: other JSON-able facts stored with each checkpoint (data config, split, ...).
      progress: show a progress bar over epochs.

    Returns:
      (graphdef, state as a pure dict (weights and batch statistics), per-epoch metrics).
    """
    streaming = bool(train_config.get("stream", False))
    if streaming and not isinstance(images, stream.Source):
        images = stream.Source.from_arrays(images, labels)
    elif not streaming:
        images = np.asarray(images, np.float32)
        labels = np.asarray(labels, np.int32)
        if train_config.get("flip_copies", False):
            # each photo's mirror image, one more example: also where a frozen part's output is
            # cached, which rules random flips out
            images = np.concatenate([images, images[:, :, ::-1]])  # [2n, h, w, c]
            labels = np.concatenate([labels, labels])
    if len(images) == 0:
        raise JaxmiaError("training set: expected at least one image, got none")
    n = len(images)
    names = tuple(names or map(str, range(model_config.num_classes)))
    batch_size = min(train_config.batch_size, n)
    mesh = stream.mesh(batch_size) if streaming else None
    steps_per_epoch = -(-n // batch_size)
    effective = defences.effective_train(train_config)
    epochs = effective.epochs
    tx = make_optimizer(effective, steps_per_epoch)
    defence = defences.Defence.from_config(train_config)
    defences.check_model(defence, model_config.arch)
    if defence.bottleneck != model_config.bottleneck:
        raise JaxmiaError(
            f"train.defence.bottleneck={defence.bottleneck} but the model's bottleneck is "
            f"{model_config.bottleneck}; expected the same (train.model_config_for)"
        )
    k_init, k_train = jax.random.split(key)
    graphdef, state = models.init(model_config, k_init)
    params, rest = models.split_trainable(graphdef, state)
    opt_state = tx.init(params)
    aug = Augment.from_config(train_config)
    history: list[dict] = []
    start_epoch = 0

    mngr = None
    if workdir is not None:
        workdir = Path(workdir)
        settings = fit_settings(model_config, train_config, images, labels, key, names)
        mngr = checkpoint.manager(workdir, keep=train_config.keep_checkpoints)
        last = mngr.latest_step()
        if last is not None and not (workdir / RECORD).exists():
            raise JaxmiaError(
                f"workdir {workdir}: holds checkpoints without a settings record ({RECORD}), "
                "so they cannot be resumed safely; use another --workdir or delete that one"
            )
        workdir_lib.claim(workdir / RECORD, settings)
        if last is not None:
            abstract_opt = jax.eval_shape(lambda: opt_state)
            state, _, opt_state = checkpoint.restore(mngr, last, model_config, abstract_opt)
            params, rest = models.split_trainable(graphdef, state)
            start_epoch = last
            # Epochs after the checkpoint will be redone, so their metrics are dropped.
            history = [m for m in files.read_jsonl(workdir / "metrics.jsonl") if m["epoch"] <= last]
            files.write_text(
                workdir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history)
            )

    # A frozen backbone (or its frozen lower blocks) without augmentation sees each image alike
    # in every epoch (it runs in inference mode): its output is computed once and the rest
    # trains on it, the same function at a fraction of the cost (faceres: about 1.2 GFLOP an
    # image a pass, its last block 0.1).
    on_features = model_config.cached and aug is None and defence.private is None and mesh is None
    train_in, test_in = images, test
    if on_features:
        state = models.join(graphdef, params, rest)
        train_in = frozen_outputs(graphdef, state, images, progress=progress)  # [n, ...]
        if test is not None and not isinstance(test, stream.Source):
            test_in = (frozen_outputs(graphdef, state, test[0], progress=progress), test[1])

    if mesh is not None:
        # Weights, statistics and optimizer state whole on every device; batches split.
        params, rest, opt_state = sharding.replicate(mesh, (params, rest, opt_state))
        seed = int(jax.random.randint(jax.random.fold_in(k_train, 2**31 - 1), (), 0, 2**31 - 1))

    bar = tqdm.trange(
        start_epoch,
        epochs,
        desc="train",
        unit="epoch",
        disable=not progress,
        leave=False,
    )
    for epoch in bar:
        t0 = time.perf_counter()
        k_epoch = jax.random.fold_in(k_train, epoch)
        losses = []
        if mesh is not None:
            batches = stream.epoch_batches(images, batch_size, seed, epoch, mesh)
        else:
            order = _epoch_batches(n, batch_size, jax.random.fold_in(k_epoch, 0))
            batches = ((train_in[idx], labels[idx]) for idx in order)
        for i, (x, y) in enumerate(batches):
            smoothing = defences.smoothing_at(defence, epoch * steps_per_epoch + i, steps_per_epoch)
            params, rest, opt_state, loss = train_step(
                graphdef,
                params,
                rest,
                opt_state,
                x,
                y,
                jax.random.fold_in(k_epoch, i + 1),
                smoothing or float(train_config.label_smoothing),
                tx=tx,
                aug=aug,
                kl_weight=defences.kl_weight(defence),
                dp=defence.private,
                on_features=on_features,
            )
            losses.append(loss)
        state = models.join(graphdef, params, rest)
        record = {
            "epoch": epoch + 1,
            "loss": float(np.mean(jax.device_get(losses))),
            "train_accuracy": _accuracy(graphdef, state, train_in, labels, on_features),
            "seconds": time.perf_counter() - t0,
        }
        if test is not None:
            record["test_accuracy"] = _accuracy(graphdef, state, *_pair(test_in), on_features)
        history.append(record)
        bar.set_postfix(
            loss=f"{record['loss']:.3f}", test=f"{record.get('test_accuracy', float('nan')):.3f}"
        )
        if mngr is not None:
            files.append_jsonl(workdir / "metrics.jsonl", record)
            done = epoch + 1
            if done % train_config.checkpoint_every == 0 or done == epochs:
                checkpoint.save(
                    mngr,
                    done,
                    state,
                    {
                        **(meta or {}),
                        "model": model_config.to_dict(),
                        "names": list(names),
                        "train": train_config.to_dict(),
                        "epoch": done,
                        **_last(record),
                        **_defence_record(defence, batch_size, n, done * steps_per_epoch),
                    },
                    opt_state,
                )
    return graphdef, models.join(graphdef, params, rest), history


def _defence_record(d: defences.Defence, batch_size: int, n: int, steps: int) -> dict:
    if not d.active:
        return {}
    return {"defence": defences.record(d, batch_size=batch_size, examples=n, steps=steps)}


def privacy_note(summary: dict) -> str:
    """ ", DP-SGD epsilon E at delta D" for a training summary of DP-SGD, else ""."""
    p = summary.get("defence", {}).get("privacy")
    return f", DP-SGD epsilon {p['epsilon']:.2f} at delta {p['delta']:g}" if p else ""


def _pair(test: tuple | stream.Source) -> tuple:
    return (test, None) if isinstance(test, stream.Source) else test


def _accuracy(graphdef: nnx.GraphDef, state, images, labels, on_features=False) -> float:
    """``accuracy`` of arrays (images, or a frozen backbone's features: ``on_features``), or of
    a streamed source read in order, over every process."""
    if not isinstance(images, stream.Source):
        return accuracy(graphdef, state, images, labels, on_features=on_features)
    state, right, seen = stream.local(state), 0, 0
    batches = stream.dataset(
        images, batch_size=EVAL_BATCH * jax.process_count(), shuffle=False, wrap=False
    )
    for batch in batches:  # this process's rows of each; the counts are summed below
        right += int(np.sum(predict(graphdef, state, batch["image"]) == batch["label"]))
        seen += len(batch["label"])
    if jax.process_count() > 1:
        right, seen = np.sum(sharding.to_host(np.array([[right, seen]])), axis=0).tolist()
    return right / seen if seen else float("nan")


def _last(record: dict) -> dict:
    return {k: v for k, v in record.items() if k in ("train_accuracy", "test_accuracy")}


# The face judge (judges.face) that each pretrained backbone is.
_JUDGE_OF_ARCH = {"dlib_resnet": "dlib", "faceres": "faceres"}


def check_target(config: ml_collections.ConfigDict) -> None:
    """Refuses an R_T built on a backbone that is also one of ``judges.face``: that judge would
    rank clones optimised through its own embedding, a twin of R_T and no independent verdict."""
    arch = config.model.arch
    judge = _JUDGE_OF_ARCH.get(arch)
    face = tuple(config.get("judges", {}).get("face", ()))
    if judge in face:
        raise JaxmiaError(
            f"config field model.arch={arch!r}: the face judge {judge!r} (judges.face={face}) is "
            f"that same network and would judge clones made through it; expected another "
            f"model.arch, or judges.face without {judge!r}"
        )


def role_arch(config: ml_collections.ConfigDict, role: str) -> str:
    """The architecture of the recognizer of ``role``: R_E's is ``model.evaluation_arch`` where
    set (so that R_E is not R_T's twin), every other's ``model.arch``."""
    m = config.model
    evaluation = m.get("evaluation_arch", "")
    if evaluation and evaluation not in models.ARCHS:
        raise JaxmiaError(
            f"config field model.evaluation_arch: expected '' or one of {models.ARCHS}, "
            f"got {evaluation!r}"
        )
    return evaluation if role == "evaluation" and evaluation else m.arch


def model_config_for(
    config: ml_collections.ConfigDict, num_classes: int, role: str = "target"
) -> models.ModelConfig:
    """The recognizer's ModelConfig from a jaxmia config's ``data`` and ``model`` sections, for
    the recognizer of ``role`` (R_E's architecture may differ: ``role_arch``). An R_E of
    another architecture than R_T's with ``model.tune="top"`` is a linear head over its frozen
    backbone: ``model.tune_blocks`` counts R_T's backbone's blocks."""
    d = defences.Defence.from_config(config.train)
    arch = role_arch(config, role)
    m = config.model
    tune, tune_blocks = m.tune, m.tune_blocks
    if tune == "top" and arch != m.arch:
        tune, tune_blocks = "linear", 0
    try:
        return models.ModelConfig(
            num_classes=num_classes,
            image_size=tuple(config.data.image_size),
            channels=config.data.channels,
            arch=arch,
            conv_features=tuple(m.conv_features),
            kernel_sizes=tuple(m.kernel_sizes),
            dense_features=tuple(m.dense_features),
            widths=tuple(m.widths),
            blocks=tuple(m.blocks),
            block=m.block,
            stem_kernel=m.stem_kernel,
            stem_stride=m.stem_stride,
            stem_pool=m.stem_pool,
            dropout=d.dropout if d.dropout >= 0 else m.dropout,
            bottleneck=d.bottleneck,
            tune=tune,
            tune_blocks=tune_blocks,
        )
    except ValueError as e:
        raise JaxmiaError(f"config fields model/data: {e}") from e


@dataclasses.dataclass(frozen=True)
class Job:
    """One recognizer to train: a part of the split, its data and where it goes."""

    role: str
    workdir: Path
    model_config: models.ModelConfig
    names: tuple[str, ...]
    train: tuple  # images [n, h, w, c], labels [n]; or (stream.Source, None) when streaming
    test: tuple
    key: jax.Array
    meta: dict[str, Any]

    def settings(self, train_config: ml_collections.ConfigDict) -> dict[str, Any]:
        return fit_settings(self.model_config, train_config, *self.train, self.key, self.names)


def make_job(
    config: ml_collections.ConfigDict,
    faces: faces_lib.FaceSet | faces_lib.FaceRecords,
    part: splits.Part,
    role: str,
    workdir: Path,
    split_record: dict,
) -> Job:
    """The training job of one part of the split (nothing is written).

    R_T's (``role`` "target" or "all") is refused on a backbone that is also a face judge
    (``check_target``); R_E's architecture is ``role_arch``'s.
    """
    if role in DEFENDED:
        check_target(config)
    names = tuple(part.identities)
    index = {name: i for i, name in enumerate(faces.names)}
    # The part's label order is its identity order; map the face set's labels onto it.
    to_part = np.full(len(faces.names), -1, np.int32)
    to_part[[index[n] for n in names]] = np.arange(len(names))
    meta = {
        "role": role,
        "data": config.data.to_dict(),
        "data_source": faces.source,
        "synthetic": faces.synthetic,
        "seed": config.seed,
        "split": split_record,
        "train_files": [faces.files[i] for i in part.train] if faces.files else [],
    }
    if isinstance(faces, faces_lib.FaceRecords):
        # Streamed: the cache's records of the part, labelled by name in the part's order.
        label_of = {name: i for i, name in enumerate(names)}
        train, test = (
            (stream.Source(faces.records, np.asarray(i, np.int64), label_of, faces.digest), None)
            for i in (part.train, part.test)
        )
    else:
        train = (faces.images[part.train], to_part[faces.labels[part.train]])
        test = (faces.images[part.test], to_part[faces.labels[part.test]])
    return Job(
        role=role,
        workdir=Path(workdir),
        model_config=model_config_for(config, len(names), role),
        names=names,
        train=train,
        test=test,
        key=jax.random.fold_in(jax.random.key(config.seed), KEYED_ROLES.index(role)),
        meta=meta,
    )


def run_job(job: Job, train_config: ml_collections.ConfigDict, *, progress: bool = True) -> dict:
    """Trains (or resumes) one job into its workdir; returns its summary (also written)."""
    t0 = time.perf_counter()
    _, _, history = fit(
        job.model_config,
        train_config,
        *job.train,
        key=job.key,
        test=job.test if job.test[1] is not None else job.test[0],
        workdir=job.workdir,
        names=job.names,
        meta=job.meta,
        progress=progress,
    )
    last = history[-1] if history else {}
    n = len(job.train[0])
    steps = (last.get("epoch") or 0) * -(-n // min(train_config.batch_size, n))
    defence = defences.Defence.from_config(train_config)
    summary = {
        "role": job.role,
        "identities": len(job.names),
        "train_images": len(job.train[0]),
        "test_images": len(job.test[0]),
        "test_accuracy": last.get("test_accuracy"),
        "train_accuracy": last.get("train_accuracy"),
        "epochs": last.get("epoch"),
        "seconds_this_run": time.perf_counter() - t0,
        "data_source": job.meta["data_source"],
        "synthetic": job.meta["synthetic"],
        **_defence_record(defence, min(train_config.batch_size, n), n, steps),
    }
    files.write_json(job.workdir / "train_summary.json", summary)
    return summary
