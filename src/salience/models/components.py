"""Where a transformer's components live, as data per Hugging Face ``model_type``: the blocks (whose
outputs are the residual stream after each layer) and, inside a block, the attention output
projection (whose input is every head's output, concatenated, before the projection mixes them).

Used by activation / attribution patching (:mod:`salience.patching`), which never looks at model
classes. A model type missing here is refused with one line naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from salience.errors import ParameterError


@dataclass(frozen=True)
class ComponentFacts:
    """``layers``: dotted path, from the task model, of the list of blocks (each block's output is
    the residual stream after it, (B, P, D)); ``heads_input``: dotted path, inside a block, of the
    linear layer whose first input is the heads' outputs concatenated, (B, P, heads x head_dim)."""

    layers: str
    heads_input: str


COMPONENTS: dict[str, ComponentFacts] = {
    "llama": ComponentFacts("model.layers", "self_attn.o_proj"),
    "bert": ComponentFacts("bert.encoder.layer", "attention.output.dense"),
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
        raise ParameterError(f"patching does not know where the layers of a {model_type!r} model are "
                             f"(known model types: {', '.join(sorted(COMPONENTS))})")
    try:
        blocks = model.get_submodule(facts.layers)
    except AttributeError:
        raise ParameterError(f"a {model_type!r} model without {facts.layers!r} (a custom head class?): "
                             "patching cannot find its layers") from None
    if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
        raise ParameterError(f"{facts.layers!r} of this {model_type!r} model is not a list of layers")
    heads = int(getattr(getattr(model, "config", None), "num_attention_heads", 0) or 0)
    if heads < 1:
        raise ParameterError(f"the config of this {model_type!r} model has no num_attention_heads")
    prefix = facts.layers
    return Components(layers=list(blocks), layer_names=[f"{prefix}.{i}" for i in range(len(blocks))],
                      projections=[block.get_submodule(facts.heads_input) for block in blocks], heads=heads)
