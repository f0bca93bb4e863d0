"""A PyTorch ResNet in torchvision's layout, imported into jaxmia: the same logits."""

from __future__ import annotations

import sys

import jax
import numpy as np
import pytest
from flax import nnx

from jaxmia import checkpoint, cli
from jaxmia.errors import JaxmiaError
from jaxmia.recognizers import models, torch_import

torch = pytest.importorskip("torch")
nn = torch.nn


# torchvision.models.resnet, reduced to what the layout needs (torchvision is not installed).
def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class TorchResNet(nn.Module):
    def __init__(self, block, layers, widths, num_classes, channels=3, stem_kernel=7,
                 stem_stride=2, stem_pool=True):  # fmt: skip
        super().__init__()
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(channels, self.inplanes, stem_kernel, stride=stem_stride,
                               padding=stem_kernel // 2, bias=False)  # fmt: skip
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem_pool else nn.Identity()
        for i, (width, n) in enumerate(zip(widths, layers, strict=True)):
            setattr(self, f"layer{i + 1}", self._make_layer(block, width, n, 1 if i == 0 else 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)
        self.depth = len(widths)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.depth):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


WIDTHS, BLOCKS, CLASSES, SIZE = (4, 8, 16), (1, 2, 1), 6, 32
KINDS = {"basic": BasicBlock, "bottleneck": Bottleneck}


# The checkpoint tests' model: load_recognizer initialises a model before it restores the
# weights, and on CPU each new shape of a random initializer compiles for seconds, so these
# tests share one small architecture.
TINY = {"widths": (4, 4), "blocks": (1, 1), "channels": 1, "stem_kernel": 3}


def make_torch(kind="basic", channels=3, stem_kernel=7, stem_stride=2, stem_pool=True,
               widths=WIDTHS, blocks=BLOCKS, seed=0):  # fmt: skip
    """A small torch ResNet whose batch norms are far from identity in eval mode."""
    torch.manual_seed(seed)
    net = TorchResNet(KINDS[kind], blocks, widths, CLASSES, channels, stem_kernel, stem_stride,
                      stem_pool)  # fmt: skip
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def torch_logits(net, x, mean, std):
    """Logits of NHWC images in [0, 1], normalised as torchvision's transforms do."""
    mean = torch.tensor(np.broadcast_to(mean, x.shape[-1:]).copy(), dtype=torch.float32)
    std = torch.tensor(np.broadcast_to(std, x.shape[-1:]).copy(), dtype=torch.float32)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    xt = (xt - mean[:, None, None]) / std[:, None, None]
    with torch.no_grad():
        return net(xt).numpy()


def images(channels, n=3, seed=1):
    return np.random.default_rng(seed).uniform(0, 1, (n, SIZE, SIZE, channels)).astype(np.float32)


def assert_close(ours, ref):
    ours = np.asarray(ours)
    scale = np.abs(ref).max()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4 * scale, np.abs(ours - ref).max() / scale


def jax_logits(config, state, x):
    # Shapes only, and jitted: op by op, the initializers and the ResNet's ops would each
    # compile on their own (tens of seconds).
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: models.build(config, nnx.Rngs(params=0))))
    return jax.jit(models.logits, static_argnums=0)(graphdef, state, x)


@pytest.mark.parametrize(
    "kind,channels,stem_kernel,stem_stride,stem_pool",
    [
        ("basic", 3, 7, 2, True),
        ("basic", 1, 3, 1, False),
        ("bottleneck", 3, 3, 1, True),
        ("bottleneck", 1, 7, 2, False),
    ],
)
def test_logits_equal_pytorch(kind, channels, stem_kernel, stem_stride, stem_pool):
    net = make_torch(kind, channels, stem_kernel, stem_stride, stem_pool)
    sd = net.state_dict()
    config = torch_import.config_from_state_dict(
        sd, image_size=(SIZE, SIZE), stem_stride=stem_stride, stem_pool=stem_pool
    )
    x = images(channels)
    ref = torch_logits(net, x, config.mean, config.std)
    assert_close(jax_logits(config, torch_import.convert(sd, config), x), ref)


def test_config_inference():
    sd = make_torch("bottleneck", channels=1, stem_kernel=3).state_dict()
    c = torch_import.config_from_state_dict(sd, image_size="32,32", stem_stride=1)
    assert (c.arch, c.block, c.widths, c.blocks) == ("resnet", "bottleneck", WIDTHS, BLOCKS)
    assert (c.num_classes, c.channels, c.stem_kernel, c.stem_stride) == (CLASSES, 1, 3, 1)
    assert c.stem_pool and (c.mean, c.std) == (0.5, 0.5) and c.image_size == (SIZE, SIZE)
    c = torch_import.config_from_state_dict(make_torch().state_dict(), image_size=SIZE)
    assert c.block == "basic" and c.channels == 3 and c.stem_kernel == 7 and c.stem_stride == 2
    assert c.mean == torch_import.IMAGENET_MEAN and c.std == torch_import.IMAGENET_STD
    c = torch_import.config_from_state_dict(sd, image_size=(32, 48), mean="0.4", std=0.2)
    assert (c.mean, c.std, c.image_size) == (0.4, 0.2, (32, 48))
    with pytest.raises(JaxmiaError, match="channels=3"):
        torch_import.config_from_state_dict(sd, image_size=SIZE, channels=3)
    with pytest.raises(JaxmiaError, match="mean"):
        torch_import.config_from_state_dict(sd, image_size=SIZE, mean=(0.1, 0.2))


