"""jaxmia: measure how much a face recognizer leaks, with batched attacks in JAX."""

__version__ = "0.1.0"
