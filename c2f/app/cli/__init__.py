"""The ``c2f`` command: ``train``, ``eval``, ``predict``, ``runs``, ``extract``, ``synth``, ``cache-stats``
and ``info``.

Results go to stdout; progress and log lines to stderr (``--quiet``, ``--verbose``, ``--log-file``).
A user error prints one line and exits with code 2 (a traceback only with ``--debug``); a run stopped
by a non-finite loss, output or metric exits with 1.
"""
from __future__ import annotations

import argparse
import logging
import sys

from ...files import LockedError
from ...model_file import CheckpointError
from .. import log as c2f_log
from ..data import CacheError
from ..runs import RunError
from .options import HelpFormatter, Parser

# What a user can cause and fix: bad settings or files, a directory in use, a missing extra. Anything else is a bug.
USER_ERRORS = (ValueError, OSError, ImportError, TypeError, CacheError, CheckpointError, RunError, LockedError)


DESCRIPTION = """C2F coarse-to-fine recognition on CUB-200-2011: cache backbone features, train the head,
evaluate and predict. Results go to stdout; progress and log lines to stderr. A user error prints
one line and exits with code 2 (--debug shows the traceback). `c2f COMMAND --help` for each command."""


def _common_flags() -> argparse.ArgumentParser:
    """Flags every subcommand takes, before or after its name; their defaults never override each other."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("output")
    g.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="log warnings and errors only (default: off)")
    g.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log debug messages too (default: off)")
    g.add_argument("--log-file", metavar="PATH", default=argparse.SUPPRESS,
                   help="also write the log, with timestamps, to PATH (default: none)")
    g.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback of an error (default: off)")
    return common


def build_parser() -> argparse.ArgumentParser:
    from ... import __version__
    from . import commands
    common = _common_flags()
    parser = Parser(prog="c2f", description=DESCRIPTION, formatter_class=HelpFormatter, parents=[common])
    parser.add_argument("--version", action="version", version=f"c2f {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name, (help_text, add, run) in commands.COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter,
                           parents=[common])
        add(p)
        p.set_defaults(run=run)
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: list | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    prog = f"c2f {args.command}"
    try:
        c2f_log.setup(c2f_log.level_for(getattr(args, "quiet", False), getattr(args, "verbose", False)),
                      getattr(args, "log_file", None))
        return args.run(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except FloatingPointError as e:   # NonFiniteError: training diverged, or non-finite outputs or metrics
        if debug:
            raise
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except USER_ERRORS as e:
        if debug:
            raise
        from . import commands
        print(f"{prog}: error: {commands.describe_error(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - anything else is a bug: one line, the traceback with --debug
        if debug:
            raise
        logging.getLogger("c2f").debug("unexpected error", exc_info=True)
        print(f"{prog}: internal error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for the "
              "traceback)", file=sys.stderr)
        return 1
