"""Check Salience's architecture-dependent code on random tiny configs of many Hugging Face families.

For each causal-LM family (Llama, Mistral, Qwen2/3, Gemma 1-3, Phi, Phi-3, OLMo 1-2, StableLM, GPT-2,
GPT-NeoX, OPT, Bloom, Falcon, GPT-J, Granite, Starcoder2, Cohere, SmolLM3) and each text-classifier
family Salience loads, in float64 with random weights (2 layers, hidden 16):

- AttnLRP conservation: with every bias, additive position embedding and relative-attention bias
  zeroed and tiny stabilisers, |logit - (sum of scores + what the softmax rules keep)|, relative to
  the larger of |logit| and the summed |scores| (families computing norms in float32 leave 1e-8 ..
  1e-7; Bloom's ALiBi bias, added to the attention scores, takes its share);
- prefix cache (causal LMs): occlusion with the unk baseline over the cached prefix against full
  passes, max difference relative to the largest score, and the positions taken from the cache;
- patching components: exact patching of the last block's output where the metric reads minus
  (corrupted metric - clean metric) (0 when the blocks are located right), and the heads' exact
  patching at scales 0.01 and 0.005, extrapolated to 0, against AtP (relative);
- steering (causal LMs): alpha = 0 gives the unsteered greedy continuation, alpha = 50 changes it.

Usage: ``HF_HUB_OFFLINE=1 python scripts/architecture_sweep.py [--lm] [--classifiers] [--only gpt2 bloom]``
(about 2 minutes on 2 CPU cores). Prints one table per kind of model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, BertTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import salience  # noqa: E402
from salience.models.arch import ARCHITECTURES  # noqa: E402
from salience.patching import attribution_patching  # noqa: E402
from tiny_lm import VOCAB, build_tokenizer  # noqa: E402
from toy import write_vocab  # noqa: E402

LM_BASE = {"vocab_size": len(VOCAB), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "max_position_embeddings": 64, "bos_token_id": 1, "eos_token_id": 2,
           "pad_token_id": 0, "tie_word_embeddings": False}
GQA = {"num_key_value_heads": 2}
LM_FAMILIES: dict[str, dict[str, Any]] = {
    "llama": GQA, "mistral": {**GQA, "sliding_window": None}, "qwen2": GQA, "qwen3": {**GQA, "head_dim": 4},
    "gemma": {**GQA, "head_dim": 4}, "gemma2": {**GQA, "head_dim": 4, "query_pre_attn_scalar": 4},
    "gemma3_text": {**GQA, "head_dim": 4, "query_pre_attn_scalar": 4}, "phi": {}, "phi3": GQA, "olmo": GQA, "olmo2": GQA,
    "stablelm": GQA, "gpt2": {"n_embd": 16, "n_layer": 2, "n_head": 4, "n_positions": 64, "n_inner": 32}, "gpt_neox": {},
    "opt": {"ffn_dim": 32, "word_embed_proj_dim": 16}, "bloom": {"n_layer": 2, "n_head": 4}, "falcon": {},
    "gptj": {"n_embd": 16, "n_layer": 2, "n_head": 4, "n_positions": 64, "rotary_dim": 4}, "granite": GQA,
    "starcoder2": GQA, "cohere": GQA, "smollm3": GQA,
}
CLASSIFIER_SHAPE = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 32,
                    "max_position_embeddings": 40, "num_labels": 3, "initializer_range": 0.5}  # (0.02: nearly flat outputs)
CLASSIFIER_EXTRA: dict[str, dict[str, Any]] = {
    "distilbert": {"dim": 16, "n_layers": 2, "n_heads": 2, "hidden_dim": 32}, "albert": {"embedding_size": 8},
    "electra": {"embedding_size": 16}, "deberta-v2": {"type_vocab_size": 0}, "roberta": {"pad_token_id": 0},
    "xlm-roberta": {"pad_token_id": 0}, "camembert": {"pad_token_id": 0}, "mpnet": {"pad_token_id": 0},
    "modernbert": {"pad_token_id": 0, "global_attn_every_n_layers": 1, "local_attention": 8},
}
ADDITIVE = ("position_embeddings", "wpe", "embed_positions", "token_type_embeddings", "relative_attention_bias")
PROMPT, CLEAN, CORRUPT = "the capital of france is a big city and it was very old", "the capital of france is", \
    "the capital of paris is"
TEXT, OTHER = "the film was good and the plot was dull", "the film was bad and the plot was dull"


def zero_additive(model: torch.nn.Module) -> None:
    """Every bias and additive (position, token-type) embedding set to 0: nothing but the softmax keeps relevance."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or any(key in name for key in ADDITIVE):
                parameter.zero_()


def conservation(model: Any, text: str, **options: Any) -> str:
    e = salience.explain(model, text, method="attnlrp", eps=1e-13, stabiliser=1e-13, trace=True, **options)
    scale = float(np.abs(np.asarray(e.token_scores)).sum())
    gap = max(abs(r["relevance_sum"] + r["softmax_kept"] - r["output"]) / max(abs(r["output"]), scale, 1e-12)
              for r in e.extras["conservation"])
    return f"{gap:.1e}"


