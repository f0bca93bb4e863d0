"""Pretrained models from registry packages: their fetch, readers of their formats, NNX modules."""
