"""The Ray engine: the units of an evaluation computed on a Ray Data actor pool.

The pending units are grouped by example into rows of a Ray dataset; ``map_batches`` sends batches
of rows (``examples_per_batch`` examples each) to a callable class on an actor pool
(``compute=ActorPoolStrategy(size=workers)``). Each actor loads the model once, in its constructor,
and computes every pending unit of its batch with :func:`salience.evaluate.runner.compute_unit`, the
local engine's work function; it returns one row per unit (the :class:`UnitResult` as JSON). The
driver consumes the stream with ``iter_batches`` and yields the results in the order they arrive;
:func:`salience.evaluate.runner.run_evaluation` writes them into the SQLite store as they come, so the
driver is the database's only writer and resuming works as with the local engine.

Faults: actors are created with ``max_restarts`` and their batches with ``max_task_retries`` (both
explicit): a worker process that dies mid-batch is restarted and the batch computed again (units
are deterministic for a seed, and only the driver writes, so a retried batch adds no rows). An
example whose explanation fails (a SalienceError) is an error row of that unit, as in the local
runner; a parameter error (a fault of the configuration, not of one example) stops the run, as it
does locally.

Ray is imported only when the engine runs; without it, :func:`import_ray` says how to install it.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from salience.errors import ParameterError, SalienceError, UnknownMethodError
from salience.evaluate.config import RunConfig
from salience.evaluate.datasets import Example
from salience.evaluate.runner import Unit, UnitResult, compute_unit, load_run_model

INSTALL_HINT = 'pip install "salience[ray]"'
FORWARDED_ENV = ("SALIENCE_", "HF_", "TRANSFORMERS_")  # driver settings the actors see (offline flags, caches, test hooks)
TRACE_ENV = "SALIENCE_RAY_TRACE_DIR"  # tests: each actor marks the batch it holds with a file named after its pid
UNIT_DELAY_ENV = "SALIENCE_RAY_UNIT_DELAY"  # tests: seconds an actor sleeps after each unit (to be killed mid-batch)


class EngineError(SalienceError, RuntimeError):
    """The engine cannot run: Ray missing, no cluster at the address, or a bad engine setting."""


def import_ray() -> Any:
    """The ``ray`` module (with Ray Data), or an EngineError saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as error:
        raise EngineError(f"--engine ray needs Ray Data ({error.name or 'ray'} is not installed): {INSTALL_HINT}") from None
    return ray


