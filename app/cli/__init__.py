"""`diffscore` command line. Every user mistake is one line on stderr: exit 2 for usage (a flag, a
choice, a missing argument), exit 1 for a problem found while working (a file, an engine, a value).

One vocabulary across commands: images are positional files, folders or glob patterns; labels are
`--labels a,b,c` or `--labels-file FILE`; `-o/--output FILE` writes json/jsonl/csv by extension;
`--limit` counts images, `--timesteps` counts the (t, ε) pairs a candidate is scored at (DSD, DiffDis),
`--grid` the race's timestep grid, `--noise-steps` the fixed noise step(s) features are read at,
`--sampling-steps` a sampler's denoising steps, `--train-steps` optimiser steps, `--text` one caption
(repeat it), `--threads` torch's threads (docs/cli.md has the table).
Runtime commands (classify, match, info, demo on an
exported engine) need no torch; export, parity, calibrate and training need the `torch` extra.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import typer

from diffscore.app.cli import run, build, train, scale  # noqa: F401  (each registers its commands, in --help order)
from diffscore.app.cli.options import DiffDisMode, HeadKind, RangeMethod, Sampler, app  # noqa: F401
from diffscore.app.render import error_line
from diffscore.errors import EngineError, UsageMistake

try:  # recent typer bundles its own click (not installed beside it); older typer raises click's exceptions
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
    from typer.exceptions import Abort
except ImportError:  # pragma: no cover
    from click.exceptions import Abort, NoArgsIsHelpError, UsageError


def usage_line(e: UsageError) -> str:
    where = f" (see `{e.ctx.command_path} --help`)" if getattr(e, "ctx", None) is not None else ""
    return f"{e.format_message()}{where}"


TERM_GRACE_S = 60  # after SIGTERM, the most a command may take to unwind before it is ended outright


def terminated(signum, frame):
    raise KeyboardInterrupt  # unwinds like Ctrl-C: temporary folders are removed on the way out


def end_now() -> None:
    """SIGTERM's backstop: the KeyboardInterrupt it raises can be swallowed (raised inside a finaliser, it is only
    reported as ignored) and the command would run on. Output folders are only ever renamed into place, so ending
    here leaves nothing half-written; the temporary folders named after this PID are removed by the next run."""
    error_line(f"terminated (SIGTERM): the command did not stop within {TERM_GRACE_S} s, ended outright; "
               f"temporary folders of process {os.getpid()} are removed by the next run")
    os._exit(143)


def main(argv: list[str] | None = None) -> None:
    """Run the CLI: exit 0 on success, 1 on a problem found while working, 2 on a usage mistake,
    130 on Ctrl-C and 143 on SIGTERM, each mistake as one line on stderr."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    stopped_by = {"signal": None}
    backstop = threading.Timer(TERM_GRACE_S, end_now)
    backstop.daemon = True

    def on_term(signum, frame):
        if stopped_by["signal"] is None:
            backstop.start()
        stopped_by["signal"] = signum
        terminated(signum, frame)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        code = app(args=argv, prog_name="diffscore", standalone_mode=False)
    except UsageMistake as e:
        error_line(str(e))
        sys.exit(2)
    except EngineError as e:
        error_line(str(e))
        sys.exit(1)
    except NoArgsIsHelpError as e:
        typer.echo(e.ctx.get_help())
        sys.exit(0)
    except UsageError as e:
        error_line(usage_line(e))
        sys.exit(2)
    except (Abort, KeyboardInterrupt):
        code = 130
    finally:
        backstop.cancel()
        signal.signal(signal.SIGTERM, previous)  # in-process callers (tests, notebooks) get their handler back
    if stopped_by["signal"] or code == 130:  # typer turns Ctrl-C into exit code 130
        error_line("terminated (SIGTERM); nothing half-written was left" if stopped_by["signal"]
                   else "interrupted; nothing half-written was left")
        sys.exit(143 if stopped_by["signal"] else 130)
    if isinstance(code, int) and code:
        sys.exit(code)  # success returns normally (exit 0), so in-process callers need not catch SystemExit


if __name__ == "__main__":
    main()
