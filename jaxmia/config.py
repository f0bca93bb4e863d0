"""Configs: ml_collections ConfigDicts from a Python file's ``get_config()``, with overrides.

Overrides follow the flax examples: ``--config.train.epochs=5``, ``--config.data.source=synthetic``.
An unknown field or a value of the wrong type is a JaxmiaError naming the field.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jaxmia.errors import JaxmiaError

# The cloning section's fields of the service's policy (service.Policy).
POLICY_FIELDS = (
    "answer",
    "top_k",
    "wrong",
    "detector",
    "scope",
    "radius",
    "cosine",
    "chunks",
    "fingerprint_bits",
)


def section(settings: Any, *, leave_out: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """A config section holding a section dataclass's fields at the values of ``settings``.

    The dataclasses (``transformed.TransformSettings``, ``policy.Policy``, ...) are the one home of
    their defaults and checks; the sections are built from them so the two cannot disagree.

    Args:
      settings: a dataclass instance: its class's defaults, or a preset of it.
      leave_out: its fields the section does not hold (set from elsewhere, or derived).
    """
    return ml_collections.ConfigDict(
        {
            f.name: getattr(settings, f.name)
            for f in dataclasses.fields(settings)
            if f.name not in leave_out
        }
    )


def default_config() -> ml_collections.ConfigDict:
    """The defaults: the paper's recognizer on the embedded AT&T faces at 64x64 grey.

    A section with a dataclass in its module is built from it (``section``): the dataclass is
    the one home of those defaults and their checks.
    """
    # imported here: importing this module stays light (the CLI's first import)
    from jaxmia.recognizers import train

    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    # "att" (embedded AT&T/ORL faces), "folder:PATH", "tfds:NAME[:SPLIT]" or "synthetic".
    c.data.source = "att"
    c.data.image_size = (64, 64)  # (height, width)
    c.data.channels = 1
    c.data.cache_dir = ""  # "" means $JAXMIA_CACHE or ~/.cache/jaxmia
    # Cut out the centred box of crop x (height, width) before resizing: for photos whose face
    # does not fill the frame (LFW's 250x250). 1.0: the whole image. Not for synthetic faces.
    c.data.crop = 1.0
    c.data.synthetic = ml_collections.ConfigDict()
    c.data.synthetic.num_identities = 40
    c.data.synthetic.images_per_identity = 10
    c.data.synthetic.seed = 0

    # The paper's protocol: R_T and R_E share `num_attacked` identities and are otherwise disjoint;
    # an auxiliary pool disjoint from both makes the inversion's seed image.
    c.split = ml_collections.ConfigDict()
    c.split.seed = 0
    c.split.num_attacked = 5
    c.split.num_target_only = -1  # -1: share the remaining identities out evenly
    c.split.num_evaluation_only = -1
    c.split.num_aux = -1
    c.split.test_per_identity = 5  # photos per identity held out for test accuracy
    # "disjoint": R_T and R_E train on different photos of an attacked identity; "shared": same.
    c.split.attacked_photos = "disjoint"
    # Identities with fewer photos are left out (named in split.json and a note). 0: the fewest
    # the split needs, test_per_identity + 2 ("disjoint") or + 1 ("shared").
    c.split.min_photos = 0

    c.model = ml_collections.ConfigDict()
    # "paper": the paper's CNN; "resnet": a ResNet with batch norm; "faceres",
    # "efficientnet_lite0", "dlib_resnet": a new head over that pretrained backbone (its weights
    # from `jaxmia models fetch`; jaxmia/recognizers/models.py). An R_T on a backbone that is also
    # one of judges.face is refused.
    c.model.arch = "paper"
    # A pretrained backbone: "linear" trains the head alone (the backbone frozen; without
    # augmentation its features are computed once), "top" (faceres) the backbone's last
    # tune_blocks blocks too (the lower ones frozen; without augmentation their output is
    # computed once; an R_E of another arch stays linear), "finetune" the whole backbone too.
    c.model.tune = "linear"
    c.model.tune_blocks = 0  # tune="top" only: 1 to 13 (faceres)
    # R_E's architecture ("": R_T's), its other model fields R_T's: a judge that is not R_T's
    # twin (e.g. efficientnet_lite0 beside a faceres R_T).
    c.model.evaluation_arch = ""
    c.model.conv_features = (5, 16, 32, 64)  # paper
    c.model.kernel_sizes = (5, 5, 3, 3)  # paper
    c.model.dense_features = (1024, 1024)  # paper
    c.model.widths = (64, 128, 256, 512)  # resnet: each stage's width (resnet18's)
    c.model.blocks = (2, 2, 2, 2)  # resnet: blocks per stage
    c.model.block = "basic"  # resnet: "basic" or "bottleneck"
    c.model.stem_kernel = 7  # resnet: torchvision's stem, 7x7 stride 2 then a 3x3/2 max-pool
    c.model.stem_stride = 2
    c.model.stem_pool = True
    c.model.dropout = 0.5

    c.train = ml_collections.ConfigDict()
    # "all": one recognizer on every identity; "target" / "evaluation": R_T / R_E of the split;
    # "both": R_T and R_E, into WORKDIR/target and WORKDIR/evaluation.
    c.train.recognizer = "all"
    c.train.epochs = 60
    c.train.batch_size = 32
    c.train.optimizer = "adam"  # "adam", "adamw", "sgd"
    c.train.learning_rate = 1e-3
    c.train.schedule = "cosine"  # "constant", "cosine"; both warm up linearly first
    c.train.warmup_epochs = 2
    # adamw: decoupled weight decay; sgd: an L2 term; adam: refused (it would have no effect).
    c.train.weight_decay = 0.0
    c.train.momentum = 0.0  # sgd only (0.9 is the usual heavy ball)
    c.train.nesterov = False  # sgd with momentum only
    # Random shifts of up to 4 pixels, horizontal flips, brightness and contrast per image.
    c.train.augment = True
    # With augment: < 1 replaces the shifts by random resized crops of [crop_scale, 1] of the
    # area (aspect 3/4 to 4/3); saturation > 0 jitters RGB saturation by a factor in 1 +- it.
    augment = train.Augment()
    c.train.crop_scale = augment.crop_scale
    c.train.saturation = augment.saturation
    c.train.label_smoothing = 0.0
    # Each training photo's mirror image as one more training example (in memory only): a
    # fixed flip augmentation that still lets a frozen backbone part's output be cached.
    c.train.flip_copies = False
    # Stream batches from the array_record cache through grain (jaxmia/data/stream.py) instead of
    # holding the images in memory, each batch split over every device (data-parallel; the
    # batch size must divide by the device count). Another shuffle than in memory: other weights.
    c.train.stream = False
    c.train.defence = _defence_defaults()
    c.train.checkpoint_every = 5  # epochs
    c.train.keep_checkpoints = 2
    c.inversion = _inversion_defaults()
    c.prior = _prior_defaults()

    c.cloning = _cloning_defaults()
    c.serve = _serve_defaults()
    c.blackbox = _blackbox_defaults()
    c.defences = _sweep_defaults()
    c.experiment = _experiment_defaults()
    c.judges = _judges_defaults()
    return c


def _defence_defaults() -> ml_collections.ConfigDict:
    """Training-time defences against inversion (``defences.Defence``); all off by default.

    They apply to the target recognizer R_T (``jaxmia train``, the experiment's ``target``
    stage); R_E and the judges are never trained with them.
    """
    from jaxmia.recognizers import defences

    return section(defences.Defence())


def _sweep_defaults() -> ml_collections.ConfigDict:
    """``jaxmia defend``: the defence sweep (jaxmia/stages/defend.py, configs/defences.py)."""
    c = ml_collections.ConfigDict()
    # "NAME: field=value; field=value" per cell, the fields relative to the config's root
    # (e.g. "nls: train.defence.label_smoothing=-0.05"); "NAME:" alone is the undefended R_T.
    c.cells = ("none:",)
    # The adaptive attacker's other attacks, "field=value; ..." each (the config's is always a
    # candidate): the one R_T recognises best under transforms on a pilot is run in full.
    c.adaptive = ("inversion.loss=cross_entropy",)
    c.pilot_clones = 1  # per identity
    # A finished experiment's workdir on the same split and data ("": none): each cell takes
    # over its R_T, R_E and second R_E where their settings equal the cell's (experiment.adopt).
    c.reuse = ""
    return c


def _judges_defaults() -> ml_collections.ConfigDict:
    """The judges beside R_E (jaxmia/judges/panel.py): how much of a success survives them."""
    from jaxmia.judges import pgd, transformed

    c = ml_collections.ConfigDict()
    # A second evaluation recognizer, trained by `jaxmia experiment` on R_E's photos: "auto" is
    # an architecture other than R_T's (resnet for the paper CNN, the paper CNN for a resnet),
    # "" none. Its model and train fields are R_T's with those of other_model / other_train.
    c.other_arch = "auto"
    c.other_model = ml_collections.ConfigDict()
    c.other_model.widths = (16, 32, 64, 128)
    c.other_model.blocks = (1, 1, 1, 1)
    c.other_model.stem_kernel = 3
    c.other_model.stem_stride = 1
    c.other_model.stem_pool = True
    c.other_train = ml_collections.ConfigDict()
    c.other_train.optimizer = "sgd"
    c.other_train.learning_rate = 0.1
    c.other_train.momentum = 0.9
    c.other_train.nesterov = True
    c.other_train.weight_decay = 5e-4
    c.other_train.epochs = 60
    # The face judges (jaxmia/judges/panel.py FACE_MODELS), first in every table: pretrained face
    # recognizers on dlib-aligned chips, by the nearest of R_E's real photos and the nearest
    # centroid; their weights come from `jaxmia models fetch dlib_resnet dlib_landmarks5
    # faceres` (a model that cannot be had is left out with a note). () runs none.
    c.face = ("dlib", "faceres")
    # The non-CNN judges' eigenface space: components of R_E's training photos (fewer photos:
    # as many as they allow, noted).
    c.eigenfaces = 64
    # R_E's verdict averaged over random small transforms (robust.TransformSettings), the draws
    # keyed by seed.
    c.transforms = section(transformed.TransformSettings())
    c.transforms.seed = 0
    # The adversarial control: a targeted L-inf PGD from seeds against R_T
    # (adversarial.PGDSettings), for the first `per_identity` clones' seeds of each identity.
    c.pgd = section(pgd.PGDSettings())
    c.pgd.per_identity = 3
    # The seeds judged as the floor: the first of each identity (0: all); every judge runs on
    # them, and they sit near chance, so a few do (5 of AT&T's 20 a person: 30% less judging).
    c.seeds_per_identity = 5
    # The report's clone grids in order of this judge's rank of the target (e.g. "face_dlib");
    # "": in clone order.
    c.sort_by = ""
    return c


def _experiment_defaults() -> ml_collections.ConfigDict:
    """``jaxmia experiment``: restarts of the inversion ranked by R_T (see
    jaxmia/stages/experiment.py)."""
    c = ml_collections.ConfigDict()
    # Invert restarts x inversion.clones per identity and keep the inversion.clones best by R_T.
    c.restarts = 1
    # By "confidence": R_T's softmax score of the target (rounds to 1.0 for most clones of a
    # long run, and ties keep the first clones); "margin": R_T's logit of the target minus its
    # highest other logit; "robust": that margin's mean over random shifts (up to select_jitter
    # pixels) and flips, favouring clones that are not adversarial pixel patterns.
    c.select = "robust"
    c.select_jitter = 2
    c.select_flip = True
    c.select_samples = 8
    # Beside an attack with a prior (inversion.prior other than "pixels", or feature_weight),
    # also run the same attack on free pixels (stage "baseline") and judge both: the report
    # shows them side by side for the same identities, from the same seeds.
    c.baseline = True
    # The baseline's own settings where the pixel attack differs from the prior's, as
    # "field=value; ..." (e.g. "inversion.denoise=gaussian" for a GAN attack, which cannot blur).
    c.baseline_overrides = ""
    # A finished experiment's workdir: its stages whose settings equal this config's are taken
    # over (hard-linked) instead of run again, e.g. R_T and the judges for another attack.
    c.reuse = ""
    return c


def _cloning_defaults() -> ml_collections.ConfigDict:
    """``jaxmia clone``: the cloning attack vs intentional misrecognition (see
    jaxmia/attacks/cloning.py).

    Small on purpose (32x32 grey, few epochs) so the default table takes minutes on 2 CPU cores.
    """
    from jaxmia.attacks import cloning
    from jaxmia.service import policy

    c = ml_collections.ConfigDict()
    c.seed = 0
    c.image_size = (32, 32)  # overrides data.image_size for this command
    c.service_identities = 20  # the service knows these people; -1: half of all
    c.train_per_identity = 5
    c.test_per_identity = 5  # the clone is scored on these
    # The attacker's unlabeled faces: "disjoint" people, or the "same" people's other photos.
    c.pool = "disjoint"
    c.service_epochs = 150  # the service's ~100 training photos need many short epochs
    c.clone_epochs = 40
    c.batch_size = 16  # service and clone training (the rest of train.* applies as set)
    c.dense_features = (512, 512)  # service and clone recognizers (the paper's conv layers)
    # The service: policy.Policy's answers and defences, but the countermeasure's detector
    # ("hash" or "embedding") is a hash search, and an embedding match stricter than served.
    cloning_policy = policy.Policy(detector="hash", cosine=0.99)
    for name in POLICY_FIELDS:
        c[name] = getattr(cloning_policy, name)
    # The attacker.
    c.near_duplicates = 3  # m queries per image in the estimation attack (the image + m-1 variants)
    c.estimate = "relabel"  # "relabel" by strict majority or "drop" images whose answers disagree
    c.accounts = 3  # accounts of the multi-account attacker
    # Clones train on m variants per image (the plain attacker makes its own, unasked).
    c.train_on_variants = True
    c.perturb = section(cloning.Perturbation())
    # The outside-the-radius attacker: shifts and crops, which move the hash but barely the
    # recognizer, at the weakest strength on the ladder that leaves the radius.
    c.outside_perturb = section(cloning.Perturbation(shift=1, crop=0.05, noise=0.01, jpeg=0.0))
    c.ladder = (1.0, 1.5, 2.0, 3.0)
    # The table: scenarios x budgets x rates; adaptive scenarios at the largest budget only.
    c.scenarios = ("none", "misrec", "estimate", "countermeasure")
    c.adaptive = (
        "accounts_client",
        "accounts_global",
        "accounts_fingerprint",
        "outside_hash",
        "outside_embedding",
        "outside_fingerprint",
    )
    c.budgets = (150, 300, 600)  # total queries per attacker
    c.repeats = 1  # clones per cell (new near-duplicates and clone init); the table has the means
    c.rates = (0.3,)  # misrecognition p
    # A served service (jaxmia serve) to attack instead of the in-process one: "http://HOST:PORT"
    # ("": in process). Its policy is the server's; each scenario's attacker runs against it
    # on fresh accounts, the ground truth read with the administrator's key, from the file
    # service_admin_key (""): the JAXMIA_ADMIN_KEY environment variable).
    c.service = ""
    c.service_admin_key = ""
    return c


def _blackbox_defaults() -> ml_collections.ConfigDict:
    """``jaxmia blackbox``: clone the served R_T from its answers, invert the clone
    (jaxmia/stages/blackbox.py); the service's policy and the attacker's near-duplicates are
    ``cloning``'s fields (detector, radius, near_duplicates, perturb, estimate, ...)."""
    from jaxmia.attacks import query

    c = ml_collections.ConfigDict()
    c.experiment = ""  # the workdir of a finished jaxmia experiment of the same config
    c.scenarios = ("none", "misrec", "countermeasure")  # of cloning.SCENARIOS, one account
    c.budgets = (300, 1000)  # queries to the service
    c.rate = 0.3  # intentional misrecognition's p
    c.clone_epochs = 60
    c.seed = 0  # the attacker's order of its faces, its near-duplicates, the clone's init
    # Inversion by queries alone (jaxmia/attacks/query.py), in the codes of a VAE trained on the
    # public faces (jaxmia prior): "nes" (score-based) and "brep" (label-only), each against
    # the service answering in each of `outputs` (the output-side defences): "probs",
    # "probs:D" (rounded to D decimals), "topk:K" (the K best only), "label".
    # query_attack.Settings' budget and step sizes, for each attack.
    q = c.query = section(query.Settings(), leave_out=("attack",))
    q.attacks = ()  # e.g. ("nes", "brep")
    q.outputs = ("probs", "probs:1", "topk:1", "label")
    q.prior = ""  # the generator folder (jaxmia prior)
    q.clones = 2  # per attacked identity
    return c


