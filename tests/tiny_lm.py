"""A tiny seeded Llama causal LM (float64, random weights) and a small WordPiece tokenizer built
offline, for causal-LM tests that compare against slow references."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL = ["<unk>", "<s>", "</s>"]
WORDS = ["the", "capital", "of", "france", "is", "paris", "a", "city", "big", "small", "river", "and", "it", "was",
         "very", "old", "new", "on", "in", "film", "plot", ".", ",", "!", "?"]
SUBWORDS = ["un", "##believ", "##able", "over", "##rated"]
VOCAB = SPECIAL + WORDS + SUBWORDS


def build_tokenizer(*, bos: bool = True) -> PreTrainedTokenizerFast:
    """Lower-casing WordPiece over :data:`VOCAB`; with ``bos`` it adds ``<s>`` in front of every text."""
    vocab = {token: i for i, token in enumerate(VOCAB)}
    backend = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", continuing_subword_prefix="##"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    if bos:
        backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>",
                                   bos_token="<s>" if bos else None)


def build_model(*, seed: int = 0, layers: int = 2, context: int = 32) -> LlamaForCausalLM:
    """A random Llama (hidden 16, 4 heads, 2 key/value heads) in float64 with eager attention; weights
    drawn with std 0.4 so that its next-token distributions are far from uniform."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(VOCAB), hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                         bos_token_id=1, eos_token_id=2, initializer_range=0.4, tie_word_embeddings=False,
                         attn_implementation="eager")
    return LlamaForCausalLM(config).double().eval()
