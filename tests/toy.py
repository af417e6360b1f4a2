"""A tiny BERT classifier trained in seconds on a planted-word rule, for tests with real signal.

Label 1 ("positive") when the sentence holds more positive than negative planted words. The
vocabulary is small and whole-word, plus two words split into subwords to exercise merging.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

POSITIVE = ["good", "great", "superb", "lovely"]
NEGATIVE = ["bad", "awful", "dull", "boring"]
NEUTRAL = ["the", "a", "movie", "film", "was", "plot", "actor", "and", "story", "it", "is", "this", "very", "quite"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SUBWORDS = ["un", "##believ", "##able", "over", "##rated", ".", ",", "!", "<", ">", "script", "/", "'", "s"]


def write_vocab(folder: Path) -> Path:
    path = folder / "vocab.txt"
    path.write_text("\n".join(SPECIAL + POSITIVE + NEGATIVE + NEUTRAL + SUBWORDS) + "\n")
    return path


def sentence(rng: random.Random) -> tuple[str, int]:
    words = [rng.choice(NEUTRAL) for _ in range(rng.randint(3, 8))]
    n_pos, n_neg = rng.randint(0, 2), rng.randint(0, 2)
    while n_pos == n_neg:
        n_pos, n_neg = rng.randint(0, 2), rng.randint(0, 2)
    for word in [rng.choice(POSITIVE) for _ in range(n_pos)] + [rng.choice(NEGATIVE) for _ in range(n_neg)]:
        words.insert(rng.randint(0, len(words)), word)
    return " ".join(words), int(n_pos > n_neg)


def build_toy_classifier(folder: Path, *, steps: int = 300, seed: int = 0) -> Path:
    """Train and ``save_pretrained`` a tiny BERT classifier + tokenizer into ``folder``; returns it."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokenizer = BertTokenizerFast(vocab=str(write_vocab(folder)), do_lower_case=True)
    assert tokenizer.convert_tokens_to_ids("good") != tokenizer.unk_token_id, "vocabulary was not read"
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=2,
                        id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    model = BertForSequenceClassification(config)
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        texts, labels = zip(*(sentence(rng) for _ in range(32)))
        batch = tokenizer(list(texts), padding=True, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor(labels)).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def explain_probability(*args: object, **kwargs: object) -> object:
    """``salience.explain`` explaining the class probability (the references the tests compare with
    read the softmax; the library's default for classifiers is the log-odds)."""
    import salience

    return salience.explain(*args, **{"output": "probability", **kwargs})  # type: ignore[arg-type]
