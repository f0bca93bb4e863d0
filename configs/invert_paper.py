"""The gray-box paper's inversion (Khosravy et al. 2021) on the default recognizer.

  jaxmia invert --config configs/invert_paper.py --checkpoint RUN/target --workdir OUT

100 clones per identity, each starting from the mean of 256 faces of the auxiliary pool (people
the recognizer never saw), updated by plain gradient descent x <- clip(x - lr * grad) of the
least-squares distance between R_T's softmax and the target's one-hot, no regulariser, a fixed
number of steps.
"""

from jaxmia.config import default_config


def get_config():
    c = default_config()
    inv = c.inversion
    inv.clones = 100
    inv.seed = "mean"
    inv.seed_pool_size = 256
    inv.loss = "least_squares"
    inv.optimizer = "sgd"
    inv.stop_confidence = 0.0
    inv.patience = 0
    return c
