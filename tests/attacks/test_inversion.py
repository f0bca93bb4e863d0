import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmia.attacks import inversion as inv
from jaxmia.attacks import seeds
from jaxmia.data import synthetic
from jaxmia.errors import JaxmiaError
from jaxmia.recognizers import models

TINY = models.ModelConfig(
    num_classes=3,
    image_size=(16, 16),
    conv_features=(4, 4, 4, 4),
    dense_features=(16,),
    dropout=0.0,
)


@pytest.fixture(scope="module")
def tiny():
    graphdef, params = models.init(TINY, jax.random.key(0))
    return inv.recognizer_apply(graphdef), params


def _batch(n, shape=(16, 16, 1), classes=3, seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    x = jax.random.uniform(k1, (n, *shape), minval=0.2, maxval=0.8)
    return x, jnp.arange(n) % classes, jax.random.split(k2, n)


def reference(cfg, apply_fn, params, seed, key, label, steps):
    """A plain per-clone loop of the rules in the inversion docstring: (image, steps, reason)."""
    opt = inv.make_optimizer(cfg)
    x, state, best, since = seed, opt.init(seed), np.inf, 0
    grad_fn = jax.jit(
        jax.value_and_grad(
            lambda v, k: inv.objective(cfg, apply_fn, params, v, k, label), has_aux=True
        )
    )
    for t in range(steps):
        (loss, conf), g = grad_fn(x, jax.random.fold_in(key, t))
        if not (np.isfinite(loss) and np.all(np.isfinite(g))):
            return x, t, "diverged"
        if loss < best - cfg.min_delta:
            best, since = loss, 0
        else:
            since += 1
        if cfg.stop_confidence and conf >= cfg.stop_confidence:
            return x, t, "confidence"
        if cfg.patience and since >= cfg.patience:
            return x, t, "patience"
        updates, state = opt.update(g, state, x)
        new = jnp.clip(x + updates, 0, 1)
        if cfg.denoise == "median" and t % cfg.denoise_every == 0:
            new = inv.median_filter(new, cfg.denoise_size)
        if cfg.denoise == "gaussian" and t % cfg.denoise_every == 0:
            new = inv.gaussian_filter(new, cfg.denoise_sigma)
        if not np.all(np.isfinite(new)):
            return x, t, "diverged"
        x = new
    return x, steps, "steps"


# --- one-clone pieces against hand-derived values ----------------------------------------------


def _poincare(z, y):
    u = z / np.abs(z).sum()
    v = np.clip(np.eye(len(z))[y], 0, 1 - 1e-5)
    d = 2 * ((u - v) ** 2).sum() / ((1 - (u**2).sum()) * (1 - (v**2).sum()))
    return np.arccosh(1 + d)


@pytest.mark.parametrize(
    "kind,z,y,want",
    [
        (
            "least_squares",
            [2.0, 0.0, 0.0],
            0,
            (1 - np.e**2 / (np.e**2 + 2)) ** 2 + 2 / (np.e**2 + 2) ** 2,
        ),
        ("cross_entropy", [2.0, 0.0, 0.0], 0, np.log(np.e**2 + 2) - 2),
        ("max_margin", [2.0, 0.0, 1.0], 0, -1.0),  # margin not reached: other - own
        ("max_margin", [9.0, 0.0, 1.0], 0, -5.0),  # flat beyond the margin (5)
        ("max_margin", [0.0, 3.0, 1.0], 0, 3.0),
        ("poincare", [2.0, -1.0, 0.5], 0, _poincare(np.array([2.0, -1.0, 0.5]), 0)),
    ],
)
def test_data_loss_hand_values(kind, z, y, want):
    got = inv.data_loss(kind, jnp.array(z), jnp.int32(y), margin=5.0)
    # float32 rounds 1 - |v|^2 (about 2e-5) for poincare to 1e-4 relative
    np.testing.assert_allclose(got, want, rtol=3e-4)


def test_total_variation_and_median_by_hand():
    x = jnp.array([[0.0, 1.0], [0.0, 0.0]])[..., None]  # [2, 2, 1]
    # vertical diffs |0-0|, |0-1| -> mean 0.5; horizontal |1-0|, |0-0| -> mean 0.5
    assert float(inv.total_variation(x)) == pytest.approx(1.0)
    spike = jnp.zeros((5, 5, 1)).at[2, 2, 0].set(1.0)
    np.testing.assert_array_equal(inv.median_filter(spike, 3), jnp.zeros((5, 5, 1)))
    ramp = jnp.tile(jnp.arange(5.0)[None, :, None], (5, 1, 1))
    np.testing.assert_array_equal(inv.median_filter(ramp, 3), ramp)  # monotone rows survive


def test_random_transform_shifts_within_jitter():
    x = jnp.arange(36.0).reshape(6, 6, 1)
    for i in range(8):
        y = inv.random_transform(x, jax.random.key(i), jitter=1, flip=False)
        # edge-padded shift by (dy, dx) in {-1, 0, 1}^2: the centre 4x4 is a window of x
        found = [
            (dy, dx)
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            if np.array_equal(y[1:5, 1:5], x[1 + dy : 5 + dy, 1 + dx : 5 + dx])
        ]
        assert found
    np.testing.assert_array_equal(inv.random_transform(x, jax.random.key(0), 0, False), x)


def test_views_average_the_data_loss_over_hand_made_views(tiny):
    apply_fn, params = tiny
    x, label, key = _batch(1)[0][0], jnp.int32(1), jax.random.key(4)
    # jitted as the program uses it: one compile rather than one per eager operation
    objective = jax.jit(inv.objective, static_argnums=(0, 1))
    cfg = inv.InversionConfig(loss="cross_entropy", views=3, noise=0.1)
    loss, conf = objective(cfg, apply_fn, params, x, key, label)
    # Each view: the image plus N(0, 0.1^2) noise drawn from fold_in(its key, 4), clipped.
    views = [
        np.clip(x + 0.1 * np.asarray(jax.random.normal(jax.random.fold_in(k, 4), x.shape)), 0, 1)
        for k in jax.random.split(key, 3)
    ]
    z = np.asarray(jax.jit(apply_fn)(params, np.stack(views)), np.float64)  # [3, n]
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    assert float(loss) == pytest.approx(-logp[:, 1].mean(), rel=1e-5)
    assert float(conf) == pytest.approx(np.exp(logp[:, 1]).mean(), rel=1e-5)
    # identical views (nothing random) give the single view's objective
    plain = inv.InversionConfig(loss="cross_entropy")
    same = objective(dataclasses.replace(plain, views=4), apply_fn, params, x, key, label)
    np.testing.assert_allclose(same, objective(plain, apply_fn, params, x, key, label), rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(views=0), "inversion.views=0"),
        (dict(zoom=1.0), r"inversion.zoom=1.0: expected in \[0, 1\)"),
        (dict(blur=-1.0), "inversion.blur=-1.0"),
        (dict(noise=float("nan")), "inversion.noise=nan"),
    ],
)
def test_bad_view_settings(kwargs, words):
    with pytest.raises(JaxmiaError, match=words):
        inv.InversionConfig(**kwargs)


