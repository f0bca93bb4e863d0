"""configs/celeba.py with R_T on a pretrained face backbone: a target worth attacking.

  jaxmia experiment --config configs/celeba_pretrained.py --workdir runs/celeba-pretrained
  jaxmia train --config configs/celeba_pretrained.py --workdir runs/celeba-pretrained-rt \\
    --recognizer target                           # R_T alone (--recognizer evaluation: R_E)

What differs from configs/celeba.py (same faces, 64x64 crops, split and attack): R_T is faceres
(MobileNet-v1 trained on VGGFace2 for face identity, 1024-d; jaxmia/pretrained/faceres.py) under
a new linear head, its last separable block fine-tuned with the head and the 12 blocks below it
frozen (model.tune="top", model.tune_blocks=1); R_E is a linear head over EfficientNet-Lite0
(ImageNet, 1280-d; model.evaluation_arch; an R_E of another arch stays linear under tune="top"),
so that R_T and R_E are not twins; the second R_E (judges.other_*) is configs/celeba.py's paper
CNN with its own recipe. The face judge is dlib's alone: faceres, R_T's own backbone, cannot
judge clones made through it (jaxmia.recognizers.train.check_target refuses an R_T on a judge's
backbone). The recipe: no augmentation, so the frozen part's output of each photo (the 7x7x1024
map entering the last block; R_E: its pooled features) is computed once
(jaxmia.recognizers.train.fit) and each epoch runs the last block and the head alone; AdamW
1e-3, weight decay 0.05, dropout 0.5 on the features, label smoothing 0.1, 30 epochs. The
trained R_T is the whole network on images (checkpoints, inversion, serving), the cached path
only a way to train it (tests/recognizers/test_partial_finetune.py).

Measured on the shared 2-core CPU (2026-12-07, load 4-12 from other helpers' runs) with
  jaxmia train --config configs/celeba_pretrained.py --workdir W --recognizer target \\
    --config.split.seed=S
R_T's test accuracy (R_T's 107 people; split.seed 2: 1,937 training and 311 test photos):

  recipe (split.seed 2 chose it; 4 only looked at)     seed 2   seed 4   seed 3 (reported)
  linear head, 100 epochs (the previous recipe)        92.0%    92.6%    85.2%
  tune="top", tune_blocks=1, 30 epochs (this config)   92.3%    93.2%    86.8%
  tune="top", tune_blocks=2, train.flip_copies, 15 ep  90.4%    -        -

This config's recipe was chosen on split.seed 2 (the better of the two fine-tuning tries there;
a tie with the linear head within 1 photo, 0.3 points) and then measured once on split.seed 3:
86.8% (270 of 311 photos; training accuracy 99.5%), 11 min 52 s wall at load 7-9 (the frozen
part of 2,278 photos about 1 min, then 15-26 s an epoch). R_T falls short of the 90% that
issue 25 asks for on the split it reports on. Seed 2's run (command-line overrides equal to
this config) took 11 min 11 s at load 4-6 (92.3%, training accuracy 99.9%); the flip-copies try
28 min 7 s at load 9-12. Seed 4 (a look at the spread after seed 3, not used to choose): 93.2%
(training accuracy 99.9%), 11 min 58 s at load 4-8.

Levers tried earlier on split.seed 2 (and 4) over the linear head's cached features, none
clearly past the noise of 311 test photos: dropout 0 / 0.5 (91.3 / 92.0%); learning rate 1e-2
(89.1%); 300 epochs (91.0%); features L2-normalised (x32) 92.0%, with flipped copies of the
training photos 92.6% (seed 4: 93.6%); data.crop 1.0 (90.7-92.0%); data.image_size (128, 128)
92.9% (seed 4 92.9% against 92.6%), at 4x the second R_E's and the pixel attack's cost. Cosine
nearest class mean of the same features: 90.7% (seed 2), 94.5% (seed 4). After seeing seed 3's
85.2%, the 128x128 input was tried there too: 87.8% (a post-hoc look, not this config's figure;
this config keeps 64x64). Not tried for want of CPU: fine-tuning the whole backbone
(model.tune="finetune", about 3.5 GFLOP a photo a step: some minutes an epoch here) or more of
its blocks without flip copies.

R_E (EfficientNet-Lite0, linear) was measured with the previous recipe's 100 epochs: 43.0% test
accuracy on split.seed 3 (106 people) in 891 s wall, most of it the backbone's features; on
split.seed 2 44.4-45.3% (R_T's part). This config trains it 30 epochs (train is R_T's and R_E's),
not measured again. celeba.py's paper-CNN R_E reached 52.7%.
"""

import ml_collections
from common import base


def get_config():
    c = base("celeba.py")
    # The second R_E: celeba.py's paper CNN with its recipe (R_T's would not train it).
    paper_model = ml_collections.ConfigDict(c.model.to_dict())
    paper_train = ml_collections.ConfigDict(c.train.to_dict())
    c.model.arch = "faceres"
    # faceres's last separable block trains with the head, the 12 below it frozen (their output
    # computed once per photo: each epoch runs that block and the head alone)
    c.model.tune = "top"
    c.model.tune_blocks = 1
    c.model.evaluation_arch = "efficientnet_lite0"
    c.model.dropout = 0.5
    t = c.train
    # No augmentation: the frozen part's output is computed once per photo.
    t.augment = False
    t.epochs = 30
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
