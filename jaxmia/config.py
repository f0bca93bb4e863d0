"""Configs: ml_collections ConfigDicts from a Python file's ``get_config()``, with overrides.

Overrides follow the flax examples: ``--config.train.epochs=5``, ``--config.data.source=synthetic``.
An unknown field or a value of the wrong type is a JaxmiaError naming the field.
"""

from __future__ import annotations

import ast
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from jaxmia.errors import JaxmiaError


def default_config() -> ml_collections.ConfigDict:
    """The defaults: the paper's recognizer on the embedded AT&T faces at 64x64 grey."""
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
    # augmentation its features are computed once), "finetune" the backbone too.
    c.model.tune = "linear"
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
    c.train.crop_scale = 1.0
    c.train.saturation = 0.0
    c.train.label_smoothing = 0.0
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
    """Training-time defences against inversion (jaxmia/recognizers/defences.py); all off by
    default.

    They apply to the target recognizer R_T (``jaxmia train``, the experiment's ``target``
    stage); R_E and the judges are never trained with them.
    """
    c = ml_collections.ConfigDict()
    # Label smoothing in (-1, 1): > 0 the usual smoothing (known to *raise* leakage), < 0
    # negative smoothing (Struppek et al. 2024: the strongest simple defence), reached linearly
    # from 0 over the first smoothing_ramp_epochs (negative smoothing from the start does not
    # train). Other than 0, it replaces train.label_smoothing (the recipe's) for R_T.
    c.label_smoothing = 0.0
    c.smoothing_ramp_epochs = 0
    # DP-SGD (Abadi et al. 2016): each example's gradient clipped to L2 norm dp_clip, Gaussian
    # noise of std dp_noise * dp_clip added to their sum; epsilon at dp_delta by an RDP
    # accountant, recorded with the checkpoint. Paper CNN only (batch norm mixes examples).
    c.dp = False
    c.dp_clip = 1.0
    c.dp_noise = 1.0
    c.dp_delta = 1e-5
    # MID (Wang et al. 2021): a variational bottleneck of this width before the classifier
    # (0: none), its KL divergence weighted by bottleneck_weight in the loss.
    c.bottleneck = 0
    c.bottleneck_weight = 0.0
    # For comparison, the plain regularisers as R_T's own: >= 0 replaces train.weight_decay
    # (decoupled, under adam as adamw) / model.dropout for R_T only; -1: R_T's are R_E's.
    c.weight_decay = -1.0
    c.dropout = -1.0
    # >= 1: R_T's epochs (DP-SGD's are costlier, and usually fewer); -1: train.epochs.
    c.epochs = -1
    return c


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
    # R_E's verdict averaged over random small transforms (jaxmia/judges/transformed.py).
    c.transforms = ml_collections.ConfigDict()
    c.transforms.max_shift = 4  # pixels
    c.transforms.flip = True
    c.transforms.scale = 0.1  # zoom factor in 1 +- scale
    c.transforms.blur_sigma = 1.0  # pixels, uniform in [0, blur_sigma]
    c.transforms.noise_std = 0.02
    # 4 draws an image: the judges' largest cost is the recognizers' passes over the draws
    # (AT&T: 8 draws made the judges 14% of an experiment's time, over the 10% they may cost).
    c.transforms.samples = 4
    c.transforms.seed = 0
    # The adversarial control: a targeted L-inf PGD from seeds against R_T (jaxmia/judges/pgd.py),
    # for the first `per_identity` clones' seeds of each identity.
    c.pgd = ml_collections.ConfigDict()
    # 16 grey levels in 30 steps: R_T accepts all on AT&T (8 levels in 20 steps: 67%).
    c.pgd.epsilon = 16 / 255
    c.pgd.step_size = 2 / 255
    c.pgd.steps = 30
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
    return c


