"""Evaluation datasets: built-in (``movie-snippets``, ``planted``, and the image sets
``imagenet-photos``, ``fashion-mnist``), users' JSONL files, image folders and CSV files of images
(the image ones: :mod:`salience.evaluate.image_datasets`).

Every dataset becomes a list of :class:`Example`. An example's ``rationale`` is one value per WORD
of its input as Salience splits it (``model.encode(input).words``: runs of letters and digits, or
single punctuation marks), so it lines up with the features of a word-level explanation. It is 0/1
(or graded, >= 0) where a reference exists and ``None`` where none does.

* ``movie-snippets``: Rotten Tomatoes sentences with human valence ratings, the held-out ``"test"``
  split by default (disjoint from the zoo sentiment models' training data). The rationale marks the
  sentence's *lexicon sentiment words*: words whose mean human valence in the VADER lexicon has
  magnitude >= ``lexicon_threshold`` (default 1.5), matched in lower case. This is a judgement of
  which words carry sentiment *out of context*, not an annotation of each sentence; see
  docs/evaluation.md.
* ``planted``: the synthetic planted-token task of :mod:`salience.zoo.planted`; the rationale
  marks the planted tokens, which decide the label (ground truth).
* a path to a ``.jsonl`` file: one JSON object a line with ``text`` (or ``premise`` and
  ``hypothesis``), optional ``id``, optional ``label`` (class index or name) and optional
  ``rationale``: word indices (``[0, 3]``) or character spans (``[[4, 8]]``, for a pair
  ``[[segment, start, end]]``). Malformed lines are reported with their line numbers; nothing is
  skipped unless ``skip_invalid``, and then the skipped lines are counted and listed.

An image example has no rationale; it may have a ``box`` around the object instead, and its
``reference`` (a path or ``builtin-name:index``) is what the results database stores.
"""

from __future__ import annotations

import base64
import difflib
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from salience.errors import SalienceError
from salience.models.tokens import WORD_PATTERN

TEXT_BUILTIN = ("movie-snippets", "planted")
BUILTIN = (*TEXT_BUILTIN, "imagenet-photos", "fashion-mnist")
DEFAULT_LEXICON_THRESHOLD = 1.5
JSONL_FIELDS = ("id", "text", "premise", "hypothesis", "label", "rationale")
MAX_LISTED = 5  # invalid lines quoted in one error message


class DatasetError(SalienceError, ValueError):
    """A dataset cannot be used: unknown name, unreadable file, malformed lines, bad rationale."""


Input = str | tuple[str, str]
Box = tuple[float, float, float, float]  # (left, top, right, bottom), original pixels, right/bottom exclusive


@dataclass(frozen=True)
class Example:
    """One input to explain.

    ``id``: unique within its dataset. ``input``: what is explained (a text or pair; an image path
    or uint8 array). ``label``: the gold class (index or name) when known. ``rationale``: one value
    per word of ``model.encode(input).words`` (1 = marked, 0 = not; graded values >= 0 allowed), or
    ``None`` when the example has no reference. ``line``: the JSONL or CSV line. ``box``: (left,
    top, right, bottom) of the object in the original image's pixels, right and bottom exclusive.
    ``reference``: what the results database records instead of ``input`` (an image's path or
    ``"fashion-mnist:test:17"``; None: the input itself).
    """

    id: str
    input: Input | Any
    label: int | str | None = None
    rationale: tuple[float, ...] | None = None
    line: int | None = None
    box: Box | None = None
    reference: str | None = None

    def to_json(self) -> str:
        """The example as JSON, to send it to another process without pickle (a uint8 image array as
        base64 with its shape; a pair as a list; the other fields as they are)."""
        data = asdict(self)
        value = self.input
        if isinstance(value, np.ndarray):
            if value.dtype != np.uint8:
                raise DatasetError(f"example {self.id}: only uint8 image arrays are sent as JSON, got {value.dtype}")
            data["input"] = {"uint8": base64.b64encode(np.ascontiguousarray(value).tobytes()).decode("ascii"),
                             "shape": list(value.shape)}
        elif isinstance(value, tuple):
            data["input"] = {"pair": list(value)}
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Example:
        """The inverse of :meth:`to_json`."""
        data = json.loads(text)
        value = data["input"]
        if isinstance(value, dict) and "uint8" in value:
            data["input"] = np.frombuffer(base64.b64decode(value["uint8"]), dtype=np.uint8).reshape(value["shape"]).copy()
        elif isinstance(value, dict) and "pair" in value:
            data["input"] = tuple(value["pair"])
        for key in ("rationale", "box"):
            if data[key] is not None:
                data[key] = tuple(data[key])
        return cls(**data)

    @property
    def stored_input(self) -> Any:
        """The input as the results database keeps it (JSON-ready): the reference, a text, a pair as a list."""
        if self.reference is not None:
            return self.reference
        return list(self.input) if isinstance(self.input, tuple) else self.input


