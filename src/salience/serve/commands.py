"""``salience serve`` and ``salience report`` (registered by :mod:`salience.cli` with
:func:`add_commands`). Importing this module imports no server package: they are imported when a
command runs, and a missing ``serve`` extra is a one-line error."""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Any

DEFAULT_DB = "results/salience.db"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def add_commands(commands: Any) -> None:
    """Add serve and report to the ``salience`` subparsers."""
    serve = commands.add_parser("serve", help="browse evaluation runs in a web browser (read-only)",
                                description="Serve read-only pages over a results database: the runs, each run's method x "
                                            "metric table and curves, and an example browser. A running `salience "
                                            "evaluate` can keep writing the database.")
    serve.add_argument("--db", default=DEFAULT_DB, help=f"results database (default {DEFAULT_DB})")
    serve.add_argument("--host", default=DEFAULT_HOST,
                       help=f"address to bind (default {DEFAULT_HOST}, this machine only; another address exposes the pages "
                            "to the network and prints a warning)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    serve.add_argument("--model", help="also serve a live explain page for this model: type a text (a text classifier), a "
                                       "prompt (a causal LM) or upload an image (an image classifier); zoo:minilm-l6-sentiment, "
                                       "zoo:smollm2-135m, zoo:efficientnet-lite0, a local model directory; nothing is stored "
                                       "unless --record")
    serve.add_argument("--time-limit", type=float, default=60.0,
                       help="seconds a live request waits for its explanations (default 60)")
    serve.add_argument("--record", action="store_true",
                       help="with --model: write each live explanation to --db (a run named live-DATE per model and day); "
                            "only this opens the database read-write, the pages stay read-only")
    serve.set_defaults(run=_serve)
    report = commands.add_parser("report", help="write a run's page as one self-contained HTML file")
    report.add_argument("run_id", metavar="RUN", help="run id or a unique prefix")
    report.add_argument("--db", default=DEFAULT_DB, help=f"results database (default {DEFAULT_DB})")
    report.add_argument("--out", required=True, help="the HTML file to write")
    report.add_argument("--sort", default="", help="sort the methods by this metric's mean (best first) or by 'method'")
    report.set_defaults(run=_report)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _serve(args: argparse.Namespace) -> int:
    from salience.errors import ParameterError
    from salience.serve import create_app, require_server

    require_server()
    try:
        import uvicorn
    except ImportError:
        from salience.errors import SalienceError

        raise SalienceError("salience serve needs uvicorn (the serve extra): pip install 'salience[serve]'") from None
    if not 0 < args.port < 65536:
        raise ParameterError(f"--port {args.port} is not a port number (1-65535)")
    loopback = is_loopback(args.host)
    if not loopback:
        print(f"warning: binding {args.host}: anyone who can reach this machine on port {args.port} can read every run in "
              f"{args.db} (no login, no TLS); use the default {DEFAULT_HOST} unless you mean it", file=sys.stderr)
    live = None
    if args.record and not args.model:
        raise ParameterError("--record stores live explanations: it needs --model")
    if args.model:
        from salience.serve.live import LiveModel

        if not args.time_limit > 0:
            raise ParameterError(f"--time-limit must be positive, not {args.time_limit}")
        live = LiveModel(args.model, time_limit=args.time_limit)
        if args.record:
            from salience.serve.record import Recorder

            live.record = Recorder(args.db, args.model, live.kind, live.methods())
    app = create_app(args.db, allowed_hosts=None if not loopback else _hosts(args.host), live=live)
    page = f"; live explanations of {args.model} at /explain{' (recorded)' if args.record else ''}" if live else ""
    print(f"serving {args.db} read-only at http://{_shown(args.host)}:{args.port}/{page} (Ctrl-C stops)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def _hosts(host: str) -> list[str]:
    """Host headers accepted on a loopback bind: the loopback names (no DNS-rebinding name)."""
    return sorted({"127.0.0.1", "localhost", "::1", "[::1]", host, _shown(host)})


def _shown(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _report(args: argparse.Namespace) -> int:
    from salience.serve import write_report

    path = write_report(args.db, args.run_id, args.out, sort=args.sort)
    print(f"wrote {path}")
    return 0
