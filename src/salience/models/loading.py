"""Load a model by zoo name, local directory or hub id, and wrap it in its adapter."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from salience.errors import ModelLoadError
from salience.models.text import TextClassifier

ZOO_PREFIX = "zoo:"
ZOO = {
    "minilm-sentiment": "MiniLM-L6 (all-MiniLM-L6-v2) fine-tuned on Rotten Tomatoes sentences; labels negative/positive",
    "planted": "tiny BERT trained in seconds on the synthetic planted-token task (salience.evaluate.planted); labels A/B",
}


def load_model(name: str, *, max_length: int | None = None, device: str | None = None) -> TextClassifier:
    """``zoo:NAME`` (bundled, offline), a local directory saved with ``save_pretrained``, or a hub id
    (needs internet or a filled Hugging Face cache). Returns the adapter, model in eval mode."""
    if name.startswith(ZOO_PREFIX):
        model, tokenizer = _load_zoo(name[len(ZOO_PREFIX):])
    else:
        model, tokenizer = _load_pretrained(name)
    if device is not None:
        model.to(device)
    return TextClassifier(model, tokenizer, name=name, max_length=max_length)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Hide transformers' loading progress bars and info logs (our CLI prints its own output)."""
    from transformers.utils import logging

    bars_were_on = logging.is_progress_bar_enabled()
    verbosity = logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars_were_on:
            logging.enable_progress_bar()


def _load_zoo(key: str) -> tuple[Any, Any]:
    if key not in ZOO:
        raise ModelLoadError(f"unknown zoo model {key!r}; the zoo has: {', '.join(ZOO_PREFIX + k for k in ZOO)}")
    if key == "planted":  # trained on first use and cached (seconds)
        from salience.evaluate.planted import planted_model_dir

        return _load_pretrained(str(planted_model_dir()))
    from salience.zoo.minilm_sentiment import build_minilm_sentiment

    with quiet_transformers():
        return build_minilm_sentiment()


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _load_pretrained(name: str) -> tuple[Any, Any]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{name} is a file; give the directory that holds config.json and the weights")
        config_file = path / "config.json"
        if not config_file.exists():
            raise ModelLoadError(f"{name} holds no config.json: it is not a saved Hugging Face model")
        architectures = json.loads(config_file.read_text()).get("architectures") or []
        if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise ModelLoadError(f"{name} holds a {', '.join(architectures)}, not a sequence classifier")
        source = str(path)
    elif _looks_local(name):
        raise ModelLoadError(f"model directory {name} does not exist")
    else:
        source = name  # a hub id
    try:
        with quiet_transformers():
            model = AutoModelForSequenceClassification.from_pretrained(source)
            tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True)
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot load {name!r} as a sequence classifier: {first_line}") from error
    return model, tokenizer
