"""configs/att.py with a ResNet R_T (and R_E): an R_T with batch norm, for DeepInversion's prior.

  jaxmia experiment --config configs/att_resnet.py --workdir runs/att-resnet

R_T and R_E are the ResNet that configs/att.py trains as its second judge (judges.other_model,
other_train: widths 16-128, one basic block a stage, SGD 0.1 with Nesterov momentum, 60
epochs; 93.9% test accuracy as that judge), and the second judge is att.py's paper CNN with its
own recipe. benchmarks/prior_levers.md inverts this R_T (trained alone: `--until target`) and
judges its clones with configs/att.py's experiment's R_E and second R_E, which train on the same
split's R_E photos: measured there.
"""

from pathlib import Path

from jaxmia.config import load
from jaxmia.experiment import resnet_target


def get_config():
    return resnet_target(load(str(Path(__file__).with_name("att.py"))))
