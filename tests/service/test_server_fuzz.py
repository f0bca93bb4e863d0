"""Fuzz: generated requests against the served app, in process (hypothesis).

For every generated request (path, method, key, Content-Type, extra headers, query string and a
body drawn from raw bytes, .npy arrays of any shape and dtype, corrupted .npy headers, PNG
headers of any size, real images of the wrong size, and JSON values):
- the answer is one line of JSON (``{"error": ...}`` for a refusal) with a 2xx or 4xx code;
- the store grows by exactly the queries the request was answered (none if it was refused);
- afterwards the app answers a valid query from another client.
"""

import io
import json
import string

import hypothesis.strategies as st
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from service.test_policy import textured
from service.test_server import SHAPE, _npy, _png_header, recognizer, serve_config  # noqa: F401
from starlette.testclient import TestClient

from jaxmia.service import server

EXAMPLES = 250
TRIED = {"cases": 0, "answered": 0, "codes": {}}
PATHS = ["/v1/query", "/v1/records", "/v1/policy", "/v1/clients", "/v1/truth", "/healthz",
         "/metrics"]  # fmt: skip


@pytest.fixture(scope="module")
def app(tmp_path_factory, recognizer):  # noqa: F811
    cfg = serve_config(budget=0, detector="hash", misrecognition=0.3, answer="topk")
    svc, db, admin = server.open_service(cfg, recognizer, tmp_path_factory.mktemp("fuzz") / "w")
    limits = server.Limits(max_body_bytes=200_000, max_images=16)
    with TestClient(server.create_app(svc, db, limits), raise_server_exceptions=False) as http:
        keys = {}
        for name in ("fuzz", "honest"):
            r = http.post(
                "/v1/clients", json={"name": name}, headers={"Authorization": f"Bearer {admin}"}
            )
            keys[name] = r.json()["key"]
        yield http, db, admin, keys
    db.close()


def _npy_arrays():
    dtypes = st.sampled_from(["<f4", ">f4", "<f8", "<f2", "|u1", "<i8", "|b1", "<c8", "<u2"])
    shapes = st.one_of(
        st.lists(st.integers(0, 6), min_size=0, max_size=5).map(tuple),
        st.tuples(st.integers(0, 20), *(st.just(s) for s in SHAPE)),
        st.tuples(st.integers(1, 3), st.integers(1, 20), st.integers(1, 20), st.integers(1, 4)),
    )
    fill = st.sampled_from([0.0, 0.5, 1.0, -1.0, 2.0, np.nan, np.inf, 255.0])

    @st.composite
    def array(draw):
        dtype, shape = np.dtype(draw(dtypes)), draw(shapes)
        if np.prod(shape) > 20_000:
            shape = (1, *SHAPE)
        x = np.full(shape, draw(fill)) if draw(st.booleans()) else np.random.default_rng(
            draw(st.integers(0, 2**32 - 1))).random(shape)  # fmt: skip
        with np.errstate(all="ignore"):
            return _npy(x.astype(dtype))

    return array()


@st.composite
def _corrupted_npy(draw):
    body = bytearray(_npy(textured(draw(st.integers(1, 3)))))
    how = draw(st.sampled_from(["flip", "cut", "header", "append"]))
    if how == "flip":
        for _ in range(draw(st.integers(1, 8))):
            body[draw(st.integers(0, min(len(body), 128) - 1))] = draw(st.integers(0, 255))
    elif how == "cut":
        body = body[: draw(st.integers(0, len(body)))]
    elif how == "append":
        body += draw(st.binary(min_size=1, max_size=64))
    else:
        dims = draw(st.lists(st.integers(-2, 10**13), min_size=0, max_size=5))
        fake = {"descr": draw(st.sampled_from(["<f4", "|u1", "|O", "<U3", "V8", "x"])),
                "fortran_order": draw(st.booleans()), "shape": tuple(dims)}  # fmt: skip
        header = repr(fake).encode()
        header += b" " * (-(len(header) + 11) % 64) + b"\n"
        body = b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + body[128:]
    return bytes(body)


@st.composite
def _valid(draw):
    """A body the service answers (its client's budget allowing)."""
    x = textured(draw(st.integers(1, 4)), seed=draw(st.integers(0, 1000)))
    if draw(st.booleans()):
        return _npy(x)
    return _npy((x * 255).round().astype(np.uint8))


