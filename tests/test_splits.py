import json

import numpy as np
import pytest

from jaxmia.data import FaceSet
from jaxmia.errors import JaxmiaError
from jaxmia.splits import make_split


def faces_with(photos_per_identity: list[int]) -> FaceSet:
    """A FaceSet of blank images with the given number of photos per identity."""
    labels = np.repeat(np.arange(len(photos_per_identity)), photos_per_identity).astype(np.int32)
    names = tuple(f"p{i + 1}" for i in range(len(photos_per_identity)))
    files = tuple(f"{names[label]}/{j}.png" for j, label in enumerate(labels))
    images = np.zeros((len(labels), 2, 2, 1), np.float32)
    return FaceSet(images, labels, names, "test faces", synthetic=False, files=files)


ATT = faces_with([10] * 40)


def names_of(faces, index):
    return {faces.names[label] for label in faces.labels[index]}


def test_default_counts_on_40_identities():
    split = make_split(ATT, seed=0)
    # 5 attacked; of the 35 left a fifth (7) is auxiliary, 14 + 14 for target/evaluation-only.
    assert len(split.attacked) == 5
    assert len(split.aux_identities) == 7
    assert len(split.target.identities) == 5 + 14
    assert len(split.evaluation.identities) == 5 + 14
    assert split.settings["num_target_only"] == 14 and split.settings["num_aux"] == 7


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("mode", ["disjoint", "shared"])
def test_identities_and_photos_are_disjoint(seed, mode):
    faces = faces_with([10 + (i % 4) for i in range(40)])  # uneven photo counts
    s = make_split(faces, seed=seed, attacked_photos=mode)
    attacked = set(s.attacked)
    target_only = set(s.target.identities) - attacked
    evaluation_only = set(s.evaluation.identities) - attacked
    aux = set(s.aux_identities)
    groups = [attacked, target_only, evaluation_only, aux]
    assert sum(len(g) for g in groups) == len(set().union(*groups)) == 40
    # Attacked identities come first, in the same order, in both recognizers.
    assert s.target.identities[:5] == s.evaluation.identities[:5] == s.attacked

    for part in (s.target, s.evaluation, s.all):
        assert not set(part.train) & set(part.test)
        assert names_of(faces, part.train) == set(part.identities) == names_of(faces, part.test)
        assert list(part.train) == sorted(part.train)
    assert names_of(faces, s.aux) == aux
    for i in range(40):  # the aux pool holds every photo of its identities
        assert (np.isin(np.flatnonzero(faces.labels == i), s.aux).all()) == (faces.names[i] in aux)

    # Each identity holds out exactly 5 test photos in the all part.
    np.testing.assert_array_equal(np.bincount(faces.labels[s.all.test]), np.full(40, 5))
    assert len(s.all.train) + len(s.all.test) == len(faces)

    rt_train, re_train = set(s.target.train), set(s.evaluation.train)
    rt_test, re_test = set(s.target.test), set(s.evaluation.test)
    attacked_photos = set(
        np.flatnonzero(np.isin(faces.labels, [faces.names.index(n) for n in attacked]))
    )
    if mode == "disjoint":
        assert not (rt_train | rt_test) & (re_train | re_test)
        # Together R_T and R_E use every photo of the attacked identities, each once.
        assert (rt_train | rt_test | re_train | re_test) & attacked_photos == attacked_photos
    else:
        assert rt_train & attacked_photos == re_train & attacked_photos
        assert rt_test & attacked_photos == re_test & attacked_photos
        assert not (rt_train | rt_test) & (re_train | re_test) - attacked_photos
    # A part's test photos are the all part's test photos of its identities.
    assert rt_test <= set(s.all.test) and re_train <= set(s.all.train)


def test_disjoint_halves_of_an_attacked_identity():
    s = make_split(ATT, seed=3, attacked_photos="disjoint")
    label = ATT.names.index(s.attacked[0])
    of = lambda index: int((ATT.labels[index] == label).sum())  # noqa: E731
    # 10 photos: 5 test (3 to R_T, 2 to R_E), 5 train (3 to R_T, 2 to R_E).
    assert (of(s.target.train), of(s.evaluation.train)) == (3, 2)
    assert (of(s.target.test), of(s.evaluation.test)) == (3, 2)


def test_deterministic_by_seed():
    a, b, c = make_split(ATT, seed=5), make_split(ATT, seed=5), make_split(ATT, seed=6)
    assert json.dumps(a.to_json(ATT)) == json.dumps(b.to_json(ATT))
    assert a.attacked != c.attacked or not np.array_equal(a.target.train, c.target.train)


def test_explicit_counts_and_rest():
    s = make_split(ATT, seed=0, num_attacked=3, num_target_only=10, num_aux=2)
    assert len(s.attacked) == 3
    assert len(s.target.identities) == 13
    assert len(s.aux_identities) == 2
    assert len(s.evaluation.identities) == 3 + 40 - 3 - 10 - 2


def test_part_labels_follow_the_part_order():
    s = make_split(ATT, seed=0)
    labels = s.target.labels(ATT, s.target.train)
    assert labels.min() == 0 and labels.max() == len(s.target.identities) - 1
    for index, label in zip(s.target.train, labels, strict=True):
        assert s.target.identities[label] == ATT.names[ATT.labels[index]]
    with pytest.raises(ValueError):
        s.target.labels(ATT, s.aux)


def test_to_json_names_files():
    s = make_split(ATT, seed=0)
    record = json.loads(json.dumps(s.to_json(ATT)))
    assert record["attacked"] == list(s.attacked)
    assert record["target"]["train"][0] == ATT.files[s.target.train[0]]
    assert record["settings"]["attacked_photos"] == "disjoint"
    assert len(record["aux"]) == 70


def test_too_many_identities():
    with pytest.raises(
        JaxmiaError, match=r"split asks for 5\+20\+20\+10=55 identities but the data set has 40"
    ):
        make_split(ATT, seed=0, num_target_only=20, num_evaluation_only=20, num_aux=10)


def test_too_few_photos_names_the_identity():
    faces = faces_with([10] * 9 + [5])
    with pytest.raises(JaxmiaError, match="identity p10: has 5 photos, the split needs at least 6"):
        make_split(faces, seed=0)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"attacked_photos": "half"}, "split.attacked_photos"),
        ({"num_aux": -2}, "split.num_aux"),
        ({"num_attacked": -1}, "split.num_attacked"),
        ({"test_per_identity": -1}, "split.test_per_identity"),
        ({"seed": -1}, "split.seed"),
    ],
)
def test_bad_settings(kwargs, field):
    with pytest.raises(JaxmiaError, match=field):
        make_split(ATT, **({"seed": 0} | kwargs))