# --- the batched program against the per-clone reference loop ----------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        inv.InversionConfig(loss="least_squares", optimizer="sgd", learning_rate=5.0),
        inv.InversionConfig(loss="cross_entropy", optimizer="momentum", learning_rate=0.2),
        inv.InversionConfig(
            loss="max_margin",
            optimizer="adam",
            learning_rate=0.02,
            margin=0.5,
            denoise="gaussian",
            denoise_every=3,
        ),
        inv.InversionConfig(loss="poincare", optimizer="sgd", learning_rate=0.5),
        inv.InversionConfig(
            loss="cross_entropy",
            optimizer="adam",
            learning_rate=0.02,
            tv_weight=0.1,
            l2_weight=0.1,
            denoise="median",
            denoise_every=3,
            jitter=2,
            flip=True,
            patience=2,
            min_delta=1e-3,
        ),
        inv.InversionConfig(
            loss="max_margin",
            optimizer="adam",
            learning_rate=0.05,
            margin=0.5,
            jitter=1,
            flip=True,
            views=2,
            zoom=0.1,
            noise=0.02,
        ),
    ],
    ids=lambda c: (
        f"{c.loss}-{c.optimizer}{'-levers' if c.jitter else ''}{'-views' if c.views > 1 else ''}"
    ),
)
@pytest.mark.slow
def test_vmapped_program_equals_reference_loop(tiny, cfg):
    apply_fn, params = tiny
    x, labels, keys = _batch(3)
    steps = 6
    got = inv.invert_batch(apply_fn, params, x, labels, keys, cfg, steps)
    moved = 0.0
    for i in range(3):
        want, taken, reason = reference(cfg, apply_fn, params, x[i], keys[i], labels[i], steps)
        # float32: the batched and the single-clone convolutions round differently (1e-6 per
        # step, amplified by a large learning rate over the steps).
        np.testing.assert_allclose(got.clones[i], want, atol=1e-5)
        assert got.steps[i] == taken
        assert inv.STOP_REASONS[got.reason[i]] == reason
        moved = max(moved, float(jnp.abs(want - x[i]).max()))
    assert moved > 1e-3  # the comparison is not between untouched seeds
    loss, conf = jax.vmap(lambda v, y: inv.objective(cfg, apply_fn, params, v, None, y))(
        jnp.asarray(got.clones), labels
    )
    np.testing.assert_allclose(got.loss, loss, rtol=1e-5)
    np.testing.assert_allclose(got.confidence, conf, rtol=1e-5)


