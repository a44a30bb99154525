"""Graph passes of fxpar's pipeline, installed as ``fxpar.passes``:
capture -> annotate -> (solve, in ``fxpar.solve``) -> rewrite."""

from fxpar.passes.annotate import annotate
from fxpar.passes.capture import capture
from fxpar.passes.rewrite import rewrite

__all__ = ["annotate", "capture", "rewrite"]