@dataclass
class Dataset:
    """Examples plus what identifies their source.

    ``fingerprint`` changes whenever the examples could (file content, split, threshold); it is part
    of a run's identity. ``skipped`` lists the invalid lines left out with ``skip_invalid``.
    """

    name: str
    examples: list[Example]
    fingerprint: str
    description: str
    reference: str | None = None  # what the rationale is: "lexicon", "planted", "annotated"; "boxes"; or None
    total: int = 0  # examples available before ``limit``
    skipped: list[str] = field(default_factory=list)
    kind: str = "text"  # "text" or "image"


def load_dataset(source: str, model: Any, *, split: str | None = None, limit: int | None = None,
                 lexicon_threshold: float = DEFAULT_LEXICON_THRESHOLD, skip_invalid: bool = False,
                 truncate: bool = False, n: int = 500, seed: int = 0) -> Dataset:
    """Load ``source`` for ``model``: a built-in name (:data:`BUILTIN`), a ``.jsonl`` file of texts,
    a ``.csv`` file of images or an image folder (one sub-folder per class).

    ``model`` is the adapter the examples will be explained with: rationales are aligned with its
    words, inputs it cannot encode (empty, too long without ``truncate``) are invalid examples, and
    image labels are matched to its labels. ``limit`` keeps the first N examples (the built-in orders
    are fixed and seeded). ``split`` applies to movie-snippets and fashion-mnist (default "test",
    the held-out one), ``lexicon_threshold`` to movie-snippets, ``n`` and ``seed`` to planted.
    """
    from salience.evaluate import image_datasets as images

    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be at least 1, got {limit}")
    key = source.strip().lower().replace("_", "-")
    if key in TEXT_BUILTIN:
        _require_text_model(key, model)
        if key == "planted" and split is not None:
            raise DatasetError("dataset planted has no splits (split is for movie-snippets and fashion-mnist)")
        if key == "movie-snippets":
            return _movie_snippets(model, split or "test", limit, lexicon_threshold, truncate)
        return _planted(model, limit, n, seed, truncate)
    if key == "imagenet-photos":
        return images.imagenet_photos(model, split, limit)
    if key == "fashion-mnist":
        return images.fashion_mnist(model, split, limit)
    path = Path(source).expanduser()
    if path.is_dir():
        return images.image_folder(path, model, split, limit, skip_invalid)
    if path.suffix.lower() == ".csv":
        return images.image_csv(path, model, split, limit, skip_invalid)
    if path.suffix.lower() in (".jsonl", ".json") or path.exists():
        _require_text_model(path.name, model)
        if split is not None:
            raise DatasetError(f"dataset {path.name} has no splits (split is for movie-snippets and fashion-mnist)")
        return _jsonl(path, model, limit, skip_invalid, truncate)
    close = difflib.get_close_matches(key, BUILTIN, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise DatasetError(f"unknown dataset {source!r}{hint}: use {', '.join(BUILTIN)}, the path of a .jsonl file (texts), "
                       "of a .csv file (images) or of an image folder")


def _require_text_model(dataset: str, model: Any) -> None:
    if getattr(model, "explanation_kind", "text") == "image":
        raise DatasetError(f"dataset {dataset} holds texts, and {getattr(model, 'name', 'the model')} is an image classifier: "
                           "use imagenet-photos, fashion-mnist, an image folder or a CSV of images")


def check_problems(problems: list[str], where: str, skip_invalid: bool, what: str = "line") -> None:
    """Raise one DatasetError listing the first :data:`MAX_LISTED` problems (``"line 3: ..."``),
    unless there are none or ``skip_invalid``."""
    if problems and not skip_invalid:
        more = len(problems) - MAX_LISTED
        listed = "; ".join(problems[:MAX_LISTED]) + (f"; ... ({more} more)" if more > 0 else "")
        raise DatasetError(f"{where}: {len(problems)} invalid {what}{'s' if len(problems) > 1 else ''} "
                           f"(fix them or pass --skip-invalid): {listed}")


# ---------------------------------------------------------------- words and rationales
def text_words(inputs: Input) -> list[tuple[int, int, int]]:
    """(segment, start, end) of every word of a text or pair, as the text adapter splits words."""
    texts = (inputs,) if isinstance(inputs, str) else inputs
    return [(segment, m.start(), m.end()) for segment, text in enumerate(texts) for m in WORD_PATTERN.finditer(text)]


def rationale_from_marks(inputs: Input, marked: set[int], model: Any, truncate: bool) -> tuple[float, ...]:
    """Per model word 0/1 from the indices of marked words among :func:`text_words`.

    Raises ``ValueError`` when a marked word is one the model has no token for (words cut off by
    ``truncate`` are left out instead: no explanation covers them).
    """
    words = text_words(inputs)
    encoded = model.encode(inputs, truncate=truncate)
    position = {(w.segment, w.start, w.end): i for i, w in enumerate(encoded.words)}
    values = [0.0] * len(encoded.words)
    for index in sorted(marked):
        word = words[index]
        if word in position:
            values[position[word]] = 1.0
        elif not encoded.truncated:
            raise ValueError(f"the rationale marks word {index} ({_word_text(inputs, word)!r}), "
                             "for which the model's tokenizer has no token")
    return tuple(values)


def _word_text(inputs: Input, word: tuple[int, int, int]) -> str:
    texts = (inputs,) if isinstance(inputs, str) else inputs
    return texts[word[0]][word[1]:word[2]]


def marks_from_json(inputs: Input, rationale: Any) -> set[int]:
    """Indices (into :func:`text_words`) marked by a JSONL ``rationale``: word indices, or character
    spans ``[start, end]`` (``[segment, start, end]`` for a pair) that must cover whole words.

    Raises ``ValueError`` with a message saying which entry does not match the words.
    """
    words = text_words(inputs)
    if not isinstance(rationale, list):
        raise ValueError("rationale must be a list of word indices or of character spans")
    marked: set[int] = set()
    for entry in rationale:
        if _is_int(entry):
            if not 0 <= entry < len(words):
                listing = " ".join(f"{i}:{_word_text(inputs, w)}" for i, w in enumerate(words[:30]))
                raise ValueError(f"rationale word index {entry} is out of range: the text has {len(words)} words "
                                 f"({listing}{' ...' if len(words) > 30 else ''})")
            marked.add(entry)
        elif isinstance(entry, list) and len(entry) in (2, 3) and all(_is_int(v) for v in entry):
            marked |= _span_words(inputs, words, entry)
        else:
            raise ValueError(f"rationale entry {entry!r} is neither a word index nor a [start, end] character span")
    return marked


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _span_words(inputs: Input, words: list[tuple[int, int, int]], entry: list[int]) -> set[int]:
    pair = not isinstance(inputs, str)
    if len(entry) == 3:
        segment, start, end = entry
        if not pair or segment not in (0, 1):
            raise ValueError(f"span {entry}: [segment, start, end] spans are for premise/hypothesis pairs (segment 0 or 1)")
    else:
        if pair:
            raise ValueError(f"span {entry}: for a premise/hypothesis pair give [segment, start, end]")
        segment, (start, end) = 0, entry
    text = inputs if isinstance(inputs, str) else inputs[segment]
    if not 0 <= start < end <= len(text):
        raise ValueError(f"character span {entry} is outside the text ({len(text)} characters) or empty")
    covered = set()
    for index, (seg, s, e) in enumerate(words):
        if seg != segment or e <= start or s >= end:
            continue
        if s < start or e > end:
            raise ValueError(f"character span {entry} ({text[start:end]!r}) cuts through the word {text[s:e]!r} at [{s}, {e}]")
        covered.add(index)
    if not covered:
        raise ValueError(f"character span {entry} ({text[start:end]!r}) covers no word")
    return covered


# ---------------------------------------------------------------- movie snippets
def _movie_snippets(model: Any, split: str, limit: int | None, threshold: float, truncate: bool) -> Dataset:
    from salience.datasets.movie_snippets import load_vader_lexicon, split_movie_snippets

    splits = split_movie_snippets()
    if split not in splits:
        raise DatasetError(f"movie-snippets has no split {split!r}; choose {', '.join(splits)} (only 'test' is held out)")
    if threshold <= 0:
        raise DatasetError(f"lexicon_threshold must be positive, got {threshold}")
    lexicon = {word.lower(): value for word, value in load_vader_lexicon().items()}
    snippets = splits[split]
    examples = []
    for snippet in snippets[:limit]:
        try:
            words = model.encode(snippet.text, truncate=truncate).words
        except SalienceError as error:
            raise DatasetError(f"movie-snippets sentence {snippet.id}: {error}") from error
        rationale = tuple(1.0 if abs(lexicon.get(w.text.lower(), 0.0)) >= threshold else 0.0 for w in words)
        examples.append(Example(snippet.id, snippet.text, snippet.label, rationale))
    return Dataset(
        name="movie-snippets",
        examples=examples,
        fingerprint=f"movie-snippets/vader-3.3.2/split-{split}/lexicon-{threshold:g}",
        description=f"movie-snippets ({split} split; rationale: VADER lexicon words with |valence| >= {threshold:g})",
        reference="lexicon",
        total=len(snippets),
    )


# ---------------------------------------------------------------- planted
def _planted(model: Any, limit: int | None, n: int, seed: int, truncate: bool) -> Dataset:
    from salience.zoo.planted import LABELS, TASK_VERSION, planted_examples

    sentences = planted_examples(n, seed)
    examples = []
    for index, sentence in enumerate(sentences[:limit]):
        example_id = f"planted-{index:04d}"
        try:
            rationale = rationale_from_marks(sentence.text, set(sentence.planted), model, truncate)
        except (SalienceError, ValueError) as error:
            raise DatasetError(f"planted example {example_id}: {error}") from error
        examples.append(Example(example_id, sentence.text, LABELS[sentence.label], rationale))
    return Dataset(
        name="planted",
        examples=examples,
        fingerprint=f"planted/v{TASK_VERSION}/n-{n}/seed-{seed}",
        description=f"planted (synthetic, {n} test sentences, seed {seed}; rationale: the planted tokens)",
        reference="planted",
        total=len(sentences),
    )


# ---------------------------------------------------------------- JSONL
def _jsonl(path: Path, model: Any, limit: int | None, skip_invalid: bool, truncate: bool) -> Dataset:
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"cannot read dataset {path}: {error.strerror or error}") from error
    examples: list[Example] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for number, line_bytes in enumerate(raw.splitlines(), start=1):
        if not line_bytes.strip():
            continue  # blank lines are not examples
        try:
            example = _parse_line(line_bytes, number, model, truncate)
            if example.id in seen:
                raise ValueError(f"id {example.id!r} repeats line {seen[example.id]}")
        except (ValueError, SalienceError) as error:
            problems.append(f"line {number}: {error}")
            continue
        seen[example.id] = number
        examples.append(example)
    check_problems(problems, str(path), skip_invalid)
    if not examples:
        raise DatasetError(f"{path} holds no valid example")
    annotated = any(e.rationale is not None for e in examples)
    return Dataset(
        name=path.name,
        examples=examples[:limit],
        fingerprint=f"jsonl/sha256-{hashlib.sha256(raw).hexdigest()}",
        description=f"{path.name} ({len(examples)} examples{', with rationales' if annotated else ''})",
        reference="annotated" if annotated else None,
        total=len(examples),
        skipped=problems,
    )