def patching(model: Any, clean: str, corrupt: str, read: int, **options: Any) -> tuple[str, str]:
    exact = attribution_patching(model, clean, corrupt, method="exact", **options)
    blocks = abs(exact.residual[-1, read] - (exact.corrupted_metric - exact.clean_metric))

    def per_unit(d: float) -> np.ndarray:
        return attribution_patching(model, clean, corrupt, method="exact", scale=d, components="heads", **options).heads / d

    atp = attribution_patching(model, clean, corrupt, components="heads", **options).heads
    heads = np.abs(2 * per_unit(0.005) - per_unit(0.01) - atp).max() / max(np.abs(atp).max(), 1e-300)
    return f"{blocks:.0e}", f"{heads:.0e}"


def guarded(check: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return check(*args, **kwargs)
    except Exception as error:  # a sweep reports every family, failures included
        return f"{type(error).__name__}: {str(error)[:60]}"


def causal_lms(families: list[str]) -> None:
    print("| family | AttnLRP conservation gap | prefix cache vs full (cached positions) | blocks | heads vs AtP "
          "| steering |\n|---|---|---|---|---|---|")
    tokenizer = build_tokenizer()
    for family in families:
        torch.manual_seed(0)
        config = AutoConfig.for_model(family, **{**LM_BASE, **LM_FAMILIES[family]})
        model = AutoModelForCausalLM.from_config(config).double().eval()
        lm = salience.CausalLM(model, tokenizer, name=family)
        cache = guarded(prefix_cache, lm)
        blocks_heads = guarded(patching, lm, CLEAN, CORRUPT, -2, continuation=" paris", contrast=" city")
        steering = guarded(steered, lm)
        zero_additive(model)
        gap = guarded(conservation, lm, "the capital of france is", max_new_tokens=2)
        blocks, heads = blocks_heads if isinstance(blocks_heads, tuple) else (blocks_heads, "")
        print(f"| {family} | {gap} | {cache} | {blocks} | {heads} | {steering} |")


def prefix_cache(lm: salience.CausalLM) -> str:
    cached = salience.explain(lm, PROMPT, method="occlusion", max_new_tokens=3, baseline="unk")
    lm.reuses_prefix = False
    try:
        full = salience.explain(lm, PROMPT, method="occlusion", max_new_tokens=3, baseline="unk")
    finally:
        lm.reuses_prefix = True
    a, b = np.asarray(cached.scores, dtype=float), np.asarray(full.scores, dtype=float)
    return f"{np.nanmax(np.abs(a - b)) / np.nanmax(np.abs(b)):.0e} ({cached.cost.cached_positions})"


def steered(lm: salience.CausalLM) -> str:
    steering = salience.steer(lm, ["it was the film and the plot was", "the new river in the old city was"], " big", " small",
                              top_k=2, steps=8)
    plain = lm.encode("the city was", max_new_tokens=4).extras["continuation"]
    off = steering.generate(lm, "the city was", max_new_tokens=4, alpha=0.0)
    on = steering.generate(lm, "the city was", max_new_tokens=4, alpha=50.0)
    return ("alpha 0 = plain" if off == plain else "alpha 0 DIFFERS") + ("; alpha 50 changes it" if on != plain else "; alpha 50 same")


def classifiers(families: list[str]) -> None:
    print("| family | AttnLRP conservation gap | blocks | heads vs AtP |\n|---|---|---|---|")
    for family in families:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder)
            torch.manual_seed(0)
            tokenizer = BertTokenizerFast(vocab=str(write_vocab(path)), do_lower_case=True)
            config = AutoConfig.for_model(family, vocab_size=tokenizer.vocab_size, **CLASSIFIER_SHAPE,
                                          **CLASSIFIER_EXTRA.get(family, {}))
            AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
            tokenizer.save_pretrained(path)
            model = salience.load_model(str(path))
            model.model.double()
            blocks_heads = guarded(patching, model, TEXT, OTHER, 0, target=1, output="logit")
            zero_additive(model.model)
            gap = guarded(conservation, model, TEXT, target="all")
            blocks, heads = blocks_heads if isinstance(blocks_heads, tuple) else (blocks_heads, "")
            print(f"| {family} | {gap} | {blocks} | {heads} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm", action="store_true", help="causal LMs only")
    parser.add_argument("--classifiers", action="store_true", help="text classifiers only")
    parser.add_argument("--only", nargs="*", help="these families only")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    both = not (args.lm or args.classifiers)
    if args.lm or both:
        causal_lms([f for f in LM_FAMILIES if not args.only or f in args.only])
    if args.classifiers or both:
        print()
        classifiers([f for f in sorted(ARCHITECTURES) if not args.only or f in args.only])


if __name__ == "__main__":
    main()
