"""configs/celeba.py with R_T on a pretrained face backbone: a target worth attacking.

  jaxmia experiment --config configs/celeba_pretrained.py --workdir runs/celeba-pretrained
  jaxmia train --config configs/celeba_pretrained.py --workdir runs/celeba-pretrained-rt \\
    --recognizer target                           # R_T alone (--recognizer evaluation: R_E)

What differs from configs/celeba.py (same faces, 64x64 crops, split and attack): R_T is a
linear head over faceres (MobileNet-v1 trained on VGGFace2 for face identity, 1024-d;
jaxmia/pretrained/faceres.py), the backbone frozen (model.tune="linear"); R_E is a linear head
over EfficientNet-Lite0 (ImageNet, 1280-d; model.evaluation_arch), so that R_T and R_E are not
twins; the second R_E (judges.other_*) is configs/celeba.py's paper CNN with its own recipe.
The face judge is dlib's alone: faceres, R_T's own backbone, cannot judge clones made through
it (jaxmia.recognizers.train.check_target refuses an R_T on a judge's backbone). The head's
recipe: no augmentation, so each photo's backbone features are computed once
(jaxmia.recognizers.train.fit), then AdamW 1e-3, weight decay 0.05, dropout 0.5 on the
features, label smoothing 0.1, 100 epochs.

Chosen on split.seed 2 (R_T's 107 people, 1,937 training and 311 test photos), measured on the
shared 2-core CPU (2026-12-07, load 6-8 from other runs) with
  jaxmia train --config configs/celeba_pretrained.py --workdir W --recognizer target \\
    --config.split.seed=S
R_T's test accuracy: split.seed 2 (chosen there) 92.0% in 210 s wall (the backbone's features
about 150 s, the head's 100 epochs 20 s); split.seed 3 (this config's, never chosen on) 85.2%
in 118 s; split.seed 4 (a look at the spread, not chosen on) 92.6% (of the same features, by
the script of the next paragraph). R_T falls short of the 90% that issue 25 asks for on the
split it reports on. R_E (EfficientNet-Lite0, linear) on split.seed 3: 43.0% test accuracy
(106 people) in 891 s wall, most of it the backbone's features; on split.seed 2 44.4-45.3%
(R_T's part). celeba.py's paper-CNN R_E reached 52.7%.

Levers tried on split.seed 2 (and 4) over the cached features, none clearly past the noise of
311 test photos (1 photo = 0.3 points): dropout 0 / 0.5 (91.3 / 92.0%); learning rate 1e-2
(89.1%); 300 epochs (91.0%); features L2-normalised (x32) 92.0%, with flipped copies of the
training photos 92.6% (seed 4: 93.6%); data.crop 1.0 (90.7-92.0%); data.image_size (128, 128)
92.9% (seed 4 92.9% against 92.6%), at 4x the second R_E's and the pixel attack's cost. Cosine
nearest class mean of the same features: 90.7% (seed 2), 94.5% (seed 4). Not tried for want of
CPU: fine-tuning the backbone (model.tune="finetune", about 3.5 GFLOP a photo a step: some
minutes an epoch here). After seeing seed 3's figure, the 128x128 input (the best of the levers
on seeds 2 and 4) was tried there too: 87.8% in 178 s (--config.data.image_size='(128,128)'),
still short of 90%; this config keeps 64x64.
"""

import ml_collections
from common import base


def get_config():
    c = base("celeba.py")
    # The second R_E: celeba.py's paper CNN with its recipe (R_T's would not train it).
    paper_model = ml_collections.ConfigDict(c.model.to_dict())
    paper_train = ml_collections.ConfigDict(c.train.to_dict())
    c.model.arch = "faceres"
    c.model.tune = "linear"
    c.model.evaluation_arch = "efficientnet_lite0"
    c.model.dropout = 0.5
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
