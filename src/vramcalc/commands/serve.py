"""`vramcalc serve`: open the page (vramcalc/serve.py) in the browser."""

from __future__ import annotations

from typing import Annotated

import typer

from vramcalc.commands.common import reports_errors
from vramcalc.errors import PlanError

PortOpt = Annotated[int, typer.Option("--port", help="TCP port; 0 picks a free one (printed).")]
HostOpt = Annotated[
    str,
    typer.Option("--host", help="Address to bind. The default, 127.0.0.1, is reachable from "
                 "this machine only; another address lets other machines use the page."),
]
NoBrowserOpt = Annotated[
    bool, typer.Option("--no-browser", help="Do not open the page in a browser.")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="Log every request on stderr.")]


@reports_errors
def serve(
    port: PortOpt = 8765,
    host: HostOpt = "127.0.0.1",
    no_browser: NoBrowserOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    """Open a local page to play with a plan: sliders, breakdown chart, verdicts, exports.

    The page and its JSON API (/api/plan, /api/check, /api/compare, /api/fit,
    /api/sweep, /api/models, POST /api/config) run from this process; every
    asset ships in the package (no internet needed). /api/plan?model=X&batch=4
    answers exactly what `vramcalc plan --json --model X --batch 4` prints.
    Stop it with Ctrl-C.

    \b
    Examples:
      vramcalc serve
      vramcalc serve --port 0 --no-browser
    """
    from vramcalc.serve import make_server

    if not 0 <= port <= 65535:
        raise PlanError(f"--port must be in 0..65535 (0: a free one), got {port}")
    try:
        server = make_server(host, port, verbose=verbose)
    except OSError as err:
        raise PlanError(f"cannot listen on {host}:{port}: {err.strerror or err}; try "
                        "--port 0 for a free port") from None
    typer.echo(f"vramcalc page at {server.url}  (Ctrl-C stops it)", err=False)
    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: bound to {host}: other machines that reach it can use the page",
                   err=True)
    if not no_browser:
        import webbrowser

        if not webbrowser.open(server.url):
            typer.echo("no browser found; open the address above", err=True)
    import signal
    import sys

    # SIGTERM (kill, a service manager) ends it as Ctrl-C does: the uploads' temporary
    # folder is removed by server_close.
    signal.signal(signal.SIGTERM, lambda _sig, _frame: sys.exit(0))
    try:
        server.serve_forever()
    finally:
        server.server_close()