@dataclass(frozen=True)
class RayEngine:
    """Where and how the units run on Ray.

    ``address``: None starts a local Ray instance sized to this machine (unless this process already
    joined one); else ``auto``, ``HOST:PORT`` or ``ray://HOST:10001`` of an existing cluster.
    ``workers``: actors in the pool (default: as many as the cluster's CPUs, or GPUs, allow).
    ``gpus_per_worker`` / ``cpus_per_worker``: each actor's resources (with GPUs the model is put on
    ``cuda``). ``examples_per_batch``: examples per batch (all their pending methods), the unit of
    scheduling and of retry. ``max_restarts``: times a dead actor is restarted; ``max_task_retries``:
    times a batch whose actor died is submitted again.
    """

    address: str | None = None
    workers: int | None = None
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    examples_per_batch: int = 1
    max_restarts: int = 3
    max_task_retries: int = 3

    def __post_init__(self) -> None:
        if self.workers is not None and self.workers < 1:
            raise EngineError(f"--workers must be at least 1, got {self.workers}")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise EngineError(f"--gpus-per-worker must be >= 0 and CPUs per worker > 0, got {self.gpus_per_worker} "
                              f"and {self.cpus_per_worker}")
        if self.examples_per_batch < 1:
            raise EngineError(f"examples per batch must be at least 1, got {self.examples_per_batch}")
        if self.max_restarts < 0 or self.max_task_retries < 0:
            raise EngineError("max_restarts and max_task_retries must be >= 0")

    def __call__(self, config: RunConfig, model: Any, pending: list[Unit], batch_size: int | None) -> Iterator[UnitResult]:
        """Compute ``pending`` on the actor pool; yield each unit's result as it reaches the driver.
        ``model`` (the driver's adapter) is not shipped: every actor loads ``config.model`` itself."""
        ray = import_ray()
        if not pending:
            return
        started = connect(ray, self.address)
        try:
            dataset = self.dataset(ray, config, pending, batch_size)
            for batch in dataset.iter_batches(batch_size=None, batch_format="pandas", prefetch_batches=1):
                for fatal, text in zip(batch["fatal"], batch["unit"]):
                    if fatal:
                        raise ParameterError(fatal)
                    yield UnitResult.from_json(text)
        finally:
            if started:
                ray.shutdown()

    def check(self) -> None:
        """Before any work: Ray is installed and the cluster at ``address`` (if given) answers."""
        import_ray()
        if self.address is not None:
            _probe(self.address)

    @contextmanager
    def session(self) -> Iterator[None]:
        """Join or start Ray once for several runs (``salience bench``'s studies); shut down at the end
        if it was started here."""
        ray = import_ray()
        started = connect(ray, self.address)
        try:
            yield
        finally:
            if started:
                ray.shutdown()

    def pool_size(self, ray: Any) -> int:
        """``workers``, or as many actors as the cluster's free CPUs (or GPUs) allow, at least one."""
        if self.workers is not None:
            return self.workers
        resources = ray.cluster_resources()
        if self.gpus_per_worker:
            return max(1, int(resources.get("GPU", 0) // self.gpus_per_worker))
        return max(1, int(resources.get("CPU", 1) // self.cpus_per_worker))

    def dataset(self, ray: Any, config: RunConfig, pending: list[Unit], batch_size: int | None) -> Any:
        """The lazy Ray dataset of result rows (``example_id``, ``method``, ``unit``, ``fatal``)."""
        methods: dict[str, list[str]] = {}
        examples = {}
        for example, spec in pending:
            examples.setdefault(example.id, example)
            methods.setdefault(example.id, []).append(spec.label)
        rows = [{"example": examples[eid].to_json(), "methods": json.dumps(labels)} for eid, labels in methods.items()]
        forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
        blocks = -(-len(rows) // self.examples_per_batch)  # one block a batch: a task is one batch, retried alone
        source = ray.data.from_items(rows, override_num_blocks=blocks)
        with warnings.catch_warnings():
            # Ray 2.59 has no named parameter for max_restarts / max_task_retries yet; the remote args still work
            warnings.filterwarnings("ignore", message=".*ray_remote_args.* is deprecated")
            return source.map_batches(
                UnitWorker, batch_size=self.examples_per_batch, batch_format="pandas",
                compute=ray.data.ActorPoolStrategy(size=self.pool_size(ray)),
                fn_constructor_kwargs={"config": config, "batch_size": batch_size,
                                       "device": "cuda" if self.gpus_per_worker else None},
                num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker or None,
                runtime_env={"env_vars": forwarded} if forwarded else None,
                max_restarts=self.max_restarts, max_task_retries=self.max_task_retries)


def connect(ray: Any, address: str | None) -> bool:
    """Join the cluster at ``address`` or, with None, the one this process is in, else start a local
    one (this machine's CPUs and GPUs). Returns True when this call started Ray (the caller shuts it
    down). Ray Data's own progress bars and start-up messages are turned off: the driver has its own."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    if ray.is_initialized():
        return False
    if address is not None:
        _probe(address)
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except ConnectionError as error:
        raise EngineError(f"cannot reach a Ray cluster at {address}: {error}") from None
    return True


def _probe(address: str, timeout: float = 5.0) -> None:
    """A HOST:PORT (or ray://HOST:PORT) that accepts no connection is an error at once (Ray itself
    retries for minutes); ``auto`` and other forms are left to Ray."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise EngineError(f"cannot reach a Ray cluster at {address}: {error.strerror or error}") from None


class UnitWorker:
    """A Ray Data callable class: one per actor, holding the model (loaded once)."""

    def __init__(self, config: RunConfig, batch_size: int | None, device: str | None) -> None:
        self.config = config
        self.specs = {spec.label: spec for spec in config.methods}
        self.batch_size = batch_size
        self.model = load_run_model(config, device=device)
        self.delay = float(os.environ.get(UNIT_DELAY_ENV, "0") or 0)
        trace = os.environ.get(TRACE_ENV)
        self.trace = Path(trace) / f"{os.getpid()}.batch" if trace else None

    def __call__(self, batch: Any) -> dict[str, list[str]]:
        """One batch of examples (pandas: ``example`` as JSON, ``methods`` a JSON list of labels) ->
        one row per unit."""
        import time

        out: dict[str, list[str]] = {"example_id": [], "method": [], "unit": [], "fatal": []}
        examples = [Example.from_json(text) for text in batch["example"]]
        if self.trace is not None:
            self.trace.write_text(json.dumps([e.id for e in examples]))
        for example, labels in zip(examples, batch["methods"]):
            for label in json.loads(labels):
                text, fatal = "", ""
                try:
                    text = compute_unit(self.config, self.model, example, self.specs[label], self.batch_size).to_json()
                except (ParameterError, UnknownMethodError) as error:  # the configuration's fault: the driver stops
                    fatal = str(error)
                out["example_id"].append(example.id)
                out["method"].append(label)
                out["unit"].append(text)
                out["fatal"].append(fatal)
                if self.delay:
                    time.sleep(self.delay)
        if self.trace is not None:
            self.trace.unlink(missing_ok=True)
        return out
