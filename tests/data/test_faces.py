import hashlib
import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxmia import config
from jaxmia.data import faces as faces_lib
from jaxmia.data import splits
from jaxmia.errors import JaxmiaError

SHARED_ATT = Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "att_faces"


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """Every test gets its own cache, also through $JAXMIA_CACHE."""
    root = tmp_path / "cache"
    monkeypatch.setenv("JAXMIA_CACHE", str(root))
    return root


@pytest.fixture
def decodes(monkeypatch):
    """Counts image decodes."""
    calls = []
    real = faces_lib._decode_image

    def counting(path, *args):
        calls.append(path)
        return real(path, *args)

    monkeypatch.setattr(faces_lib, "_decode_image", counting)
    return calls


def reference(path, size, channels):
    """What one image should become, the plain PIL way. # [h, w, c] float32"""
    img = Image.open(path).convert("RGBA").convert("L" if channels == 1 else "RGB")
    img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(img, np.float32).reshape(*size, channels) / 255


def prepared(cache: Path) -> list[Path]:
    return sorted(cache.glob("faces/*/jaxmia_faces/1.0.0"))


def write_tiny_folder(root: Path) -> None:
    """3 identities (natural order p2 < p10 < zed), every format, grey and colour."""
    rgb = np.zeros((20, 16, 3), np.uint8)
    rgb[..., 0] = 200  # red
    rgb[5:15, 4:12] = (20, 160, 40)  # a green square
    grey = np.tile(np.linspace(0, 255, 16, dtype=np.uint8), (20, 1))
    for d in ("p2", "p10", "zed"):
        (root / d).mkdir(parents=True)
    Image.fromarray(rgb).save(root / "p2" / "a.png")
    Image.fromarray(grey).save(root / "p2" / "b.pgm")
    Image.fromarray(rgb).save(root / "p10" / "1.jpg", quality=95)
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "p10" / "2.gif")
    Image.fromarray(grey).save(root / "p10" / "10.png")
    Image.fromarray(rgb).convert("RGBA").save(root / "zed" / "x.PNG")
    (root / "zed" / "notes.txt").write_text("not an image")


def test_embedded_att(decodes):
    faces = faces_lib.load_faces("att", image_size=(28, 24), channels=1, progress=False)
    assert faces.images.shape == (400, 28, 24, 1) and faces.images.dtype == np.float32
    assert faces.images.min() >= 0.0 and faces.images.max() <= 1.0
    assert faces.names == tuple(f"s{i}" for i in range(1, 41))
    np.testing.assert_array_equal(faces.labels, np.repeat(np.arange(40), 10))
    assert faces.files[:3] == ("s1/1.pgm", "s1/2.pgm", "s1/3.pgm")
    assert all(f.endswith(".pgm") for f in faces.files)  # not the stray s10/target.jpg
    assert not faces.synthetic and "AT&T" in faces.source
    assert len(decodes) == 400
    root = faces_lib.att_faces_dir()
    for i in (0, 123, 399):
        np.testing.assert_allclose(
            faces.images[i], reference(root / faces.files[i], (28, 24), 1), atol=1e-6
        )


def test_second_load_is_served_from_the_cache(cache, decodes):
    first = faces_lib.load_faces("att", image_size=(16, 16), channels=1, progress=False)
    assert len(decodes) == 400 and len(prepared(cache)) == 1
    second = faces_lib.load_faces("att", image_size=(16, 16), channels=1, progress=False)
    assert len(decodes) == 400  # nothing decoded again
    assert second.images.tobytes() == first.images.tobytes()
    assert second.files == first.files and second.names == first.names
    faces_lib.load_faces("att", image_size=(16, 16), channels=3, progress=False)
    assert len(decodes) == 800 and len(prepared(cache)) == 2  # another shape: its own cache


@pytest.mark.skipif(not SHARED_ATT.is_dir(), reason="../shared/datasets/att_faces is absent")
def test_shared_att_folder():
    faces = faces_lib.load_faces(f"folder:{SHARED_ATT}", image_size=(32, 32), channels=1)
    embedded = faces_lib.load_faces("att", image_size=(32, 32), channels=1)
    assert faces.images.shape == (400, 32, 32, 1)
    assert faces.names == embedded.names and faces.files == embedded.files
    np.testing.assert_array_equal(faces.labels, embedded.labels)
    for i in (0, 200, 399):
        np.testing.assert_allclose(
            faces.images[i], reference(SHARED_ATT / faces.files[i], (32, 32), 1), atol=1e-6
        )


