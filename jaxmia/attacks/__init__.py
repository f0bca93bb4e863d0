"""Attacks: the inversion engine and its losses, priors, seeds, selection, query attacks,
cloning."""
