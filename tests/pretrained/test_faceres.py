"""faceres in JAX against TensorFlow.js's own outputs of the original graph on real faces.

The reference (tests/reference/faceres_reference.npz, made by make_faceres_reference.mjs) holds 6
CelebA photos as uint8 (3 at 128x128, 3 at 64x64) and what TF.js 4.22.0 computed from them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmia.errors import JaxmiaError
from jaxmia.pretrained import faceres, fetch, tfjs_format

REFERENCE = Path(__file__).resolve().parents[1] / "reference" / "faceres_reference.npz"


@pytest.fixture(scope="module")
def files():
    try:
        return fetch.model_files("faceres")
    except fetch.FetchError as e:
        if e.offline:
            pytest.skip("faceres is not fetched and no registry is reachable: "
                        "jaxmia models fetch faceres")  # fmt: skip
        raise


@pytest.fixture(scope="module")
def model(files):
    return faceres.load_faceres(files["faceres.json"])


@pytest.fixture(scope="module")
def ref():
    with np.load(REFERENCE) as data:
        return dict(data)


@nnx.jit
def _outputs(model, x):
    return model(x), *model.age_gender(x)


@pytest.mark.parametrize("size", [128, 64])
def test_equals_tensorflow_js(model, ref, size):
    x = ref[f"images{size}"].astype(np.float32) / 255  # [3, size, size, 3]
    descriptor, age, male = (np.asarray(a) for a in _outputs(model, x))
    diff = np.abs(descriptor - ref[f"descriptor{size}"]).max()
    print(f"faceres vs TF.js, {size}x{size} inputs: max abs diff {diff:.2e}")
    assert descriptor.shape == (3, faceres.DESCRIPTOR_DIM)
    assert diff <= 1e-4
    assert np.abs(ref[f"descriptor{size}"]).max() > 1.0  # the figure compares real signals
    np.testing.assert_allclose(age, ref[f"age{size}"], atol=1e-5)
    np.testing.assert_allclose(male, ref[f"male{size}"], atol=1e-5)


def test_near_humans_own_resize(model, ref):
    # human resizes without half-pixel centres; the descriptor barely moves with it
    for size in (128, 64):
        ours = np.asarray(_outputs(model, ref[f"images{size}"].astype(np.float32) / 255)[0])
        human = ref[f"human{size}"]
        cosine = (
            (ours * human).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(human, axis=1)
        )
        assert cosine.min() > 0.98, cosine


@pytest.mark.slow
def test_jit_vmap_gradient_backbone(model, ref):
    x = jnp.asarray(ref["images64"].astype(np.float32) / 255)  # [3, 64, 64, 3]
    one_each = jax.jit(jax.vmap(lambda xi: model(xi[None])[0]))(x)
    assert np.abs(np.asarray(one_each) - ref["descriptor64"]).max() <= 1e-4
    assert isinstance(model.backbone, faceres.FaceResBackbone)
    features, backbone = nnx.jit(lambda m, x: (m.features(x), m.backbone(x)))(model, x)
    assert np.abs(np.asarray(features) - ref["descriptor64"]).max() <= 1e-4
    assert np.abs(np.asarray(backbone) - ref["descriptor64"]).max() <= 1e-4
    # MobileNet-v1 1.0 without its classifier: 3.2 million weights, norms folded in
    params = nnx.state(model.backbone, nnx.Param)
    assert 3.1e6 < sum(p.size for p in jax.tree.leaves(params)) < 3.3e6

    def similarity(x):  # cosine to the first photo's descriptor, as an inversion would use
        d = model(x)
        return jnp.sum(d[1:] @ d[0]) / jnp.linalg.norm(d[0]) ** 2

    grad = jax.jit(jax.grad(similarity))(x)
    assert grad.shape == x.shape
    assert bool(jnp.isfinite(grad).all()) and float(jnp.abs(grad).max()) > 0


@pytest.mark.parametrize("shape,stride", [((2, 7, 7, 4), 1), ((2, 8, 9, 3), 2)])
def test_depthwise_and_its_gradient_equal_a_grouped_convolution(shape, stride):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(3, 3, shape[-1])), jnp.float32)

    def grouped(x, kernel, stride):  # XLA's own depthwise convolution, autodiff's gradient
        return jax.lax.conv_general_dilated(
            x, kernel[:, :, None], (stride, stride), "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=shape[-1],
        )  # fmt: skip

    expected = grouped(x, kernel, stride)
    np.testing.assert_allclose(faceres._depthwise(x, kernel, stride), expected, atol=1e-5)
    weights = jnp.asarray(rng.normal(size=expected.shape), jnp.float32)
    for ours, theirs in zip(
        jax.grad(lambda x, k: jnp.sum(faceres._depthwise(x, k, stride) * weights), (0, 1))(
            x, kernel
        ),
        jax.grad(lambda x, k: jnp.sum(grouped(x, k, stride) * weights), (0, 1))(x, kernel),
        strict=True,
    ):
        np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_embed_pads_batches_and_takes_grey(model, ref):
    x = ref["images64"].astype(np.float32) / 255  # [3, 64, 64, 3]
    before = faceres._descriptors._cache_size()
    out = faceres.embed(model, x, batch_size=2)  # batches of 2, the last padded
    assert faceres._descriptors._cache_size() - before <= 1
    assert out.shape == (3, faceres.DESCRIPTOR_DIM)
    assert np.abs(out - ref["descriptor64"]).max() <= 1e-4
    grey = x.mean(-1, keepdims=True)
    np.testing.assert_array_equal(
        np.asarray(faceres._to_input(jnp.asarray(grey))),
        np.asarray(faceres._to_input(jnp.asarray(np.repeat(grey, 3, -1)))),
    )
    with pytest.raises(JaxmiaError, match=r"expected \[n, h, w, 3\]"):
        faceres.embed(model, x[..., :2])
    with pytest.raises(JaxmiaError, match=r"expected \[n, h, w, 3\]"):
        model(jnp.zeros((64, 64, 3)))


def test_refuses_another_graph(files):
    graph = tfjs_format.load_graph_model(files["faceres.json"])
    faceres._check_graph(graph)
    name = "conv_dw_4/depthwise"
    wrong = dataclasses.replace(
        graph.nodes[name], attrs={**graph.nodes[name].attrs, "strides": [1, 1, 1, 1]}
    )
    nodes = {**graph.nodes, name: wrong}
    with pytest.raises(JaxmiaError, match="conv_dw_4/depthwise"):
        faceres._check_graph(dataclasses.replace(graph, nodes=nodes))
    weights = {**graph.weights, "conv_pw_3_relu/Cast": np.float32(20.0)}
    with pytest.raises(JaxmiaError, match="not a ReLU6"):
        faceres._check_graph(dataclasses.replace(graph, weights=weights))
