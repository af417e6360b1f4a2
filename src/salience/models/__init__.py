"""Model adapters: each knows one model family (tokenising, embeddings, perturbing, scoring)."""

from salience.models.base import Adapter, Encoded
from salience.models.causal_lm import CausalLM
from salience.models.text import TextClassifier

__all__ = ["Adapter", "CausalLM", "Encoded", "TextClassifier"]
