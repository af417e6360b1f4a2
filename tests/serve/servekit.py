"""Small results databases for the viewer's tests, written by the real runner on the tiny models.

A plain module (not a conftest.py, which would shadow tests/conftest.py): test files import the
fixtures from here."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from PIL import Image

sys.path.insert(0, str(Path(__file__).parents[1] / "evaluate"))

from evalkit import toy_records, write_jsonl  # noqa: E402

import salience  # noqa: E402
from salience.evaluate.config import RunConfig, parse_method_spec, parse_metric_spec  # noqa: E402
from salience.evaluate.runner import run_evaluation  # noqa: E402
from salience.evaluate.store import Store  # noqa: E402
from tiny_cnn import photo, tiny_classifier  # noqa: E402
from tiny_lm import build_model, build_tokenizer  # noqa: E402

XSS = '<script>alert("xss")</script><img src=x onerror=alert(1)>'
XSS_ID = "<b onmouseover=alert(2)>ex-xss</b>"
TEXT_METHODS = ("occlusion", "saliency")
TEXT_METRICS = ("comprehensiveness", "deletion_auc", "token_f1")
N_TEXT = 12


def text_config(dataset: Path) -> RunConfig:
    return RunConfig(model="toy", dataset=str(dataset), methods=tuple(map(parse_method_spec, TEXT_METHODS)),
                     metrics=tuple(map(parse_metric_spec, TEXT_METRICS)))


def text_records() -> list[dict[str, Any]]:
    """Toy sentences; the first carries an XSS payload in its text and its id, and no rationale
    (so token_f1 has no value there: a metric error row)."""
    records = toy_records(N_TEXT)
    records[0]["text"] = f"{XSS} the film was good"
    records[0]["id"] = XSS_ID
    del records[0]["rationale"]
    return records


def build_text_db(folder: Path, toy_dir: Path) -> tuple[Path, str]:
    """A complete run of the toy classifier: (database, run id)."""
    model = salience.load_model(str(toy_dir))
    data = write_jsonl(folder / "toy.jsonl", text_records())
    with Store(folder / "runs.db") as store:
        outcome = run_evaluation(text_config(data), store, model=model, progress=False, log=lambda _: None)
    return folder / "runs.db", outcome.run_id


def build_image_db(folder: Path, name: str = "images.db") -> tuple[Path, str]:
    """A run of the tiny CNN on an image folder of two photo-like pictures (files kept, so the
    viewer can draw the heatmaps over them), into ``folder / name`` (created or added to)."""
    for label, seed in (("cat", 0), ("dog", 1)):
        (folder / "images" / label).mkdir(parents=True, exist_ok=True)
        Image.fromarray(photo(seed=seed)).save(folder / "images" / label / f"{label}.png")
    config = RunConfig(model="tiny-cnn", dataset=str(folder / "images"), methods=(parse_method_spec("saliency"),),
                       metrics=(parse_metric_spec("deletion_auc"),))
    with Store(folder / name) as store:
        outcome = run_evaluation(config, store, model=tiny_classifier(), progress=False, log=lambda _: None)
    return folder / name, outcome.run_id


GENERATION_METHODS = ("saliency:max_new_tokens=3", "occlusion:max_new_tokens=3")
PROMPTS = ("the film was good", f"{XSS} a b c")


def build_generation_db(folder: Path, name: str = "generation.db") -> tuple[Path, str]:
    """A run of the tiny Llama (float64) on two prompts (the second with the XSS payload): each
    method explains a 3-token greedy continuation (a generation matrix with NaN for the tokens a
    target cannot see), into ``folder / name`` (created or added to)."""
    from salience.models.causal_lm import CausalLM

    data = write_jsonl(folder / "prompts.jsonl", [{"id": f"p{i}", "text": text} for i, text in enumerate(PROMPTS)])
    config = RunConfig(model="tiny-lm", dataset=str(data), methods=tuple(map(parse_method_spec, GENERATION_METHODS)),
                       metrics=(parse_metric_spec("deletion_auc"),))
    with Store(folder / name) as store:
        outcome = run_evaluation(config, store, model=CausalLM(build_model(context=64), build_tokenizer(), name="tiny-lm"),
                                 progress=False, log=lambda _: None)
    return folder / name, outcome.run_id
