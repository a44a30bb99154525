"""Models shipped with fxpar for demos, tests and benchmarks (random init, no downloads)."""

from fxpar.models.mlp import MLP

__all__ = ["MLP"]
