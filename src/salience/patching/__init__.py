"""Scores of model components (residual stream, attention heads) by patching activations between a
clean and a corrupted input: exact activation patching and its gradient estimate, attribution
patching (AtP). See :mod:`salience.patching.run`."""

from salience.patching.result import PatchingResult
from salience.patching.run import attribution_patching

__all__ = ["PatchingResult", "attribution_patching"]
