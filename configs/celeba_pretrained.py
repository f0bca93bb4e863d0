"""configs/celeba.py with R_T on a pretrained face backbone: a target worth attacking.

  jaxmia experiment --config configs/celeba_pretrained.py --workdir runs/celeba-pretrained
  jaxmia train --config configs/celeba_pretrained.py --workdir runs/celeba-pretrained-rt \\
    --recognizer target                           # R_T alone

What differs from configs/celeba.py: R_T is a linear head over faceres (MobileNet-v1 trained on
VGGFace2 for face identity; jaxmia/pretrained/faceres.py), frozen; R_E a linear head over
EfficientNet-Lite0 (ImageNet; model.evaluation_arch), so R_T and R_E are not twins; the second
R_E is configs/celeba.py's paper CNN with its recipe. The face judge is dlib's alone: faceres,
R_T's own backbone, cannot judge R_T's clones (jaxmia.recognizers.train.check_target refuses it).
"""

from pathlib import Path

import ml_collections

from jaxmia.config import load


def get_config():
    c = load(str(Path(__file__).with_name("celeba.py")))
    paper_model = ml_collections.ConfigDict(c.model.to_dict())
    paper_train = ml_collections.ConfigDict(c.train.to_dict())
    c.model.arch = "faceres"
    c.model.tune = "linear"
    c.model.evaluation_arch = "efficientnet_lite0"
    c.model.dropout = 0.0
    t = c.train
    # No augmentation: the frozen backbone's features are computed once per photo.
    t.augment = False
    t.epochs = 100
    t.batch_size = 64
    t.optimizer = "adamw"
    t.learning_rate = 1e-3
    t.weight_decay = 0.05
    t.warmup_epochs = 3
    t.label_smoothing = 0.1
    t.crop_scale = 1.0
    t.saturation = 0.0
    j = c.judges
    j.face = ("dlib",)
    j.other_arch = "paper"
    j.other_model = paper_model
    j.other_train = paper_train
    return c
