"""``jaxmia import-torch``: a torchvision-layout PyTorch ResNet state_dict as a recognizer folder.

jaxmia import-torch --state-dict resnet18.pt --image-size 112,112 --names names.txt --workdir OUT
"""

from __future__ import annotations

import argparse

import ml_collections

from jaxmia.recognizers import torch_import


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dict", required=True, help="a .pt/.pth file of torch.save(model.state_dict())"
    )
    parser.add_argument("--image-size", required=True, help="the model's input size: H,W")
    parser.add_argument(
        "--names",
        default=None,
        help="text file: one identity name a line, in label order (default: 0..n-1)",
    )
    parser.add_argument(
        "--stem-stride", type=int, default=2, help="conv1's stride (default 2, torchvision's)"
    )
    parser.add_argument(
        "--no-stem-pool",
        action="store_true",
        help="the model has no 3x3/2 max-pool after the stem (torchvision's has one)",
    )
    parser.add_argument(
        "--mean",
        default=None,
        help="input normalisation mean for x in [0, 1]: one value or one per channel "
        "(default: ImageNet's 0.485,0.456,0.406 for 3 channels, else 0.5)",
    )
    parser.add_argument(
        "--std",
        default=None,
        help="input normalisation std (default: ImageNet's 0.229,0.224,0.225 for 3 channels, "
        "else 0.5)",
    )


def run(args: argparse.Namespace, config: ml_collections.ConfigDict) -> None:
    summary = torch_import.run(
        args.state_dict,
        args.workdir,
        image_size=args.image_size,
        names=args.names,
        stem_stride=args.stem_stride,
        stem_pool=not args.no_stem_pool,
        mean=args.mean,
        std=args.std,
    )
    m = summary["model"]
    print(
        f"imported a {m['block']} ResNet (widths {m['widths']}, blocks {m['blocks']}, "
        f"{summary['num_classes']} classes) into {summary['workdir']}"
    )