def _serve_defaults() -> ml_collections.ConfigDict:
    """``jaxmia serve``: the HTTP service's policy (``policy.Policy``) and limits
    (``server.Limits``; its body limit in MiB here)."""
    from jaxmia.service import policy, server

    c = section(policy.Policy())
    limits = server.Limits()
    c.update(section(limits, leave_out=("max_body_bytes",)))
    c.max_body_mb = limits.max_body_bytes / (1 << 20)
    # The coins' key: -1 a secret drawn at the first start (workdir/secret.key); >= 0 this seed.
    c.seed = -1
    c.durable = False  # fsync every request (survives power loss, not only a killed server)
    return c


def _prior_defaults() -> ml_collections.ConfigDict:
    """``jaxmia prior``: the VAE of the generator prior (see jaxmia/attacks/generator.py),
    trained on the auxiliary pool the inversion's seeds come from (inversion.seed_source): the
    fields of ``generator.GeneratorConfig`` but the faces' shape, and of
    ``generator.TrainConfig``; for ``inversion.prior="gan"`` the pretrained generator tuned on
    that pool with a discriminator (jaxmia/attacks/gan_tuning.py): ``gan_tuning.TuneConfig``'s
    fields, with batch_size, flip and seed shared with the VAE."""
    from jaxmia.attacks import gan_tuning, generator

    c = section(generator.GeneratorConfig(), leave_out=("image_size", "channels"))
    c.update(section(generator.TrainConfig()))
    c.update(section(gan_tuning.TuneConfig()))
    c.seed = 0  # initialisation, batches, flips and codes
    c.checkpoint_every = 10  # epochs
    c.keep_checkpoints = 2
    return c


