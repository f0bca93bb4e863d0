"""The inversions file: what save_inversions writes, load_inversions reads back."""

import zipfile

import numpy as np
import pytest

from jaxmia.attacks import inversions_file


def arrays(ids=2, n=3, shared_seed=True):
    rng = np.random.default_rng(0)
    return {
        "stop_reasons": np.array(["converged", "max_steps"]),
        "seeds": rng.random((1, 1, 4, 4, 1) if shared_seed else (ids, n, 4, 4, 1), np.float32),
        "clones": rng.random((ids, n, 4, 4, 1), np.float32),
        "identities": np.array(["ann", "bob"][:ids]),
        "labels": np.arange(ids, dtype=np.int32),
        "diverged": np.array([[False, True, False], [False, False, False]][:ids]),
        "confidence": rng.random((ids, n), np.float32),
        "steps": np.full((ids, n), 7, np.int32),
    }


def test_saved_arrays_come_back_in_the_formats_order(tmp_path):
    a = arrays()
    path = inversions_file.save_inversions(tmp_path / "inv", **a)
    assert path == tmp_path / "inv" / "inversions.npz"
    names = [i.filename.removesuffix(".npy") for i in zipfile.ZipFile(path).infolist()]
    assert names == [
        "clones", "steps", "confidence", "seeds", "identities", "labels", "diverged",
        "stop_reasons",
    ]  # fmt: skip
    raw = inversions_file.load_arrays(tmp_path / "inv")
    for k, v in a.items():
        np.testing.assert_array_equal(raw[k], v)
    inv = inversions_file.load_inversions(tmp_path / "inv")
    np.testing.assert_array_equal(inv.clones, a["clones"])
    assert inv.seeds.shape == a["clones"].shape
    np.testing.assert_array_equal(inv.seeds[1, 2], a["seeds"][0, 0])
    assert inv.identities == ("ann", "bob")
    np.testing.assert_array_equal(inv.diverged, a["diverged"])
    np.testing.assert_array_equal(inv.steps, a["steps"])
    np.testing.assert_array_equal(inv.target_confidence, a["confidence"])
    assert inv.seed_target_confidence is None


@pytest.mark.parametrize("drop, add", [("labels", None), ("diverged", None), (None, "extra")])
def test_missing_or_unknown_fields_are_refused(tmp_path, drop, add):
    a = arrays()
    a.pop(drop, None)
    if add:
        a[add] = np.zeros(2)
    with pytest.raises(ValueError, match=drop or add):
        inversions_file.save_inversions(tmp_path, **a)
    assert not (tmp_path / "inversions.npz").exists()
