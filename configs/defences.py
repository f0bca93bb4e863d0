"""The defence sweep on the AT&T faces: leak against utility for each training-time defence.

  jaxmia defend --config configs/defences.py --workdir runs/defences

configs/att.py (split.seed 2, the attack chosen on seed 0) with 5 clones per attacked identity
(165 clones a cell). R_T is trained under each defence at two strengths (the comparison
regularisers at one), attacked with configs/att.py's attack and by an adaptive attacker (the
config's attack or the cross-entropy loss, whichever R_T recognises best under transforms on
a pilot of one clone per identity), and every judge beside R_E scores the clones. R_E and the
second R_E are trained once, undefended, and judge every cell.

Strengths from the literature, not tuned here: negative smoothing -0.05 (Struppek et al. 2024)
and -0.15, ramped in over the first 30 of 60 epochs; MID at beta 0.01 and 0.1 on a 256-wide
code (Wang et al. 2021 use 0.003-0.02 on 512); DP-SGD at clip 1 and noise 0.1, 0.5 and 1.5,
and the clipping alone (noise 0, no privacy) to tell the clipping's cost from the noise's.

Measured: see README, "Defences", and benchmarks/results/defences_att.{md,json,png}.
"""

from common import base


def get_config():
    c = base("att.py")
    c.inversion.clones = 5
    # the judges as the table was measured: every seed as the floor (5 a person here anyway),
    # 8 transforms an image, 5 PGD controls a person
    c.judges.seeds_per_identity = 0
    c.judges.transforms.samples = 8
    c.judges.pgd.per_identity = 5
    d = "train.defence"
    c.defences.cells = (
        "none:",
        f"smooth+0.1: {d}.label_smoothing=0.1",
        f"nls-0.05: {d}.label_smoothing=-0.05; {d}.smoothing_ramp_epochs=30",
        f"nls-0.15: {d}.label_smoothing=-0.15; {d}.smoothing_ramp_epochs=30",
        f"mid-0.01: {d}.bottleneck=256; {d}.bottleneck_weight=0.01",
        f"mid-0.1: {d}.bottleneck=256; {d}.bottleneck_weight=0.1",
        f"clip-only: {d}.dp=True; {d}.dp_clip=1.0; {d}.dp_noise=0.0",
        f"dp-0.1: {d}.dp=True; {d}.dp_clip=1.0; {d}.dp_noise=0.1",
        f"dp-0.5: {d}.dp=True; {d}.dp_clip=1.0; {d}.dp_noise=0.5",
        f"dp-1.5: {d}.dp=True; {d}.dp_clip=1.0; {d}.dp_noise=1.5",
        f"wd-0.5: {d}.weight_decay=0.5",
        f"dropout-0.8: {d}.dropout=0.8",
    )
    c.defences.adaptive = ("inversion.loss=cross_entropy",)
    c.defences.pilot_clones = 1
    return c
