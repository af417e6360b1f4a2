"""Where a transformer's components live, as data per Hugging Face ``model_type``: the blocks (whose
outputs are the residual stream after each layer) and, inside a block, the attention output
projection (whose input is every head's output, concatenated, before the projection mixes them).

Used by activation / attribution patching (:mod:`salience.patching`), which never looks at model
classes. A model type missing here is refused with one line naming it (ALBERT among them: its one
shared layer runs once per depth, so a block module is not one layer).

Each entry was checked on a random tiny config of its family (session 17): patching the last block's
output at the position the metric reads gives the corrupted run's metric exactly, and exact
patching of each head at small scales meets AtP's first-order estimate (Richardson-extrapolated,
within 2e-3; 1e-7 where the family computes no norm in float32). The CI tests a few of them
(tests/methods/test_patching.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from salience.errors import ParameterError, indefinite


@dataclass(frozen=True)
class ComponentFacts:
    """``layers``: dotted path, from the task model, of the list of blocks (each block's output is
    the residual stream after it, (B, P, D)); ``heads_input``: dotted path, inside a block, of the
    linear layer whose first input is the heads' outputs concatenated, (B, P, heads x head_dim)."""

    layers: str
    heads_input: str


_DECODER = ComponentFacts("model.layers", "self_attn.o_proj")  # Llama and the families built like it
COMPONENTS: dict[str, ComponentFacts] = {
    # causal LMs
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "olmo", "olmo2",
                     "stablelm", "granite", "starcoder2", "cohere", "smollm3"), _DECODER),
    "phi": ComponentFacts("model.layers", "self_attn.dense"),
    "gpt2": ComponentFacts("transformer.h", "attn.c_proj"),  # Conv1D: its input is the heads' outputs too
    "gptj": ComponentFacts("transformer.h", "attn.out_proj"),
    "gpt_neox": ComponentFacts("gpt_neox.layers", "attention.dense"),
    "opt": ComponentFacts("model.decoder.layers", "self_attn.out_proj"),
    "bloom": ComponentFacts("transformer.h", "self_attention.dense"),
    "falcon": ComponentFacts("transformer.h", "self_attention.dense"),
    # text classifiers (*ForSequenceClassification)
    "bert": ComponentFacts("bert.encoder.layer", "attention.output.dense"),
    **dict.fromkeys(("roberta", "xlm-roberta", "camembert"), ComponentFacts("roberta.encoder.layer", "attention.output.dense")),
    "electra": ComponentFacts("electra.encoder.layer", "attention.output.dense"),
    **dict.fromkeys(("deberta", "deberta-v2"), ComponentFacts("deberta.encoder.layer", "attention.output.dense")),
    "distilbert": ComponentFacts("distilbert.transformer.layer", "attention.out_lin"),
    "mpnet": ComponentFacts("mpnet.encoder.layer", "attention.attn.o"),
    "modernbert": ComponentFacts("model.layers", "attn.Wo"),
}


@dataclass
class Components:
    """The located components of one model: the blocks and their head-output projections (one per
    block, same order), their dotted names, and the number of attention heads per block."""

    layers: list[nn.Module]
    layer_names: list[str]
    projections: list[nn.Module]
    heads: int


def model_components(model: nn.Module, model_type: str | None) -> Components:
    """The blocks and head-output projections of ``model`` (a task model such as ``*ForCausalLM``)."""
    facts = COMPONENTS.get(model_type or "")
    if facts is None:
        raise ParameterError(f"patching does not know where the layers of {indefinite(repr(model_type))} model are "
                             f"(known model types: {', '.join(sorted(COMPONENTS))})")
    try:
        blocks = model.get_submodule(facts.layers)
    except AttributeError:
        raise ParameterError(f"{indefinite(repr(model_type))} model without {facts.layers!r} (a custom head class?): "
                             "patching cannot find its layers") from None
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise ParameterError(f"{facts.layers!r} of this {model_type!r} model is not a list of layers")
    heads = int(getattr(getattr(model, "config", None), "num_attention_heads", 0) or 0)
    if heads < 1:
        raise ParameterError(f"the config of this {model_type!r} model has no num_attention_heads")
    prefix = facts.layers
    return Components(layers=list(blocks), layer_names=[f"{prefix}.{i}" for i in range(len(blocks))],
                      projections=[block.get_submodule(facts.heads_input) for block in blocks], heads=heads)
