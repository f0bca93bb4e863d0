"""The judges' registry and the one interface of a fitted judge.

The derived lists are checked against the literal values they had when each was written by
hand in ``panel.py`` (before the registry): the outputs' keys and column orders hang on them.
"""

from __future__ import annotations

import numpy as np
import pytest
from stages.test_evaluate_metrics import Rec

from jaxmia.errors import JaxmiaError
from jaxmia.judges import classical, registry
from jaxmia.judges import face as face_lib
from jaxmia.judges import panel as panel_lib
from jaxmia.pretrained import fetch

FACE = ("face_dlib", "face_dlib_centroid", "face_faceres", "face_faceres_centroid")
# The hand-written values of panel.py before the registry.
BEFORE = {
    "JUDGE_TITLES": {
        "face_dlib": "face judge, dlib's ResNet-29 (about 3 million faces): nearest real photo",
        "face_dlib_centroid": (
            "face judge, dlib's ResNet-29 (about 3 million faces): nearest identity centroid"
        ),
        "face_faceres": "face judge, faceres MobileNet-v1 (VGGFace2): nearest real photo",
        "face_faceres_centroid": (
            "face judge, faceres MobileNet-v1 (VGGFace2): nearest identity centroid"
        ),
        "R_T": "R_T (the attacked model; not a judge)",
        "R_E": "R_E (R_T's architecture: the paper's judge)",
        "R_E_transformed": "R_E under random transforms",
        "R_E_other": "R_E of another architecture",
        "R_E_other_transformed": "R_E of another architecture under transforms",
        "eigenface_nn": "nearest real photo, eigenface space",
        "eigenface_mean": "nearest class mean, eigenface space",
        "pixel_nn": "nearest real photo, pixels",
    },
    "FACE_JUDGES": FACE,
    "ROBUST": (*FACE, "R_E_transformed", "eigenface_nn", "eigenface_mean", "pixel_nn"),
    "TABLE_JUDGES": (
        *FACE,
        "R_T",
        "R_E",
        "R_E_other",
        "R_E_transformed",
        "eigenface_nn",
        "eigenface_mean",
        "pixel_nn",
    ),  # fmt: skip
    "BESIDE_R_E": (
        *FACE,
        "R_E_transformed",
        "R_E_other",
        "R_E_other_transformed",
        "eigenface_nn",
        "eigenface_mean",
        "pixel_nn",
    ),  # fmt: skip
}


@pytest.mark.parametrize("name", list(BEFORE))
def test_derived_lists_are_the_hand_written_ones(name):
    got = getattr(registry, name)
    want = BEFORE[name]
    if isinstance(want, dict):
        assert list(got.items()) == list(want.items())  # the order too: the JSON's
    else:
        assert got == want
    assert getattr(panel_lib, name) is got  # the stages read them from the panel


def test_one_entry_per_judge_with_a_title_and_a_kind():
    names = [j.name for j in registry.JUDGES]
    assert len(names) == len(set(names)) == len(registry.BY_NAME) == 12
    for j in registry.JUDGES:
        assert j.title.strip() and j.kind in registry.KINDS, j
        assert registry.BY_NAME[j.name] is j
    assert not {"R_E", "R_T", "R_E_other"} & set(registry.ROBUST)
    assert [j.name for j in registry.JUDGES if not j.in_tables] == ["R_E_other_transformed"]
    assert {j.kind for j in registry.JUDGES} == set(registry.KINDS)


def test_every_face_model_has_its_two_judges():
    for model in registry.FACE_MODELS:
        for name in registry.face_judge_names(model):
            assert registry.BY_NAME[name].kind == "face" and registry.BY_NAME[name].robust


# --- the interface, on hand-made data --------------------------------------------------------


def test_face_judges_rank_hand_made_embeddings():
    """Three identities, one gallery embedding each on a line (0, 1, 3): each query's ranks
    derived by hand. The embedder returns the queries whatever the chips (aligned for real)."""
    gallery = face_lib.fit(np.array([[0.0], [1.0], [3.0]]), np.array([0, 1, 2]), 3, "euclidean")
    queries = np.array([[0.1], [2.1], [2.9]])  # nearest: 0; 2 (then 1); 2 (then 1, 0)
    judge = panel_lib.FaceJudges(
        (panel_lib.FittedFaceModel("dlib", lambda chips: queries[: len(chips)], gallery),)
    )
    assert judge.names == ("face_dlib", "face_dlib_centroid")
    try:
        fetch.model_files("dlib_landmarks5")  # aligns the chips
    except fetch.FetchError as e:
        if e.offline:
            pytest.skip("no registry reachable: run jaxmia models fetch dlib_landmarks5")
        raise
    got = judge.rank(np.full((3, 8, 8, 1), 0.5, np.float32), np.array([0, 1, 2]))
    # query 0 (0.1) target 0: nearest; query 1 (2.1) target 1: 2 is nearer (0.9 < 1.1): rank 2;
    # query 2 (2.9) target 2: nearest. One photo an identity: centroid = photo.
    np.testing.assert_array_equal(got["face_dlib"], [1, 2, 1])
    np.testing.assert_array_equal(got["face_dlib_centroid"], [1, 2, 1])
    np.testing.assert_allclose(got["face_knn_distance_dlib"], [0.1, 1.1, 0.1], atol=1e-12)
    assert got["face_detected"].shape == (3,)


def test_classical_judge_ranks_by_the_nearest_photo():
    """Two identities, two flat grey photos each; a query equal to a photo of the other
    identity ranks its target second by pixels."""
    photos = np.array([0.1, 0.2, 0.8, 0.9], np.float32)[:, None, None, None] * np.ones(
        (1, 4, 4, 1), np.float32
    )  # [4, 4, 4, 1]
    fitted = classical.fit(classical.Gallery(photos, np.array([0, 0, 1, 1]), 2), 1)
    judge = panel_lib.ClassicalJudge(fitted)
    assert judge.names == ("eigenface_nn", "eigenface_mean", "pixel_nn")
    got = judge.rank(photos[[0, 2]], np.array([1, 1]))
    np.testing.assert_array_equal(got["pixel_nn"], [2, 1])
    assert set(got) == {*judge.names, "knn_ratio", "residual_energy"}


def test_a_recognizer_judge_ranks_by_name_and_refuses_strangers():
    """R_T knows two of R_E's three people, in another order: R_E's labels are mapped by name
    before its scores are read."""
    evaluator = Rec(None, None, None, ("ann", "bob", "cy"))
    target = Rec(None, None, None, ("cy", "ann"))
    judge = panel_lib._recognizer_judge("R_T", target, evaluator)
    np.testing.assert_array_equal(judge.own_labels(np.array([0, 2, 0])), [1, 0, 1])
    with pytest.raises(JaxmiaError, match="does not know: bob"):
        judge.own_labels(np.array([1, 0]))
    assert judge.names == ("R_T",)