def _cloning_defaults() -> ml_collections.ConfigDict:
    """``jaxmia clone``: the cloning attack vs intentional misrecognition (see
    jaxmia/attacks/cloning.py).

    Small on purpose (32x32 grey, few epochs) so the default table takes minutes on 2 CPU cores.
    """
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
    # The service: its answers and defences.
    c.answer = "label"  # "label", "topk" or "probs"
    c.top_k = 3
    c.wrong = "uniform"  # misrecognition's wrong identity: "uniform" or "runner_up"
    c.detector = "hash"  # countermeasure: "hash" or "embedding"
    c.scope = "client"  # near-duplicates searched in the "client"'s history or a "global" one
    c.radius = 4  # Hamming radius of a hash match (of 64 bits); <= 5 keeps 2 chunk tables fast
    c.cosine = 0.99  # cosine threshold of an embedding match
    c.chunks = 2  # hash index chunk tables: 8 * chunks bytes per stored query
    c.fingerprint_bits = 16  # "fingerprint" misrecognition: coin keyed by this many low hash bits
    # The attacker.
    c.near_duplicates = 3  # m queries per image in the estimation attack (the image + m-1 variants)
    c.estimate = "relabel"  # "relabel" by strict majority or "drop" images whose answers disagree
    c.accounts = 3  # accounts of the multi-account attacker
    # Clones train on m variants per image (the plain attacker makes its own, unasked).
    c.train_on_variants = True
    c.perturb = ml_collections.ConfigDict()
    c.perturb.shift = 0  # pixels
    c.perturb.crop = 0.0  # fraction of the side
    c.perturb.noise = 0.02
    c.perturb.brightness = 0.05
    c.perturb.jpeg = 0.02
    # The outside-the-radius attacker: shifts and crops, which move the hash but barely the
    # recognizer, at the weakest strength on the ladder that leaves the radius.
    c.outside_perturb = ml_collections.ConfigDict()
    c.outside_perturb.shift = 1
    c.outside_perturb.crop = 0.05
    c.outside_perturb.noise = 0.01
    c.outside_perturb.brightness = 0.05
    c.outside_perturb.jpeg = 0.0
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
    q = c.query = ml_collections.ConfigDict()
    q.attacks = ()  # e.g. ("nes", "brep")
    q.outputs = ("probs", "probs:1", "topk:1", "label")
    q.prior = ""  # the generator folder (jaxmia prior)
    q.clones = 2  # per attacked identity
    q.steps = 40
    q.samples = 16  # queries per clone per step
    q.sigma = 0.5
    q.learning_rate = 0.5
    q.init_codes = 2000
    q.radius = 1.0
    q.growth = 1.3
    q.step_size = 0.5
    return c


def _serve_defaults() -> ml_collections.ConfigDict:
    """``jaxmia serve``: the HTTP service's policy (``service.Policy``) and limits."""
    c = ml_collections.ConfigDict()
    c.answer = "label"  # "label", "topk" or "probs"
    c.top_k = 3
    c.decimals = -1  # probabilities rounded to this many decimals; -1: unrounded
    c.budget = 0  # queries per client (0: unlimited); a client's own budget replaces it
    c.misrecognition = 0.0  # p of an intentionally wrong answer
    c.wrong = "uniform"
    c.keyed = "query"  # the coin per "query" or per hash "fingerprint"
    c.fingerprint_bits = 16
    c.detector = "none"  # near-duplicate detection: "none", "hash" or "embedding"
    c.scope = "client"
    c.radius = 4
    c.cosine = 0.98
    c.chunks = 2
    c.buckets = (8, 64, 256)  # batch sizes the recognizer is compiled for
    # Dynamic batching: a request waits at most max_wait_ms for others, max_batch images a pass.
    c.max_batch = 256
    c.max_wait_ms = 5.0
    c.max_images = 1024  # per request
    c.max_body_mb = 64.0
    # Connections: at most max_connections open (more get a 503); a request's head must arrive
    # within header_timeout_s of its connection opening (or its last answer), its body within
    # body_timeout_s (else 408); an idle connection closes after keep_alive_s. SIGTERM waits
    # at most shutdown_s for the requests in flight. Bodies decode on decode_threads threads.
    c.max_connections = 512
    c.keep_alive_s = 5.0
    c.header_timeout_s = 10.0
    c.body_timeout_s = 30.0
    c.shutdown_s = 10.0
    c.decode_threads = 2
    # The coins' key: -1 a secret drawn at the first start (workdir/secret.key); >= 0 this seed.
    c.seed = -1
    c.durable = False  # fsync every request (survives power loss, not only a killed server)
    return c


