"""Optional executors for ``salience evaluate`` / ``salience bench`` (leaves: only the evaluation
commands import them, lazily).

* :mod:`~salience.engines.ray_engine`: the Ray engine (``--engine ray``): units computed by actors of a
  Ray Data actor pool, one model per actor, streamed back to the driver, which alone writes results.
  Needs the ``ray`` extra (``pip install "salience[ray]"``).
* :mod:`~salience.engines.parquet_output`: ``--results parquet://PATH`` (Parquet partitions keyed by
  run, example and method, for clusters whose driver cannot keep the SQLite database) and
  ``salience runs import``, which merges them into a database. Needs no Ray.

The local engine (:func:`salience.evaluate.runner.local_engine`) stays the default; every engine
computes a unit with the same :func:`salience.evaluate.runner.compute_unit` and the results are
written by the same writer, so they are the same rows. See docs/scaling.md.
"""

ENGINES = ("local", "ray")

__all__ = ["ENGINES"]
