"""Activation steering of a causal LM: GrAInS (attribution-guided) and a plain mean-difference baseline.

``steer(lm, prompts, preferred, dispreferred)`` builds one unit direction per chosen decoder layer;
``Steering.applied(lm, alpha=...)`` shifts that layer's output at every position while the block
runs. Hidden states are the residual stream after a decoder layer (the block's output, (P, D), as
:mod:`salience.models.components` locates the blocks): layer l is block l, 0-based.

Directions (computed in float64, whatever the model's dtype):

- ``strategy="grains"`` (Nguyen et al. 2025, "GrAInS: Gradient-based Attribution for Inference-Time
  Steering of LLMs and VLMs", simplified): for each training prompt, the contrastive attribution
  of ``explain(lm, prompt, continuation=preferred, contrast=dispreferred, output="logit")`` scores
  every prompt token for logit(preferred) - logit(dispreferred) (summed over the continuation's
  tokens when it has several, each read against the foil at its position). The ``top_k``
  highest-scoring prompt tokens are the *positive* set, the ``top_k`` lowest-scoring the
  *negative* set (by rank, whatever their sign; 2 x top_k prompt tokens are needed so that the
  sets are disjoint). Per prompt d_p = mean(hidden of the positive tokens) - mean(hidden of the
  negative tokens); the direction is mean_p(d_p) / ||mean_p(d_p)||: prompts weigh equally, tokens
  weigh equally within their set. The paper instead masks the top-k tokens, takes the difference
  of the hidden states with and without masking, and keeps the first principal component over
  prompts; this is the simpler form this library implements.
- ``strategy="mean_difference"`` (no attribution; contrastive activation addition, Rimsky et al.
  2024): per prompt, the mean hidden state over the continuation's token positions of
  prompt + preferred minus the same for prompt + dispreferred (for one-token answers: the last
  position, the answer token itself); averaged over prompts and normalised likewise.

Applying (both strategies): at each chosen layer and every position, h' = h + alpha d, rescaled to
the original norm: h'' = h' ||h|| / ||h'|| (a position with ||h'|| = 0 is left as h'). alpha is in
the units of the hidden state (compare it with ``Steering.norms``, the mean per-token norm of the
training prompts at each layer); alpha = 0 leaves the model's outputs unchanged. During generation
with the key/value cache each new position is steered as it is computed, so every position of the
prompt and the continuation is steered once.

A Steering is saved as safetensors (directions, float64) with its description as JSON metadata,
or as plain JSON; never pickled.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from salience.api import explain
from salience.errors import InputError, ModelOutputError, ParameterError, indefinite
from salience.models.causal_lm import CausalLM
from salience.models.components import COMPONENTS

STRATEGIES = ("grains", "mean_difference")
FORMAT, VERSION = "salience-steering", 1
METADATA_KEY = "salience_steering"


@dataclass
class Steering:
    """Unit steering directions, one per decoder layer (``directions[l]``: (D,) float64), and how they
    were made. ``alpha``: the default strength of :meth:`applied`. ``norms[l]``: mean per-token
    hidden-state norm at layer l over the training prompts (a scale for alpha); ``magnitudes[l]``:
    the norm of the mean difference before normalisation. ``picks``: per training prompt, the
    positive and negative tokens GrAInS chose and the attribution's completeness delta (summed over
    the continuation's tokens; logit units), empty for ``mean_difference``."""

    directions: dict[int, np.ndarray] = field(repr=False)
    alpha: float
    strategy: str
    model: str
    method: str | None = None
    top_k: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    norms: dict[int, float] = field(default_factory=dict)
    magnitudes: dict[int, float] = field(default_factory=dict)
    picks: list[dict[str, Any]] = field(default_factory=list, repr=False)
    prompts: int = 0
    seconds: float = 0.0

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    @contextmanager
    def applied(self, lm: CausalLM, alpha: float | None = None) -> Iterator[Steering]:
        """Steer ``lm`` inside the block: forward hooks on the chosen layers shift every position's
        hidden state by alpha x direction and rescale it to its original norm. The hooks are removed
        on every path, exceptions included."""
        strength = _check_alpha(self.alpha if alpha is None else alpha)
        blocks = decoder_layers(lm)
        width = _hidden_size(lm)
        for layer in self.layers:
            _check_layer(layer, len(blocks), lm.name)
            if self.directions[layer].shape != (width,):
                raise ParameterError(f"the direction of layer {layer} has {self.directions[layer].shape[0]} values but "
                                     f"{lm.name}'s hidden states have {width}: this steering was made for another model")
        handles = [blocks[layer].register_forward_hook(_steering_hook(torch.from_numpy(self.directions[layer]), strength))
                   for layer in self.layers]
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def generate(self, lm: CausalLM, prompt: str | list[dict[str, str]], *, max_new_tokens: int = 20,
                 alpha: float | None = None) -> str:
        """Greedy continuation of ``prompt`` (up to ``max_new_tokens`` tokens) with the steering applied."""
        with self.applied(lm, alpha):
            encoded = lm.encode(prompt, max_new_tokens=max_new_tokens)
        return str(encoded.extras["continuation"])

    # ------------------------------------------------------------ persistence
    def describe(self) -> dict[str, Any]:
        """Everything but the directions, JSON-ready."""
        return {"format": FORMAT, "version": VERSION, "strategy": self.strategy, "model": self.model, "alpha": self.alpha,
                "method": self.method, "top_k": self.top_k, "params": self.params, "layers": self.layers,
                "norms": {str(k): v for k, v in self.norms.items()},
                "magnitudes": {str(k): v for k, v in self.magnitudes.items()},
                "picks": self.picks, "prompts": self.prompts, "seconds": self.seconds}

    def save(self, path: str | Path) -> Path:
        """Write to ``path``: ``.json`` as plain JSON (directions as lists of floats, exact), anything
        else as safetensors (float64 tensors ``layer.<l>``, the description in the metadata)."""
        path = Path(path)
        if path.suffix == ".json":
            data = {**self.describe(), "directions": {str(k): v.tolist() for k, v in self.directions.items()}}
            path.write_text(json.dumps(data), encoding="utf-8")
            return path
        from safetensors.torch import save_file

        tensors = {f"layer.{k}": torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.directions.items()}
        save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(self.describe())})
        return path

    @classmethod
    def load(cls, path: str | Path) -> Steering:
        """Read a Steering written by :meth:`save` (JSON or safetensors, chosen by the suffix)."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"no steering file at {path}")
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            directions = {int(k): np.asarray(v, dtype=np.float64) for k, v in dict(data.pop("directions", {})).items()}
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                text = (handle.metadata() or {}).get(METADATA_KEY)
                if text is None:
                    raise InputError(f"{path} is a safetensors file without a Salience steering description")
                data = json.loads(text)
                directions = {int(name.split(".", 1)[1]): handle.get_tensor(name).numpy() for name in handle.keys()}
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise InputError(f"{path} is not a {FORMAT} file of version {VERSION}")
        if sorted(directions) != list(data["layers"]):
            raise InputError(f"{path}: directions for layers {sorted(directions)} but the description lists {data['layers']}")
        return cls(directions=directions, alpha=float(data["alpha"]), strategy=data["strategy"], model=data["model"],
                   method=data["method"], top_k=data["top_k"], params=dict(data["params"]),
                   norms={int(k): float(v) for k, v in data["norms"].items()},
                   magnitudes={int(k): float(v) for k, v in data["magnitudes"].items()},
                   picks=list(data["picks"]), prompts=int(data["prompts"]), seconds=float(data["seconds"]))


# ---------------------------------------------------------------- building
def steer(lm: CausalLM, prompts: str | Sequence[str], preferred: str | Sequence[str], dispreferred: str | Sequence[str], *,
          layers: int | Sequence[int] | None = None, top_k: int = 3, alpha: float = 1.0, strategy: str = "grains",
          method: str = "integrated_gradients", steps: int | None = None, **options: Any) -> Steering:
    """Steering directions from training ``prompts`` and, per prompt (or one for all), a ``preferred``
    and a ``dispreferred`` continuation (texts of as many tokens, aligned by position).

    ``layers``: decoder-layer indices (0-based; default: every layer). ``top_k``: tokens in each of
    GrAInS's positive and negative sets. ``alpha``: the default strength of :meth:`Steering.applied`
    (hidden-state units). ``strategy``: ``"grains"`` or ``"mean_difference"`` (see the module
    docstring for what is averaged). ``method``, ``steps`` and other ``options`` go to
    :func:`salience.explain` for the contrastive attribution (GrAInS only; default: integrated
    gradients from the zero embedding, adaptive steps). Cost: per prompt one attribution plus one
    forward pass (GrAInS), or two forward passes (mean difference)."""
    if not isinstance(lm, CausalLM):
        raise ParameterError(f"steering needs a causal LM (salience.CausalLM), not {indefinite(getattr(lm, 'kind', type(lm).__name__))}")
    if strategy not in STRATEGIES:
        raise ParameterError(f"unknown steering strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not texts:
        raise InputError("steer needs at least one training prompt")
    pairs = list(zip(_per_prompt(preferred, len(texts), "preferred"), _per_prompt(dispreferred, len(texts), "dispreferred")))
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ParameterError(f"top_k must be a positive integer, got {top_k!r}")
    blocks = decoder_layers(lm)
    chosen = _layers(layers, len(blocks), lm.name)
    alpha = _check_alpha(alpha)
    params = {**options, **({"steps": steps} if steps is not None else {})}
    started = time.perf_counter()
    differences: list[dict[int, torch.Tensor]] = []
    norms: list[dict[int, float]] = []
    picks: list[dict[str, Any]] = []
    for index, (prompt, (good, bad)) in enumerate(zip(texts, pairs)):
        preferred_ids, prompt_length = _sequence(lm, prompt, good)
        dispreferred_ids, _ = _sequence(lm, prompt, bad)
        if preferred_ids.tolist() == dispreferred_ids.tolist():
            raise InputError(f"prompt {index}: the preferred and dispreferred continuations are the same tokens ({good!r}, {bad!r})")
        preferred_hidden = hidden_states(lm, preferred_ids, chosen, blocks)
        norms.append({layer: float(h[:prompt_length].norm(dim=-1).mean()) for layer, h in preferred_hidden.items()})
        if strategy == "grains":
            pick = _grains_tokens(lm, prompt, good, bad, top_k, index, method, params)
            picks.append(pick)
            positive = [p["position"] for p in pick["positive"]]
            negative = [p["position"] for p in pick["negative"]]
            differences.append({layer: h[positive].mean(0) - h[negative].mean(0) for layer, h in preferred_hidden.items()})
        else:
            dispreferred_hidden = hidden_states(lm, dispreferred_ids, chosen, blocks)
            differences.append({layer: preferred_hidden[layer][prompt_length:].mean(0)
                                - dispreferred_hidden[layer][prompt_length:].mean(0) for layer in chosen})
    directions, magnitudes = {}, {}
    for layer in chosen:
        mean = torch.stack([d[layer] for d in differences]).mean(0)
        magnitude = float(mean.norm())
        if not magnitude > 0:
            raise ModelOutputError(f"the mean difference of hidden states at layer {layer} is zero: no direction to steer along")
        directions[layer], magnitudes[layer] = (mean / magnitude).numpy(), magnitude
    return Steering(directions=directions, alpha=alpha, strategy=strategy, model=lm.name,
                    method=method if strategy == "grains" else None, top_k=top_k if strategy == "grains" else None,
                    params=params if strategy == "grains" else {},
                    norms={layer: float(np.mean([n[layer] for n in norms])) for layer in chosen},
                    magnitudes=magnitudes, picks=picks, prompts=len(texts), seconds=time.perf_counter() - started)


def _grains_tokens(lm: CausalLM, prompt: str, good: str, bad: str, top_k: int, index: int, method: str,
                   params: dict[str, Any]) -> dict[str, Any]:
    """The top_k highest- and top_k lowest-scoring prompt tokens of the contrastive attribution."""
    explanation = explain(lm, prompt, method=method, continuation=good, contrast=bad, output="logit", level="token", **params)
    scores = np.atleast_2d(np.asarray(explanation.scores, dtype=np.float64))
    prompt_features = [(f, feature) for f, feature in enumerate(explanation.features) if feature.segment == 0]
    if 2 * top_k > len(prompt_features):
        raise InputError(f"top_k={top_k} needs {2 * top_k} prompt tokens (top_k positive, top_k negative) but prompt {index} "
                         f"has {len(prompt_features)}")
    summed = scores[:, [f for f, _ in prompt_features]].sum(axis=0)  # over the continuation's tokens
    if not np.isfinite(summed).all():
        raise ModelOutputError(f"prompt {index}: the contrastive attribution is not finite")
    order = np.argsort(-summed, kind="stable")

    def listed(chosen: np.ndarray) -> list[dict[str, Any]]:
        return [{"position": int(prompt_features[i][1].tokens[0]), "token": prompt_features[i][1].text,
                 "score": float(summed[i])} for i in chosen]

    delta = None if explanation.delta is None else float(np.sum(explanation.delta))
    return {"prompt": prompt, "positive": listed(order[:top_k]), "negative": listed(order[::-1][:top_k]),
            "completeness_delta": delta}


def _sequence(lm: CausalLM, prompt: str, continuation: str) -> tuple[torch.Tensor, int]:
    """Token ids of prompt + continuation as the adapter encodes them, and the prompt's length."""
    encoded = lm.encode(prompt, continuation=continuation)
    return encoded.input_ids, int(encoded.extras["prompt_length"])