@st.composite
def _png(draw):
    if draw(st.booleans()):
        return _png_header(
            draw(st.integers(0, 2**31 - 1)), draw(st.integers(0, 2**31 - 1)),
            draw(st.sampled_from([0, 2, 3, 4, 6, 7])),
        )  # fmt: skip
    from PIL import Image

    size = (draw(st.integers(1, 24)), draw(st.integers(1, 24)))
    buf = io.BytesIO()
    fmt = draw(st.sampled_from(["PNG", "JPEG"]))
    Image.new(draw(st.sampled_from(["L", "RGB"])), size, 128).save(buf, format=fmt)
    return buf.getvalue()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=10,
)
_spec = st.fixed_dictionaries(
    {"name": st.text(max_size=20) | _json}, optional={"budget": st.integers(-2, 2**64) | _json}
)
_bodies = st.one_of(
    _valid(), st.binary(max_size=300), _npy_arrays(), _corrupted_npy(), _png(),
    (_json | _spec).map(lambda v: json.dumps(v).encode()), st.just(b""),
)  # fmt: skip
_header_text = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=30
)


@settings(
    max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip
@given(
    path=st.sampled_from(["/v1/query"] * 6 + ["/v1/clients"] * 2 + PATHS + ["random"]),
    random_path=st.text(string.ascii_letters + "/._-%", max_size=20),
    method=st.sampled_from(["its own"] * 8 + ["GET", "POST", "PUT", "DELETE", "HEAD"]),
    who=st.sampled_from(["fuzz", "fuzz", "admin", "none", "junk"]),
    junk_key=_header_text,
    ctype=st.sampled_from(["application/x-npy"] * 4 + ["application/octet-stream", "image/png",
                           "image/jpeg", "text/plain", "", "application/json", "random"]),
    extra=st.dictionaries(st.sampled_from(["x-a", "accept", "content-encoding", "expect", "range",
                                           "transfer-encoding"]), _header_text, max_size=2),
    query=st.dictionaries(st.sampled_from(["after", "limit", "client", "x"]),
                          st.integers(-2**70, 2**70).map(str) | st.text(max_size=8), max_size=3),
    body=_bodies,
)  # fmt: skip
def test_generated_requests_get_json_4xx_or_2xx_and_change_only_what_they_answer(
    app, path, random_path, method, who, junk_key, ctype, extra, query, body
):
    http, db, admin, keys = app
    if path == "random":
        path = "/" + random_path
    if method == "its own":
        method = "POST" if path in ("/v1/query", "/v1/clients", "/v1/truth") else "GET"
    key = {"fuzz": keys["fuzz"], "admin": admin, "none": None, "junk": junk_key}[who]
    headers = dict(extra)
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    headers["Content-Type"] = junk_key if ctype == "random" else ctype
    headers = {k: v.encode("latin-1") for k, v in headers.items()}  # raw bytes, as on the wire
    before = db.count()
    r = http.request(method, path, content=body if method in ("POST", "PUT") else None,
                     headers=headers, params=query)  # fmt: skip
    TRIED["cases"] += 1
    TRIED["codes"][r.status_code] = TRIED["codes"].get(r.status_code, 0) + 1
    assert 200 <= r.status_code < 300 or 400 <= r.status_code < 500, (r.status_code, r.text)
    answered = 0
    if method != "HEAD" and not (path == "/metrics" and r.status_code == 200):
        reply = r.json()
        if r.status_code >= 400:
            assert isinstance(reply["error"], str) and "\n" not in reply["error"]
        elif path == "/v1/query":
            answered = len(reply["indices"])
    TRIED["answered"] += answered
    assert db.count() == before + answered
    ok = http.post("/v1/query", content=_npy(textured(1, seed=TRIED["cases"])),
                   headers={"Authorization": f"Bearer {keys['honest']}"})  # fmt: skip
    assert ok.status_code == 200, ok.text
    assert db.count() == before + answered + 1


def test_fuzz_tried_its_cases(capsys):
    """Reports what the fuzz test tried (run with -s to see it)."""
    if not TRIED["cases"]:
        pytest.skip("the fuzz test did not run in this session")
    with capsys.disabled():
        print(f"\nfuzz: {TRIED['cases']} generated requests, {TRIED['answered']} queries "
              f"answered, codes {dict(sorted(TRIED['codes'].items()))}")  # fmt: skip
    assert TRIED["cases"] >= EXAMPLES and TRIED["answered"] > 0
    assert set(TRIED["codes"]) & {400, 401, 413, 415} and 200 in TRIED["codes"]
