"""The Typer app, the two consoles, and the entry point's error handling (one line, never a traceback)."""

from __future__ import annotations

import importlib
import os
import signal
import sys

import typer
from rich.console import Console
from rich.markup import escape

from llavaq.errors import Interrupted, LlavaqError
from llavaq.safety import exit_code, handle_termination, harden_streams

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Quantize LLaVA vision-language models to W8A8 (int8 weights, int8 static activations).",
    pretty_exceptions_enable=False,
)
#: progress, status lines and errors
err = Console(stderr=True)
#: tables and results
out = Console()

INTERRUPTED = ("[yellow]interrupted:[/] no output was written; the session cache keeps every finished layer "
               "(and tuning score): run the same command again to resume")


def main() -> None:
    """Entry point: one-line errors, exit 130 on Ctrl-C, never a traceback (LLAVAQ_DEBUG=1 shows it)."""
    debug = os.environ.get("LLAVAQ_DEBUG") == "1"
    signal.signal(signal.SIGINT, signal.default_int_handler)
    handle_termination()  # SIGTERM/SIGHUP like Ctrl-C, exit 128+n
    harden_streams()  # a non-UTF-8 stdout degrades symbols, never crashes
    try:
        # Non-standalone Typer turns KeyboardInterrupt into a *returned* 130 and ``typer.Exit(n)`` into a
        # returned n, so the return value is the exit status.
        rv = app(standalone_mode=False)
        if rv == 130:
            err.print(INTERRUPTED, soft_wrap=True)
            sys.exit(exit_code(130))
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except LlavaqError as e:
        if debug:
            raise
        err.print(f"[red]error:[/] {escape(e.message)}", highlight=False, soft_wrap=True)
        if isinstance(e, Interrupted):
            sys.exit(exit_code(130))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        err.print(INTERRUPTED, soft_wrap=True)
        sys.exit(exit_code(130))
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors and anything unexpected
        _unexpected(e, debug)


def _unexpected(e: Exception, debug: bool) -> None:
    if isinstance(e, _click_exceptions("ClickException")):
        e.show()
        sys.exit(e.exit_code)
    if isinstance(e, _click_exceptions("Abort")):  # click's wrapper of KeyboardInterrupt / EOF
        err.print(INTERRUPTED, soft_wrap=True)
        sys.exit(exit_code(130))
    if debug:
        raise e
    msg = str(e).splitlines()[0] if str(e) else ""
    err.print(f"[red]error:[/] {e.__class__.__name__}: {escape(msg)} (set LLAVAQ_DEBUG=1 for the traceback)",
              highlight=False, soft_wrap=True)
    sys.exit(1)


def _click_exceptions(name: str) -> tuple[type, ...]:
    """``name`` from click and from the copy of click that newer Typer releases vendor (``typer._click``)."""
    found = []
    for mod in ("click.exceptions", "typer._click.exceptions"):
        try:
            cls = getattr(importlib.import_module(mod), name, None)
        except ImportError:
            continue
        if isinstance(cls, type):
            found.append(cls)
    return tuple(found)
