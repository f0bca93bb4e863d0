"""The defaults: the paper's recognizer on the embedded AT&T (ORL) faces at 64x64 grey.

  jaxmia train --config configs/default.py --workdir runs/att
  jaxmia train --workdir runs/synth --config.data.source=synthetic --config.train.epochs=20

Expected: at least 90% test accuracy on the 40 AT&T identities (5 train / 5 test photos each).
"""

from jaxmia.config import default_config


def get_config():
    return default_config()
