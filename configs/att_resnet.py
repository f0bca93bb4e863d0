"""configs/att.py with a ResNet R_T (and R_E): an R_T with batch norm, for DeepInversion's prior.

  jaxmia experiment --config configs/att_resnet.py --workdir runs/att-resnet

R_T and R_E are the ResNet that configs/att.py trains as its second judge (judges.other_model,
other_train: widths 16-128, one basic block a stage, SGD 0.1 with Nesterov momentum, 60 epochs;
93.9% test accuracy as that judge), and the second judge is att.py's paper CNN with its own
recipe. benchmarks/prior_levers.md inverts this R_T (trained alone: `--until target`, 2-3 min)
and judges its clones with configs/att.py's experiment's R_E and second R_E, which train on the
same split's R_E photos. Measured: R_T 87.9% test accuracy (split seed 2; 97.0% on seed 0);
configs/att.py's attack, 10 clones per identity: top-1 by R_E (the paper CNN) 15.2%, by the
ResNet R_E 37.6%; with inversion.feature_weight=0.01 (chosen on seed 0) 17.6% and 40.3%.
"""

from common import base, resnet_target


def get_config():
    return resnet_target(base("att.py"))