def _inversion_defaults() -> ml_collections.ConfigDict:
    """``jaxmia invert``: the paper's gray-box inversion (jaxmia/attacks/inversion.py, seeds.py).

    The optimisation's fields are ``inversion.InversionConfig``'s: the loss, the optimizer, the
    regularisers and denoiser, the transform-robust objective (views of the clone shifted by
    jitter, flipped, zoomed, blurred and noised), the clone's variables (prior: "pixels", the
    paper's free pixels; "linear", coefficients of the auxiliary pool's first prior_components
    principal components; "generator", the latent code of the VAE `jaxmia prior` trained into
    prior_checkpoint), DeepInversion's feature_weight, the early stops and the host loop.
    """
    from jaxmia.attacks import inversion

    c = section(inversion.InversionConfig(), leave_out=("steps_per_call",))
    c.steps_per_call = ml_collections.config_dict.placeholder(int)  # None: by backend
    c.clones = 100  # per identity (the paper's)
    c.steps = 600  # most updates per clone
    c.rng_seed = 0  # per-clone keys: fold_in(key(rng_seed), identity label, clone index)
    # The seed image: "subset_mean" (the paper's mean of 256 auxiliary faces, drawn per clone so
    # that clones differ), "mean" (one mean of seed_pool_size faces for all clones), "mean_noise"
    # (that mean plus noise), "grey", "uniform" or "files" (seed_files).
    c.seed = "subset_mean"
    c.seed_source = ""  # the pool: "" = the checkpoint's auxiliary identities; or a data source
    c.seed_pool_size = 256
    c.seed_subset_size = 256  # faces per clone for "subset_mean" (at most half the pool)
    c.seed_noise = 0.1  # std of the Gaussian noise of "mean_noise"
    c.seed_grey = 0.5
    c.seed_files = ""  # comma-separated image paths for "files", cycled over the clones
    c.max_batch = 256  # clones per compiled chunk (fewer if memory says so)
    return c