@pytest.mark.parametrize("channels", [1, 3])
def test_tiny_folder_every_format(tmp_path, channels):
    write_tiny_folder(tmp_path / "faces")
    faces = faces_lib.load_faces(
        f"folder:{tmp_path / 'faces'}", image_size=(10, 8), channels=channels, progress=False
    )
    assert faces.names == ("p2", "p10", "zed")
    assert faces.files == (
        "p2/a.png",
        "p2/b.pgm",
        "p10/1.jpg",
        "p10/2.gif",
        "p10/10.png",
        "zed/x.PNG",
    )
    np.testing.assert_array_equal(faces.labels, [0, 0, 1, 1, 1, 2])
    assert faces.images.shape == (6, 10, 8, channels)
    for i, f in enumerate(faces.files):
        atol = 0.06 if f.endswith((".jpg", ".gif")) else 1e-6  # lossy formats
        want = reference(tmp_path / "faces" / f, (10, 8), channels)
        np.testing.assert_allclose(faces.images[i], want, atol=atol)
    # Colour survives in RGB: the red background and the green square.
    if channels == 3:
        red = faces.images[0, 0, 0]
        green = faces.images[0, 5, 4]
        assert red[0] > 0.7 and red[1] < 0.1 and green[1] > 0.5 and green[0] < 0.2


def test_changed_folder_is_prepared_again(tmp_path, cache, decodes):
    root = tmp_path / "faces"
    write_tiny_folder(root)
    faces_lib.load_faces(f"folder:{root}", image_size=(8, 8), channels=1, progress=False)
    assert len(decodes) == 6
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(root / "zed" / "y.png")
    faces = faces_lib.load_faces(f"folder:{root}", image_size=(8, 8), channels=1, progress=False)
    assert len(decodes) == 6 + 7 and len(faces) == 7
    os.utime(root / "p2" / "a.png", ns=(1, 1))  # same files, one changed mtime
    faces_lib.load_faces(f"folder:{root}", image_size=(8, 8), channels=1, progress=False)
    assert len(decodes) == 6 + 7 + 7
    assert len(prepared(cache)) == 3


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_image_names_the_file_and_leaves_no_cache(tmp_path, cache, damage):
    root = tmp_path / "faces"
    write_tiny_folder(root)
    bad = root / "p10" / "10.png"
    if damage == "truncated":
        noise = np.random.default_rng(0).integers(0, 256, (40, 40), np.uint8)
        Image.fromarray(noise).save(bad)  # incompressible, so cutting it loses pixels
        bad.write_bytes(bad.read_bytes()[:900])
    else:
        bad.write_bytes(b"\x89PNG this is not a picture")
    with pytest.raises(JaxmiaError) as e:
        faces_lib.load_faces(f"folder:{root}", image_size=(8, 8), channels=1, progress=False)
    message = str(e.value)
    assert str(bad) in message and "not a readable image" in message
    assert "\n" not in message
    assert list(cache.glob("faces/*")) == []  # nothing half-written


