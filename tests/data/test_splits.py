import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from jaxmia import config
from jaxmia.data.faces import FaceSet
from jaxmia.data.splits import from_config, make_split
from jaxmia.errors import JaxmiaError
from jaxmia.stages import experiment
from jaxmia.stages import train as train_stage


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


def test_too_few_photos_leaves_the_identity_out():
    # It used to stop the split: "identity p10: has 5 photos, the split needs at least 6".
    faces = faces_with([10] * 9 + [5])
    s = make_split(faces, seed=0)
    assert s.left_out == ("p10",) and s.left_out_photos == (5,)
    assert "p10" not in s.all.identities and len(s.all.identities) == 9
    assert s.notes() == ["left out 1 of 10 identities with fewer than 7 photos (p10: 5)"]


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


def every_name(split) -> set[str]:
    """The identities in any part or pool of a split."""
    parts = (split.target, split.evaluation, split.all)
    return set(split.aux_identities).union(*(p.identities for p in parts))


def photos_of(faces, split, names) -> set[int]:
    """Every photo index the split uses of the named identities."""
    parts = (split.target, split.evaluation, split.all)
    used = np.concatenate([split.aux, *(i for p in parts for i in (p.train, p.test))])
    return {int(i) for i in used if faces.names[faces.labels[i]] in names}


# p4, p18 and p31 have 3 photos, too few for the default split (7); the others 9 to 11.
SHORT = faces_with([3 if i in (3, 17, 30) else 9 + (i % 3) for i in range(40)])


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("mode, need", [("disjoint", 7), ("shared", 6)])
def test_small_identities_are_left_out(seed, mode, need):
    faces = faces_with([need - 1 if i in (3, 17) else 9 + (i % 3) for i in range(40)] + [2])
    s = make_split(faces, seed=seed, attacked_photos=mode)
    assert s.left_out == ("p4", "p18", "p41")
    assert s.left_out_photos == (need - 1, need - 1, 2)
    assert s.settings["min_photos"] == 0 and s.settings["min_photos_resolved"] == need
    assert not every_name(s) & set(s.left_out)  # in no part and no pool
    assert not photos_of(faces, s, set(s.left_out))
    assert every_name(s) == set(faces.names) - set(s.left_out)
    # The -1 counts share out the 38 kept identities: 5 attacked, 6 auxiliary, 14 + 13.
    sizes = len(s.aux_identities), len(s.target.identities), len(s.evaluation.identities)
    assert sizes == (6, 5 + 14, 5 + 13)
    record = json.loads(json.dumps(s.to_json(faces)))
    assert record["left_out"] == ["p4", "p18", "p41"]
    assert record["settings"]["min_photos_resolved"] == need
    assert s.notes() == [
        f"left out 3 of 41 identities with fewer than {need} photos "
        f"(p4: {need - 1}, p18: {need - 1}, p41: 2)"
    ]


def test_which_identities_are_left_out_does_not_depend_on_the_seed():
    # Left out by photo count before the identities are dealt: an identity with 6 photos (enough
    # for a target-only one, one short for an attacked one) is left out whatever its group.
    faces = faces_with([6 if i in (3, 17, 30) else 10 for i in range(40)])
    lefts = {make_split(faces, seed=seed).left_out for seed in range(20)}
    assert lefts == {("p4", "p18", "p31")}


@pytest.mark.parametrize(
    "min_photos, test_per_identity, mode",
    [
        (6, 5, "disjoint"),
        (1, 5, "disjoint"),
        (5, 5, "shared"),
        (3, 2, "disjoint"),
        (-1, 5, "shared"),
    ],
)
def test_min_photos_below_the_need_is_refused(min_photos, test_per_identity, mode):
    need = test_per_identity + (2 if mode == "disjoint" else 1)
    with pytest.raises(JaxmiaError) as e:
        make_split(
            ATT,
            seed=0,
            min_photos=min_photos,
            test_per_identity=test_per_identity,
            attacked_photos=mode,
        )
    message = str(e.value)
    assert message.startswith("split.min_photos: expected 0 (the fewest the split needs) or an")
    assert f"integer >= {need}" in message and message.endswith(f"got {min_photos}")
    assert "\n" not in message


@pytest.mark.parametrize("min_photos", [7.0, True, "8"])
def test_min_photos_must_be_an_integer(min_photos):
    with pytest.raises(JaxmiaError, match="split.min_photos: expected 0"):
        make_split(ATT, seed=0, min_photos=min_photos)


@pytest.mark.parametrize(
    "min_photos, floor, left_out",
    [
        (0, 7, 3),
        (7, 7, 3),  # the need, asked for explicitly
        (10, 10, 15),  # also those with 9 photos
        (11, 11, 28),  # also those with 10
    ],
)
def test_a_larger_min_photos_leaves_out_more(min_photos, floor, left_out):
    s = make_split(SHORT, seed=0, min_photos=min_photos, num_attacked=2)
    counts = np.bincount(SHORT.labels)
    want = tuple(SHORT.names[i] for i in np.flatnonzero(counts < floor))
    assert s.left_out == want and len(want) == left_out
    assert s.left_out_photos == tuple(int(c) for c in counts[counts < floor])
    assert s.settings["min_photos"] == min_photos and s.settings["min_photos_resolved"] == floor
    assert every_name(s) == set(SHORT.names) - set(want)
    assert s.notes()[0].startswith(f"left out {left_out} of 40 identities with fewer than {floor}")


def test_note_names_the_first_ten():
    faces = faces_with([2] * 12 + [10] * 20)
    (note,) = make_split(faces, seed=0).notes()
    assert note.startswith("left out 12 of 32 identities with fewer than 7 photos (p1: 2, p2: 2,")
    assert note.endswith(" p10: 2, and 2 more)")


