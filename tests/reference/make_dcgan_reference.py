"""Makes tests/test_dcgan.py's reference with PyTorch (run once; the tests need no torch).

The generator is written here as ``gan_face_generate/models.py`` (1.1.1) defines it (the
package is not installed: it pulls wandb), with the package's settings (nz=100, ngf=64, nc=3),
loaded from the fetched ``weights.tar`` with ``torch.load`` and ``load_state_dict(strict=True)``
as the package's ``inference.py`` does, in eval mode.

Writes ``dcgan_reference.npz``: ``z`` [4, 100] (standard normal, numpy seed 0) and ``images``
[4, 64, 64, 3]: the generator's Tanh output mapped to [0, 1] as ``(t + 1) / 2``, NHWC.

Run: ``python tests/reference/make_dcgan_reference.py`` (needs torch and the fetched model).
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn

from jaxmia.pretrained import fetch

HERE = Path(__file__).parent


class Generator(nn.Module):
    def __init__(self, ngpu: int, nc: int, nz: int, ngf: int) -> None:
        super().__init__()
        self.ngpu = ngpu
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, x):
        return self.main(x)


def main():
    net = Generator(0, 3, 100, 64)
    path = fetch.model_files("dcgan_face")["weights.tar"]
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(checkpoint["netG_state_dict"], strict=True)
    net.eval()
    z = np.random.default_rng(0).standard_normal((4, 100)).astype(np.float32)
    with torch.no_grad():
        t = net(torch.from_numpy(z)[:, :, None, None])  # [4, 3, 64, 64] in [-1, 1]
    images = ((t + 1) / 2).permute(0, 2, 3, 1).numpy()
    np.savez_compressed(HERE / "dcgan_reference.npz", z=z, images=images)
    print("images", images.shape, float(images.min()), float(images.max()))


if __name__ == "__main__":
    main()