TINY_RESNET = models.ModelConfig(
    num_classes=3,
    image_size=(16, 16),
    arch="resnet",
    widths=(4, 8),
    blocks=(1, 1),
    stem_kernel=3,
    stem_stride=1,
)


@pytest.mark.parametrize("feature_weight", [0.0, 0.1], ids=["logits", "feature-statistics"])
@pytest.mark.slow
def test_vmapped_resnet_inversion_equals_reference_loop(feature_weight):
    cfg = inv.InversionConfig(
        loss="max_margin",
        optimizer="adam",
        learning_rate=0.02,
        margin=0.5,
        jitter=1,
        flip=True,
        feature_weight=feature_weight,
    )
    # Batch norm in inference mode, on running statistics that are not the identity: each clone
    # sees the same function whatever else is in its batch.
    graphdef, state = models.init(TINY_RESNET, jax.random.key(0))
    params, rest = models.split_trainable(graphdef, state)
    keys = iter(jax.random.split(jax.random.key(5), 64))
    rest = jax.tree.map(lambda v: v + 0.3 * jax.random.uniform(next(keys), v.shape), rest)
    params = jax.tree.map(lambda v: v + 0.2 * jax.random.normal(next(keys), v.shape), params)
    full = models.join(graphdef, params, rest)
    apply_fn = inv.recognizer_apply(graphdef, statistics=feature_weight != 0)
    x, labels, clone_keys = _batch(2)
    got = inv.invert_batch(apply_fn, full, x, labels, clone_keys, cfg, 5)
    for i in range(2):
        want, taken, _ = reference(cfg, apply_fn, full, x[i], clone_keys[i], labels[i], 5)
        np.testing.assert_allclose(got.clones[i], want, atol=1e-5)
        assert got.steps[i] == taken
    assert float(jnp.abs(got.clones - x).max()) > 1e-3


