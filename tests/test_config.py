import dataclasses
import importlib.util
import sys
from pathlib import Path

import pytest

from jaxmia import config
from jaxmia.errors import JaxmiaError


@pytest.mark.parametrize(
    "override,field,expected",
    [
        ("--config.train.epochs=5", ("train", "epochs"), 5),
        ("config.train.learning_rate=3", ("train", "learning_rate"), 3.0),
        ("--config.data.source=folder:some/where", ("data", "source"), "folder:some/where"),
        ("--config.data.image_size=(32,40)", ("data", "image_size"), (32, 40)),
        ("--config.data.image_size=[32,40]", ("data", "image_size"), (32, 40)),
        ("--config.train.augment=False", ("train", "augment"), False),
        ("--config.train.augment=false", ("train", "augment"), False),
        ("--config.inversion.shard=TRUE", ("inversion", "shard"), True),
        ("--config.data.synthetic.num_identities=7", ("data", "synthetic", "num_identities"), 7),
    ],
)
def test_overrides(override, field, expected):
    c = config.default_config()
    config.apply_overrides(c, [override])
    node = c
    for name in field:
        node = node[name]
    assert node == expected
    assert type(node) is type(expected)


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.train.epoch=5", "unknown config field config.train.epoch"),
        ("--config.trian.epochs=5", "unknown config field config.trian"),
        ("--config.train.epochs=many", "config field config.train.epochs: expected int"),
        ("--config.train=3", "is a group"),
        ("--config.train.augment=yes", "config field config.train.augment: expected bool"),
        (
            "--config.inversion.steps_per_call=auto",
            "config field config.inversion.steps_per_call: expected int",
        ),
        ("--config.train.epochs", "expected --config.FIELD=VALUE"),
    ],
)
def test_bad_overrides(override, message):
    with pytest.raises(JaxmiaError, match=message):
        config.apply_overrides(config.default_config(), [override])


def test_load_file(tmp_path):
    p = tmp_path / "c.py"
    p.write_text(
        "from jaxmia.config import default_config\n"
        "def get_config():\n    c = default_config()\n    c.train.epochs = 2\n    return c\n"
    )
    assert config.load(str(p)).train.epochs == 2
    assert config.load(None).train.epochs == config.default_config().train.epochs


@pytest.mark.parametrize(
    "text,message",
    [
        (None, "not found"),
        ("x = 1\n", "expected a function get_config"),
        ("1/0\n", "failed to load"),
    ],
)
def test_load_bad_file(tmp_path, text, message):
    p = tmp_path / "bad.py"
    if text is not None:
        p.write_text(text)
    with pytest.raises(JaxmiaError, match=message):
        config.load(str(p))


# Every config file; configs/common.py holds the helpers they share.
CONFIGS = sorted(
    p
    for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.py")
    if p.name != "common.py"
)