def test_interrupted_preparation_leaves_no_cache(tmp_path, cache, monkeypatch):
    root = tmp_path / "faces"
    write_tiny_folder(root)
    real = faces_lib._decode_image
    seen = []

    def interrupted(path, *args):
        seen.append(path)
        if len(seen) == 4:
            raise KeyboardInterrupt
        return real(path, *args)

    monkeypatch.setattr(faces_lib, "_decode_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        faces_lib.load_faces(f"folder:{root}", image_size=(8, 8), channels=1, progress=False)
    assert prepared(cache) == []
    monkeypatch.setattr(faces_lib, "_decode_image", real)
    faces = faces_lib.load_faces(f"folder:{root}", image_size=(8, 8), channels=1, progress=False)
    assert len(faces) == 6


def test_damaged_cache_is_prepared_again(tmp_path, cache, decodes):
    root = tmp_path / "faces"
    write_tiny_folder(root)
    first = faces_lib.load_faces(f"folder:{root}", image_size=(8, 8), channels=1, progress=False)
    (record,) = prepared(cache)[0].glob("*.array_record*")
    record.write_bytes(b"")
    again = faces_lib.load_faces(f"folder:{root}", image_size=(8, 8), channels=1, progress=False)
    assert len(decodes) == 12
    assert again.images.tobytes() == first.images.tobytes()


def test_min_images_drops_small_identities(tmp_path):
    root = tmp_path / "faces"
    write_tiny_folder(root)
    faces = faces_lib.load_faces(
        f"folder:{root}", image_size=(8, 8), channels=1, progress=False, min_images=2
    )
    assert faces.names == ("p2", "p10")
    np.testing.assert_array_equal(faces.labels, [0, 0, 1, 1, 1])
    assert faces.files[-1] == "p10/10.png"


def test_subset_keeps_names():
    faces = faces_lib.load_faces("att", image_size=(8, 8), channels=1, progress=False)
    part = faces.subset(np.array([15, 3]))
    assert part.names == faces.names and part.files == ("s2/6.pgm", "s1/4.pgm")
    np.testing.assert_array_equal(part.labels, [1, 0])
    np.testing.assert_array_equal(part.images, faces.images[[15, 3]])


def test_synthetic_source():
    faces = faces_lib.load_faces(
        "synthetic",
        image_size=(32, 32),
        channels=1,
        synthetic={"num_identities": 20, "images_per_identity": 6, "seed": 0},
        progress=False,
    )
    assert faces.synthetic and "synthetic" in faces.source
    assert faces.images.shape == (120, 32, 32, 1)
    assert faces.names[0] == "synthetic_0000" and faces.files[7] == "synthetic_0001/1"


class JaxmiaTestCatalog(tfds.core.GeneratorBasedBuilder):
    """A stand-in for a catalog set such as lfw: an Image and a Text name per example."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.Text(),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(9), "test": self._generate_examples(3)}

    def _generate_examples(self, n):
        for i in range(n):
            image = np.full((12, 10, 3), 20 * i, np.uint8)
            yield i, {"image": Image.fromarray(image), "label": f"person_{i % 3 + 1}"}


def test_prepared_catalog_set_reads_without_tensorflow(cache, monkeypatch):
    builder = tfds.builder("jaxmia_test_catalog", data_dir=cache / "tfds")
    tfds.display_progress_bar(False)
    builder.download_and_prepare(file_format="array_record")
    faces = faces_lib.load_faces(
        "tfds:jaxmia_test_catalog", image_size=(6, 5), channels=3, progress=False
    )
    assert faces.names == ("person_1", "person_2", "person_3")
    assert faces.images.shape == (9, 6, 5, 3) and np.bincount(faces.labels).tolist() == [3, 3, 3]
    assert sorted(faces.files) == sorted(f"train/{i}" for i in range(9))
    for image, label in zip(faces.images, faces.labels, strict=True):
        np.testing.assert_allclose(image, np.full((6, 5, 3), image[0, 0, 0]), atol=1e-6)
        made = round(image[0, 0, 0] * 255 / 20)  # the example's number as generated
        assert faces.names[label] == f"person_{made % 3 + 1}"
    test = faces_lib.load_faces(
        "tfds:jaxmia_test_catalog:test", image_size=(6, 5), channels=1, progress=False
    )
    assert len(test) == 3 and test.files[0].startswith("test/")
    with pytest.raises(JaxmiaError, match="no split 'validation'"):
        faces_lib.load_faces("tfds:jaxmia_test_catalog:validation", image_size=(6, 5), channels=1)


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None, reason="TensorFlow is installed"
)
def test_catalog_set_without_tensorflow(cache):
    with pytest.raises(JaxmiaError) as e:
        faces_lib.load_faces("tfds:lfw", image_size=(8, 8), channels=1, progress=False)
    assert str(e.value) == (
        "tfds:lfw: preparing tensorflow-datasets catalog sets needs TensorFlow; "
        "install it with pip install 'jaxmia[tf]'"
    )
    assert not (cache / "faces").exists()


def test_unknown_catalog_name():
    with pytest.raises(JaxmiaError, match="tfds:no_such_faces: no tensorflow-datasets catalog set"):
        faces_lib.load_faces("tfds:no_such_faces", image_size=(8, 8), channels=1)


@pytest.mark.parametrize(
    "make, source, expected",
    [
        (
            None,
            "folder:{root}/missing",
            "{root}/missing: folder not found (expected one sub-folder",
        ),
        ("empty", "folder:{root}", "{root}: no identity sub-folders (expected one sub-folder"),
        ("file", "folder:{root}/f.png", "{root}/f.png: not a folder"),
        ("no_images", "folder:{root}", "{root}/bob: identity folder has no images (expected .png"),
        (None, "http://faces", "data source 'http://faces': expected 'att', 'folder:PATH'"),
        (None, "folder:", "data source 'folder:': expected"),
    ],
)
def test_bad_folders_and_sources(tmp_path, cache, make, source, expected):
    root = tmp_path / "faces"
    root.mkdir()
    if make == "file":
        (root / "f.png").write_bytes(b"")
    elif make == "no_images":
        (root / "alice").mkdir()
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "alice" / "1.png")
        (root / "bob").mkdir()
        (root / "bob" / "readme.txt").write_text("x")
    with pytest.raises(JaxmiaError) as e:
        faces_lib.load_faces(
            source.format(root=root), image_size=(8, 8), channels=1, progress=False
        )
    assert str(e.value).startswith(expected.format(root=root))
    assert "\n" not in str(e.value)
    assert not (cache / "faces").exists()


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"channels": 2}, "data.channels"),
        ({"image_size": (0, 8)}, "data.image_size"),
        ({"image_size": (8,)}, "data.image_size"),
        ({"source": "synthetic", "synthetic": {"identities": 3}}, "data.synthetic.identities"),
        ({"source": "synthetic", "synthetic": {"seed": 1.5}}, "data.synthetic.seed"),
    ],
)
def test_bad_settings(kwargs, field):
    args = {"source": "att", "image_size": (8, 8), "channels": 1} | kwargs
    with pytest.raises(JaxmiaError, match=field):
        faces_lib.load_faces(args.pop("source"), **args)


def test_cache_root(monkeypatch, tmp_path):
    assert faces_lib.cache_root(str(tmp_path)) == tmp_path
    monkeypatch.delenv("JAXMIA_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert faces_lib.cache_root(None) == tmp_path / ".cache" / "jaxmia"


def write_framed_folder(root: Path, shape=(40, 32)) -> None:
    """2 identities x 2 PNGs: a flat red frame round a noise centre of half the height and width."""
    rng = np.random.default_rng(0)
    h, w = shape
    for person in ("alice", "bob"):
        (root / person).mkdir(parents=True)
        for j in range(2):
            image = np.zeros((h, w, 3), np.uint8)
            image[...] = (220, 10, 10)
            image[h // 4 : h // 4 + h // 2, w // 4 : w // 4 + w // 2] = rng.integers(
                0, 256, (h // 2, w // 2, 3), np.uint8
            )
            Image.fromarray(image).save(root / person / f"{j}.png")


def cropped_reference(path, size, channels, crop):
    """The centred crop and resize, the plain PIL way. # [h, w, c] float32"""
    img = Image.open(path).convert("L" if channels == 1 else "RGB")
    w, h = img.size
    ch, cw = max(1, int(crop * h + 0.5)), max(1, int(crop * w + 0.5))
    top, left = (h - ch) // 2, (w - cw) // 2
    img = img.crop((left, top, left + cw, top + ch))
    img = img.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(img, np.float32).reshape(*size, channels) / 255


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("crop, size", [(0.5, (20, 16)), (0.5, (10, 8)), (0.3, (9, 7))])
def test_crop_cuts_the_centre(tmp_path, channels, crop, size):
    root = tmp_path / "faces"
    write_framed_folder(root)
    faces = faces_lib.load_faces(
        f"folder:{root}", image_size=size, channels=channels, crop=crop, progress=False
    )
    assert faces.images.shape == (4, *size, channels)
    for i, f in enumerate(faces.files):
        want = cropped_reference(root / f, size, channels, crop)
        np.testing.assert_allclose(faces.images[i], want, atol=1e-6)
    if size == (20, 16):  # exactly the centre: no frame left, and nothing resized
        centre = np.asarray(Image.open(root / faces.files[0]).convert("RGB"))[10:30, 8:24]
        if channels == 3:
            np.testing.assert_allclose(faces.images[0], centre / 255, atol=1e-6)
    whole = faces_lib.load_faces(
        f"folder:{root}", image_size=size, channels=channels, progress=False
    )
    assert not np.allclose(whole.images, faces.images)


@pytest.mark.parametrize(
    "height, width, crop, box",
    [
        (250, 250, 0.5, (62, 62, 187, 187)),  # LFW: the centred 125x125
        (5, 5, 0.5, (1, 1, 4, 4)),  # 2.5 rounds up to 3
        (10, 20, 0.01, (9, 4, 10, 5)),  # at least a pixel
        (7, 9, 1.0, (0, 0, 9, 7)),
    ],
)
def test_crop_box(height, width, crop, box):
    assert faces_lib.crop_box(height, width, crop) == box


@pytest.mark.parametrize("crop", [0, 0.0, -0.5, 1.01, 2, float("nan"), True, "0.5", None])
def test_crop_out_of_range_is_refused(tmp_path, cache, crop):
    with pytest.raises(JaxmiaError) as e:
        faces_lib.load_faces("att", image_size=(8, 8), channels=1, crop=crop, progress=False)
    assert str(e.value) == (
        f"data.crop: expected a fraction in (0, 1] of the image's height and width, got {crop!r}"
    )
    assert not (cache / "faces").exists()


def test_synthetic_faces_refuse_a_crop():
    # test_synthetic_source's faces: the renderer compiled for their shape already
    kw = dict(image_size=(32, 32), channels=1, progress=False)
    kw["synthetic"] = {"num_identities": 20, "images_per_identity": 6, "seed": 0}
    with pytest.raises(JaxmiaError, match="data.crop: expected 1.0 for data.source 'synthetic'"):
        faces_lib.load_faces("synthetic", crop=0.5, **kw)
    faces = faces_lib.load_faces("synthetic", crop=1.0, **kw)
    assert faces.synthetic


def test_crop_is_part_of_the_cache_key(tmp_path, cache, decodes):
    root = tmp_path / "faces"
    write_framed_folder(root)
    load = lambda crop: faces_lib.load_faces(  # noqa: E731
        f"folder:{root}", image_size=(10, 8), channels=1, crop=crop, progress=False
    )
    whole, half = load(1.0), load(0.5)
    assert len(decodes) == 8 and len(prepared(cache)) == 2  # each crop prepared
    again = load(0.5)
    load(1)  # an int 1 is the same as no crop
    assert len(decodes) == 8  # both served from their caches
    assert again.images.tobytes() == half.images.tobytes() != whole.images.tobytes()
    load(0.6)
    assert len(decodes) == 12 and len(prepared(cache)) == 3
    names = sorted(p.parents[1].name for p in prepared(cache))
    assert sorted(n.split("-")[1:-1] for n in names) == [
        ["10x8x1"],
        ["10x8x1", "crop0.5"],
        ["10x8x1", "crop0.6"],
    ]
    # Without a crop the key is what it was before crops existed: those caches stay valid.
    digest = hashlib.sha256(
        json.dumps([1, str(root), (10, 8), 1, sorted(faces_lib.IMAGE_SUFFIXES)]).encode()
    )
    for f in whole.files:
        st = (root / f).stat()
        digest.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    assert f"faces-10x8x1-{digest.hexdigest()[:16]}" in names


def test_faces_from_config_passes_the_crop(tmp_path):
    root = tmp_path / "faces"
    write_framed_folder(root)
    cfg = config.default_config()
    cfg.data.source = f"folder:{root}"
    cfg.data.image_size = (10, 8)
    cfg.data.crop = 0.5
    faces = faces_lib.faces_from_config(cfg, progress=False)
    np.testing.assert_allclose(
        faces.images[1], cropped_reference(root / faces.files[1], (10, 8), 1, 0.5), atol=1e-6
    )


def test_catalog_set_crop(cache):
    builder = tfds.builder("jaxmia_test_catalog", data_dir=cache / "tfds")
    tfds.display_progress_bar(False)
    builder.download_and_prepare(file_format="array_record")
    kwargs = {"image_size": (6, 5), "channels": 3, "progress": False}
    whole = faces_lib.load_faces("tfds:jaxmia_test_catalog", **kwargs)
    half = faces_lib.load_faces("tfds:jaxmia_test_catalog", crop=0.5, **kwargs)
    assert len(prepared(cache)) == 2  # its own cache
    # The stand-in's images are flat, so the centre is the whole.
    np.testing.assert_allclose(half.images, whole.images, atol=1e-6)


CELEBA = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "celeba128"


@pytest.mark.skipif(not CELEBA.is_dir(), reason="../shared/datasets/celeba128 is absent")
def test_celeba128_loads_and_splits(tmp_path):
    # Photo counts straight from the folder (5 to 30 per identity).
    counts = {
        d.name: sum(1 for f in d.iterdir() if f.suffix.lower() in faces_lib.IMAGE_SUFFIXES)
        for d in CELEBA.iterdir()
        if d.is_dir() and not d.name.startswith(".")
    }
    faces = faces_lib.load_faces(
        f"folder:{CELEBA}",
        image_size=(32, 32),
        channels=3,
        cache_dir=str(tmp_path / "cache"),
        progress=False,
    )
    assert faces.images.shape == (sum(counts.values()), 32, 32, 3)
    assert set(faces.names) == set(counts)
    for test_per_identity in (3, 5):  # needing 5 photos (none short) and 7 (some short)
        split = splits.make_split(faces, seed=0, test_per_identity=test_per_identity)
        need = test_per_identity + 2
        short = {n for n, c in counts.items() if c < need}
        assert set(split.left_out) == short
        assert len(split.all.identities) == len(counts) - len(short)
        assert (split.notes() != []) == bool(short)
        assert not set(split.aux_identities) & short
