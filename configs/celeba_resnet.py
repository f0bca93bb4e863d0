"""configs/celeba.py with a ResNet R_T (and R_E): an R_T with batch norm, for DeepInversion's
prior.

  jaxmia experiment --config configs/celeba_resnet.py --workdir runs/celeba-resnet

R_T and R_E are the ResNet that configs/celeba.py trains as its second judge (41.9% test
accuracy as that judge, 36 min on the shared 2-core CPU); the second judge is celeba.py's paper
CNN with its own recipe. benchmarks/prior_levers.md inverts this R_T (trained alone: `--until
target`, 36-46 min on shared cores) and judges its clones with configs/celeba.py's experiment's
judges. Measured: R_T 41.8% test accuracy; configs/att.py's attack, 20 clones per identity:
top-1 by R_E (the paper CNN) 0.5%, by the ResNet R_E 4.0%; with inversion.feature_weight=0.01
1.0% and 4.5%.
"""

from common import base, resnet_target


def get_config():
    return resnet_target(base("celeba.py"))