def _common():
    """configs/common.py as a module (a config file imports it by name)."""
    spec = importlib.util.spec_from_file_location("configs_common", CONFIGS[0].parent / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_repo_configs_load_and_each_differs_from_the_defaults():
    """A config is what differs from the defaults: one that equals them is redundant."""
    defaults = config.default_config().to_dict()
    path_before = list(sys.path)
    for path in CONFIGS:
        c = config.load(str(path))
        assert sys.path == path_before  # the config's folder is on it only while it loads
        assert "data" in c and "train" in c, path
        assert c.to_dict() != defaults, f"{path.name} equals the defaults"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_file_loads_and_passes_the_checks(path):
    """Each shipped config is valid for every stage that reads it (no work is done)."""
    from jaxmia.stages import clone, experiment

    c = config.load(str(path))
    experiment.check_config(c)
    clone._check(c.cloning)


def test_the_headline_split_is_not_one_the_settings_were_tuned_on():
    """configs/att.py reports its attack on a split seed the lever study never looked at."""
    import sys

    sys.path.insert(0, str(CONFIGS[0].parents[1]))
    try:
        from benchmarks import attack_levers
    finally:
        sys.path.pop(0)
    tuned = {attack_levers.SETUPS[s].get("split.seed", 0) for s in attack_levers.SETUPS}
    att = config.load(str(CONFIGS[0].parent / "att.py"))
    assert att.split.seed not in tuned
    assert attack_levers.TUNED_ON == {"setup": "many", "split.seed": 0}


def test_fields_added_later_stay_out_of_records_at_their_defaults():
    from jaxmia import workdir

    # Records written before these fields existed must still equal a rerun's settings: at the
    # value that reproduces the old behaviour a field stays out of the record.
    c = config.default_config()
    flat = workdir.flatten(c)
    # the one default that changed the behaviour (fewer seeds judged) is recorded
    assert [k for k in workdir.LATER_DEFAULTS if k in flat] == ["judges.seeds_per_identity"]
    c.judges.seeds_per_identity = workdir.LATER_DEFAULTS["judges.seeds_per_identity"]
    assert not [k for k in workdir.LATER_DEFAULTS if k in workdir.flatten(c)]
    # Any other value is a setting of its own, and so is another type of the same value.
    c.inversion.views, c.inversion.zoom, c.train.stream = 2, 0.1, True
    flat = workdir.flatten(c)
    assert flat["inversion.views"] == 2 and flat["inversion.zoom"] == 0.1 and flat["train.stream"]
    assert workdir._is_later_default("train.stream", False)
    assert not workdir._is_later_default("train.stream", 0)


@pytest.mark.parametrize("name", ["att", "celeba"])
def test_resnet_target_configs_swap_r_t_and_the_second_judge(name):
    """configs/*_resnet.py: R_T is the base config's ResNet judge, on the same split, and the
    second judge is the base config's paper CNN with its own recipe."""
    from jaxmia.stages import experiment

    base = config.load(str(CONFIGS[0].parent / f"{name}.py"))
    swapped = config.load(str(CONFIGS[0].parent / f"{name}_resnet.py"))
    settings = experiment.stage_settings
    assert settings(swapped)["split"] == settings(base)["split"]
    resnet_target = _common().resnet_target
    assert swapped.to_dict() == resnet_target(base).to_dict()
    judge = experiment.other_config(base)
    assert swapped.model.to_dict() == judge.model.to_dict() and swapped.model.arch == "resnet"
    assert swapped.train.to_dict() == judge.train.to_dict()
    second = experiment.other_config(swapped)
    assert second.model.to_dict() == base.model.to_dict()
    assert second.train.to_dict() == base.train.to_dict()
    assert swapped.inversion.to_dict() == base.inversion.to_dict()
    with pytest.raises(JaxmiaError, match="expected a paper-CNN config"):
        resnet_target(swapped)


def _section_cases():
    """(config section, the dataclass it is built from, its fields the section leaves out)."""
    from jaxmia.attacks import cloning, generator, inversion, query
    from jaxmia.judges import pgd, transformed
    from jaxmia.recognizers import defences, models, train
    from jaxmia.service import policy, server

    return [
        ("train.defence", defences.Defence(), ()),
        ("train", train.Augment(), ("max_shift",)),
        ("judges.transforms", transformed.TransformSettings(), ()),
        ("judges.pgd", pgd.PGDSettings(), ()),
        ("inversion", inversion.InversionConfig(), ()),
        ("prior", generator.GeneratorConfig(), ("image_size", "channels")),
        ("prior", generator.TrainConfig(), ()),
        ("serve", policy.Policy(), ()),
        ("serve", server.Limits(), ("max_body_bytes",)),
        ("blackbox.query", query.Settings(), ("attack",)),
        ("cloning.perturb", cloning.Perturbation(), ()),
        # Presets: what the section sets apart from the dataclass's defaults, stated here once.
        (
            "cloning",
            policy.Policy(detector="hash", cosine=0.99),
            tuple(
                f.name
                for f in dataclasses.fields(policy.Policy)
                if f.name not in config.POLICY_FIELDS
            ),
        ),
        (
            "cloning.outside_perturb",
            cloning.Perturbation(shift=1, crop=0.05, noise=0.01, jpeg=0.0),
            (),
        ),
        # The model section is not built from ModelConfig (whose dropout, 0, is the architecture's
        # for imported networks too); R_T's recipe trains with dropout 0.5.
        (
            "model",
            models.ModelConfig(num_classes=1, dropout=0.5),
            ("num_classes", "image_size", "channels", "bottleneck", "mean", "std"),
        ),
    ]


def test_every_section_agrees_with_its_dataclass():
    """One definition of each default: every field a section shares with its dataclass has the
    dataclass's value and type, and the section holds every field it does not leave out."""
    c = config.default_config()
    for path, settings, leave_out in _section_cases():
        node = c
        for name in path.split("."):
            node = node[name]
        for f in dataclasses.fields(settings):
            if f.name in leave_out:
                assert f.name not in node, f"{path}.{f.name} is left out but set"
                continue
            want = getattr(settings, f.name)
            assert f.name in node, f"{path}.{f.name}: missing (dataclass {type(settings)})"
            got = node[f.name]
            assert got == want and type(got) is type(want), f"{path}.{f.name}: {got!r} != {want!r}"
    from jaxmia.service import server

    assert c.serve.max_body_mb * (1 << 20) == server.Limits().max_body_bytes
    assert c.inversion.steps_per_call is None  # InversionConfig's "by backend"


def test_the_section_check_sees_a_change_on_one_side(monkeypatch):
    """A default changed in config.py alone is a disagreement the check above reports."""
    built = config.default_config

    def changed():
        c = built()
        c.judges.transforms.samples = 8
        return c

    monkeypatch.setattr(config, "default_config", changed)
    with pytest.raises(AssertionError, match="judges.transforms.samples: 8 != 4"):
        test_every_section_agrees_with_its_dataclass()


def test_section_dataclasses_hold_the_defaults_runs_used():
    """The three that disagreed before took config.py's values (what every CLI run used)."""
    from jaxmia.judges import pgd, transformed
    from jaxmia.service import policy

    assert pgd.PGDSettings() == pgd.PGDSettings(16 / 255, 2 / 255, 30)
    assert transformed.TransformSettings().samples == 4
    assert policy.Policy().cosine == 0.98 and config.default_config().cloning.cosine == 0.99


def test_each_config_folder_gets_its_own_common_module(tmp_path):
    for tag in ("a", "b"):
        folder = tmp_path / tag
        folder.mkdir()
        (folder / "common.py").write_text(f"TAG = {tag!r}\n")
        (folder / "cfg.py").write_text(
            "import ml_collections\nfrom common import TAG\n\n\n"
            "def get_config():\n    return ml_collections.ConfigDict({'tag': TAG})\n"
        )
    assert config.load(str(tmp_path / "a" / "cfg.py")).tag == "a"
    assert config.load(str(tmp_path / "b" / "cfg.py")).tag == "b"


def test_the_gan_configs_baseline_is_the_pixel_attack_of_its_base():
    """configs/att_gan.py's baseline stage runs configs/att.py's attack field for field."""
    from jaxmia.stages import experiment

    base = config.load(str(CONFIGS[0].parent / "att.py"))
    gan = config.load(str(CONFIGS[0].parent / "att_gan.py"))
    assert gan.inversion.prior == "gan" and gan.inversion.denoise == "none"
    assert experiment.baseline_config(gan).inversion.to_dict() == base.inversion.to_dict()
    assert experiment.stage_settings(gan)["split"] == experiment.stage_settings(base)["split"]
