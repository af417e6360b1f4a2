"""Decoding a continuation from a causal LM: greedy or seeded sampling, with the key/value cache.

Greedy decoding takes the argmax of the model's raw next-token logits (ties: the lowest token id,
as ``torch.argmax`` and ``generate(do_sample=False)``); sampling draws from the plain softmax
(temperature 1, no top-k or top-p) with a CPU ``torch.Generator`` seeded with ``seed``, so the
draw does not depend on the device. The model's ``generation_config`` processors (repetition
penalties, ...) are not applied. Decoding stops after ``max_new_tokens`` tokens or after an end
token (which is kept, as ``generate`` keeps it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from salience.errors import ModelOutputError


def end_token_ids(model: nn.Module, tokenizer: Any) -> set[int]:
    """Ids that end a generation: the model's ``generation_config.eos_token_id`` (one id or a list),
    else the tokenizer's EOS."""
    config = getattr(model, "generation_config", None)
    ids = getattr(config, "eos_token_id", None)
    if ids is None:
        ids = getattr(tokenizer, "eos_token_id", None)
    if ids is None:
        return set()
    return {int(i) for i in ids} if isinstance(ids, (list, tuple)) else {int(ids)}


def decode_tokens(call: Callable[..., Any], model: nn.Module, prompt_ids: torch.Tensor, max_new_tokens: int, *,
                  end_ids: set[int], sample: bool = False, seed: int = 0,
                  on_step: Callable[[torch.Tensor], None] | None = None) -> list[int]:
    """Continue ``prompt_ids`` (L,) by up to ``max_new_tokens`` tokens. ``call`` runs the model on one
    row and counts it (one forward pass per decoding step: the prompt, then one token per step).
    ``on_step`` receives each step's next-token logits (V,) (float64, CPU)."""
    parameters = inspect.signature(model.forward).parameters
    cache_name = "cache" if "cache" in parameters else "past_key_values"
    keep_last = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    generator = torch.Generator().manual_seed(seed) if sample else None
    sequence = prompt_ids[None]
    cache: Any = None
    produced: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            step = sequence if cache is None else sequence[:, -1:]
            output = call(input_ids=step, use_cache=True, **({cache_name: cache} if cache is not None else {}), **keep_last)
            cache = getattr(output, "cache", None)
            cache = getattr(output, "past_key_values", None) if cache is None else cache
            logits = output.logits[0, -1].double().cpu()
            if not torch.isfinite(logits).all():
                raise ModelOutputError(f"the model returned NaN or infinite logits at generation step {len(produced) + 1}")
            if on_step is not None:
                on_step(logits)
            token = _next_token(logits, generator)
            produced.append(token)
            if token in end_ids:
                break
            sequence = torch.cat([sequence, torch.tensor([[token]], dtype=sequence.dtype)], dim=1)
    return produced


def _next_token(logits: torch.Tensor, generator: torch.Generator | None) -> int:
    if generator is None:
        return int(torch.argmax(logits))
    return int(torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator))


def decoded_offsets(tokenizer: Any, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The text of ``ids`` and each token's character span in it: token k spans from the length of
    the decoded first k tokens to that of the first k + 1 (clamped to be non-decreasing, so a token
    that completes a multi-byte character of the previous one may get an empty span)."""
    text = tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)
    offsets: list[tuple[int, int]] = []
    previous = 0
    for k in range(1, len(ids) + 1):
        end = len(tokenizer.decode(list(ids[:k]), clean_up_tokenization_spaces=False))
        end = max(previous, min(end, len(text)))
        offsets.append((previous, end))
        previous = end
    return text, offsets
