"""Command-line entry point `cacs-node`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

#: Subcommand name → module under node.commands.
COMMANDS: dict[str, str] = {
    "score": "score",
    "phantom": "phantom",
    "train": "train",
    "evaluate": "evaluate",
    "calibrate": "calibrate",
    "serve": "serve",
    "check-config": "check_config",
    "echo": "echo",
    "status": "status",
    "retry": "retry",
    "demo": "demo",
}


_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]

#: Exit status of a command whose standard output was closed early, as a shell reports SIGPIPE (128 + 13).
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE
#: Exit status of a command stopped by Ctrl-C, as a shell reports SIGINT (128 + 2).
EXIT_INTERRUPTED = 128 + signal.SIGINT


def build_parser() -> argparse.ArgumentParser:
    from scoring import __version__

    parser = argparse.ArgumentParser(
        prog="cacs-node",
        description="DICOM node that scores coronary artery calcium on CT series.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=_LOG_LEVELS,
        help="logging level for messages on standard error (default INFO)",
    )
    # The same option after the subcommand; SUPPRESS keeps the value given before it when absent.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        choices=_LOG_LEVELS,
        help="logging level for messages on standard error (default INFO)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        try:
            module = importlib.import_module(f"node.commands.{module_name}")
        except ModuleNotFoundError as error:
            if error.name != f"node.commands.{module_name}":
                raise
            continue
        subparser = subparsers.add_parser(
            name, help=module.HELP, description=module.HELP, parents=[common],
            epilog=getattr(module, "EPILOG", None),
        )
        module.configure(subparser)
        subparser.set_defaults(run=module.run)
    return parser


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.run(args) or 0)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand and return its exit status.

    When the reader of standard output goes away (`cacs-node status | head -1`),
    the command stops quietly with EXIT_BROKEN_PIPE instead of a traceback.
    """
    try:
        try:
            return _run(argv)
        finally:
            # Flushing here, also on SystemExit from --help or --version, raises
            # BrokenPipeError where it can be handled instead of at interpreter exit.
            sys.stdout.flush()
    except KeyboardInterrupt:
        print("cacs-node: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Python's documented recipe: point stdout at devnull so the final flush at exit stays silent.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
