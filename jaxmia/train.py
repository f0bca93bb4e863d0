"""Training recognizers with optax: a jitted step, test accuracy per epoch, orbax checkpoints.

``fit`` trains one recognizer in memory (and, given a workdir, checkpoints every few epochs and
resumes from the latest checkpoint). The ``jaxmia train`` command loads faces, makes the paper's
split, and trains the recognizer(s) the config asks for.
"""

from __future__ import annotations

import argparse
import functools
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

from jaxmia import checkpoint, data, files, models, splits
from jaxmia.errors import JaxmiaError

OPTIMIZERS = ("adam", "adamw", "sgd", "momentum")
SCHEDULES = ("constant", "cosine")
RECOGNIZERS = ("all", "target", "evaluation", "both")
EVAL_BATCH = 256


def make_optimizer(
    cfg: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """The optimizer and learning-rate schedule the train config names."""
    if cfg.optimizer not in OPTIMIZERS:
        raise JaxmiaError(
            f"config field train.optimizer: expected one of {OPTIMIZERS}, got {cfg.optimizer!r}"
        )
    if cfg.schedule not in SCHEDULES:
        raise JaxmiaError(
            f"config field train.schedule: expected one of {SCHEDULES}, got {cfg.schedule!r}"
        )
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(cfg.warmup_epochs * steps_per_epoch, total - 1)
    return _optimizer(
        cfg.optimizer,
        cfg.schedule,
        float(cfg.learning_rate),
        warmup,
        total,
        float(cfg.weight_decay),
    )


# Cached so that equal settings give the same (hashable) transformation: the jitted train step
# takes it as a static argument, and a fresh one per fit() would recompile the step every time.
@functools.lru_cache(maxsize=64)
def _optimizer(optimizer, schedule, learning_rate, warmup, total, weight_decay):
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
    if optimizer == "momentum":
        return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr, momentum=0.9))
    return optax.chain(optax.add_decayed_weights(weight_decay), optax.sgd(lr))


def augment(x: jax.Array, key: jax.Array, max_shift: int = 4) -> jax.Array:
    """Random shift, horizontal flip, brightness and contrast of one image. # [h, w, c]"""
    k_shift, k_flip, k_bright, k_contrast = jax.random.split(key, 4)
    h, w, _ = x.shape
    padded = jnp.pad(x, ((max_shift, max_shift), (max_shift, max_shift), (0, 0)), mode="edge")
    dy, dx = jax.random.randint(k_shift, (2,), 0, 2 * max_shift + 1)
    x = jax.lax.dynamic_slice(padded, (dy, dx, 0), x.shape)
    x = jnp.where(jax.random.bernoulli(k_flip), x[:, ::-1], x)
    mean = x.mean()
    x = (x - mean) * jax.random.uniform(k_contrast, (), minval=0.8, maxval=1.2) + mean
    x = x + jax.random.uniform(k_bright, (), minval=-0.1, maxval=0.1)
    return jnp.clip(x, 0.0, 1.0)


