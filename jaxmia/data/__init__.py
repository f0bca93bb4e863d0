"""Faces: the datasets, their cache, the identity splits, synthetic faces and streaming."""
