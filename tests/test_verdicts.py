"""The judges beside R_E on the AT&T faces: the controls a judge must pass.

Two small recognizers of the paper's layout are trained on the paper's split of the embedded
AT&T faces at 32x32 (33 attacked people), as jaxmia experiment would. Then every judge must
score held-out real photos of the attacked people well above chance and the seeds near it,
and the PGD controls, which R_T accepts, must be rejected by the robust judges.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from test_evaluation import Rec

from jaxmia import adversarial, config, data, models, robust, splits, train, verdicts
from jaxmia.errors import JaxmiaError

SIZE = (32, 32)


@pytest.fixture(scope="module")
def att(tmp_path_factory):
    faces = data.load_faces(
        "att", image_size=SIZE, channels=1, cache_dir=str(tmp_path_factory.mktemp("cache")),
        progress=False,
    )  # fmt: skip
    cfg = config.load("configs/att.py")
    split = splits.from_config(cfg, faces)
    tc = cfg.train
    tc.epochs, tc.batch_size, tc.checkpoint_every = 40, 32, 1000
    recognizers = {}
    for i, role in enumerate(("target", "evaluation")):
        part = getattr(split, role)
        mc = models.ModelConfig(
            num_classes=len(part.identities), image_size=SIZE, channels=1,
            dense_features=(256, 256),
        )  # fmt: skip
        graphdef, state, _ = train.fit(
            mc, tc, faces.images[part.train], part.labels(faces, part.train),
            key=jax.random.key(i),
        )  # fmt: skip
        recognizers[role] = Rec(graphdef, state, mc, tuple(part.identities))
    names = np.asarray(faces.names, object)[faces.labels]
    attacked = np.isin(names, list(split.attacked))
    held_out = np.union1d(split.target.test, split.evaluation.test)
    held_out = held_out[attacked[held_out]]
    gallery = split.evaluation.train
    # Two seeds per attacked person, each the mean of a random half of the auxiliary faces.
    rng = np.random.default_rng(0)
    aux = faces.images[split.aux]
    seeds = np.stack([
        aux[rng.choice(len(aux), len(aux) // 2, replace=False)].mean(0)
        for _ in range(2 * len(split.attacked))
    ]).reshape(len(split.attacked), 2, *SIZE, 1)  # fmt: skip
    settings = verdicts.Settings.from_config(config.default_config().judges)
    panel = verdicts.make_panel(
        recognizers["evaluation"], faces.images[gallery], list(names[gallery]),
        faces.images[held_out], list(names[held_out]), settings,
        target=recognizers["target"],
    )  # fmt: skip
    # The clones are the seeds here: what matters are the controls.
    summary, per_clone = verdicts.run(panel, seeds, seeds, tuple(split.attacked))
    return panel, summary, per_clone, split, seeds


def test_held_out_real_photos_are_recognised_by_every_judge(att):
    _, summary, _, _, _ = att
    real = summary["top"]["real"]
    assert real["R_E"]["count"] == 66  # 2 test photos of each of the 33 attacked people
    assert summary["chance_top1"] == pytest.approx(1 / 33)
    # AT&T's studio photos: eigenfaces and pixels are strong on them; chance is 3%.
    floors = {"R_T": 0.6, "R_E": 0.6, "R_E_transformed": 0.5, "eigenface_nn": 0.7,
              "eigenface_mean": 0.7, "pixel_nn": 0.7}  # fmt: skip
    for judge, floor in floors.items():
        assert real[judge]["top1"] >= floor, (judge, real[judge])


def test_seeds_are_near_chance_for_every_judge(att):
    _, summary, _, _, _ = att
    for judge, cell in summary["top"]["seeds"].items():
        assert cell["count"] == 66
        assert cell["top1"] <= 0.15, (judge, cell)


def test_pgd_controls_fool_r_t_not_the_robust_judges(att):
    _, summary, _, _, _ = att
    pgd = summary["top"]["pgd"]
    assert pgd["R_T"]["count"] == 33 * 2
    assert pgd["R_T"]["top1"] >= 0.9  # the attack works on the model it attacks
    for judge in ("eigenface_nn", "eigenface_mean", "pixel_nn"):
        assert pgd[judge]["top1"] <= 0.15, (judge, pgd[judge])
    assert pgd["R_E_transformed"]["top1"] <= pgd["R_T"]["top1"] - 0.5


def test_realism_of_the_groups(att):
    _, summary, _, _, _ = att
    r = summary["realism"]
    # Held-out real photos are closer to their own identity than to anyone else, seeds are not.
    assert r["real"]["knn_ratio_below_1"] >= 0.7 and r["seeds"]["knn_ratio_below_1"] <= 0.15
    assert r["real"]["frechet_eigenface"] < r["seeds"]["frechet_eigenface"]
    # A PGD control is its seed plus at most 16/255 a pixel: as far from every face as the
    # seed, and its pattern lies outside the span of real faces.
    assert r["pgd"]["knn_ratio_below_1"] <= 0.15
    assert r["pgd"]["residual_energy_mean"] > r["seeds"]["residual_energy_mean"]
    assert r["real"]["residual_energy_mean"] < r["seeds"]["residual_energy_mean"]


def test_inflation_is_r_e_minus_the_most_generous_robust_judge(att):
    _, summary, per_clone, _, _ = att
    clones = summary["top"]["clones"]
    inf = summary["inflation"]
    best = inf["most_generous_robust_judge"]
    assert clones[best]["top1"] == max(clones[j]["top1"] for j in verdicts.ROBUST)
    assert inf["adversarial_inflation"] == pytest.approx(
        clones["R_E"]["top1"] - clones[best]["top1"]
    )
    assert per_clone["pixel_nn"].shape == (33, 2)
    assert "R_E" not in per_clone  # the caller has R_E's ranks


def test_pgd_controls_stay_in_the_ball(att):
    panel, _, _, split, _ = att
    seeds = np.full((2, 3, *SIZE, 1), 0.5, np.float32)
    images, names = verdicts.pgd_controls(panel, seeds, tuple(split.attacked[:2]))
    assert (
        images.shape == (2 * 3, *SIZE, 1)
        and names == (split.attacked[0],) * 3 + (split.attacked[1],) * 3
    )
    assert np.abs(images - 0.5).max() <= panel.settings.pgd.epsilon + 1e-6


def test_groups_judged_together_equal_each_group_alone(att):
    panel, _, _, split, seeds = att
    # The other R_E: R_E with its classes in another order, so each judge needs its own labels.
    rec = panel.evaluator
    perm = np.random.default_rng(1).permutation(len(rec.names))
    params = jax.tree.map(lambda x: x, rec.params)  # a copy of the pure dict train.fit returns
    params["head"] = {
        "kernel": params["head"]["kernel"][:, perm],
        "bias": params["head"]["bias"][perm],
    }
    other = dataclasses.replace(rec, params=params, names=tuple(np.asarray(rec.names)[perm]))
    panel = dataclasses.replace(panel, other=other)
    names = tuple(np.repeat(np.asarray(split.attacked, object), 2))
    groups = {
        "seeds": (seeds.reshape(-1, *SIZE, 1), names),
        "real": (panel.real, panel.real_names),
    }
    together = verdicts.judge_groups(panel, groups)
    for g, (images, group_names) in groups.items():
        alone = verdicts.judge_groups(panel, {g: (images, group_names)})[g]
        for j in ("R_T", "R_E", "R_E_other", "eigenface_nn", "pixel_nn"):
            np.testing.assert_array_equal(together[g][j], alone[j], err_msg=f"{g} {j}")
        assert together[g]["frechet"] == pytest.approx(alone["frechet"])
    # Ranks are per name, not per label: the permuted copy ranks like R_E itself.
    np.testing.assert_array_equal(together["real"]["R_E_other"], together["real"]["R_E"])


def test_the_floor_judges_the_first_seeds_of_each_identity(att):
    panel, summary, _, split, seeds = att
    ids = len(split.attacked)
    assert summary["seeds_per_identity"] == 2 and summary["top"]["seeds"]["R_E"]["count"] == 2 * ids
    one = dataclasses.replace(
        panel, settings=dataclasses.replace(panel.settings, seeds_per_identity=1)
    )
    got = verdicts.judge_groups(one, {"seeds": (seeds[:, 0], tuple(split.attacked))})["seeds"]
    small, _ = verdicts.run(one, seeds, seeds, tuple(split.attacked))
    assert small["seeds_per_identity"] == 1
    for judge, cell in small["top"]["seeds"].items():
        assert cell["count"] == ids
        if not judge.endswith("_transformed"):  # transforms are drawn by position in the set
            assert cell["top1"] == pytest.approx(np.mean(got[judge] <= 1))


def test_too_few_photos_for_the_components_is_a_note(att):
    panel, _, _, _, _ = att
    few = panel.fitted.gallery.images[:6]
    names = [panel.evaluator.names[i] for i in panel.fitted.gallery.labels[:6]]
    small = verdicts.make_panel(
        panel.evaluator, few, names, few[:0], [], dataclasses.replace(panel.settings, eigenfaces=64)
    )
    assert small.fitted.eigenfaces.components.shape[0] == 5
    assert any("allow 5 components" in n for n in small.notes)
    assert any("no held-out real photos" in n for n in small.notes)
    with pytest.raises(JaxmiaError, match="needs 2"):
        verdicts.make_panel(panel.evaluator, few[:1], names[:1], few[:0], [], panel.settings)


def test_bad_input(att):
    panel, _, _, _, _ = att
    wrong = np.zeros((3, 16, 16, 1), np.float32)
    with pytest.raises(JaxmiaError, match="R_E takes 32x32x1"):
        verdicts.make_panel(panel.evaluator, wrong, ["x"] * 3, wrong[:0], [], panel.settings)
    photos = panel.fitted.gallery.images[:3]
    with pytest.raises(JaxmiaError, match="does not know: nobody"):
        verdicts.make_panel(panel.evaluator, photos, ["nobody"] * 3, photos[:0], [], panel.settings)


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("eigenfaces", 0, "judges.eigenfaces"),
        ("sort_by", "bogus", "judges.sort_by"),
        ("pgd.epsilon", 0.0, "epsilon"),
        ("pgd.per_identity", -1, "judges.pgd.per_identity"),
        ("transforms.samples", 0, "samples"),
        ("seeds_per_identity", -1, "judges.seeds_per_identity"),
        ("transforms.noise_std", -0.1, "noise_std"),
    ],
)
def test_bad_settings(field, value, words):
    cfg = config.default_config().judges
    node = cfg
    *parents, leaf = field.split(".")
    for p in parents:
        node = node[p]
    node[leaf] = value
    with pytest.raises(JaxmiaError, match=words):
        verdicts.Settings.from_config(cfg)


def test_settings_from_config_reach_the_modules():
    s = verdicts.Settings.from_config(config.default_config().judges)
    assert s.pgd == adversarial.PGDSettings(epsilon=16 / 255, step_size=2 / 255, steps=30)
    assert s.transforms == robust.TransformSettings(
        max_shift=4, flip=True, scale=0.1, blur_sigma=1.0, noise_std=0.02, samples=4
    )
    assert s.eigenfaces == 64 and s.pgd_per_identity == 3