def _per_prompt(value: str | Sequence[str], count: int, name: str) -> list[str]:
    if isinstance(value, str):
        return [value] * count
    values = list(value)
    if len(values) != count or not all(isinstance(v, str) for v in values):
        raise InputError(f"{name} must be one text or one text per prompt ({count}), got {len(values)} values")
    return values


# ---------------------------------------------------------------- layers and hooks
def decoder_layers(lm: CausalLM) -> list[nn.Module]:
    """The decoder blocks of ``lm``'s model, in order (their outputs are the residual stream)."""
    facts = COMPONENTS.get(lm.model_type or "")
    if facts is None:
        raise ParameterError(f"steering does not know where the layers of {indefinite(repr(lm.model_type))} model are "
                             f"(known model types: {', '.join(sorted(COMPONENTS))})")
    try:
        blocks = lm.model.get_submodule(facts.layers)
    except AttributeError:
        raise ParameterError(f"{indefinite(repr(lm.model_type))} model without {facts.layers!r}: steering cannot find its layers") from None
    return list(blocks)  # type: ignore[arg-type]


def hidden_states(lm: CausalLM, ids: torch.Tensor, layers: Sequence[int], blocks: Sequence[nn.Module]) -> dict[int, torch.Tensor]:
    """The outputs (P, D), float64 on the CPU, of ``blocks[l]`` for each l in ``layers`` in one forward
    pass of the token ids (P,)."""
    seen: dict[int, torch.Tensor] = {}

    def keeper(layer: int) -> Callable[[nn.Module, Any, Any], None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            seen[layer] = _tensor(output).detach()[0].double().cpu()
        return hook

    handles = [blocks[layer].register_forward_hook(keeper(layer)) for layer in layers]
    try:
        with torch.no_grad():
            lm.model(input_ids=ids[None].to(lm.device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def shifted(hidden: torch.Tensor, direction: torch.Tensor, alpha: float) -> torch.Tensor:
    """(h + alpha d) ||h|| / ||h + alpha d|| at every position (last dimension: the hidden units); a
    position where h + alpha d is zero is returned as it is."""
    norm = hidden.norm(dim=-1, keepdim=True)
    moved = hidden + alpha * direction
    new = moved.norm(dim=-1, keepdim=True)
    return torch.where(new > 0, moved * (norm / new), moved)


def _steering_hook(direction: torch.Tensor, alpha: float) -> Callable[[nn.Module, Any, Any], Any]:
    def hook(_module: nn.Module, _inputs: Any, output: Any) -> Any:
        value = _tensor(output)
        changed = shifted(value, direction.to(value.device, value.dtype), alpha)
        return (changed, *output[1:]) if isinstance(output, tuple) else changed
    return hook


def _tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _hidden_size(lm: CausalLM) -> int:
    return int(lm.model.config.hidden_size)  # type: ignore[union-attr]


def _layers(layers: int | Sequence[int] | None, count: int, name: str) -> list[int]:
    chosen = list(range(count)) if layers is None else [layers] if isinstance(layers, int) else list(layers)
    if not chosen:
        raise ParameterError("layers is empty; give decoder-layer indices or None for every layer")
    for layer in chosen:
        _check_layer(layer, count, name)
    return sorted(set(chosen))


def _check_layer(layer: object, count: int, name: str) -> None:
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < count:
        raise ParameterError(f"layer {layer!r} is not a decoder-layer index of {name}: it has {count} layers (0-{count - 1})")


def _check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise ParameterError(f"alpha must be a finite number, got {alpha!r}")
    return float(alpha)
