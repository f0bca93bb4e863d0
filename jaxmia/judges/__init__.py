"""Judges: who scores a clone, and the panel of all of them."""
