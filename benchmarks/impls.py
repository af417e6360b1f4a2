"""Each benchmarked method, run by Salience and by its peers on one case, plus the references the
results are checked against. Every implementation returns scores on the same features:

- gradient and path methods (IG, SIG, saliency, input x gradient) at the token level, as sums over
  the embedding dimension of attributions at the output of the word-embedding layer;
- perturbation methods (occlusion, KernelSHAP, LIME) at the word level (Salience's words; Captum
  gets them as a ``feature_mask``; shap's Partition scores its own tokens, summed per word).

The explained output is the softmax probability of the predicted class everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
from cases import Limit

import salience
from salience.models.base import Encoded


# --------------------------------------------------------------------------------------- the case
@dataclass
class Settings:
    """What every implementation of a method is given (the same for Salience and its peers)."""

    kernel_shap_samples: int = 512  # Salience's default n_samples
    lime_samples: int = 500  # Salience's default n_samples
    ig_steps: int = 50  # Captum's default n_steps (Captum IG, tint SIG)
    ref_panels: int = 16  # IG reference: composite Gauss-Legendre, panels x nodes gradients
    ref_nodes: int = 8
    sig_ref_panels: int = 16  # SIG reference: per token, composite Gauss-Legendre, panels x nodes gradients
    top_k: int = 5  # LIME: agreement of the top-k words across seeds


@dataclass
class Case:
    model_name: str
    clf: salience.TextClassifier
    length: int
    text: str
    encoded: Encoded
    target: int
    limit: Limit
    settings: Settings
    references: dict[str, Any] = field(default_factory=dict)

    @property
    def dev(self) -> torch.device:
        return self.clf.device

    @property
    def ids(self) -> torch.Tensor:
        return self.encoded.input_ids[None].to(self.dev)

    @property
    def special(self) -> torch.Tensor:
        return self.encoded.special.to(self.dev)

    def baseline_ids(self, token_id: int) -> torch.Tensor:
        """Input ids with every non-special token replaced by ``token_id`` (specials kept)."""
        return torch.where(self.special[None], self.ids, token_id)

    @property
    def mask_id(self) -> int:
        return int(self.clf.tokenizer.mask_token_id)

    @property
    def pad_id(self) -> int:
        return int(self.clf.tokenizer.pad_token_id)

    @property
    def n_words(self) -> int:
        return len(self.encoded.words)

    def feature_mask(self) -> torch.Tensor:
        """Captum feature_mask (1, T): the word index of each token; special tokens form one extra
        group whose baseline is themselves (a dummy feature)."""
        mask = torch.full((self.length,), self.n_words, dtype=torch.long)
        for index, word in enumerate(self.encoded.words):
            mask[list(word.tokens)] = index
        return mask[None].to(self.dev)

    def joined_mask(self, per_token: bool = False) -> torch.Tensor:
        """Captum feature_mask (1, T) with one feature per word (``per_token``: per non-special token)
        and no extra feature: each special token joins its nearest word's group. Its baseline is
        itself, so removing the group changes exactly that word, and the players are the words."""
        groups = ([[t] for t in range(self.length) if not self.encoded.special[t]] if per_token
                  else [list(word.tokens) for word in self.encoded.words])
        mask = torch.empty(self.length, dtype=torch.long)
        firsts = torch.tensor([g[0] for g in groups])
        for t in range(self.length):
            mask[t] = int(torch.argmin((firsts - t).abs()))  # specials: the nearest group
        for index, tokens in enumerate(groups):
            mask[tokens] = index
        return mask[None].to(self.dev)

    def word_firsts(self) -> list[int]:
        return [word.tokens[0] for word in self.encoded.words]


# ----------------------------------------------------------------------------- forward functions
def forward_ids(case: Case) -> Callable[[torch.Tensor], torch.Tensor]:
    model = case.clf.model

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits.softmax(-1)

    return forward


def forward_embeds(case: Case) -> Callable[[torch.Tensor], torch.Tensor]:
    """Probabilities from word embeddings (B, T, D); BERT adds positions and token types to
    ``inputs_embeds`` exactly as to the word-embedding output."""
    model = case.clf.model

    def forward(embeds: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return model(inputs_embeds=embeds, attention_mask=mask).logits.softmax(-1)

    return forward


def forward_strings(case: Case, batch: int, *, sort: bool = True) -> Callable[[list[str]], np.ndarray]:
    """For lime and shap: texts -> probabilities (N, C), run ``batch`` texts per call.

    ``sort`` (the wrapper a careful user writes): tokenise all texts once, order them by token
    length, pad each batch to its own longest row, and return the rows in the caller's order.
    ``sort=False`` (the naive wrapper): batches in the caller's order, each padded to its longest
    row; with words deleted at random, nearly every batch holds one almost full-length row."""
    model, tok, dev = case.clf.model, case.clf.tokenizer, case.dev

    def naive(texts: list[str]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for start in range(0, len(texts), batch):
                enc = tok(texts[start:start + batch], padding=True, truncation=True, max_length=512, return_tensors="pt")
                enc = {k: v.to(dev) for k, v in enc.items()}
                out.append(model(**enc).logits.softmax(-1).double().cpu().numpy())
        return np.concatenate(out)

    def by_length(texts: list[str]) -> np.ndarray:
        encoded = tok(texts, truncation=True, max_length=512)["input_ids"]
        order = np.argsort([len(ids) for ids in encoded], kind="stable")
        out = np.empty((len(texts), model.config.num_labels))
        with torch.no_grad():
            for start in range(0, len(order), batch):
                rows = order[start:start + batch]
                enc = tok.pad({"input_ids": [encoded[i] for i in rows]}, return_tensors="pt")
                enc = {k: v.to(dev) for k, v in enc.items()}
                out[rows] = model(**enc).logits.softmax(-1).double().cpu().numpy()
        return out

    def forward(texts: list[str]) -> np.ndarray:
        texts = [str(t) for t in texts]
        return by_length(texts) if sort else naive(texts)

    return forward


def embeddings(case: Case, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return case.clf.embedding_layer(ids).detach()


# -------------------------------------------------------------------------------- implementations
@dataclass
class Output:
    scores: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Impl:
    method: str
    library: str  # salience, captum, tint, lime, shap
    name: str
    settings: Callable[[Case], str]
    estimate: Callable[[Case], tuple[int, int]]  # (forward-only passes, forward + backward passes)
    run: Callable[[Case, int], Output]
    stochastic: bool = False
    overhead: float = 1.3  # estimated seconds / limit, for planning only
    removal: str = ""  # perturbation methods: how a word is removed ("mask" token or "delete"); ratios pair equal removals

    @property
    def is_salience(self) -> bool:
        return self.library == "salience"


def _salience(method: str, level: str, params: Callable[[Case], dict[str, Any]] | None = None,
              scores: str = "scores") -> Callable[[Case, int], Output]:
    def run(case: Case, seed: int) -> Output:
        extra = params(case) if params else {}
        e = salience.explain(case.clf, case.text, method, level=level, seed=seed, output="probability", **extra)
        assert e.target.index == case.target
        values = e.token_scores if scores == "token_scores" else e.scores
        info = {"steps": e.params.get("steps_used"), "cost": e.cost, "warnings": e.warnings}
        return Output(np.asarray(values, dtype=np.float64), info)

    return run


def _np(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().double().cpu().numpy()


# --- integrated gradients
def captum_ig(case: Case, seed: int) -> Output:
    from captum.attr import LayerIntegratedGradients

    lig = LayerIntegratedGradients(forward_ids(case), case.clf.embedding_layer)
    attr = lig.attribute(case.ids, baselines=case.baseline_ids(case.pad_id), target=case.target,
                         n_steps=case.settings.ig_steps, internal_batch_size=case.limit.best_batch(True))
    return Output(_np(attr[0].sum(-1)))


# --- sequential integrated gradients
def tint_sig(case: Case, seed: int) -> Output:
    from tint.attr import SequentialIntegratedGradients

    x = embeddings(case, case.ids)
    x0 = embeddings(case, case.baseline_ids(case.mask_id))
    sig = SequentialIntegratedGradients(forward_embeds(case))
    attr = sig.attribute(x, baselines=x0, target=case.target, n_steps=case.settings.ig_steps,
                         internal_batch_size=case.limit.best_batch(True))
    return Output(_np(attr[0].sum(-1))[~case.encoded.special.numpy()])


def captum_sig_ablation(case: Case, seed: int) -> Output:
    """Exact SIG computed as a user would without Salience: Captum ``FeatureAblation`` with one
    feature per SIG feature (here the compared level, tokens; per word at the word level; special
    tokens joined to a neighbour's group) and the [MASK] baseline, i.e. occlusion with [MASK]:
    F(x) - F(x with the feature at [MASK])."""
    from captum.attr import FeatureAblation

    attr = FeatureAblation(forward_ids(case)).attribute(
        case.ids, baselines=case.baseline_ids(case.mask_id), target=case.target, feature_mask=case.joined_mask(True),
        perturbations_per_eval=case.limit.best_batch(False))
    return Output(_np(attr[0])[~case.encoded.special.numpy()])


# --- local gradients
def captum_saliency(case: Case, seed: int) -> Output:
    from captum.attr import Saliency

    x = embeddings(case, case.ids).requires_grad_(True)
    return Output(_np(Saliency(forward_embeds(case)).attribute(x, target=case.target, abs=True)[0].sum(-1)))


def captum_ixg(case: Case, seed: int) -> Output:
    from captum.attr import InputXGradient

    x = embeddings(case, case.ids).requires_grad_(True)
    return Output(_np(InputXGradient(forward_embeds(case)).attribute(x, target=case.target)[0].sum(-1)))


# --- perturbation
def _per_word(case: Case, attr: torch.Tensor) -> np.ndarray:
    return _np(attr[0])[case.word_firsts()]


def captum_ablation(case: Case, seed: int) -> Output:
    from captum.attr import FeatureAblation

    attr = FeatureAblation(forward_ids(case)).attribute(
        case.ids, baselines=case.baseline_ids(case.mask_id), target=case.target, feature_mask=case.feature_mask(),
        perturbations_per_eval=case.limit.best_batch(False))
    return Output(_per_word(case, attr))


def captum_kernel_shap(case: Case, seed: int, n_samples: int | None = None, special_feature: bool = False) -> Output:
    """Captum KernelShap with one feature per word and the special tokens joined to their nearest
    word's group (their baseline is themselves), so the words are the only players. With
    ``special_feature`` the special tokens form one extra player instead (a dummy: it changes the
    sampling and the regression, not the Shapley values)."""
    from captum.attr import KernelShap

    torch.manual_seed(seed)
    attr = KernelShap(forward_ids(case)).attribute(
        case.ids, baselines=case.baseline_ids(case.mask_id), target=case.target,
        feature_mask=case.feature_mask() if special_feature else case.joined_mask(),
        n_samples=n_samples or case.settings.kernel_shap_samples, perturbations_per_eval=case.limit.best_batch(False))
    return Output(_per_word(case, attr))


def shap_kernel(case: Case, seed: int, n_samples: int | None = None, l1_reg: Any = False) -> Output:
    """shap's model-agnostic ``KernelExplainer`` (Kernel SHAP, the estimator family of Salience's
    and Captum's) on the words: a coalition z in {0, 1}^words is the input with the words outside it
    set to [MASK]; background all-masked, explained point all-present. ``l1_reg=False`` keeps every
    word (the default ``"num_features(10)"`` would keep 10 non-zero); ``nsamples`` model
    evaluations (plus 2: the background and the input)."""
    import shap

    np.random.seed(seed)
    n_words, batch = case.n_words, case.limit.best_batch(False)
    membership = torch.zeros(n_words, case.length, dtype=torch.float32, device=case.dev)
    for index, word in enumerate(case.encoded.words):
        membership[index, list(word.tokens)] = 1.0
    forward = forward_ids(case)

    def f(z: np.ndarray) -> np.ndarray:
        present = torch.as_tensor(np.asarray(z, dtype=np.float32), device=case.dev)
        removed = ((1.0 - present) @ membership) > 0
        ids = torch.where(removed, case.mask_id, case.ids.expand(len(present), -1))
        with torch.no_grad():
            return np.concatenate([_np(forward(ids[i:i + batch])[:, case.target]) for i in range(0, len(ids), batch)])

    explainer = shap.KernelExplainer(f, np.zeros((1, n_words)))
    values = explainer.shap_values(np.ones((1, n_words)), nsamples=n_samples or case.settings.kernel_shap_samples,
                                   l1_reg=l1_reg, silent=True)
    return Output(np.asarray(values, dtype=np.float64).reshape(-1))


def captum_lime(case: Case, seed: int) -> Output:
    from captum.attr import Lime

    torch.manual_seed(seed)
    attr = Lime(forward_ids(case)).attribute(
        case.ids, baselines=case.baseline_ids(case.mask_id), target=case.target, feature_mask=case.feature_mask(),
        n_samples=case.settings.lime_samples, perturbations_per_eval=case.limit.best_batch(False))
    scores = _per_word(case, attr)
    return Output(scores, {"top": _top_positions(scores, case.settings.top_k)})


def lime_text(case: Case, seed: int, sort: bool = True) -> Output:
    from lime.lime_text import LimeTextExplainer

    explainer = LimeTextExplainer(class_names=case.clf.labels, random_state=seed)
    exp = explainer.explain_instance(case.text, forward_strings(case, case.limit.best_batch(False), sort=sort),
                                     labels=(case.target,), num_samples=case.settings.lime_samples)
    pairs = exp.as_map()[case.target]  # (feature id, weight), largest |weight| first
    words = exp.domain_mapper.indexed_string
    top = [words.word(i).lower() for i, _ in sorted(pairs, key=lambda p: -abs(p[1]))[: case.settings.top_k]]
    return Output(np.array([w for _, w in pairs]), {"top": top})


def shap_partition(case: Case, seed: int, max_evals: int | None = None, delete: bool = False,
                   sort: bool = True) -> Output:
    """shap's Partition explainer (Owen values over the masker's token hierarchy, not Shapley
    values); masked tokens become [MASK] (the Text masker's default for this tokenizer) or, with
    ``delete``, are removed (``mask_token=""``: the masker joins what is left)."""
    import shap

    target = case.target
    batch = case.limit.best_batch(False)
    probs = forward_strings(case, batch, sort=sort)
    masker = shap.maskers.Text(case.clf.tokenizer, mask_token="" if delete else None)
    explainer = shap.Explainer(lambda texts: probs(list(texts))[:, target], masker)
    result = explainer([case.text], max_evals=max_evals or case.settings.kernel_shap_samples, batch_size=batch,
                       silent=True)
    return Output(_shap_words(case, list(result.data[0]), np.asarray(result.values[0], dtype=np.float64)),
                  {"base_value": float(np.asarray(result.base_values).reshape(-1)[0])})


def _shap_words(case: Case, pieces: list[str], values: np.ndarray) -> np.ndarray:
    """shap's per-token values summed into Salience's words (by character offsets; shap's token
    strings concatenate back to the text, special tokens being empty strings)."""
    scores = np.zeros(case.n_words)
    starts = [w.start for w in case.encoded.words]
    position = 0
    for piece, value in zip(pieces, values):
        begin = position + (len(piece) - len(piece.lstrip()))
        position += len(piece)
        if not piece.strip():
            continue
        index = int(np.searchsorted(starts, begin, side="right")) - 1
        scores[max(index, 0)] += value
    return scores


def _top_positions(scores: np.ndarray, k: int) -> list[int]:
    return [int(i) for i in np.argsort(-np.abs(scores), kind="stable")[:k]]


def salience_lime(case: Case, seed: int, baseline: str = "delete") -> Output:
    out = _salience("lime", "word", lambda c: {"n_samples": c.settings.lime_samples, "baseline": baseline})(case, seed)
    out.info["top"] = _top_positions(out.scores, case.settings.top_k)
    return out


def salience_kernel_shap(case: Case, seed: int, n_samples: int | None = None, baseline: str = "mask") -> Output:
    run = _salience("kernel_shap", "word", lambda c: {"n_samples": n_samples or c.settings.kernel_shap_samples,
                                                      "baseline": baseline})
    return run(case, seed)


# ---------------------------------------------------------------------------------- the registry
def _t(case: Case) -> int:
    return case.length


def implementations() -> list[Impl]:
    """Salience first for each method, then its peers."""
    s = lambda case: case.settings  # noqa: E731
    fb = lambda case: case.limit.best_batch(True)  # noqa: E731
    ff = lambda case: case.limit.best_batch(False)  # noqa: E731
    return [
        Impl("integrated_gradients", "salience", "Salience integrated_gradients",
             lambda c: "adaptive (tolerance 0.01), baseline pad, no batch size",
             lambda c: (4, 24), _salience("integrated_gradients", "token", scores="token_scores")),
        Impl("integrated_gradients", "captum", "Captum LayerIntegratedGradients",
             lambda c: f"n_steps={s(c).ig_steps} gausslegendre (default), baseline pad, internal_batch_size={fb(c)}",
             lambda c: (0, s(c).ig_steps), captum_ig),
        Impl("sequential_integrated_gradients", "salience", "Salience sig (form=exact)",
             lambda c: "exact, baseline mask, token level", lambda c: (c.length, 0),
             _salience("sequential_integrated_gradients", "token")),
        Impl("sequential_integrated_gradients", "tint", "tint SequentialIntegratedGradients",
             lambda c: f"n_steps={s(c).ig_steps} (default), baseline mask, internal_batch_size={fb(c)}",
             lambda c: (0, _t(c) * s(c).ig_steps), tint_sig),
        Impl("sequential_integrated_gradients", "captum", "Captum FeatureAblation (exact SIG = occlusion with [MASK])",
             lambda c: f"feature_mask=one feature per non-special token, baseline mask, perturbations_per_eval={ff(c)}",
             lambda c: (c.length - 1, 0), captum_sig_ablation),
        Impl("saliency", "salience", "Salience saliency", lambda c: "abs, token level", lambda c: (1, 1),
             _salience("saliency", "token", scores="token_scores")),
        Impl("saliency", "captum", "Captum Saliency", lambda c: "abs=True, on inputs_embeds", lambda c: (0, 1),
             captum_saliency),
        Impl("input_x_gradient", "salience", "Salience input_x_gradient", lambda c: "token level", lambda c: (1, 1),
             _salience("input_x_gradient", "token", scores="token_scores")),
        Impl("input_x_gradient", "captum", "Captum InputXGradient", lambda c: "on inputs_embeds", lambda c: (0, 1),
             captum_ixg),
        Impl("occlusion", "salience", "Salience occlusion", lambda c: "words, baseline mask", lambda c: (c.n_words + 2, 0),
             _salience("occlusion", "word")),
        Impl("occlusion", "captum", "Captum FeatureAblation",
             lambda c: f"feature_mask=words, baseline mask, perturbations_per_eval={ff(c)}",
             lambda c: (c.n_words + 2, 0), captum_ablation),
        Impl("kernel_shap", "salience", "Salience kernel_shap",
             lambda c: f"n_samples={s(c).kernel_shap_samples}, baseline mask", lambda c: (s(c).kernel_shap_samples + 3, 0),
             salience_kernel_shap, stochastic=True, removal="mask"),
        Impl("kernel_shap", "salience", "Salience kernel_shap (delete)",
             lambda c: f"n_samples={s(c).kernel_shap_samples}, baseline delete", lambda c: (s(c).kernel_shap_samples + 3, 0),
             partial(salience_kernel_shap, baseline="delete"), stochastic=True, removal="delete"),
        Impl("kernel_shap", "captum", "Captum KernelShap",
             lambda c: f"n_samples={s(c).kernel_shap_samples}, feature_mask=words (specials in a word's group: no "
                       f"extra player), baseline mask, perturbations_per_eval={ff(c)}",
             lambda c: (s(c).kernel_shap_samples + 1, 0), captum_kernel_shap, stochastic=True, removal="mask"),
        Impl("kernel_shap", "shap", "shap KernelExplainer",
             lambda c: f"nsamples={s(c).kernel_shap_samples}, l1_reg=False, players=words, baseline mask, "
                       f"batch {ff(c)} in f",
             lambda c: (s(c).kernel_shap_samples + 2, 0), shap_kernel, stochastic=True, removal="mask"),
        Impl("kernel_shap", "shap", "shap Partition (Text masker; Owen values)",
             lambda c: f"max_evals={s(c).kernel_shap_samples}, batch_size={ff(c)}, mask [MASK], length-sorted batches",
             lambda c: (s(c).kernel_shap_samples + 2, 0), shap_partition, overhead=1.6, removal="mask"),
        Impl("kernel_shap", "shap", "shap Partition (Text masker, deletion; Owen values)",
             lambda c: f"max_evals={s(c).kernel_shap_samples}, batch_size={ff(c)}, mask_token='' (masked words removed), "
                       "length-sorted batches",
             lambda c: (s(c).kernel_shap_samples + 2, 0), partial(shap_partition, delete=True), overhead=1.6,
             removal="delete"),
        Impl("kernel_shap", "shap", "shap Partition (Text masker, deletion; Owen values) (naive batching)",
             lambda c: f"max_evals={s(c).kernel_shap_samples}, batch_size={ff(c)}, mask_token='' (masked words removed), "
                       "batches in shap's order, each padded to its longest row",
             lambda c: (s(c).kernel_shap_samples + 2, 0), partial(shap_partition, delete=True, sort=False), overhead=1.6,
             removal="delete"),
        Impl("lime", "salience", "Salience lime", lambda c: f"n_samples={s(c).lime_samples}, baseline delete",
             lambda c: (s(c).lime_samples + 1, 0), salience_lime, stochastic=True, removal="delete"),
        Impl("lime", "salience", "Salience lime (mask)", lambda c: f"n_samples={s(c).lime_samples}, baseline mask",
             lambda c: (s(c).lime_samples + 1, 0), partial(salience_lime, baseline="mask"), stochastic=True,
             removal="mask"),
        Impl("lime", "captum", "Captum Lime",
             lambda c: f"n_samples={s(c).lime_samples}, feature_mask=words, baseline mask, perturbations_per_eval={ff(c)}",
             lambda c: (s(c).lime_samples + 1, 0), captum_lime, stochastic=True, removal="mask"),
        Impl("lime", "lime", "lime LimeTextExplainer",
             lambda c: f"num_samples={s(c).lime_samples}, classifier_fn: length-sorted batches of {ff(c)}, "
                       "defaults (bow, delete)",
             lambda c: (s(c).lime_samples, 0), lime_text, stochastic=True, overhead=1.6, removal="delete"),
        Impl("lime", "lime", "lime LimeTextExplainer (naive batching)",
             lambda c: f"num_samples={s(c).lime_samples}, classifier_fn: batches of {ff(c)} in lime's order, each "
                       "padded to its longest row, defaults (bow, delete)",
             lambda c: (s(c).lime_samples, 0), partial(lime_text, sort=False), stochastic=True, overhead=1.6,
             removal="delete"),
    ]


METHODS = ("integrated_gradients", "sequential_integrated_gradients", "saliency", "input_x_gradient",
           "occlusion", "kernel_shap", "lime")
SHORT = {"integrated_gradients": "IG", "sequential_integrated_gradients": "SIG", "saliency": "saliency",
         "input_x_gradient": "IxG", "occlusion": "occlusion", "kernel_shap": "KernelSHAP", "lime": "LIME"}


# -------------------------------------------------------------------------------- references
def probabilities(case: Case, ids: torch.Tensor) -> np.ndarray:
    """Target probability for rows of ids (N, T), run in best-throughput batches, no gradients."""
    forward, batch = forward_ids(case), case.limit.best_batch(False)
    with torch.no_grad():
        return np.concatenate([_np(forward(ids[i:i + batch])[:, case.target]) for i in range(0, len(ids), batch)])


def ig_ends(case: Case) -> tuple[float, float]:
    """F(x), F(pad baseline) by a plain forward pass."""
    values = probabilities(case, torch.cat([case.ids, case.baseline_ids(case.pad_id)]))
    return float(values[0]), float(values[1])


def ig_reference(case: Case) -> np.ndarray:
    """IG token scores (T,) by composite Gauss-Legendre (panels x nodes gradient evaluations)."""
    panels, nodes = case.settings.ref_panels, case.settings.ref_nodes
    x, x0 = embeddings(case, case.ids)[0], embeddings(case, case.baseline_ids(case.pad_id))[0]
    g_nodes, g_weights = np.polynomial.legendre.leggauss(nodes)
    alphas = np.concatenate([(p + (g_nodes + 1) / 2) / panels for p in range(panels)])
    weights = np.tile(g_weights / 2 / panels, panels)
    forward, batch = forward_embeds(case), case.limit.best_batch(True)
    total = torch.zeros_like(x, dtype=torch.float64)
    for start in range(0, len(alphas), batch):
        a = torch.as_tensor(alphas[start:start + batch], dtype=x.dtype, device=x.device)[:, None, None]
        w = torch.as_tensor(weights[start:start + batch], dtype=torch.float64, device=x.device)[:, None, None]
        points = (x0[None] + a * (x - x0)[None]).requires_grad_(True)
        (grads,) = torch.autograd.grad(forward(points)[:, case.target].sum(), points)
        total += (w * grads.double()).sum(0)
    return _np((total * (x - x0).double()).sum(-1))


def sig_path_reference(case: Case) -> np.ndarray:
    """SIG per non-special token as a path integral computed here, independently of Salience: for
    each token, only its embedding moves from [MASK]'s to the input's (the rest stays at the input),
    and dF/dx . (x - x') is integrated by composite Gauss-Legendre (``sig_ref_panels`` x
    ``ref_nodes`` gradients per token), accumulated in float64."""
    panels, nodes = case.settings.sig_ref_panels, case.settings.ref_nodes
    x, x0 = embeddings(case, case.ids)[0], embeddings(case, case.baseline_ids(case.mask_id))[0]
    g_nodes, g_weights = np.polynomial.legendre.leggauss(nodes)
    alphas = np.concatenate([(p + (g_nodes + 1) / 2) / panels for p in range(panels)])
    weights = np.tile(g_weights / 2 / panels, panels)
    positions = torch.nonzero(~case.special).flatten().tolist()
    jobs = [(t, a) for t in positions for a in range(len(alphas))]
    forward, batch = forward_embeds(case), case.limit.best_batch(True)
    scores = np.zeros(len(positions))
    where = {t: i for i, t in enumerate(positions)}
    for start in range(0, len(jobs), batch):
        chunk = jobs[start:start + batch]
        points = x[None].repeat(len(chunk), 1, 1)
        for row, (t, a) in enumerate(chunk):
            points[row, t] = x0[t] + float(alphas[a]) * (x[t] - x0[t])
        points.requires_grad_(True)
        (grads,) = torch.autograd.grad(forward(points)[:, case.target].sum(), points)
        for row, (t, a) in enumerate(chunk):
            scores[where[t]] += float(weights[a]) * float((grads[row, t].double() * (x[t] - x0[t]).double()).sum())
    return scores


def sig_reference(case: Case) -> np.ndarray:
    """Exact SIG per non-special token: F(x) - F(x with that token set to [MASK]) (the path integral's
    value by the fundamental theorem of calculus), by plain forward passes."""
    positions = torch.nonzero(~case.special).flatten()
    rows = case.ids.repeat(len(positions) + 1, 1)
    rows[torch.arange(1, len(positions) + 1, device=rows.device), positions] = case.mask_id
    values = probabilities(case, rows)
    return values[0] - values[1:]


def exact_shapley(case: Case) -> np.ndarray:
    """Shapley values of the words, game v(S) = F(x with the words outside S set to [MASK]), by
    enumerating all 2^F coalitions."""
    n = case.n_words
    codes = np.arange(2**n)
    keep = ((codes[:, None] >> np.arange(n)[None]) & 1).astype(bool)
    membership = torch.zeros(n, case.length, dtype=torch.bool)
    for index, word in enumerate(case.encoded.words):
        membership[index, list(word.tokens)] = True
    removed = ((~torch.as_tensor(keep)).float() @ membership.float()) > 0
    ids = torch.where(removed.to(case.dev), case.mask_id, case.ids.expand(len(keep), -1))
    values = probabilities(case, ids)
    scores = np.zeros(n)
    for i in range(n):
        without = codes[~keep[:, i]]
        sizes = keep[without].sum(1)
        weight = np.array([math.factorial(s) * math.factorial(n - s - 1) / math.factorial(n) for s in sizes])
        scores[i] = float(weight @ (values[without | (1 << i)] - values[without]))
    return scores


# ------------------------------------------------------------------------------------- accuracy
def rel_l1(scores: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(scores - reference).sum() / max(np.abs(reference).sum(), 1e-300))


def max_rel(scores: np.ndarray, reference: np.ndarray) -> float:
    """Per-feature error: max abs difference / max abs reference score."""
    return float(np.abs(scores - reference).max() / max(np.abs(reference).max(), 1e-300))


def rel_l2(scores: np.ndarray, reference: np.ndarray) -> float:
    return float(np.linalg.norm(scores - reference) / max(np.linalg.norm(reference), 1e-300))


def top_k_agreement(tops: list[list[Any]], k: int) -> float | None:
    """Mean over pairs of runs (seeds) of |top-k of run a & top-k of run b| / k."""
    pairs = [(a, b) for i, a in enumerate(tops) for b in tops[i + 1:]]
    if not pairs:
        return None
    return float(np.mean([len(set(a) & set(b)) / k for a, b in pairs]))
