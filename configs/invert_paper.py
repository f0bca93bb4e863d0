"""The gray-box paper's inversion (Khosravy et al. 2021) on the default recognizer.

  jaxmia invert --config configs/invert_paper.py --checkpoint RUN/target --workdir OUT

100 clones per identity, each starting from the mean of 256 faces of the auxiliary pool (people
the recognizer never saw; drawn per clone, and at most half the pool, so that the clones differ),
updated by plain gradient descent x <- clip(x - 0.1 * grad) of the least-squares distance between
R_T's softmax and the target's one-hot, no regulariser, a fixed 600 steps.

Measured with this file: R_T of the default AT&T split (19 identities, 64x64 grey, 94% test
accuracy; `jaxmia train --recognizer target`), its 5 attacked identities x 100 clones: mean target
confidence 0.053 (seed) -> 0.967, every identity >= 0.92, in 10.7 minutes on the shared 2-core
CPU. With 300 steps some identities stayed near 0 in tuning (the least-squares gradient vanishes
while the target's softmax is near 0); larger rates (1.0, 10) saturate pixels and do worse.
"""

from jaxmia.config import default_config


def get_config():
    c = default_config()
    inv = c.inversion
    inv.clones = 100
    inv.steps = 600
    inv.seed = "subset_mean"
    inv.seed_subset_size = 256
    inv.loss = "least_squares"
    inv.optimizer = "sgd"
    inv.learning_rate = 0.1
    inv.stop_confidence = 0.0
    inv.patience = 0
    return c
