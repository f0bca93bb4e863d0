"""The generator prior: the VAE learns, is deterministic and resumes; ``jaxmia prior`` end to end,
and ``jaxmia invert`` with its checkpoint."""

import json
import shutil

import jax
import numpy as np
import pytest

from jaxmia import checkpoint, cli
from jaxmia.attacks import generator
from jaxmia.data import synthetic
from jaxmia.errors import JaxmiaError
from jaxmia.recognizers import models

CFG = generator.GeneratorConfig(image_size=(16, 16), channels=1, latent_dim=8, widths=(8, 16))
TRAIN = generator.TrainConfig(epochs=6, batch_size=8, learning_rate=3e-3)
TINY = models.ModelConfig(
    num_classes=3, image_size=(16, 16), conv_features=(4, 4, 4, 4), dense_features=(16,)
)
AUX = ["synthetic_0004", "synthetic_0005"]
# `jaxmia prior` at the size of CFG, on the tiny checkpoint's 10 auxiliary faces.
PRIOR_ARGS = [
    "--config.prior.latent_dim=8",
    "--config.prior.widths=(8,16)",
    "--config.prior.batch_size=8",
    "--config.prior.learning_rate=0.003",
    "--config.prior.epochs=4",
    "--config.prior.checkpoint_every=2",
]


@pytest.fixture(scope="module")
def faces():
    images, _, _ = synthetic.make_faces(6, 5, (16, 16), 1, seed=3)
    return np.asarray(images, np.float32)  # [30, 16, 16, 1]


@pytest.fixture(scope="module")
def trained(faces):
    """The state after every epoch of one run (copied: fit donates it to the next step)."""
    states = {}

    def keep(done, params, opt_state, history):
        states[done] = jax.tree.map(np.array, (params, opt_state, list(history)))

    params, history = generator.fit(CFG, TRAIN, faces, key=jax.random.key(0), on_epoch=keep)
    return params, history, states


@pytest.mark.slow
def test_fit_lowers_the_loss_and_makes_images_in_range(faces, trained):
    params, history, _ = trained
    assert [h["epoch"] for h in history] == list(range(1, 7))
    assert history[-1]["loss"] < 0.97 * history[0]["loss"]
    z = jax.random.normal(jax.random.key(1), (CFG.latent_dim,))
    for image in (
        generator.decode(CFG, params, z)[None],
        generator.sample(CFG, params, jax.random.key(2), 5),
        generator.reconstruct(CFG, params, faces[:3]),
    ):
        assert image.shape[1:] == (16, 16, 1)
        assert float(image.min()) >= 0 and float(image.max()) <= 1
    assert generator.encode_mean(CFG, params, faces[0]).shape == (CFG.latent_dim,)


@pytest.mark.slow
def test_same_key_same_weights_other_key_other_weights(faces, trained):
    few = generator.TrainConfig(epochs=2, batch_size=8, learning_rate=3e-3)
    a, _ = generator.fit(CFG, few, faces, key=jax.random.key(0))
    b, _ = generator.fit(CFG, few, faces, key=jax.random.key(0))
    c, _ = generator.fit(CFG, few, faces, key=jax.random.key(1))
    jax.tree.map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["decoder"]["stem"]["kernel"], c["decoder"]["stem"]["kernel"])
    # and the first two epochs of a longer run are those of this one
    jax.tree.map(np.testing.assert_array_equal, a, trained[2][2][0])


@pytest.mark.slow
def test_resumed_fit_ends_with_the_uninterrupted_weights(faces, trained):
    params, history, states = trained
    resume = (3, *states[3])
    again, again_history = generator.fit(CFG, TRAIN, faces, key=jax.random.key(0), resume=resume)
    jax.tree.map(np.testing.assert_array_equal, again, params)
    assert [h["loss"] for h in again_history] == [h["loss"] for h in history]


def test_bad_settings_are_one_line_errors(faces):
    with pytest.raises(JaxmiaError, match="divisible by 8"):
        generator.GeneratorConfig(image_size=(20, 20), widths=(8, 8, 8))
    with pytest.raises(JaxmiaError, match="prior.beta=-1.0"):
        generator.TrainConfig(beta=-1.0)
    with pytest.raises(JaxmiaError, match=r"expected faces of shape \(16, 16, 1\)"):
        generator.fit(CFG, TRAIN, faces[:, :8], key=jax.random.key(0))


@pytest.mark.slow
def test_checkpoint_round_trip_and_a_recognizer_is_not_a_generator(tmp_path, trained):
    params = trained[0]
    checkpoint.save_generator(checkpoint.manager(tmp_path / "g"), 6, params, CFG, {"x": 1})
    loaded = checkpoint.load_generator(tmp_path / "g")
    assert loaded.config == CFG and loaded.step == 6 and loaded.meta["x"] == 1
    jax.tree.map(np.testing.assert_array_equal, loaded.params, params)
    _, rec_params = models.init(TINY, jax.random.key(0))
    checkpoint.save_recognizer(tmp_path / "r", rec_params, TINY, ("a", "b", "c"))
    with pytest.raises(JaxmiaError, match="meta lacks a valid generator config"):
        checkpoint.load_generator(tmp_path / "r")
    with pytest.raises(JaxmiaError, match="not found .*jaxmia prior"):
        checkpoint.load_generator(tmp_path / "none")