def _one_line(e: pytest.ExceptionInfo) -> str:
    message = str(e.value)
    assert "\n" not in message
    return message


def test_bad_state_dicts_name_the_key():
    sd = make_torch().state_dict()
    config = torch_import.config_from_state_dict(sd, image_size=SIZE)
    # Plain numpy arrays work as well as tensors.
    arrays = {k: v.numpy() for k, v in sd.items()}
    assert torch_import.convert(arrays, config)["head"]["kernel"].shape == (16, CLASSES)

    wrong = {**arrays, "layer2.1.conv2.weight": np.zeros((8, 8, 3, 1), np.float32)}
    with pytest.raises(JaxmiaError) as e:
        torch_import.convert(wrong, config)
    assert "'layer2.1.conv2.weight'" in _one_line(e) and "(8, 8, 3, 1)" in str(e.value)
    assert "(8, 8, 3, 3)" in str(e.value)

    missing = {k: v for k, v in arrays.items() if k != "layer3.0.downsample.1.running_var"}
    with pytest.raises(JaxmiaError) as e:
        torch_import.convert(missing, config)
    assert "missing 'layer3.0.downsample.1.running_var'" in _one_line(e)

    extra = {**arrays, "layer1.0.downsample.0.weight": np.zeros((4, 4, 1, 1), np.float32)}
    with pytest.raises(JaxmiaError) as e:
        torch_import.convert(extra, config)
    assert "unexpected 'layer1.0.downsample.0.weight'" in _one_line(e)

    no_fc = {k: v for k, v in arrays.items() if not k.startswith("fc.")}
    with pytest.raises(JaxmiaError, match="fc.weight"):
        torch_import.config_from_state_dict(no_fc, image_size=SIZE)


def test_saved_checkpoint_loads_with_the_same_logits(tmp_path):
    net = make_torch(**TINY)
    # A DataParallel model's keys, wrapped as a training checkpoint often is.
    sd = {"module." + k: v for k, v in net.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "model.pt")
    sd = torch_import.load_state_dict(tmp_path / "model.pt")
    config = torch_import.config_from_state_dict(sd, image_size=SIZE)
    state = torch_import.convert(sd, config)
    names = [f"id{i}" for i in range(CLASSES)]
    torch_import.save_checkpoint(state, config, names, tmp_path / "rec", {"source": "test"})
    rec = checkpoint.load_recognizer(tmp_path / "rec")
    assert rec.config == config and rec.names == tuple(names) and rec.meta["source"] == "test"
    x = images(1)
    assert_close(rec.logits(x), torch_logits(net, x, config.mean, config.std))


def test_cli_end_to_end(tmp_path, capsys):
    net = make_torch(stem_stride=1, stem_pool=False, **TINY)
    torch.save(net.state_dict(), tmp_path / "net.pt")
    names = [f"person {i}" for i in range(CLASSES)]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    base = ["import-torch", "--state-dict", str(tmp_path / "net.pt"), "--image-size", "32,32"]
    flags = ["--stem-stride", "1", "--no-stem-pool", "--mean", "0.3", "--std", "0.25"]
    out = tmp_path / "rec"
    argv = [*base, *flags, "--names", str(tmp_path / "names.txt"), "--workdir", str(out)]
    assert cli.main(argv) == 0
    assert "basic ResNet" in capsys.readouterr().out
    rec = checkpoint.load_recognizer(out)
    assert rec.names == tuple(names) and (rec.config.mean, rec.config.std) == (0.3, 0.25)
    assert rec.meta["source"] == f"torch state_dict {tmp_path / 'net.pt'}"
    x = images(1)
    assert_close(rec.logits(x), torch_logits(net, x, 0.3, 0.25))

    # Bad input: one line, exit code 2, nothing written.
    (tmp_path / "few.txt").write_text("a\nb\n")
    argv = [*base, *flags, "--names", str(tmp_path / "few.txt"), "--workdir", str(tmp_path / "x")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "2 names" in err and f"{CLASSES} classes" in err
    assert not (tmp_path / "x").exists()
    # An existing recognizer folder is not overwritten.
    assert cli.main([*base, *flags, "--workdir", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def test_load_state_dict_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(JaxmiaError, match="junk.pt.*expected a torch.save file") as e:
        torch_import.load_state_dict(tmp_path / "junk.pt")
    _one_line(e)
    with pytest.raises(JaxmiaError, match="not found"):
        torch_import.load_state_dict(tmp_path / "absent.pt")
    torch.save({"epoch": 3, "note": "no weights"}, tmp_path / "empty.pt")
    with pytest.raises(JaxmiaError, match="expected a dict of tensors") as e:
        torch_import.load_state_dict(tmp_path / "empty.pt")
    _one_line(e)


def test_load_state_dict_needs_no_torch(tmp_path, monkeypatch):
    net = make_torch(**TINY)
    torch.save(net.state_dict(), tmp_path / "net.pt")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now fails
    sd = torch_import.load_state_dict(tmp_path / "net.pt")
    assert all(isinstance(v, np.ndarray) for v in sd.values())
    for name, t in net.state_dict().items():
        np.testing.assert_array_equal(sd[name], t.numpy(), err_msg=name)
