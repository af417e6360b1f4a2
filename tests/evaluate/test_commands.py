"""End to end through the command line: evaluate (table, CSV, Markdown, PNGs), runs list/show/export,
bench from a study file, and one-line errors."""

from __future__ import annotations

import csv

import pytest
from evalkit import toy_records, write_jsonl

from salience.cli import main

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture()
def toy_data(tmp_path):
    return write_jsonl(tmp_path / "toy.jsonl", toy_records(6))


def _evaluate(toy_dir, data, tmp_path, *extra):
    return ["evaluate", "--model", str(toy_dir), "--dataset", str(data), "--method", "occlusion", "--method",
            "sig:baseline=pad", "--metric", "comprehensiveness", "--metric", "deletion_auc", "--metric", "insertion_auc",
            "--metric", "auprc", "--db", str(tmp_path / "results" / "r.db"), "--no-progress", *extra]


def test_evaluate_runs_show_and_export(toy_dir, toy_data, tmp_path, capsys):
    assert main(_evaluate(toy_dir, toy_data, tmp_path, "--limit", "4")) == 0
    captured = capsys.readouterr()
    run_id = captured.err.split("new run ")[1].split(":")[0]
    assert "4 examples of toy.jsonl" in captured.err
    for text in ("occlusion", "comprehensiveness ↑", "deletion_auc ↓", "bootstrap 95 % interval"):
        assert text in captured.out
    out = tmp_path / "results" / run_id
    with open(out / "summary.csv", newline="") as handle:
        summary = list(csv.DictReader(handle))
    assert len(summary) == 2 * 4 and {r["n"] for r in summary} == {"4"}
    assert float(summary[0]["ci_low"]) <= float(summary[0]["mean"]) <= float(summary[0]["ci_high"])
    markdown = (out / "summary.md").read_text()
    assert "| occlusion |" in markdown and "| sequential_integrated_gradients:baseline=pad |" in markdown
    for png in ("deletion_auc_curve.png", "insertion_auc_curve.png", "heat_table.png"):
        assert (out / png).read_bytes().startswith(PNG)

    db = str(tmp_path / "results" / "r.db")
    assert main(["runs", "list", "--db", db]) == 0
    assert run_id[:8] in capsys.readouterr().out
    assert main(["runs", "show", run_id[:6], "--db", db]) == 0
    shown = capsys.readouterr().out
    assert f"run {run_id}" in shown and "status complete" in shown and '"torch"' in shown and "occlusion" in shown
    assert main(["runs", "export", run_id, "--db", db, "--out", str(tmp_path / "rows.csv")]) == 0
    with open(tmp_path / "rows.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 * 2 * 4 and {"example_id", "method", "metric", "value", "details"} <= set(rows[0])
    pyarrow = pytest.importorskip("pyarrow.parquet")
    assert main(["runs", "export", run_id[:5], "--db", db, "--format", "parquet", "--table", "explanations",
                 "--out", str(tmp_path / "x.parquet")]) == 0
    table = pyarrow.read_table(tmp_path / "x.parquet")
    assert table.num_rows == 8 and '"schema": "salience.explanation/2"' in table.column("explanation")[0].as_py()
    assert main(["runs", "export", run_id, "--db", db, "--table", "summary", "--out", str(tmp_path / "s.csv")]) == 0


def test_bench_runs_each_study(toy_dir, toy_data, tmp_path, capsys):
    study = tmp_path / "study.toml"
    study.write_text(f"""
db = "{tmp_path / 'bench.db'}"
out = "{tmp_path / 'bench'}"
[[study]]
name = "one"
model = "{toy_dir}"
dataset = "{toy_data}"
limit = 5
methods = [{{ label = "OCC", name = "occlusion" }}]
metrics = ["comprehensiveness", {{ label = "F1", name = "token_f1" }}]
[[study]]
name = "two"
model = "{toy_dir}"
dataset = "{toy_data}"
methods = ["saliency"]
metrics = ["sufficiency"]
""")
    assert main(["bench", str(study), "--limit", "2", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("new run") == 2 and "2 examples of toy.jsonl" in captured.err
    assert "OCC" in captured.out and "F1 ↑" in captured.out
    assert (tmp_path / "bench" / "one" / "heat_table.png").is_file() and (tmp_path / "bench" / "two" / "summary.csv").is_file()
    assert main(["bench", str(study), "--study", "two", "--limit", "2", "--no-progress"]) == 0
    assert "0 units computed, 2 already stored" in capsys.readouterr().err


def test_errors_are_one_line(toy_dir, toy_data, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [*toy_records(2), "{oops", {"id": "ex9", "text": "good film", "rationale": [5]}])
    plain = write_jsonl(tmp_path / "plain.jsonl", toy_records(2, rationale=False))
    cases = [
        (_evaluate(toy_dir, bad, tmp_path), "2 invalid lines (fix them or pass --skip-invalid): line 3: not valid JSON"),
        (_evaluate(toy_dir, bad, tmp_path), "line 4: example 'ex9': rationale word index 5 is out of range"),
        (_evaluate(toy_dir, plain, tmp_path), "metric auprc needs a rationale"),
        (_evaluate(toy_dir, toy_data, tmp_path, "--metric", "nope"), "unknown metric 'nope'"),
        (_evaluate(toy_dir, toy_data, tmp_path, "--method", "ig:stepz=1"), "has no parameter 'stepz'"),
        (["runs", "show", "zzz", "--db", str(tmp_path / "none.db")], "no results database"),
        (["bench", str(tmp_path / "missing.toml")], "cannot read study file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert main(_evaluate(toy_dir, bad, tmp_path, "--skip-invalid")) == 0
    err = capsys.readouterr().err
    assert "skipped 2 invalid lines of" in err and "(first: line 3: not valid JSON" in err
