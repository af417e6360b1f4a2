"""The viewer's pages over a run written by the real runner: the runs list, the run page's table
(means and intervals equal to summarise(), the order asked for), the curves (areas equal to the
mean curves'), and the example browser's pagination, filters and sorts, checked against the
database itself."""

from __future__ import annotations

import html
import re

import numpy as np
import pytest
from servekit import N_TEXT, TEXT_METHODS, TEXT_METRICS, XSS_ID, build_image_db, build_text_db
from starlette.testclient import TestClient

from salience.evaluate.plots import mean_curves
from salience.evaluate.store import Store
from salience.evaluate.summary import summarise
from salience.serve import create_app
from salience.serve.database import ReadOnlyStore
from salience.serve.svg import trapezoid_area


@pytest.fixture(scope="module")
def text_db(toy_dir, tmp_path_factory):
    """(database, run id) of a complete toy-classifier run (see servekit.build_text_db)."""
    return build_text_db(tmp_path_factory.mktemp("viewer"), toy_dir)


@pytest.fixture(scope="module")
def client(text_db):
    return TestClient(create_app(text_db[0]), base_url="http://127.0.0.1")


def _ids(page: str) -> list[str]:
    """The example ids of an example-browser page, in order."""
    return [html.unescape(m) for m in re.findall(r'<section class="example">\s*<header>\s*<a [^>]*><b>(.*?)</b>', page)]


def _entries(text_db):
    with ReadOnlyStore(text_db[0]) as store:
        return store.example_index(text_db[1])


def test_runs_list(client, text_db):
    page = client.get("/")
    assert page.status_code == 200
    row = page.text[page.text.index(text_db[1]):]
    assert "status-complete" in page.text
    for shown in ("toy", "toy.jsonl", ", ".join(TEXT_METHODS), ", ".join(TEXT_METRICS), f">{N_TEXT}<", f">{N_TEXT * 2}<"):
        assert shown in row


def test_interrupted_run_is_shown_so(text_db, tmp_path):
    copy = tmp_path / "copy.db"
    copy.write_bytes(text_db[0].read_bytes())
    with Store(copy) as store:  # a run whose writer died: status running, no live writer
        store.conn.execute("UPDATE runs SET status = 'running'")
    page = TestClient(create_app(copy), base_url="http://127.0.0.1").get("/")
    assert "status-interrupted" in page.text and ">interrupted<" in page.text


def test_run_table_equals_summarise(client, text_db):
    path, run_id = text_db
    with Store(path) as store:
        summary = summarise(store.results(run_id), methods=list(TEXT_METHODS), metrics=list(TEXT_METRICS), seed=0)
    page = client.get(f"/runs/{run_id}").text
    body = page[page.index("<tbody>"):page.index("</tbody>")]
    for row in summary:
        method_row = body[body.index(f"<th>{row.method}</th>"):]
        method_row = method_row[:method_row.index("</tr>")]
        cells = re.findall(r'<td class="num[^"]*"[^>]*>(.*?)\n<div class="ci">\[(.*?)\]</div>', method_row)
        mean, interval = cells[TEXT_METRICS.index(row.metric)]
        assert mean == f"{row.mean:.3f}" and interval == f"{row.ci_low:.3f}, {row.ci_high:.3f}"
    assert page.count("↑ higher is better") == 2 and page.count("↓ lower is better") == 1  # comprehensiveness, token_f1 / deletion_auc


@pytest.mark.parametrize(("sort", "order"), [("comprehensiveness", ""), ("deletion_auc", ""), ("deletion_auc", "desc"),
                                             ("method", "desc")])
def test_run_table_sorts(client, text_db, sort, order):
    path, run_id = text_db
    with Store(path) as store:
        summary = summarise(store.results(run_id), methods=list(TEXT_METHODS), metrics=list(TEXT_METRICS), seed=0)
    page = client.get(f"/runs/{run_id}", params={"sort": sort, "order": order}).text
    shown = re.findall(r"<tr><th>(.*?)</th>", page)
    if sort == "method":
        expected = sorted(TEXT_METHODS, reverse=True)
    else:
        means = {r.method: r.mean for r in summary if r.metric == sort}
        best_first = order == "" and sort != "deletion_auc" or order == "desc"  # deletion_auc: lower is better
        expected = sorted(means, key=means.__getitem__, reverse=best_first)
    assert shown == expected


