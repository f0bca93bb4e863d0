"""The defence sweep on the CelebA faces: configs/celeba.py's protocol, one strength a defence.

  jaxmia defend --config configs/defences_celeba.py --workdir runs/defences-celeba \\
    --config.defences.reuse=runs/celeba

configs/celeba.py (split.seed 3; R_T, R_E and the ResNet R_E by its recipe, which already
holds positive label smoothing 0.1, weight decay 0.05 and dropout 0.5: the "none" cell) with
its attack (20 clones per attacked person, 200 a cell), the adaptive attacker of
configs/defences.py, and every judge. With ``defences.reuse`` the "none" cell and every cell's
R_E and ResNet R_E are taken over from a finished ``jaxmia experiment --config
configs/celeba.py`` run; without it the first cell trains them (about 60 min more).

On these 2 CPU cores a CelebA R_T takes 15-20 min (40 with the cores shared), so the sweep has
one strength a defence (those of configs/defences.py that did best on AT&T, chosen there, not
here); DP-SGD costs about 5x a plain step, so its R_T trains 20 epochs, not 100. The plain
regularisers for comparison: weight decay 0.5 and dropout 0.8 (the recipe's are 0.05 and 0.5).
Positive smoothing is the recipe's own here (R_E's too), so its effect is AT&T's cell only.
Expected time: about 2.2 h with --config.defences.reuse (measured 132 min, cores shared).

Measured: see README, "Defences", and benchmarks/results/defences_celeba.{md,json,png}.
"""

from common import base


def get_config():
    c = base("celeba.py")
    d = "train.defence"
    c.defences.cells = (
        "none:",
        f"nls-0.05: {d}.label_smoothing=-0.05; {d}.smoothing_ramp_epochs=50",
        f"mid-0.1: {d}.bottleneck=256; {d}.bottleneck_weight=0.1",
        f"dp-0.5: {d}.dp=True; {d}.dp_clip=1.0; {d}.dp_noise=0.5; {d}.epochs=20",
        f"wd-0.5: {d}.weight_decay=0.5",
        f"dropout-0.8: {d}.dropout=0.8",
    )
    c.defences.adaptive = ("inversion.loss=cross_entropy",)
    c.defences.pilot_clones = 1
    return c