def _prior_defaults() -> ml_collections.ConfigDict:
    """``jaxmia prior``: the VAE of the generator prior (see jaxmia/attacks/generator.py), trained
    on the auxiliary pool the inversion's seeds come from (inversion.seed_source)."""
    c = ml_collections.ConfigDict()
    c.latent_dim = 64
    # Encoder channels per halving of the image (the decoder mirrors them): 4 halvings take
    # 64x64 to 4x4; the image size must divide by 2**len(widths).
    c.widths = (16, 32, 64, 128)
    # Weight of the KL term against the pixels' reconstruction: lower gives sharper
    # reconstructions but random codes that look less like faces.
    c.beta = 1.0
    c.epochs = 100
    c.batch_size = 32
    c.learning_rate = 1e-3  # Adam, constant
    c.flip = True  # random horizontal flips: twice the faces for a small pool
    c.seed = 0  # initialisation, batches, flips and codes
    c.checkpoint_every = 10  # epochs
    c.keep_checkpoints = 2
    return c


def _inversion_defaults() -> ml_collections.ConfigDict:
    """``jaxmia invert``: the paper's gray-box inversion (see jaxmia/attacks/inversion.py,
    seeds.py)."""
    c = ml_collections.ConfigDict()
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
    # The optimisation (jaxmia.attacks.inversion.InversionConfig).
    c.loss = "least_squares"  # "least_squares", "cross_entropy", "max_margin", "poincare"
    c.optimizer = "sgd"  # "sgd" (the paper's x <- x - lr * grad), "momentum", "adam"
    c.learning_rate = 0.1
    c.momentum = 0.9
    c.margin = 5.0  # max_margin's flat point
    c.tv_weight = 0.0
    c.l2_weight = 0.0
    # "none", "median" (the paper's suggested denoising between steps) or "gaussian" (a blur,
    # which on AT&T makes clones that R_E recognises far more often: benchmarks/attack_levers.md)
    c.denoise = "none"
    c.denoise_every = 10
    c.denoise_size = 3  # median: odd window width
    c.denoise_sigma = 1.0  # gaussian: standard deviation in pixels
    c.jitter = 0  # random shift (pixels) per step: robust rather than adversarial clones
    c.flip = False
    # A transform-robust objective: each step's data loss averaged over `views` random views of
    # the clone, each shifted (jitter) and flipped (flip) as above, zoomed by 1 +- zoom, blurred
    # by a sigma up to `blur` pixels and noised with std `noise`.
    c.views = 1
    c.zoom = 0.0
    c.blur = 0.0
    c.noise = 0.0
    # What each clone's variables are (jaxmia/attacks/priors.py): "pixels" (the paper's free
    # pixels), "linear": coefficients of the auxiliary pool's first prior_components principal
    # components (the seed pool's faces, public: never R_T's or R_E's photos), starting at the
    # seed's projection, or "generator": the latent code of the VAE that `jaxmia prior` trained
    # on that pool into the folder prior_checkpoint, starting at the encoder's code of the seed.
    # With prior_residual a pixel residual is added (it is what a denoiser filters).
    # residual_weight and coef_weight penalise the mean squared residual and coefficient (the
    # coefficients have unit variance over the pool's own faces; the codes a unit Gaussian prior).
    c.prior = "pixels"
    c.prior_components = 64
    c.prior_checkpoint = ""
    c.prior_residual = False
    c.residual_weight = 0.0
    c.coef_weight = 0.0
    # DeepInversion's feature-statistics prior for an R_T with batch norm (model.arch=resnet):
    # x the distance of each clone's per-layer feature mean and variance from R_T's running ones.
    c.feature_weight = 0.0
    c.stop_confidence = 0.0  # stop a clone at this target confidence; 0: off
    c.patience = 0  # stop a clone whose best loss has not improved for this many steps; 0: off
    c.min_delta = 0.0
    c.steps_per_call = ml_collections.config_dict.placeholder(int)  # None: by backend (1 on CPU)
    c.check_every = 50
    c.max_batch = 256  # clones per compiled chunk (fewer if memory says so)
    # Split each chunk's clones over every device JAX sees (jaxmia/sharding.py); on CPU,
    # `jaxmia invert` first splits the host into one JAX device per core.
    c.shard = True
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
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any failure of the user's file is bad input
        raise JaxmiaError(f"config file {path}: failed to load: {type(e).__name__}: {e}") from e
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
