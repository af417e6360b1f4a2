"""Command-line subcommands ``salience evaluate``, ``salience bench`` and ``salience runs``.

``--engine ray`` runs the units on Ray (:mod:`salience.engines.ray_engine`, imported only then);
``--results parquet://PATH`` writes Parquet partitions that ``salience runs import`` merges.

``salience.cli`` registers them with :func:`add_commands`; errors are SalienceErrors (one line).
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

DEFAULT_DB = "results/salience.db"
LOG_WIDTH = 240
TABLES = ("results", "explanations", "examples", "summary")


def add_commands(commands: Any) -> None:
    """Add evaluate, bench and runs to the ``salience`` subparsers."""
    evaluate = commands.add_parser("evaluate", help="evaluate methods with metrics on a dataset (resumable)",
                                   description="Explain every example with every method, score every metric, store "
                                               "the results in a database and print a summary. Running the same command "
                                               "again resumes an interrupted run.")
    evaluate.add_argument("--model", required=True,
                          help="zoo:minilm-l6-sentiment, zoo:planted, zoo:efficientnet-lite0, another zoo model, or a local "
                               "model directory")
    evaluate.add_argument("--dataset", required=True,
                          help="texts: movie-snippets, planted, or a .jsonl file; images: imagenet-photos (8 photos with "
                               "ImageNet labels and hand-made boxes), fashion-mnist, an image folder (ROOT/<class "
                               "name>/*.png|jpg) or a .csv file (path,label[,box]; see docs/evaluation.md)")
    evaluate.add_argument("--method", action="append", required=True, metavar="NAME[:KEY=VALUE,...]",
                          help="method and parameters, e.g. sig:baseline=pad (repeatable)")
    evaluate.add_argument("--metric", action="append", required=True, metavar="NAME[:KEY=VALUE,...]",
                          help="metric and parameters, e.g. sufficiency:fraction=0.2 (repeatable)")
    evaluate.add_argument("--limit", type=int, help="evaluate the first N examples (a larger N later extends the run)")
    evaluate.add_argument("--split", help="movie-snippets or fashion-mnist split (default test, the held-out one)")
    evaluate.add_argument("--lexicon-threshold", type=float,
                          help="movie-snippets: |VADER valence| marking a sentiment word (default 1.5)")
    evaluate.add_argument("--skip-invalid", action="store_true",
                          help="skip malformed JSONL or CSV lines and unreadable images (counted) instead of failing")
    evaluate.add_argument("--target", default="predicted", choices=["predicted", "label"],
                          help="explain the predicted class (default) or the gold label")
    evaluate.add_argument("--output", default="probability", choices=["probability", "logit", "log_probability", "log_odds"],
                          help="what the explanations explain (default probability, the quantity the ERASER metrics read; "
                               "salience explain defaults to log_odds for classifiers)")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--truncate", action="store_true", help="cut texts over the model's limit instead of failing")
    evaluate.add_argument("--max-length", type=int, help="token limit (default: the model's)")
    evaluate.add_argument("--batch-size", type=int, help="rows per model call (default: chosen by Salience)")
    evaluate.add_argument("--prompt-template",
                          help="a causal LM as a zero-shot classifier: the template with {text} (or a JSON list of chat "
                               "messages); with --labels")
    evaluate.add_argument("--labels", help="with --prompt-template: NAME=VERBALISATION,... or a JSON object")
    _common(evaluate)
    evaluate.set_defaults(run=_evaluate)

    bench = commands.add_parser("bench", help="run the studies of a TOML (or YAML) study file")
    bench.add_argument("config", help="study file (see docs/evaluation.md)")
    bench.add_argument("--limit", type=int, help="override every study's limit (e.g. 5 to check the file)")
    bench.add_argument("--study", action="append", help="run only this study (repeatable)")
    _common(bench, db_default=None)
    bench.set_defaults(run=_bench)

    runs = commands.add_parser("runs", help="list, show or export stored evaluation runs")
    actions = runs.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="every run in the database")
    listing.add_argument("--db", default=DEFAULT_DB, help=f"results database (default {DEFAULT_DB})")
    listing.set_defaults(run=_runs_list)
    show = actions.add_parser("show", help="a run's configuration, versions and summary table")
    show.add_argument("run_id", metavar="RUN", help="run id or a unique prefix")
    show.add_argument("--db", default=DEFAULT_DB)
    show.set_defaults(run=_runs_show)
    export = actions.add_parser("export", help="write a run's rows to CSV or Parquet")
    export.add_argument("run_id", metavar="RUN", help="run id or a unique prefix")
    export.add_argument("--format", default="csv", choices=["csv", "parquet"])
    export.add_argument("--table", default="results", choices=TABLES,
                        help="results (one row per example, method, metric; default), explanations, examples or summary")
    export.add_argument("--out", required=True, help="output file")
    export.add_argument("--db", default=DEFAULT_DB)
    export.set_defaults(run=_runs_export)
    merge = actions.add_parser("import", help="merge Parquet results (--results parquet://PATH) into a database",
                               description="Merge the runs written under PATH by --results parquet://PATH into the "
                                           "database; units already there are skipped, so importing twice adds nothing.")
    merge.add_argument("path", metavar="PATH", help="the folder (or s3://... URI) given as parquet://PATH")
    merge.add_argument("--db", default=DEFAULT_DB, help=f"results database (default {DEFAULT_DB})")
    merge.set_defaults(run=_runs_import)


def _common(parser: argparse.ArgumentParser, db_default: str | None = DEFAULT_DB) -> None:
    parser.add_argument("--db", default=db_default, help=f"results database (default {DEFAULT_DB})")
    parser.add_argument("--engine", default="local", choices=["local", "ray"],
                        help="where units are computed: this process (default) or Ray actors (pip install \"salience[ray]\"; "
                             "see docs/scaling.md)")
    parser.add_argument("--address", help="--engine ray: an existing cluster (auto, HOST:PORT or ray://HOST:10001; default: "
                                          "start a local Ray sized to this machine)")
    parser.add_argument("--workers", type=int, help="--engine ray: actors, one model each (default: as many as the CPUs, or "
                                                    "GPUs, allow)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="--engine ray: GPUs per actor (model on cuda)")
    parser.add_argument("--results", metavar="parquet://PATH",
                        help="write Parquet partitions under PATH (a folder or s3://...) instead of the database; "
                             "merge them later with `salience runs import PATH --db DB`")
    parser.add_argument("--out", help="folder for summary.csv/.md and the PNG plots (default: next to the database, "
                                      "one folder per run)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-color", action="store_true", help="plain text output")


def _consoles(args: argparse.Namespace) -> tuple[Any, Any]:
    from rich.console import Console

    width = None if sys.stdout.isatty() else LOG_WIDTH  # tables in logs and pipes: not folded to 80 columns
    plain = getattr(args, "no_color", False)
    return (Console(no_color=plain, highlight=False, markup=False, soft_wrap=True, width=width),
            Console(stderr=True, no_color=plain, highlight=False, markup=False, soft_wrap=True))


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """``kill`` (SIGTERM) stops like Ctrl-C: the unit in progress is dropped, the lock released."""
    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _evaluate(args: argparse.Namespace) -> int:
    from salience.evaluate.config import RunConfig, parse_method_spec, parse_metric_spec, prompt_template_value
    from salience.models.prompt_options import parse_prompt_options

    template, labels = parse_prompt_options(args.prompt_template, args.labels)
    options = {k: v for k, v in (("split", args.split), ("lexicon_threshold", args.lexicon_threshold)) if v is not None}
    config = RunConfig(model=args.model, dataset=args.dataset, methods=tuple(parse_method_spec(m) for m in args.method),
                       metrics=tuple(parse_metric_spec(m) for m in args.metric), dataset_options=options,
                       target=args.target, output=args.output, seed=args.seed, truncate=args.truncate,
                       max_length=args.max_length, prompt_template=prompt_template_value(template), labels=labels)
    return _run_and_report(config, args, args.db, args.out, args.limit, args.batch_size, _engine(args))


def _run_and_report(config: Any, args: argparse.Namespace, db: str, out: str | None, limit: int | None,
                    batch_size: int | None, engine: Any) -> int:
    from salience.evaluate.runner import run_evaluation
    from salience.evaluate.store import Store

    console, errors = _consoles(args)

    def log(message: str) -> None:
        errors.print(message, markup=False)

    if args.results:
        return _run_to_parquet(config, args, engine, limit, batch_size, log)
    with Store(db) as store:
        try:
            with _sigterm_as_interrupt():
                outcome = run_evaluation(config, store, limit=limit, batch_size=batch_size, progress=not args.no_progress,
                                         skip_invalid=getattr(args, "skip_invalid", False), log=log, engine=engine)
        except KeyboardInterrupt:
            errors.print("interrupted: every finished unit is stored; run the same command again to continue")
            return 130
        state = "new run" if outcome.created else "resumed run"
        errors.print(f"{state} {outcome.run_id}: {outcome.computed} units computed, {outcome.reused} already stored "
                     f"({len(outcome.example_ids)} examples of {outcome.dataset.description}) in {store.path}", markup=False)
        _report(store, outcome.run_id, outcome.example_ids, outcome.methods, outcome.metrics, config.seed,
                Path(out) / (config.name or "") if out else store.path.parent / outcome.run_id,
                f"{config.name or config.model} on {outcome.dataset.name}", console)
    return 0


def _engine(args: argparse.Namespace) -> Any:
    """None (the local engine) or the Ray engine the flags describe; Ray flags without it are an error."""
    from salience.errors import ParameterError

    if args.engine == "local":
        given = [flag for flag, value in (("--address", args.address), ("--workers", args.workers),
                                          ("--gpus-per-worker", args.gpus_per_worker)) if value]
        if given:
            raise ParameterError(f"{given[0]} goes with --engine ray")
        return None
    from salience.engines.ray_engine import RayEngine  # an optional leaf: imported only here

    engine = RayEngine(address=args.address, workers=args.workers, gpus_per_worker=args.gpus_per_worker)
    engine.check()  # before any work: one line when Ray is not installed or the cluster does not answer
    return engine


def _run_to_parquet(config: Any, args: argparse.Namespace, engine: Any, limit: int | None, batch_size: int | None,
                    log: Any) -> int:
    from salience.engines.parquet_output import parse_results, run_to_parquet

    root = parse_results(args.results)
    try:
        with _sigterm_as_interrupt():
            outcome = run_to_parquet(config, root, limit=limit, batch_size=batch_size, progress=not args.no_progress,
                                     skip_invalid=getattr(args, "skip_invalid", False), log=log, engine=engine)
    except KeyboardInterrupt:
        log("interrupted: every finished unit is written; run the same command again to continue")
        return 130
    log(f"run {outcome.run_id}: {outcome.computed} units computed, {outcome.reused} already written "
        f"({len(outcome.example_ids)} examples of {outcome.dataset.description}) under {root}; "
        f"merge with `salience runs import {root} --db DB`")
    return 0


def _report(store: Any, run_id: str, example_ids: list[str] | None, methods: list[str], metrics: list[str], seed: int,
            out: Path | None, title: str, console: Any) -> None:
    from salience.evaluate.report import print_summary, write_outputs
    from salience.evaluate.summary import summarise

    rows = store.results(run_id, example_ids)
    summary = summarise(rows, methods=methods, metrics=metrics, seed=seed)
    print_summary(summary, console, title=f"{title} (run {run_id})")
    if out is not None:
        for path in write_outputs(summary, rows, out, title=title):
            console.print(f"wrote {path}")


def _bench(args: argparse.Namespace) -> int:
    from salience.evaluate.config import load_bench_file

    bench = load_bench_file(args.config)
    studies = [s for s in bench.studies if not args.study or s.config.name in args.study]
    if args.study and len(studies) != len(args.study):
        known = ", ".join(str(s.config.name) for s in bench.studies)
        from salience.evaluate.config import ConfigError

        missing = sorted(set(args.study) - {s.config.name for s in studies})[0]
        raise ConfigError(f"no study named {missing!r}; the file has: {known}")
    db = args.db or bench.db or DEFAULT_DB
    out = args.out or bench.out
    engine = _engine(args)
    with engine.session() if engine is not None else nullcontext():  # Ray: one instance for every study
        for study in studies:
            limit = args.limit if args.limit is not None else study.limit
            status = _run_and_report(study.config, args, db, out, limit, study.batch_size, engine)
            if status:
                return status
    return 0


def _runs_list(args: argparse.Namespace) -> int:
    from rich.table import Table
    from rich.text import Text

    from salience.evaluate.store import Store

    _require_db(args.db)
    with Store(args.db) as store:
        infos = store.runs()
    table = Table(title=Text(f"runs in {args.db}"), title_justify="left")
    for column in ("run", "name", "status", "model", "dataset", "examples", "units", "updated"):
        table.add_column(column, overflow="fold")
    for info in infos:
        status = info.status + (f" ({info.writer})" if info.writer else "")
        cells = (info.run_id, info.name or "", status, info.model, info.dataset, str(info.examples), str(info.units),
                 time.strftime("%Y-%m-%d %H:%M", time.localtime(info.updated)))
        table.add_row(*(Text(c) for c in cells))
    _consoles(args)[0].print(table)
    return 0


def _runs_show(args: argparse.Namespace) -> int:
    import json

    from salience.evaluate.store import Store

    _require_db(args.db)
    console = _consoles(args)[0]
    with Store(args.db) as store:
        info = store.run(store.find_run(args.run_id))
        config = info.config
        console.print(f"run {info.run_id}  {info.name or ''}\nstatus {info.status}"
                      + (f" (written by {info.writer})" if info.writer else "")
                      + f"\nmodel {info.model}\ndataset {info.dataset}\nexamples {info.examples}, units {info.units}"
                      + f"\ncreated {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.created))}, "
                      + f"updated {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(info.updated))}")
        console.print("versions " + json.dumps(info.versions))
        console.print("config " + json.dumps({k: v for k, v in config.items() if k != "identity"}))
        methods = [m["label"] for m in config.get("methods", [])]
        metrics = [m["label"] for m in config.get("metrics", [])]
        _report(store, info.run_id, None, methods, metrics, int(config.get("seed", 0)), None,
                f"{info.name or info.model}", console)
    return 0


def _runs_export(args: argparse.Namespace) -> int:
    from salience.evaluate.export import write_table
    from salience.evaluate.store import Store
    from salience.evaluate.summary import summarise

    _require_db(args.db)
    with Store(args.db) as store:
        run_id = store.find_run(args.run_id)
        if args.table == "results":
            rows = store.results(run_id)
        elif args.table == "explanations":
            rows = store.explanations(run_id)
        elif args.table == "examples":
            rows = store.examples(run_id)
        else:
            config = store.run(run_id).config
            rows = [r.to_dict() for r in summarise(store.results(run_id), methods=[m["label"] for m in config["methods"]],
                                                   metrics=[m["label"] for m in config["metrics"]],
                                                   seed=int(config.get("seed", 0)))]
    path = write_table(rows, args.out, args.format)
    print(f"wrote {len(rows)} rows to {path}")
    return 0


def _runs_import(args: argparse.Namespace) -> int:
    from salience.engines.parquet_output import SCHEME, import_parquet
    from salience.evaluate.store import Store

    path = args.path[len(SCHEME):] if args.path.startswith(SCHEME) else args.path
    _, errors = _consoles(args)
    with Store(args.db) as store:
        outcomes = import_parquet(path, store, log=lambda message: errors.print(message, markup=False))
    for outcome in outcomes:
        print(f"run {outcome.run_id}: {outcome.added} units added, {outcome.already} already stored"
              + (f", {outcome.unreadable} unreadable part files left out" if outcome.unreadable else "")
              + f" ({outcome.status}) in {args.db}")
    return 0


def _require_db(db: str) -> None:
    from salience.evaluate.store import StoreError

    if not Path(db).expanduser().is_file():
        raise StoreError(f"no results database at {db} (give --db PATH)")

