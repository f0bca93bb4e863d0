"""faceres's trunk split at a block (``map_before`` then ``pooled_from``) is the whole network:
what partial fine-tuning (models.ModelConfig tune="top") caches and trains on."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxmia.pretrained import faceres, fetch


@pytest.fixture(scope="module")
def model():
    try:
        fetch.model_files("faceres")
    except fetch.FetchError as e:
        if e.offline:
            pytest.skip("faceres is not fetched and no registry is reachable: "
                        "jaxmia models fetch faceres")  # fmt: skip
        raise
    return faceres.load_faceres()


@pytest.mark.slow
def test_a_split_anywhere_gives_the_descriptor(model):
    x = jax.random.uniform(jax.random.key(0), (2, 48, 40, 3))
    whole = np.asarray(model(x))  # [2, 1024]
    trunk = model.backbone
    # conv1's map, a stride-2 block's input, the 14x14 stage, the last block's input, the end
    shapes = {0: (112, 112, 32), 1: (112, 112, 64), 11: (14, 14, 512), 12: (7, 7, 1024),
              13: (7, 7, 1024)}  # fmt: skip
    for block, shape in shapes.items():
        h = trunk.map_before(x, block)
        assert h.shape == (2, *shape)
        np.testing.assert_allclose(trunk.pooled_from(h, block), whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(trunk.feature_map(x), trunk.map_before(x, 13))
    assert whole.max() > 0.5  # a real signal, not zeros on both sides
