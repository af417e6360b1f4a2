"""Load test of the browser viewer (`salience serve`) on loopback, and the disagreement filter on a
large run.

1. A synthetic complete text run (default 10,000 examples x 3 methods x 2 metrics, written by
   tests/serve/synthetic.py) is served by `salience serve` in a subprocess on a free 127.0.0.1
   port. The first request of each page kind is timed alone (cold: the run page's bootstrap, the
   example index, the first ρ scan), then `--clients` concurrent clients (httpx, asyncio) request
   for `--seconds` seconds, each in turn: the run page, a random page of the example browser (10
   examples), one random example, and a random page of the browser sorted by the Spearman ρ of
   two methods. Reported: requests, errors (any status but 200, or a transport error),
   p50 / p90 / p99 latency and requests per second, per page kind and in all.
2. `--rho-examples` (default 100,000; 0 skips it): a run of that many examples x 2 methods, and
   the time of the example browser's page sorted / filtered by ρ: the first (one scan of the run)
   and the next ones (cached), through the same kind of server.

Run it under the machine's CPU lock, e.g.
    flock /tmp/salience-cpu.lock .venv/bin/python benchmarks/viewer_load.py
It writes benchmarks/RESULTS-viewer.md.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "serve")]

from common import log, run_and_write, table  # noqa: E402
from synthetic import synthetic_run  # noqa: E402

METHODS = ("occlusion", "saliency", "integrated_gradients")
KINDS = ("run page", "examples page", "one example", "ρ-sorted page")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Server:
    """`salience serve --db DATABASE` in a subprocess on a free loopback port."""

    def __init__(self, database: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-c", "import sys; from salience.cli import main; sys.exit(main())", "serve", "--db",
                   str(database), "--port", str(self.port)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def __enter__(self) -> Server:
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server stopped: {self.process.stderr.read().decode()[-500:]}")  # type: ignore[union-attr]
            try:
                if httpx.get(self.base + "/", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                time.sleep(0.1)
        raise RuntimeError("the server did not answer within 60 s")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()  # this process only (its own child)
        self.process.wait(10)


def urls(kind: str, n: int, rng: random.Random, per: int = 10) -> str:
    pages = max(1, n // per)
    if kind == "run page":
        return "/runs/synthetic"
    if kind == "examples page":
        return f"/runs/synthetic/examples?page={rng.randint(1, pages)}&per={per}"
    if kind == "one example":
        return f"/runs/synthetic/example?id=ex{rng.randrange(n)}"
    return f"/runs/synthetic/examples?rank_a=occlusion&rank_b=saliency&sort=rho&page={rng.randint(1, pages)}&per={per}"


def cold(base: str, n: int) -> list[list[str]]:
    """The first request of each kind, alone (what it costs before anything is cached)."""
    import httpx

    rows = []
    with httpx.Client(base_url=base, timeout=600) as client:
        for kind in KINDS:
            started = time.perf_counter()
            status = client.get(urls(kind, n, random.Random(0))).status_code
            rows.append([kind, str(status), f"{time.perf_counter() - started:.2f}"])
    return rows


async def load(base: str, n: int, clients: int, seconds: float) -> dict[str, list[tuple[float, bool]]]:
    """(latency, ok) of every request of ``clients`` concurrent clients during ``seconds``."""
    import httpx

    results: dict[str, list[tuple[float, bool]]] = {kind: [] for kind in KINDS}
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(number: int, client: httpx.AsyncClient) -> None:
        rng = random.Random(number)
        turn = number
        while time.perf_counter() < deadline:
            kind = KINDS[turn % len(KINDS)]
            turn += 1
            started = time.perf_counter()
            try:
                ok = (await client.get(urls(kind, n, rng))).status_code == 200
            except httpx.HTTPError:
                ok = False
            results[kind].append((time.perf_counter() - started, ok))

    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
    return results


def load_rows(results: dict[str, list[tuple[float, bool]]], seconds: float) -> list[list[str]]:
    rows = []
    every = [r for kind in KINDS for r in results[kind]]
    for kind, items in [*results.items(), ("all", every)]:
        latencies = np.array([t for t, _ in items]) * 1000
        errors = sum(not ok for _, ok in items)
        p50, p90, p99 = np.percentile(latencies, [50, 90, 99]) if len(latencies) else (np.nan,) * 3
        rows.append([kind, str(len(items)), str(errors), f"{p50:.0f}", f"{p90:.0f}", f"{p99:.0f}", f"{len(items) / seconds:.1f}"])
    return rows


def rho_rows(folder: Path, n: int) -> list[list[str]]:
    """Times of the example browser sorted and filtered by ρ on an ``n``-example run."""
    import httpx

    started = time.perf_counter()
    database = synthetic_run(folder / "rho.db", n, METHODS[:2], ("comprehensiveness",), seed=1)
    log(f"  {n} examples written in {time.perf_counter() - started:.0f} s ({database.stat().st_size / 1e6:.0f} MB)")
    queries = [("examples page 1 (no ρ; builds the example index)", "/runs/synthetic/examples"),
               ("ρ-sorted page 1 (first: scans the run)", "/runs/synthetic/examples?rank_a=occlusion&rank_b=saliency&sort=rho"),
               ("ρ-sorted page 1 again (cached)", "/runs/synthetic/examples?rank_a=occlusion&rank_b=saliency&sort=rho"),
               ("ρ < 0 filter, last page (cached)",
                "/runs/synthetic/examples?rank_a=saliency&rank_b=occlusion&rho_below=0&sort=rho&order=desc&page=LAST"),
               ("one example", f"/runs/synthetic/example?id=ex{n // 2}")]
    rows = []
    with Server(database) as server, httpx.Client(base_url=server.base, timeout=600) as client:
        for name, url in queries:
            if "LAST" in url:
                first = client.get(url.replace("LAST", "1")).text
                total = int(re.search(r"(\d+) matching example", first).group(1))  # type: ignore[union-attr]
                url = url.replace("LAST", str(max(1, -(-total // 10))))
            started = time.perf_counter()
            response = client.get(url)
            rows.append([name, str(response.status_code), f"{time.perf_counter() - started:.2f}"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rho-examples", type=int, default=100_000, help="0 skips the large-run ρ timing")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS-viewer.md")
    args = parser.parse_args(argv)

    def body() -> tuple[list[str], list[str]]:
        with tempfile.TemporaryDirectory(prefix="salience-viewer-") as folder:
            started = time.perf_counter()
            database = synthetic_run(Path(folder) / "load.db", args.examples, METHODS)
            log(f"{args.examples} examples x {len(METHODS)} methods written in {time.perf_counter() - started:.0f} s")
            with Server(database) as server:
                first = cold(server.base, args.examples)
                log(f"cold requests: {first}")
                results = asyncio.run(load(server.base, args.examples, args.clients, args.seconds))
            rows = load_rows(results, args.seconds)
            log("\n".join(map(str, rows)))
            rho = rho_rows(Path(folder), args.rho_examples) if args.rho_examples else []
        total = rows[-1]
        summary = [f"- {args.clients} clients for {args.seconds:g} s on a {args.examples:,}-example run: {total[1]} requests, "
                   f"{total[2]} errors, p50 {total[3]} ms, p90 {total[4]} ms, p99 {total[5]} ms, {total[6]} requests/s"]
        summary += [f"- {args.rho_examples:,} examples: {name}: {seconds} s" for name, _, seconds in rho]
        lines = ["## Setup", "",
                 f"- server: `salience serve --db DB` (uvicorn, one process, Starlette's thread pool) in a subprocess on 127.0.0.1; "
                 f"the clients: one httpx.AsyncClient in this process, {args.clients} concurrent tasks, each requesting the "
                 "four page kinds in turn (random page / example), keep-alive connections",
                 f"- run: synthetic, complete, {args.examples:,} examples (4-24 words) x {len(METHODS)} methods x 2 metrics "
                 "(comprehensiveness, deletion_auc with a 2-point curve), written by tests/serve/synthetic.py",
                 "- the server and the clients share the machine's cores: latencies include queueing behind the other "
                 "clients' requests",
                 "", "## First request of each kind (alone, before the load)", "",
                 *table(["page", "status", "seconds"], first), "",
                 f"## {args.clients} concurrent clients, {args.seconds:g} s", "",
                 *table(["page", "requests", "errors", "p50 ms", "p90 ms", "p99 ms", "requests/s"], rows), ""]
        if rho:
            lines += [f"## Disagreement filter on {args.rho_examples:,} examples x 2 methods (one client, in order)", "",
                      *table(["request", "status", "seconds"], rho), ""]
        return summary, lines

    run_and_write("Viewer load test", "viewer_load.py", argv, ["starlette", "uvicorn", "httpx", "scipy"], args.out, body)


if __name__ == "__main__":
    main()
