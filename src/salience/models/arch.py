"""Architecture facts as data: where the word-embedding layer sits, per Hugging Face ``model_type``.

Methods never look at model classes; adapters read this table. A model type missing here falls back
to ``model.get_input_embeddings()``, which every Hugging Face model implements.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ArchFacts:
    """``word_embeddings``: dotted path, from the task model, of the token-embedding module whose
    output (before position embeddings are added) is what gradient methods attribute to."""

    word_embeddings: str


ARCHITECTURES: dict[str, ArchFacts] = {
    "bert": ArchFacts("bert.embeddings.word_embeddings"),
    "distilbert": ArchFacts("distilbert.embeddings.word_embeddings"),
    "roberta": ArchFacts("roberta.embeddings.word_embeddings"),
    "xlm-roberta": ArchFacts("roberta.embeddings.word_embeddings"),
    "camembert": ArchFacts("roberta.embeddings.word_embeddings"),
    "deberta": ArchFacts("deberta.embeddings.word_embeddings"),
    "deberta-v2": ArchFacts("deberta.embeddings.word_embeddings"),
    "electra": ArchFacts("electra.embeddings.word_embeddings"),
    "albert": ArchFacts("albert.embeddings.word_embeddings"),
    "mpnet": ArchFacts("mpnet.embeddings.word_embeddings"),
    "modernbert": ArchFacts("model.embeddings.tok_embeddings"),
}


def word_embedding_module(model: nn.Module, model_type: str | None) -> nn.Module:
    """The token-embedding module of ``model`` (a task model such as ``*ForSequenceClassification``)."""
    facts = ARCHITECTURES.get(model_type or "")
    if facts is not None:
        try:
            return model.get_submodule(facts.word_embeddings)
        except AttributeError:
            pass  # a custom head class with another prefix: fall back below
    getter = getattr(model, "get_input_embeddings", None)
    module = getter() if callable(getter) else None
    if not isinstance(module, nn.Module):
        raise TypeError(f"cannot find the word-embedding layer of a {type(model).__name__} (model_type {model_type!r})")
    return module