def _loss(graphdef, params, x, y, key):
    logits = models.logits(graphdef, params, x, key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@functools.partial(jax.jit, static_argnames=("graphdef", "tx", "do_augment"), donate_argnums=(1, 2))
def train_step(graphdef, params, opt_state, x, y, key, *, tx, do_augment):
    """One optimizer step on a batch. # x: [b, h, w, c], y: [b]"""
    k_aug, k_drop = jax.random.split(key)
    if do_augment:
        x = jax.vmap(augment)(x, jax.random.split(k_aug, x.shape[0]))
    loss, grads = jax.value_and_grad(_loss, argnums=1)(graphdef, params, x, y, k_drop)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _correct(graphdef, params, x, y, mask):
    pred = models.logits(graphdef, params, x).argmax(-1)
    return jnp.sum((pred == y) & mask)


def accuracy(graphdef: nnx.GraphDef, params, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy, in fixed-size batches so that it compiles once."""
    n = len(images)
    if n == 0:
        return float("nan")
    b = min(EVAL_BATCH, n)
    correct = 0
    for start in range(0, n, b):
        x, y = images[start : start + b], labels[start : start + b]
        pad = b - len(x)
        mask = np.arange(b) < len(x)
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x
        y = np.concatenate([y, np.zeros(pad, y.dtype)]) if pad else y
        correct += int(_correct(graphdef, params, x, y, mask))
    return correct / n


def _epoch_batches(n: int, batch_size: int, key: jax.Array) -> np.ndarray:
    """Index batches of one epoch, wrapped round so every batch is full. # [steps, b]"""
    perm = np.asarray(jax.random.permutation(key, n))
    steps = -(-n // batch_size)
    return np.resize(perm, steps * batch_size).reshape(steps, batch_size)


def fit(
    model_config: models.ModelConfig,
    train_config: ml_collections.ConfigDict,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    key: jax.Array,
    test: tuple[np.ndarray, np.ndarray] | None = None,
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
      labels: integer labels. # [n]
      key: PRNG key for init, shuffling, augmentation and dropout.
      test: held-out (images, labels) for the per-epoch test accuracy.
      workdir: if given, checkpoints go to ``workdir/checkpoints`` every
        ``checkpoint_every`` epochs and at the end, metrics to ``workdir/metrics.jsonl``, and a
        rerun resumes from the latest checkpoint.
      names: identity names in label order, stored with each checkpoint (default "0", "1", ...).
      meta: other JSON-able facts stored with each checkpoint (data config, split, ...).
      progress: show a progress bar over epochs.

    Returns:
      (graphdef, params as a pure dict, per-epoch metrics).
    """
    images = np.asarray(images, np.float32)
    labels = np.asarray(labels, np.int32)
    if len(images) == 0:
        raise JaxmiaError("training set: expected at least one image, got none")
    n = len(images)
    batch_size = min(train_config.batch_size, n)
    steps_per_epoch = -(-n // batch_size)
    tx = make_optimizer(train_config, steps_per_epoch)
    k_init, k_train = jax.random.split(key)
    graphdef, state = models.init(model_config, k_init)
    params = nnx.to_pure_dict(state)
    opt_state = tx.init(params)
    history: list[dict] = []
    start_epoch = 0

    mngr = None
    if workdir is not None:
        workdir = Path(workdir)
        mngr = checkpoint.manager(workdir, keep=train_config.keep_checkpoints)
        last = mngr.latest_step()
        if last is not None:
            abstract_opt = jax.eval_shape(lambda: opt_state)
            params, _, opt_state = checkpoint.restore(mngr, last, model_config, abstract_opt)
            start_epoch = last
            # Epochs after the checkpoint will be redone, so their metrics are dropped.
            history = [m for m in files.read_jsonl(workdir / "metrics.jsonl") if m["epoch"] <= last]
            files.write_text(
                workdir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in history)
            )

    bar = tqdm.trange(
        start_epoch,
        train_config.epochs,
        desc="train",
        unit="epoch",
        disable=not progress,
        leave=False,
    )
    for epoch in bar:
        t0 = time.perf_counter()
        k_epoch = jax.random.fold_in(k_train, epoch)
        losses = []
        batches = _epoch_batches(n, batch_size, jax.random.fold_in(k_epoch, 0))
        for i, idx in enumerate(batches):
            params, opt_state, loss = train_step(
                graphdef,
                params,
                opt_state,
                images[idx],
                labels[idx],
                jax.random.fold_in(k_epoch, i + 1),
                tx=tx,
                do_augment=bool(train_config.augment),
            )
            losses.append(loss)
        record = {
            "epoch": epoch + 1,
            "loss": float(np.mean(jax.device_get(losses))),
            "train_accuracy": accuracy(graphdef, params, images, labels),
            "seconds": time.perf_counter() - t0,
        }
        if test is not None:
            record["test_accuracy"] = accuracy(graphdef, params, *test)
        history.append(record)
        bar.set_postfix(
            loss=f"{record['loss']:.3f}", test=f"{record.get('test_accuracy', float('nan')):.3f}"
        )
        if mngr is not None:
            files.append_jsonl(workdir / "metrics.jsonl", record)
            done = epoch + 1
            if done % train_config.checkpoint_every == 0 or done == train_config.epochs:
                checkpoint.save(
                    mngr,
                    done,
                    params,
                    {
                        **(meta or {}),
                        "model": model_config.to_dict(),
                        "names": list(names or map(str, range(model_config.num_classes))),
                        "epoch": done,
                        **_last(record),
                    },
                    opt_state,
                )
    return graphdef, params, history


def _last(record: dict) -> dict:
    return {k: v for k, v in record.items() if k in ("train_accuracy", "test_accuracy")}


def model_config_for(config: ml_collections.ConfigDict, num_classes: int) -> models.ModelConfig:
    """The recognizer's ModelConfig from a jaxmia config's ``data`` and ``model`` sections."""
    try:
        return models.ModelConfig(
            num_classes=num_classes,
            image_size=tuple(config.data.image_size),
            channels=config.data.channels,
            conv_features=tuple(config.model.conv_features),
            kernel_sizes=tuple(config.model.kernel_sizes),
            dense_features=tuple(config.model.dense_features),
            dropout=config.model.dropout,
        )
    except ValueError as e:
        raise JaxmiaError(f"config fields model/data: {e}") from e


def train_part(
    config: ml_collections.ConfigDict,
    faces: data.FaceSet,
    part: splits.Part,
    role: str,
    workdir: Path,
    split_record: dict,
    *,
    progress: bool = True,
) -> dict:
    """Trains the recognizer of one part of the split into ``workdir``; returns its summary."""
    names = tuple(part.identities)
    index = {name: i for i, name in enumerate(faces.names)}
    # The part's label order is its identity order; map the face set's labels onto it.
    to_part = np.full(len(faces.names), -1, np.int32)
    to_part[[index[n] for n in names]] = np.arange(len(names))
    train_x, train_y = faces.images[part.train], to_part[faces.labels[part.train]]
    test_x, test_y = faces.images[part.test], to_part[faces.labels[part.test]]
    model_config = model_config_for(config, len(names))
    meta = {
        "role": role,
        "data": config.data.to_dict(),
        "data_source": faces.source,
        "synthetic": faces.synthetic,
        "train": config.train.to_dict(),
        "seed": config.seed,
        "split": split_record,
        "train_files": [faces.files[i] for i in part.train] if faces.files else [],
    }
    key = jax.random.fold_in(jax.random.key(config.seed), RECOGNIZERS.index(role))
    t0 = time.perf_counter()
    _, _, history = fit(
        model_config,
        config.train,
        train_x,
        train_y,
        key=key,
        test=(test_x, test_y),
        workdir=workdir,
        names=names,
        meta=meta,
        progress=progress,
    )
    last = history[-1] if history else {}
    summary = {
        "role": role,
        "identities": len(names),
        "train_images": len(train_x),
        "test_images": len(test_x),
        "test_accuracy": last.get("test_accuracy"),
        "train_accuracy": last.get("train_accuracy"),
        "epochs": last.get("epoch"),
        "seconds_this_run": time.perf_counter() - t0,
        "data_source": faces.source,
        "synthetic": faces.synthetic,
    }
    files.write_json(workdir / "train_summary.json", summary)
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--recognizer",
        choices=RECOGNIZERS,
        default=None,
        help="which recognizer(s) to train (overrides config.train.recognizer)",
    )


def load_config_data(config: ml_collections.ConfigDict, *, progress: bool = True) -> data.FaceSet:
    """The face set a config's ``data`` section names."""
    return data.load_faces(
        config.data.source,
        image_size=tuple(config.data.image_size),
        channels=config.data.channels,
        cache_dir=config.data.cache_dir or None,
        synthetic=config.data.synthetic.to_dict(),
        progress=progress,
    )


def make_config_split(config: ml_collections.ConfigDict, faces: data.FaceSet) -> splits.Split:
    """The paper's split of ``faces`` as the config's ``split`` section asks."""
    s = config.split
    return splits.make_split(
        faces,
        seed=s.seed,
        num_attacked=s.num_attacked,
        num_target_only=s.num_target_only,
        num_evaluation_only=s.num_evaluation_only,
        num_aux=s.num_aux,
        test_per_identity=s.test_per_identity,
        attacked_photos=s.attacked_photos,
    )


def run(args: argparse.Namespace, config: ml_collections.ConfigDict) -> None:
    recognizer = args.recognizer or config.train.recognizer
    if recognizer not in RECOGNIZERS:
        raise JaxmiaError(
            f"config field train.recognizer: expected one of {RECOGNIZERS}, got {recognizer!r}"
        )
    workdir = Path(args.workdir)
    faces = load_config_data(config)
    split = make_config_split(config, faces)
    record = split.to_json(faces)
    workdir.mkdir(parents=True, exist_ok=True)
    files.write_json(workdir / "config.json", config.to_dict())
    files.write_json(workdir / "split.json", record)
    if faces.synthetic:
        print(f"note: training on SYNTHETIC faces ({faces.source})")
    roles = {
        "all": ["all"],
        "target": ["target"],
        "evaluation": ["evaluation"],
        "both": ["target", "evaluation"],
    }
    for role in roles[recognizer]:
        out = workdir if role == "all" else workdir / role
        summary = train_part(config, faces, getattr(split, role), role, out, record)
        print(
            f"{role}: {summary['identities']} identities, test accuracy "
            f"{summary['test_accuracy']:.4f} after {summary['epochs']} epochs -> {out}"
        )