def _parse_line(line_bytes: bytes, number: int, model: Any, truncate: bool) -> Example:
    try:
        record = json.loads(line_bytes.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"not UTF-8 ({error.reason} at byte {error.start})") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg} at column {error.colno})") from error
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    unknown = [k for k in record if k not in JSONL_FIELDS]
    for key in unknown:
        close = difflib.get_close_matches(key, JSONL_FIELDS, n=1, cutoff=0.75)
        if close:
            raise ValueError(f"unknown field {key!r} (did you mean {close[0]!r}?)")
    inputs = _input_of(record)
    example_id = record.get("id", f"line-{number}")
    if not isinstance(example_id, (str, int)) or isinstance(example_id, bool):
        raise ValueError("id must be a string or an integer")
    example_id = str(example_id)
    label = record.get("label")
    if label is not None and (isinstance(label, bool) or not isinstance(label, (int, str))):
        raise ValueError("label must be a class index or a label name")
    try:
        model.encode(inputs, truncate=truncate)  # the model can take it (not empty, not too long)
    except SalienceError as error:
        raise ValueError(f"example {example_id!r}: {error}") from error
    rationale = None
    if "rationale" in record and record["rationale"] is not None:
        try:
            rationale = rationale_from_marks(inputs, marks_from_json(inputs, record["rationale"]), model, truncate)
        except ValueError as error:
            raise ValueError(f"example {example_id!r}: {error}") from error
    return Example(example_id, inputs, label, rationale, number)


def _input_of(record: dict[str, Any]) -> Input:
    has_text = "text" in record
    has_pair = "premise" in record or "hypothesis" in record
    if has_text and has_pair:
        raise ValueError("give either text or premise/hypothesis, not both")
    if has_text:
        if not isinstance(record["text"], str):
            raise ValueError("text must be a string")
        return str(record["text"])
    if has_pair:
        premise, hypothesis = record.get("premise"), record.get("hypothesis")
        if not isinstance(premise, str) or not isinstance(hypothesis, str):
            raise ValueError("premise and hypothesis must both be strings")
        return (premise, hypothesis)
    raise ValueError('no "text" (or "premise" and "hypothesis") field')
