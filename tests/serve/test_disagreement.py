"""The example browser's disagreement filter: the Spearman rank correlation ρ of two methods'
feature scores per example, checked against hand-computed values (1 - 6 Σd² / (n (n² - 1)) without
ties, Pearson's correlation of average ranks with them) and scipy.stats.spearmanr; filtering
(ρ strictly below a threshold, undefined ρ excluded), sorting (undefined last), one scan per
method pair (cached), bad parameters (400) and escaping."""

from __future__ import annotations

import html
import json
import math
import re

import numpy as np
import pytest
from scipy.stats import spearmanr
from servekit import build_text_db
from starlette.testclient import TestClient
from synthetic import text_document, write_run

import salience.serve.app as app_module
from salience.core.explanation import decode_array
from salience.serve import create_app
from salience.serve.database import ReadOnlyStore
from salience.serve.disagreement import _chunk_rhos, rank_correlations, spearman_rho

NAN = float("nan")
# example id -> (alpha's scores, beta's scores (None: beta failed), the hand-computed ρ (None: undefined))
HAND = {
    "e1": ([1, 2, 3, 4], [4, 3, 1, 2], 1 - 6 * (9 + 1 + 4 + 4) / (4 * 15)),  # d = -3, -1, 2, 2: -0.8
    "e2": ([1, 2, 3], [10, 20, 30], 1.0),
    "e3": ([5, 5, 5], [1, 2, 3], None),  # constant: no rank variance
    "e4": ([1, 2, 3, 4, 5], [2, 1, 4, 3, 5], 1 - 6 * 4 / (5 * 24)),  # d = -1, 1, -1, 1, 0: 0.8
    "e5": ([1, 1, 2], [1, 2, 3], 1.5 / math.sqrt(1.5 * 2)),  # ranks (1.5, 1.5, 3) and (1, 2, 3), centred: 1.5 / sqrt(1.5 x 2)
    "e6": ([1, 2, 3], None, None),  # beta failed on it: no ρ
    "e7": ([1, NAN, 2, 3], [3, 9, 2, 1], -1.0),  # the NaN entry is left out of both: (1, 2, 3) vs (3, 2, 1)
}