def test_curves_are_the_mean_curves(client, text_db):
    path, run_id = text_db
    with Store(path) as store:
        curves = mean_curves(store.results(run_id), "deletion_auc")
    page = client.get(f"/runs/{run_id}").text
    assert page.count("<polyline") == len(TEXT_METHODS)
    for method, (x, y, n) in curves.items():
        assert f"{method} (area {trapezoid_area(x, y):.3f}, n={n})" in page
        assert n == N_TEXT
    # the area of the mean curve is the mean of the per-example trapezoid areas on the same grid (linearity)
    x, y, _ = curves["occlusion"]
    assert trapezoid_area(x, y) == pytest.approx(float(np.trapezoid(y, x)), abs=1e-12)


def test_example_pages(client, text_db):
    run_id = text_db[1]
    entries = _entries(text_db)
    first = client.get(f"/runs/{run_id}/examples", params={"per": 5})
    second = client.get(f"/runs/{run_id}/examples", params={"per": 5, "page": 3})
    assert first.status_code == second.status_code == 200
    assert _ids(first.text) == [e.example_id for e in entries[:5]]
    assert _ids(second.text) == [e.example_id for e in entries[10:]]  # 12 examples: pages of 5, 5, 2
    assert "page 3 of 3" in second.text and "next →" not in second.text
    for method in TEXT_METHODS:  # each method side by side, rendered by render.html
        assert first.text.count(f"<h3>{method}</h3>") == 5
    assert first.text.count('class="explanation"') == 5 * len(TEXT_METHODS)


def test_example_filters(client, text_db):
    run_id = text_db[1]
    entries = _entries(text_db)
    positive = client.get(f"/runs/{run_id}/examples", params={"label": "1", "per": 50}).text
    assert _ids(positive) == [e.example_id for e in entries if e.label == 1]
    wrong = client.get(f"/runs/{run_id}/examples", params={"correct": "no", "per": 50}).text
    expected = [e.example_id for e in entries if e.label != e.prediction_index]
    assert _ids(wrong) == expected and f"{len(expected)} matching example(s)" in wrong
    predicted = client.get(f"/runs/{run_id}/examples", params={"prediction": "negative", "per": 50}).text
    assert _ids(predicted) == [e.example_id for e in entries if e.prediction == "negative"]


def test_example_sort_and_range_by_metric_value(client, text_db):
    path, run_id = text_db
    with ReadOnlyStore(path) as store:
        values = store.metric_values(run_id, "occlusion", "comprehensiveness")
    query = {"sort": "value", "method": "occlusion", "metric": "comprehensiveness", "order": "desc", "per": 50}
    shown = _ids(client.get(f"/runs/{run_id}/examples", params=query).text)
    assert [values[i] for i in shown] == sorted(values.values(), reverse=True)
    low = float(np.median(list(values.values())))
    ranged = _ids(client.get(f"/runs/{run_id}/examples", params={**query, "low": repr(low)}).text)
    assert set(ranged) == {i for i, v in values.items() if v >= low}
    by_id = _ids(client.get(f"/runs/{run_id}/examples", params={"sort": "id", "per": 50}).text)
    assert by_id == sorted(values)
    last_first = _ids(client.get(f"/runs/{run_id}/examples", params={"order": "desc", "per": 50}).text)
    assert last_first == [e.example_id for e in _entries(text_db)][::-1]  # position, descending


def test_one_example_with_every_method(client, text_db):
    run_id = text_db[1]
    page = client.get(f"/runs/{run_id}/example", params={"id": "ex3"})
    assert page.status_code == 200 and _ids(page.text) == ["ex3"]
    assert all(f"<h3>{m}</h3>" in page.text for m in TEXT_METHODS)
    xss = client.get(f"/runs/{run_id}/example", params={"id": XSS_ID})
    assert xss.status_code == 200 and _ids(xss.text) == [XSS_ID]


def test_image_run_draws_overlays_over_the_picture(tmp_path):
    path, run_id = build_image_db(tmp_path)
    client = TestClient(create_app(path), base_url="http://127.0.0.1")
    page = client.get(f"/runs/{run_id}/examples")
    assert page.status_code == 200
    assert page.text.count('<img class="overlay"') == 2 and page.text.count('src="data:image/png;base64,') == 2
    from salience.serve.explanations import picture

    with ReadOnlyStore(path) as store:
        stored = [e.input for e in store.example_index(run_id)]
    assert all(picture(s) is not None and picture(s).shape == (20, 30, 3) for s in stored)  # the files the run read
    assert picture("/no/such/file.png") is None and picture("fashion-mnist:test:-1") is None
