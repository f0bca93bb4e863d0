"""The cloning attack (Kinbara et al. 2020) on the embedded AT&T faces at 32x32 grey.

  jaxmia clone --config configs/cloning.py --workdir runs/clone-att
  jaxmia clone --config configs/cloning.py --workdir runs/clone-synth --config.data.source=synthetic

A service trained on 20 people answers an attacker who owns photos of the 20 others; the table
compares no defence, intentional misrecognition at p, the near-duplicate estimation attack, the
near-duplicate countermeasure, and adaptive attackers (several accounts, near-duplicates pushed
outside the hash radius). See the `cloning` section of jaxmia/config.py for every field.
"""

from jaxmia.config import default_config


def get_config():
    c = default_config()
    c.data.synthetic.num_identities = 40
    c.data.synthetic.images_per_identity = 10
    return c