@pytest.mark.parametrize("steps_per_call", [3, 0])
def test_multi_step_calls_equal_single_steps(tiny, steps_per_call):
    apply_fn, params = tiny
    x, labels, keys = _batch(4)
    cfg = inv.InversionConfig(loss="cross_entropy", learning_rate=0.5, stop_confidence=0.4)
    one = inv.invert_batch(apply_fn, params, x, labels, keys, cfg, 7)
    assert {inv.STOP_REASONS[r] for r in one.reason} == {"confidence", "steps"}  # stops mid-call
    many = inv.invert_batch(
        apply_fn,
        params,
        x,
        labels,
        keys,
        dataclasses.replace(cfg, steps_per_call=steps_per_call),
        7,
    )
    for a, b in zip(one, many, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


# --- stopping, by hand on a toy recognizer ------------------------------------------------------


def _toy(params, x):
    """Two classes: logits [params * mean(x), 0]. # [b, h, w, c] -> [b, 2]"""
    m = params * jnp.mean(x, axis=(1, 2, 3))
    return jnp.stack([m, jnp.zeros_like(m)], -1)


def _flat(values, shape=(2, 2, 1)):
    return jnp.stack([jnp.full(shape, v) for v in values])


def test_stopping_rules_by_hand():
    # max_margin on the toy: loss max(-10 m, -5), d loss / d pixel = -10 / 4 while 10 m < 5, so
    # SGD at lr 0.04 adds 0.1 to every pixel per step until m >= 0.5, then the gradient is 0.
    base = inv.InversionConfig(loss="max_margin", optimizer="sgd", learning_rate=0.04, margin=5.0)
    keys = jax.random.split(jax.random.key(0), 3)
    labels = jnp.array([0, 0, 1])

    # Patience 3: improving until step 4 (m = 0.55, loss -5), then flat; since reaches 3 at step 7.
    # Clone 2 (label 1) is pushed to 0 and its loss 10 m stops improving once clipped at 0.
    rec = inv.invert_batch(
        _toy,
        10.0,
        _flat([0.15, 0.15, 0.25]),
        labels,
        keys,
        dataclasses.replace(base, patience=3),
        50,
    )
    np.testing.assert_allclose(rec.clones[0], 0.55, atol=1e-6)
    assert rec.steps.tolist()[:2] == [7, 7]
    assert [inv.STOP_REASONS[r] for r in rec.reason] == ["patience", "patience", "patience"]
    # clone 2: 0.25 -> 0.15 -> 0.05 -> 0 (clipped) at step 3; loss 0 at steps 3..6 -> stop at 6
    assert rec.steps[2] == 6
    np.testing.assert_allclose(rec.clones[2], 0.0)

    # Confidence 0.95 = sigmoid(10 m) needs m >= 0.2944: clone 0 from 0.15 stops at step 2
    # (m = 0.35); clone 1 starts at 0.4 (sigmoid(4) = 0.982) and stops untouched with 0 steps;
    # clone 2 (label 1) can only reach sigmoid(0) = 0.5 and runs all 10 steps.
    rec = inv.invert_batch(
        _toy,
        10.0,
        _flat([0.15, 0.4, 0.3]),
        labels,
        keys,
        dataclasses.replace(base, stop_confidence=0.95),
        10,
    )
    assert rec.steps.tolist() == [2, 0, 10]
    assert [inv.STOP_REASONS[r] for r in rec.reason] == ["confidence", "confidence", "steps"]
    np.testing.assert_allclose(rec.clones[:, 0, 0, 0], [0.35, 0.4, 0.0], atol=1e-6)
    np.testing.assert_allclose(
        rec.confidence, [jax.nn.sigmoid(3.5), jax.nn.sigmoid(4.0), 0.5], rtol=1e-5
    )


@pytest.mark.slow
def test_jit_equals_eager_step():
    cfg = inv.InversionConfig(
        loss="cross_entropy", optimizer="adam", learning_rate=0.05, jitter=1, patience=2
    )
    x = jax.random.uniform(jax.random.key(0), (1, 6, 6, 1))
    state = jax.tree.map(lambda a: a[0], inv.make_program(_toy, cfg).init(x, None, None))
    for step in range(2):
        args = (
            cfg,
            _toy,
            3.0,
            state,
            jax.random.key(1),
            jnp.int32(1),
            jnp.int32(step),
            jnp.int32(9),
        )
        with jax.disable_jit():
            eager = inv.clone_step(*args)
        state = jax.jit(inv.clone_step, static_argnums=(0, 1))(*args)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), eager, state)
    assert int(state.steps) == 2