def load(path: str | None) -> ml_collections.ConfigDict:
    """The ConfigDict of a config file's ``get_config()``; the defaults when path is None."""
    if path is None:
        return default_config()
    p = Path(path)
    if not p.is_file():
        raise JaxmiaError(
            f"config file {path}: not found (expected a Python file with get_config())"
        )
    spec = importlib.util.spec_from_file_location(f"jaxmia_config_{p.stem}", p)
    module = importlib.util.module_from_spec(spec)
    # The file runs as it would as a script in its folder: a module beside it imports by name
    # (configs/*.py: ``from common import ...``, configs/common.py).
    folder = str(p.resolve().parent)
    before = set(sys.modules)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any failure of the user's file is bad input
        raise JaxmiaError(f"config file {path}: failed to load: {type(e).__name__}: {e}") from e
    finally:
        sys.path.remove(folder)
        # Forget the modules found beside it, so another folder's common.py is its own.
        for name in set(sys.modules) - before:
            if str(Path(getattr(sys.modules[name], "__file__", "") or "").parent) == folder:
                del sys.modules[name]
    if not hasattr(module, "get_config"):
        raise JaxmiaError(f"config file {path}: expected a function get_config()")
    return module.get_config()


def _parse_value(text: str, current):
    if isinstance(current, str):
        return text
    if isinstance(current, bool) and text.lower() in ("true", "false"):
        return text.lower() == "true"  # absl's config_flags accept both spellings too
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    if isinstance(current, tuple) and isinstance(value, list | int | float):
        value = tuple(value) if isinstance(value, list) else (value,)
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    return value


