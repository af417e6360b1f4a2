"""Salience: feature attribution for neural networks, exact where the maths allows, and its evaluation."""

import salience.render  # noqa: F401  (registers the renderers of Explanation)
from salience.api import SalienceWarning, explain, methods
from salience.core.explanation import Cost, Explanation, Feature
from salience.core.target import Prediction, Target
from salience.errors import (
    AssetMissingError,
    InputError,
    ModelLoadError,
    ModelOutputError,
    ParameterError,
    SalienceError,
    TargetError,
    UnknownMethodError,
)
from salience.models.causal_lm import CausalLM
from salience.models.image import ImageClassifier
from salience.models.loading import load_model
from salience.models.prompt_classifier import PromptClassifier
from salience.models.text import TextClassifier
from salience.models.zero_shot import ZeroShotClassifier
from salience.patching import PatchingResult, attribution_patching
from salience.steering import Steering, steer

__version__ = "0.1.0"

__all__ = [
    "AssetMissingError",
    "CausalLM",
    "Cost",
    "Explanation",
    "Feature",
    "ImageClassifier",
    "InputError",
    "ModelLoadError",
    "ModelOutputError",
    "ParameterError",
    "PatchingResult",
    "Prediction",
    "PromptClassifier",
    "SalienceError",
    "SalienceWarning",
    "Steering",
    "Target",
    "TargetError",
    "TextClassifier",
    "UnknownMethodError",
    "ZeroShotClassifier",
    "__version__",
    "attribution_patching",
    "explain",
    "load_model",
    "methods",
    "steer",
]
