"""A stored generation run (the tiny Llama through the real evaluation runner) in the viewer: each
example shows every method's generation matrix (one row per generated token, blank cells where a
token cannot see the feature), the prompt escaped, the continuation as the prediction, and the
disagreement ρ over the entries both matrices define."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from scipy.stats import spearmanr
from servekit import GENERATION_METHODS, PROMPTS, XSS, build_generation_db
from starlette.testclient import TestClient

from salience.core.explanation import Explanation
from salience.serve import create_app
from salience.serve.database import ReadOnlyStore
from salience.serve.disagreement import rank_correlations


@pytest.fixture(scope="module")
def generation(tmp_path_factory):
    path, run_id = build_generation_db(tmp_path_factory.mktemp("generation"))
    with ReadOnlyStore(path) as store:
        rows = store.explanations(run_id)
    explanations = {(r["example_id"], r["method"]): Explanation.from_json(r["explanation"]) for r in rows}
    return path, run_id, explanations


def test_generation_matrices_side_by_side(generation):
    path, run_id, explanations = generation
    page = TestClient(create_app(path), base_url="http://127.0.0.1").get(f"/runs/{run_id}/examples")
    assert page.status_code == 200
    assert page.text.count('<table class="matrix">') == len(PROMPTS) * len(GENERATION_METHODS)
    assert "<script>alert" not in page.text and XSS not in page.text and "&lt;script&gt;alert" in page.text
    for example_id in ("p0", "p1"):
        e = explanations[(example_id, GENERATION_METHODS[0])]
        assert e.kind == "generation" and e.scores.shape == (3, len(e.features)) and np.isnan(e.scores).any()
        section = page.text[page.text.index(f"<b>{example_id}</b>"):]
        section = section[:section.index("</section>")]
        header = section[:section.index("</header>")]
        assert f"prediction <b>{e.extras['continuation']}</b>" in header  # the continuation stands for a prediction
        for method in GENERATION_METHODS:
            one = explanations[(example_id, method)]
            matrix = section[section.index(f"<h3>{method}</h3>"):]
            body = matrix[matrix.index("<tbody>"):matrix.index("</tbody>")]
            assert body.count("<tr>") == 3  # one row per generated token
            assert body.count("<td></td>") == int(np.isnan(one.scores).sum())  # NaN: blank cells
            titles = [float(t) for t in re.findall(r'title="([^"]+)"', body)]
            finite = one.scores[np.isfinite(one.scores)]
            np.testing.assert_allclose(titles, finite, rtol=5e-4)  # the titles print 4 significant digits


def test_rho_over_the_entries_both_matrices_define(generation):
    path, run_id, explanations = generation
    with ReadOnlyStore(path) as store:
        rhos = rank_correlations(store, run_id, *GENERATION_METHODS)
    for example_id in ("p0", "p1"):
        a, b = (explanations[(example_id, m)].scores for m in GENERATION_METHODS)
        keep = np.isfinite(a) & np.isfinite(b)
        assert keep.sum() >= 3 and rhos[example_id] == pytest.approx(spearmanr(a[keep], b[keep]).statistic, abs=1e-12)
    page = TestClient(create_app(path), base_url="http://127.0.0.1").get(
        f"/runs/{run_id}/examples", params={"rank_a": GENERATION_METHODS[0], "rank_b": GENERATION_METHODS[1], "sort": "rho"})
    assert page.status_code == 200, page.text[-300:]
    shown = re.findall(r'<span class="rho">.*? = (.*?)</span>', page.text)
    assert shown == [f"{v:.3f}" for v in sorted(rhos.values())]


def test_nan_documents_are_read_in_python(generation):
    path, run_id, _ = generation
    with ReadOnlyStore(path) as store:
        valid = store.conn.execute("SELECT json_valid(explanation) FROM explanations WHERE run_id = ?", (run_id,)).fetchall()
        entries = store.example_index(run_id)
        first = json.loads(store.explanations(run_id)[0]["explanation"])
    assert {v[0] for v in valid} == {0}  # SQLite's parser refuses the NaN the documents hold ...
    assert [e.prediction for e in entries] == [first["extras"]["continuation"], entries[1].prediction]  # ... Python reads them
    assert all(e.prediction for e in entries)
