"""Helpers the configs share: a config file imports them as ``from common import ...``
(``jaxmia.config.load`` runs a config file with its folder on the import path)."""

from pathlib import Path

import ml_collections

from jaxmia.config import load
from jaxmia.errors import JaxmiaError


def base(name: str) -> ml_collections.ConfigDict:
    """The config of the file ``name`` in this folder (e.g. "att.py"), to build on."""
    return load(str(Path(__file__).with_name(name)))


def resnet_target(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with R_T and R_E the ResNet of its second judge (``judges.other_*``), and its
    paper CNN, with its own recipe, as the second judge: an R_T with batch norm.

    The swap of ``experiment.other_config``'s second judge (tests/test_config.py holds the two
    to the same model and recipe).
    """
    j = config.judges
    if config.model.arch != "paper" or j.other_arch not in ("auto", "resnet"):
        raise JaxmiaError(
            f"model.arch={config.model.arch!r}, judges.other_arch={j.other_arch!r}: "
            "expected a paper-CNN config with a ResNet second judge"
        )
    out = ml_collections.ConfigDict(config.to_dict())
    out.model.arch = "resnet"
    out.model.update(j.other_model.to_dict())
    out.train.update(j.other_train.to_dict())
    out.judges.other_arch = "paper"
    out.judges.other_model = ml_collections.ConfigDict(config.model.to_dict())
    out.judges.other_train = ml_collections.ConfigDict(config.train.to_dict())
    return out


def pixel_overrides(config: ml_collections.ConfigDict, pixels: ml_collections.ConfigDict) -> str:
    """``experiment.baseline_overrides`` that give the baseline ``pixels``'s attack back: the
    ``inversion`` fields where ``config`` differs from it, besides the prior's own (which the
    baseline resets itself)."""
    own = {"prior", "prior_checkpoint", "prior_residual", "residual_weight", "coef_weight",
           "init_candidates", "feature_weight"}  # fmt: skip
    a, b = config.inversion, pixels.inversion
    text = lambda v: v if isinstance(v, str) else repr(v)  # noqa: E731 - strings go in raw
    return "; ".join(f"inversion.{k}={text(b[k])}" for k in b if k not in own and a[k] != b[k])