# --- the commands --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def recognizer(tmp_path_factory):
    """A tiny R_T whose meta names 2 synthetic auxiliary identities (10 faces: 6 x 5 synthetic
    faces, the shape of the ``faces`` fixture, for which the renderer compiled already)."""
    root = tmp_path_factory.mktemp("prior")
    names = ("synthetic_0000", "synthetic_0001", "synthetic_0002")
    meta = {
        "data": {
            "source": "synthetic",
            "synthetic": {"num_identities": 6, "images_per_identity": 5, "seed": 7},
        },
        "split": {"attacked": ["synthetic_0002"], "aux_identities": AUX},
    }
    _, params = models.init(TINY, jax.random.key(0))
    checkpoint.save_recognizer(root / "rt", params, TINY, names, meta)
    return root


def _one_line_error(capsys, words):
    """The error is one line (after any progress bar of the faces' loading) naming ``words``."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "jaxmia prior" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("jaxmia prior: error:") and words in lines[0], err


def _prior(root, workdir, *extra):
    argv = ["prior", "--checkpoint", str(root / "rt"), "--workdir", str(workdir)]
    return cli.main(argv + [f"--config.data.cache_dir={root}", *PRIOR_ARGS, *extra])


@pytest.fixture(scope="module")
def prior_dir(recognizer):
    assert _prior(recognizer, recognizer / "prior") == 0
    return recognizer / "prior"


@pytest.mark.slow
def test_jaxmia_prior_writes_a_generator_of_the_auxiliary_faces(prior_dir):
    summary = json.loads((prior_dir / "prior.json").read_text())
    assert summary["faces"] == 10 and summary["pool"] == "synthetic (2 identities, 10 faces)"
    assert [h["epoch"] for h in summary["history"]] == [1, 2, 3, 4]
    assert (prior_dir / "samples.png").stat().st_size > 0
    loaded = checkpoint.load_generator(prior_dir)
    assert loaded.step == 4 and loaded.config == CFG
    assert loaded.meta["history"] == summary["history"]


@pytest.mark.slow
def test_a_rerun_only_reports_and_other_settings_are_refused(recognizer, prior_dir, capsys):
    before = (prior_dir / "prior.json").read_text()
    capsys.readouterr()
    assert _prior(recognizer, prior_dir) == 0
    assert "already trained" in capsys.readouterr().out
    assert (prior_dir / "prior.json").read_text() == before
    assert _prior(recognizer, prior_dir, "--config.prior.beta=0.5") == 2
    _one_line_error(capsys, "prior.beta: 1.0 -> 0.5")


@pytest.mark.slow
def test_an_interrupted_prior_resumes_to_the_same_weights(recognizer, prior_dir, tmp_path):
    work = tmp_path / "cut"
    shutil.copytree(prior_dir, work)
    # As if killed after the checkpoint of epoch 2: the later checkpoint and outputs are missing.
    shutil.rmtree(work / "checkpoints" / "4")
    (work / "prior.json").unlink()
    assert _prior(recognizer, work) == 0
    assert json.loads((work / "prior.json").read_text())["resumed_from_epoch"] == 2
    jax.tree.map(
        np.testing.assert_array_equal,
        checkpoint.load_generator(work).params,
        checkpoint.load_generator(prior_dir).params,
    )


@pytest.mark.parametrize(
    "args, words",
    [
        ([], "--checkpoint: expected the recognizer folder"),
        (["--checkpoint", "nowhere"], "checkpoint nowhere: not found"),
        # A pool of the recognizer's own 3 synthetic identities leaves no public face.
        (["--checkpoint", "RT", "--config.inversion.seed_source=synthetic",
          "--config.data.synthetic.num_identities=3"], "no faces of identities outside"),
        (["--checkpoint", "RT", "--config.prior.widths=(4,4,4,4,4)"], "divisible by 32"),
    ],
    ids=["no-checkpoint", "missing", "empty-pool", "too-deep"],
)  # fmt: skip
def test_bad_input_is_one_line_and_claims_nothing(recognizer, tmp_path, capsys, args, words):
    args = [str(recognizer / "rt") if a == "RT" else a for a in args]
    argv = ["prior", "--workdir", str(tmp_path / "w"), f"--config.data.cache_dir={tmp_path}"]
    assert cli.main(argv + args) == 2
    _one_line_error(capsys, words)
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_jaxmia_invert_with_the_generator_prior(recognizer, prior_dir, tmp_path, capsys):
    out = tmp_path / "inv"
    argv = ["invert", "--checkpoint", str(recognizer / "rt"), "--workdir", str(out)]
    argv += ["--clones", "2", "--steps", "3", f"--config.data.cache_dir={recognizer}"]
    argv += ["--config.inversion.seed_subset_size=4", "--config.inversion.optimizer=adam"]
    assert cli.main([*argv, "--config.inversion.prior=generator"]) == 2
    assert "expected inversion.prior_checkpoint=DIR" in capsys.readouterr().err
    argv += [
        "--config.inversion.prior=generator",
        f"--config.inversion.prior_checkpoint={prior_dir}",
    ]
    assert cli.main(argv) == 0
    with np.load(out / "inversions.npz") as z:
        clones = z["clones"]
    assert clones.shape == (1, 2, 16, 16, 1) and np.all((clones >= 0) & (clones <= 1))
    assert json.loads((out / "summary.json").read_text())["config"]["prior"] == "generator"
