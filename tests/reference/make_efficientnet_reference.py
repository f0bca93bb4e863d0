"""Makes tests/test_efficientnet.py's reference with PyTorch (run once; the tests need no torch).

The network is written here in torch as ml-illustrated's ``efficientnet_lite_pytorch`` builds
Lite0 (their fork of lukemelas' EfficientNet-PyTorch, which is not installed): the same module
names, ``Conv2dStaticSamePadding`` (TensorFlow "SAME" padding computed for 224x224 inputs with
``nn.ZeroPad2d``), batch norm with epsilon 1e-3 in eval mode, ReLU6, no squeeze-excite; it
loads the fetched ``.pth`` with ``torch.load`` and ``load_state_dict(strict=True)``. Inputs are
resized to 224 with ``F.interpolate`` (bilinear, half-pixel centres, antialiased when
shrinking) and normalised as ``(255 x - 127) / 128``, as the jaxmia module does.

Writes ``efficientnet_reference.npz``: ``small`` (4 photos at 64x64, uint8, enlarged inside),
``large`` (1 photo at 240x300, uint8, shrunk inside), their logits ``small_logits``,
``large_logits`` [n, 1000] and pooled features ``small_features`` [n, 1280].

Run: ``python tests/reference/make_efficientnet_reference.py`` (needs torch, PIL, scikit-image and
the fetched model).
"""

import math
from pathlib import Path

import numpy as np
import skimage.data
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from jaxmia.pretrained import fetch

HERE = Path(__file__).parent
SIZE = 224
# (repeats, kernel, stride, expand, in, out): efficientnet_lite_builder's Lite0 block strings
STAGES = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]  # fmt: skip


class Conv2dStaticSamePadding(nn.Conv2d):
    """The fork's conv: TF "SAME" padding for a fixed input size, as a ZeroPad2d."""

    def __init__(self, cin, cout, k, stride=1, image_size=SIZE, groups=1):
        super().__init__(cin, cout, k, stride, groups=groups, bias=False)
        o = math.ceil(image_size / stride)
        pad = max((o - 1) * stride + k - image_size, 0)
        self.static_padding = nn.ZeroPad2d((pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))

    def forward(self, x):
        return super().forward(self.static_padding(x))


def bn(n):
    return nn.BatchNorm2d(n, momentum=0.01, eps=1e-3)


class MBConvBlock(nn.Module):
    def __init__(self, cin, cout, k, stride, expand, image_size):
        super().__init__()
        mid = cin * expand
        self.expand = expand
        if expand != 1:
            self._expand_conv = Conv2dStaticSamePadding(cin, mid, 1, image_size=image_size)
            self._bn0 = bn(mid)
        self._depthwise_conv = Conv2dStaticSamePadding(mid, mid, k, stride, image_size, groups=mid)
        self._bn1 = bn(mid)
        self._project_conv = Conv2dStaticSamePadding(mid, cout, 1, image_size=image_size)
        self._bn2 = bn(cout)
        self._swish = nn.ReLU6()
        self.skip = stride == 1 and cin == cout

    def forward(self, inputs):
        x = inputs
        if self.expand != 1:
            x = self._swish(self._bn0(self._expand_conv(x)))
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class EfficientNetLite0(nn.Module):
    def __init__(self):
        super().__init__()
        self._conv_stem = Conv2dStaticSamePadding(3, 32, 3, 2)
        self._bn0 = bn(32)
        size = math.ceil(SIZE / 2)
        blocks = []
        for repeats, k, stride, expand, cin, cout in STAGES:
            for r in range(repeats):
                blocks.append(MBConvBlock(cin if r == 0 else cout, cout, k, stride if r == 0 else 1,
                                          expand, size))  # fmt: skip
                if r == 0:
                    size = math.ceil(size / stride)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = Conv2dStaticSamePadding(320, 1280, 1, image_size=size)
        self._bn1 = bn(1280)
        self._fc = nn.Linear(1280, 1000)
        self._swish = nn.ReLU6()

    def features(self, x):
        x = self._swish(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self._swish(self._bn1(self._conv_head(x))).mean(dim=(2, 3))

    def forward(self, x):
        return self._fc(self.features(x))


def prepare(images_uint8):
    """uint8 [n, h, w, 3] -> the network's input [n, 3, 224, 224]."""
    x = torch.from_numpy(images_uint8.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    shrink = x.shape[2] > SIZE or x.shape[3] > SIZE
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False,
                      antialias=shrink)  # fmt: skip
    return (x * 255.0 - 127.0) / 128.0


def photo(image, size):
    return np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))


def main():
    path = fetch.model_files("efficientnet_lite0")["efficientnet-lite0-57934424.pth"]
    net = EfficientNetLite0().eval()
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    small = np.stack([photo(skimage.data.chelsea()[:, 50:350], (64, 64)),
                      photo(skimage.data.coffee()[:, 100:500], (64, 64)),
                      photo(skimage.data.astronaut()[:300, 100:400], (64, 64)),
                      photo(skimage.data.rocket()[:, 100:400], (64, 64))])  # fmt: skip
    large = photo(skimage.data.chelsea(), (240, 300))[None]
    with torch.no_grad():
        out = {
            "small": small,
            "large": large,
            "small_logits": net(prepare(small)).numpy(),
            "small_features": net.features(prepare(small)).numpy(),
            "large_logits": net(prepare(large)).numpy(),
        }
    print("top-1 small:", out["small_logits"].argmax(1), "large:", out["large_logits"].argmax(1))
    np.savez_compressed(HERE / "efficientnet_reference.npz", **out)


if __name__ == "__main__":
    main()