def overrides_from(text: str) -> list[str]:
    """``"a.b=1; c=2"``, a config field's overrides, as ``["config.a.b=1", "config.c=2"]``."""
    return [f"config.{o.strip()}" for o in str(text).split(";") if o.strip()]


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Apply ``config.a.b=value`` overrides (the leading ``--`` optional) in place."""
    for item in overrides:
        item = item.removeprefix("--")
        if "=" not in item or not item.startswith("config."):
            raise JaxmiaError(f"override {item!r}: expected --config.FIELD=VALUE")
        dotted, text = item.split("=", 1)
        *parents, leaf = dotted.split(".")[1:]
        node = config
        for i, name in enumerate(parents):
            if not isinstance(node, ml_collections.ConfigDict) or name not in node:
                where = ".".join(["config", *parents[: i + 1]])
                raise JaxmiaError(f"unknown config field {where} (in override {dotted})")
            node = node[name]
        if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
            raise JaxmiaError(f"unknown config field {dotted}")
        current = node[leaf]
        if isinstance(current, ml_collections.ConfigDict):
            raise JaxmiaError(f"config field {dotted} is a group; set one of its fields")
        value = _parse_value(text, current)
        # A placeholder (None by default, e.g. "auto") still has a type to name.
        expected = node.get_type(leaf) if current is None else type(current)
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise JaxmiaError(
                f"config field {dotted}: expected {expected.__name__}, got {text!r}"
            ) from e


def to_dict(config: ml_collections.ConfigDict) -> dict:
    """A JSON-ready plain dict of the config."""
    return config.to_dict()