def _text(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


@pytest.fixture(scope="module")
def hand_db(tmp_path_factory):
    examples, units = [], []
    for position, (example_id, (alpha, beta, _)) in enumerate(HAND.items()):
        text = _text(len(alpha))
        examples.append((example_id, position, text, 1))
        units.append((example_id, "alpha", text_document(text, alpha, "alpha"), "", {"comprehensiveness": 0.5}))
        units.append((example_id, "beta", None if beta is None else text_document(text, beta, "beta"),
                      "failed" if beta is None else "", {"comprehensiveness": None}))
    return write_run(tmp_path_factory.mktemp("rho") / "hand.db", "hand", ("alpha", "beta"), ("comprehensiveness",),
                     units, examples)


@pytest.fixture(scope="module")
def client(hand_db):
    return TestClient(create_app(hand_db), base_url="http://127.0.0.1", raise_server_exceptions=False)


def _shown(page: str) -> dict[str, str]:
    """example id -> the ρ text shown in its header."""
    ids = re.findall(r'<section class="example">\s*<header>\s*<a [^>]*><b>(.*?)</b>', page)
    rhos = re.findall(r'<span class="rho">[^=]*= (.*?)</span>', page)
    assert len(ids) == len(rhos)
    return dict(zip(map(html.unescape, ids), rhos, strict=True))


def test_hand_computed_rho(hand_db, client):
    with ReadOnlyStore(hand_db) as store:
        rhos = rank_correlations(store, "hand", "alpha", "beta")
    assert set(rhos) == set(HAND) and rhos["e6"] is None  # beta failed on e6: its unit holds no explanation
    for example_id, (alpha, beta, expected) in HAND.items():
        if expected is None:
            assert rhos.get(example_id) is None
            continue
        assert rhos[example_id] == pytest.approx(expected, abs=1e-12)  # float64 ranks of a few entries: rounding only
        keep = np.isfinite(alpha)
        assert rhos[example_id] == pytest.approx(spearmanr(np.asarray(alpha)[keep], np.asarray(beta)[keep]).statistic, abs=1e-12)
    page = client.get("/runs/hand/examples", params={"rank_a": "alpha", "rank_b": "beta", "per": 50})
    assert page.status_code == 200
    shown = _shown(page.text)
    assert shown == {k: "—" if v[2] is None else f"{v[2]:.3f}" for k, v in HAND.items()}


def test_filter_below_a_threshold_and_sort(client):
    query = {"rank_a": "alpha", "rank_b": "beta", "per": 50, "sort": "rho"}
    below = _shown(client.get("/runs/hand/examples", params={**query, "rho_below": "0.9"}).text)
    expected = sorted((k for k, v in HAND.items() if v[2] is not None and v[2] < 0.9), key=lambda k: HAND[k][2])
    assert list(below) == expected == ["e7", "e1", "e4", "e5"]  # undefined ρ (e3, e6) and ρ = 1 (e2) are left out
    page = client.get("/runs/hand/examples", params={**query, "rho_below": "0.9"}).text
    assert "4 matching example(s)" in page
    descending = list(_shown(client.get("/runs/hand/examples", params={**query, "order": "desc"}).text))
    assert descending == ["e2", "e5", "e4", "e1", "e7", "e3", "e6"]  # undefined last, in dataset order
    swapped = _shown(client.get("/runs/hand/examples", params={**query, "rank_a": "beta", "rank_b": "alpha"}).text)
    assert swapped == _shown(client.get("/runs/hand/examples", params=query).text)  # ρ is symmetric
    none_below = client.get("/runs/hand/examples", params={**query, "rho_below": "-1"})
    assert none_below.status_code == 200 and "0 matching example(s)" in none_below.text


def test_one_scan_per_pair_then_cached(hand_db, monkeypatch):
    calls = []

    def counted(store, run_id, first, second):
        calls.append((first, second))
        return rank_correlations(store, run_id, first, second)

    monkeypatch.setattr(app_module, "rank_correlations", counted)
    client = TestClient(create_app(hand_db), base_url="http://127.0.0.1")
    for order in ("asc", "desc"):
        for pair in (("alpha", "beta"), ("beta", "alpha")):
            params = {"rank_a": pair[0], "rank_b": pair[1], "sort": "rho", "order": order, "page": "1", "per": "2"}
            assert client.get("/runs/hand/examples", params=params).status_code == 200
    assert calls == [("alpha", "beta")]


@pytest.mark.parametrize(("params", "message"), [
    ({"rank_a": "alpha", "rank_b": "nope"}, "unknown method"),
    ({"rank_a": "alpha"}, "pick two methods"),
    ({"rank_a": "alpha", "rank_b": "alpha"}, "two different methods"),
    ({"rank_a": "alpha", "rank_b": "beta", "rho_below": "low"}, "rho_below must be a number"),
    ({"rank_a": "alpha", "rank_b": "beta", "rho_below": "nan"}, "finite"),
    ({"sort": "rho"}, "pick two methods"),
    ({"rho_below": "0.5"}, "pick two methods"),
    ({"rank_a": "alpha", "rank_b": '<script>alert("r")</script>'}, "unknown method"),
])
def test_bad_parameters_give_400(client, params, message):
    page = client.get("/runs/hand/examples", params=params)
    assert page.status_code == 400 and message in page.text and "Traceback" not in page.text
    assert "<script>" not in page.text


def test_method_names_are_escaped(tmp_path):
    odd = ('<i onmouseover=alert(1)>a</i>', 'b&"c"')
    units = [("e1", m, text_document("x y z", s, m), "", {}) for m, s in zip(odd, ([1, 2, 3], [3, 1, 2]), strict=True)]
    path = write_run(tmp_path / "odd.db", "odd", odd, (), units, [("e1", 0, "x y z", 0)])
    page = TestClient(create_app(path), base_url="http://127.0.0.1").get(
        "/runs/odd/examples", params={"rank_a": odd[0], "rank_b": odd[1]})
    assert page.status_code == 200
    assert "<i onmouseover" not in page.text and "&lt;i onmouseover=alert(1)&gt;a&lt;/i&gt;" in page.text
    assert "ρ(&lt;i onmouseover=alert(1)&gt;a&lt;/i&gt;, b&amp;&#34;c&#34;) = -0.500" in page.text  # d = -2, 1, 1: 1 - 6*6/24


def test_stored_toy_run_equals_scipy(toy_dir, tmp_path):
    path, run_id = build_text_db(tmp_path, toy_dir)
    with ReadOnlyStore(path) as store:
        rhos = rank_correlations(store, run_id, "occlusion", "saliency")
        rows = store.conn.execute("SELECT example_id, method, explanation FROM explanations WHERE run_id = ?", (run_id,)).fetchall()
    scores: dict[str, dict[str, np.ndarray]] = {}
    for example_id, method, document in rows:
        scores.setdefault(example_id, {})[method] = decode_array(json.loads(document)["scores"])
    assert set(rhos) == set(scores) and len(rhos) == 12
    for example_id, pair in scores.items():
        assert rhos[example_id] == pytest.approx(spearmanr(pair["occlusion"], pair["saliency"]).statistic, abs=1e-12)
    page = TestClient(create_app(path), base_url="http://127.0.0.1").get(
        f"/runs/{run_id}/examples", params={"rank_a": "occlusion", "rank_b": "saliency", "per": 50})
    shown = _shown(page.text)
    assert shown["ex3"] == f"{rhos['ex3']:.3f}"


def test_vectorised_ranks_equal_spearmanr_with_ties_and_nans(monkeypatch):
    import salience.serve.disagreement as disagreement

    monkeypatch.setattr(disagreement, "ENTRIES", 7)  # batches of 1-3 rows: the split must not change a value
    rng = np.random.default_rng(0)
    rows = []
    for i in range(300):
        n = int(rng.integers(2, 12))
        a, b = rng.integers(0, 4, n).astype(float), rng.normal(size=n)  # a has many ties
        if i % 3 == 0:
            b[rng.integers(0, n)] = np.nan
        rows.append((f"r{i}", json.dumps(a.tolist()), json.dumps([None if np.isnan(v) else v for v in b])))
    batch = _chunk_rhos(rows)
    for example_id, a_text, b_text in rows:
        a, b = np.asarray(json.loads(a_text), float), np.asarray(json.loads(b_text), dtype=float)
        keep = np.isfinite(a) & np.isfinite(b)
        one = spearman_rho(a, b)
        assert batch[example_id] == one
        if one is None:
            assert np.ptp(a[keep]) == 0 or np.ptp(b[keep]) == 0 or keep.sum() < 2
        else:
            assert one == pytest.approx(spearmanr(a[keep], b[keep]).statistic, abs=1e-12)
    assert spearman_rho(np.ones(3), np.ones(4)) is None  # different shapes
    assert spearman_rho(np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[4.0, 3.0], [2.0, 1.0]])) == pytest.approx(-1.0)