def test_nothing_left_out_no_note():
    s = make_split(ATT, seed=0)
    assert s.left_out == () and s.notes() == [] and s.to_json(ATT)["left_out"] == []


# Digests of the splits made before min_photos existed, of sets where every identity has enough
# photos: the to_json records less "settings" (which gained the min_photos keys) and "left_out".
GOLDEN = [
    ([10 + (i % 4) for i in range(40)], 0, "disjoint", 5, "f4035d5ad647d16f"),
    ([10 + (i % 4) for i in range(40)], 3, "shared", 5, "2788bfdebc409203"),
    ([7 + (i % 3) for i in range(25)], 1, "disjoint", 5, "5b162637dca8320a"),  # some at the need
    ([4 + (i % 5) for i in range(30)], 2, "disjoint", 2, "da0decb49624a7b5"),
]


@pytest.mark.parametrize("counts, seed, mode, test_per_identity, digest", GOLDEN)
def test_split_unchanged_where_nothing_is_left_out(counts, seed, mode, test_per_identity, digest):
    faces = faces_with(counts)
    args = {"seed": seed, "attacked_photos": mode, "test_per_identity": test_per_identity}
    need = test_per_identity + (2 if mode == "disjoint" else 1)
    records = []
    for min_photos in (0, need, min(counts)):
        s = make_split(faces, **args, min_photos=min_photos)
        assert s.left_out == () and s.notes() == []
        record = s.to_json(faces)
        record.pop("settings")
        assert record.pop("left_out") == []
        records.append(json.dumps(record, sort_keys=True))
    assert records[0] == records[1] == records[2]
    assert hashlib.sha256(records[0].encode()).hexdigest()[:16] == digest


def test_kept_identities_keep_their_photo_shuffle():
    # Photos are shuffled by the identity's index in the face set: leaving another identity out
    # changes no kept identity's test photos.
    full, short = faces_with([10] * 40), faces_with([10] * 39 + [4])
    a, b = make_split(full, seed=0), make_split(short, seed=0)
    assert b.left_out == ("p40",)
    np.testing.assert_array_equal(
        np.intersect1d(a.all.test, np.flatnonzero(full.labels < 39)), b.all.test
    )


def test_too_few_identities_left_says_how_many_were_left_out():
    faces = faces_with([10] * 6 + [4] * 4)
    with pytest.raises(JaxmiaError) as e:
        make_split(faces, seed=0, num_attacked=5, num_target_only=2)
    assert str(e.value) == (
        "split asks for 5+2+?+?=7 identities but the data set has 6 "
        "(attacked+target-only+evaluation-only+aux); 4 identities with fewer than 7 photos are "
        "left out"
    )


def test_from_config_passes_min_photos():
    cfg = config.default_config()
    assert cfg.split.min_photos == 0
    cfg.split.min_photos = 10
    s = from_config(cfg, SHORT)
    assert s.settings["min_photos_resolved"] == 10 and len(s.left_out) == 15


def test_experiment_split_notes_what_is_left_out():
    split, _, notes = experiment.make_split(config.default_config(), SHORT)
    assert split.left_out == ("p4", "p18", "p31")
    assert "left out 3 of 40 identities with fewer than 7 photos (p4: 3, p18: 3, p31: 3)" in notes
    assert any(n.startswith("37 identities (test faces): 5 attacked") for n in notes)


def test_experiment_scales_down_on_the_kept_identities():
    # 10 identities, 4 short of photos: the 6 kept are too few for 5 attacked and a pool.
    faces = faces_with([10] * 6 + [4] * 4)
    split, used, notes = experiment.make_split(config.default_config(), faces)
    assert len(split.left_out) == 4
    assert used.split.num_attacked == 1 and len(split.aux_identities) == 1
    assert any("has 6 identities, too few for split.num_attacked=5" in n for n in notes)
    assert any(n.startswith("left out 4 of 10 identities") for n in notes)
    cfg = config.default_config()
    cfg.split.min_photos = 3  # bad input is named, not taken for a data set too small
    with pytest.raises(JaxmiaError, match="split.min_photos"):
        experiment.make_split(cfg, faces_with([10] * 3))


@pytest.mark.slow
def test_train_prints_the_note(tmp_path, capsys):
    root = tmp_path / "faces"
    rng = np.random.default_rng(0)
    for i, count in enumerate([6] * 8 + [3, 2]):  # 2 test + 2 to train: p9 and p10 left out
        (root / f"p{i + 1}").mkdir(parents=True)
        for j in range(count):
            pixels = rng.integers(0, 256, (32, 32), np.uint8)
            Image.fromarray(pixels).save(root / f"p{i + 1}" / f"{j}.png")
    cfg = config.default_config()
    config.apply_overrides(
        cfg,
        [
            f"--config.data.source=folder:{root}",
            f"--config.data.cache_dir={tmp_path / 'cache'}",
            "--config.data.image_size=(32,32)",
            "--config.split.num_attacked=2",
            "--config.split.test_per_identity=2",
            "--config.model.dense_features=(64,64)",
            "--config.train.batch_size=16",
            "--config.train.epochs=1",
        ],
    )
    train_stage.run(cfg, tmp_path / "w", progress=False)
    out = capsys.readouterr().out
    assert "note: left out 2 of 10 identities with fewer than 4 photos (p9: 3, p10: 2)" in out
    record = json.loads((tmp_path / "w" / "split.json").read_text())
    assert record["left_out"] == ["p9", "p10"] and len(record["all"]["identities"]) == 8
