"""Command-line entry point `cacs-node`."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

#: Subcommand name → module under node.commands.
COMMANDS: dict[str, str] = {
    "score": "score",
    "phantom": "phantom",
    "train": "train",
    "evaluate": "evaluate",
    "serve": "serve",
    "check-config": "check_config",
    "echo": "echo",
    "status": "status",
    "retry": "retry",
    "demo": "demo",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cacs-node",
        description="DICOM node that scores coronary artery calcium on CT series.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
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
        subparser = subparsers.add_parser(name, help=module.HELP, description=module.HELP)
        module.configure(subparser)
        subparser.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