def _log_toy(params, x):
    """logits [params * mean(log x), 0]: the gradient 1/x blows up once a pixel is clipped to 0"""
    m = params * jnp.mean(jnp.log(x), axis=(1, 2, 3))
    return jnp.stack([m, jnp.zeros_like(m)], -1)


def test_nan_in_one_clone_freezes_it_and_spares_the_others():
    cfg = inv.InversionConfig(loss="cross_entropy", learning_rate=0.5)
    x = _flat([0.05, 0.5, 0.6])
    labels = jnp.array([1, 0, 0])  # clone 0 is pushed down to 0, where log(0) = -inf
    keys = jax.random.split(jax.random.key(0), 3)
    rec = inv.invert_batch(_log_toy, 1.0, x, labels, keys, cfg, 20)
    assert rec.diverged.tolist() == [True, False, False]
    assert np.all(np.isfinite(rec.clones[0]))
    assert rec.steps[0] < 20 and rec.steps[1:].tolist() == [20, 20]
    alone = inv.invert_batch(_log_toy, 1.0, x[1:], labels[1:], keys[1:], cfg, 20)
    np.testing.assert_array_equal(rec.clones[1:], alone.clones)


# --- chunking and compilation ---------------------------------------------------------------------


def test_chunked_equals_unchunked(tiny):
    apply_fn, params = tiny
    x, labels, keys = _batch(4)
    cfg = inv.InversionConfig(loss="cross_entropy", learning_rate=0.5, stop_confidence=0.4)
    whole = inv.invert_batch(apply_fn, params, x, labels, keys, cfg, 7)
    timing = inv.Timing()
    chunked = inv.invert(apply_fn, params, x, labels, keys, cfg, 7, size=3, timing=timing)
    for a, b in zip(whole, chunked, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert timing.gradients == 2 * 3 * 7  # two chunks of three (the last padded), seven steps


def test_second_run_of_a_shape_compiles_nothing(tiny):
    apply_fn, params = tiny
    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    cfg = inv.InversionConfig(loss="poincare", learning_rate=0.1)
    x, labels, keys = _batch(4, seed=1)
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        inv.invert_batch(apply_fn, params, x, labels, keys, cfg, 3)
        first = len(compiles)
        x2, labels2, keys2 = _batch(4, seed=2)
        inv.invert_batch(apply_fn, params, x2, labels2, keys2, cfg, 9)  # new values and step count
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert first > 0 and len(compiles) == first


def test_chunk_size_caps_by_batch_memory_and_cache():
    big = dict(memory_bytes=10**12, cpu_cache=False)
    assert inv.chunk_size(1000, 256, 1000, **big) == 250  # 4 equal chunks
    assert inv.chunk_size(100, 256, 1000, **big) == 100
    assert inv.chunk_size(100, 256, 1000, memory_bytes=4 * 30 * 1000, cpu_cache=False) == 25
    # on CPU (these tests' backend): per device a power of two of clones within CPU_CACHE_BYTES
    per = inv.CPU_CACHE_BYTES // 100  # 100 fit -> 64 per device
    assert inv.chunk_size(6400, 10**6, per, memory_bytes=10**12) == 64 * len(jax.devices())
    paper = models.ModelConfig(num_classes=2041, image_size=(128, 128), channels=3)
    per = inv.bytes_per_clone(paper, inv.InversionConfig(optimizer="adam"))
    assert 1e6 < per < 2e7


def test_bad_settings_are_jaxmia_errors(tiny):
    apply_fn, params = tiny
    x, labels, keys = _batch(1)
    with pytest.raises(JaxmiaError, match="steps=0"):
        inv.invert_batch(apply_fn, params, x, labels, keys, inv.InversionConfig(), 0)
    with pytest.raises(JaxmiaError, match="inversion.loss"):
        inv.InversionConfig(loss="l1")
    with pytest.raises(JaxmiaError, match="learning_rate"):
        inv.InversionConfig(learning_rate=-1.0)


# --- the attack works ------------------------------------------------------------------------


@pytest.mark.slow
def test_attack_raises_target_confidence_on_synthetic_faces():
    from jaxmia.recognizers import train

    size, ids, aux = (32, 32), 6, 6
    images, labels, _ = synthetic.make_faces(ids + aux, 10, size, 1, seed=3)
    known = labels < ids
    mc = models.ModelConfig(num_classes=ids, image_size=size, dense_features=(64, 64), dropout=0.0)
    from jaxmia import config as config_lib

    tc = config_lib.default_config().train
    tc.update(
        dict(
            epochs=8, batch_size=16, optimizer="adam", learning_rate=3e-3,
            schedule="constant", warmup_epochs=0, augment=False,
            checkpoint_every=100, keep_checkpoints=1,
        )
    )  # fmt: skip
    graphdef, params, history = train.fit(
        mc, tc, images[known], labels[known], key=jax.random.key(0)
    )
    assert history[-1]["train_accuracy"] >= 0.8
    clones = 4
    keys = jax.random.split(jax.random.key(1), ids * clones)
    # The paper's seed (per-clone means of auxiliary faces) and loss; a rate tuned for 32x32.
    start = seeds.make_seeds("subset_mean", keys, (*size, 1), pool=images[~known], subset_size=256)
    target = jnp.repeat(jnp.arange(ids), clones)
    apply_fn = inv.recognizer_apply(graphdef)
    cfg = inv.InversionConfig(learning_rate=0.3, stop_confidence=0.95)
    _, before = inv.evaluate(apply_fn, params, start, target, cfg)
    rec = inv.invert_batch(apply_fn, params, start, target, keys, cfg, 300)
    after = rec.confidence.reshape(ids, clones).mean(1)
    assert np.all(after > 0.9), after
    assert np.all(after > before.reshape(ids, clones).mean(1) + 0.3)
    assert not rec.diverged.any()


def test_optimizer_is_the_papers_update():
    g = jnp.array([1.0, -2.0])
    opt = inv.make_optimizer(inv.InversionConfig(learning_rate=0.1))
    updates, _ = opt.update(g, opt.init(g))
    np.testing.assert_allclose(updates, -0.1 * g)


# --- the program's cache key: structure only; numeric settings traced -------------------------


def test_logit_margin_by_hand():
    z = jnp.array([2.0, 0.0, 1.0])
    assert float(inv.logit_margin(z, jnp.int32(0))) == 1.0  # 2 - max(0, 1)
    assert float(inv.logit_margin(z, jnp.int32(2))) == -1.0  # 1 - 2
    assert float(inv.logit_margin(jnp.array([0.5, 3.0, -1.0]), jnp.int32(1))) == 2.5
    for y, m in [(0, 5.0), (0, 0.5), (1, 5.0)]:  # max_margin is its negation, floored
        want = jnp.maximum(-inv.logit_margin(z, jnp.int32(y)), -m)
        assert float(inv.data_loss("max_margin", z, jnp.int32(y), m)) == float(want)


def _counted(apply_fn, n):
    """``apply_fn`` as a new function that raises once traced more than ``n`` times.

    Python runs it only while JAX traces a program around it, so its calls count traces. A new
    function object also keys a new program (``make_program`` caches by function).
    """
    chex.clear_trace_counter()
    return chex.assert_max_traces(lambda params, x: apply_fn(params, x), n=n)


SWEEPS = {
    "learning_rate": [dict(learning_rate=v) for v in (0.05, 0.2, 1.0, 5.0)],
    "margin_tv_weight": [
        dict(loss="max_margin", learning_rate=0.5, margin=m, tv_weight=w)
        for m, w in ((0.5, 0.1), (1.0, 0.2), (2.0, 0.5), (5.0, 1.0))
    ],
    "the_rest": [
        dict(optimizer="momentum", learning_rate=0.5, momentum=mo, l2_weight=l2,
             stop_confidence=sc, patience=p, min_delta=md, denoise="gaussian", denoise_every=de)
        for mo, l2, sc, p, md, de in (
            (0.0, 0.1, 0.0, 0, 0.0, 1), (0.5, 0.2, 0.4, 1, 1e-3, 2),
            (0.9, 0.5, 0.5, 2, 1e-2, 3), (0.99, 1.0, 0.9, 3, 0.1, 10),
        )
    ],
}  # fmt: skip


@pytest.mark.parametrize("sweep", list(SWEEPS))
def test_a_sweep_of_numeric_settings_compiles_once(tiny, sweep):
    apply_fn = _counted(tiny[0], 2)  # one trace each of the step and of the evaluation
    params = tiny[1]
    x, labels, keys = _batch(3)
    cfgs = [inv.InversionConfig(steps_per_call=1, **kw) for kw in SWEEPS[sweep]]
    recs = [inv.invert_batch(apply_fn, params, x, labels, keys, c, 4) for c in cfgs]
    program = inv.make_program(apply_fn, cfgs[0])
    assert all(inv.make_program(apply_fn, c) is program for c in cfgs)
    assert len(program.compiled) == 4  # init, steps, decode, evaluate
    # the traced values are used: every setting gives other clones
    flat = [r.clones.tobytes() for r in recs]
    assert len(set(flat)) == len(flat)


def test_check_every_and_shard_reuse_the_program(tiny):
    apply_fn = _counted(tiny[0], 2)
    x, labels, keys = _batch(3)
    cfg = inv.InversionConfig(learning_rate=0.5, steps_per_call=2, check_every=2)
    program = inv.make_program(apply_fn, cfg)
    for kw in (dict(check_every=1), dict(check_every=7), dict(shard=False), {}):
        other = dataclasses.replace(cfg, **kw)
        assert inv.make_program(apply_fn, other) is program
        inv.invert_batch(apply_fn, tiny[1], x, labels, keys, other, 5)
    # by backend too: under the default steps_per_call, CPU runs one step per call regardless
    auto = inv.InversionConfig()
    assert auto.spec("cpu") == dataclasses.replace(auto, check_every=7, shard=False).spec("cpu")


def test_steps_per_call_by_backend():
    auto = inv.InversionConfig(check_every=25)
    assert auto.steps_per_call is None
    assert inv.resolved_steps_per_call(auto, "cpu") == 1
    assert inv.resolved_steps_per_call(auto, "gpu") == 25
    assert inv.resolved_steps_per_call(auto, "tpu") == 25
    assert inv.resolved_steps_per_call(auto) == inv.resolved_steps_per_call(
        auto, jax.default_backend()
    )
    assert auto.spec("gpu").steps_per_call == 25
    for k in (0, 1, 3):
        for backend in ("cpu", "gpu", "tpu"):
            assert (
                inv.resolved_steps_per_call(dataclasses.replace(auto, steps_per_call=k), backend)
                == k
            )
    with pytest.raises(JaxmiaError, match="steps_per_call=-1"):
        inv.InversionConfig(steps_per_call=-1)


def test_auto_steps_per_call_from_config():
    from jaxmia import config

    section = config.default_config().inversion
    assert section.steps_per_call is None
    assert inv.InversionConfig.from_config(section).steps_per_call is None
    c = config.default_config()
    config.apply_overrides(c, ["--config.inversion.steps_per_call=4"])
    assert inv.InversionConfig.from_config(c.inversion).steps_per_call == 4
    section.steps_per_call = -2
    with pytest.raises(JaxmiaError, match="steps_per_call=-2"):
        inv.InversionConfig.from_config(section)


def test_auto_steps_per_call_on_an_accelerator_runs_check_every_per_call(tiny, monkeypatch):
    apply_fn, params = tiny
    x, labels, keys = _batch(4)
    cfg = inv.InversionConfig(loss="cross_entropy", learning_rate=0.5, stop_confidence=0.4)
    one = inv.invert_batch(
        apply_fn, params, x, labels, keys, dataclasses.replace(cfg, steps_per_call=1), 7
    )
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    auto = dataclasses.replace(cfg, check_every=3)
    assert inv.make_program(apply_fn, auto).spec.steps_per_call == 3
    timing = inv.Timing()
    got = inv.invert_batch(apply_fn, params, x, labels, keys, auto, 7, timing)
    for a, b in zip(one, got, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert timing.gradients == 4 * 7
