"""`cacs-node echo AE@HOST:PORT`: check that a DICOM peer responds to C-ECHO."""

from __future__ import annotations

import argparse
import re
import sys

HELP = "send a C-ECHO (DICOM verification) to AE@HOST:PORT and report the result"

#: Longest --timeout accepted: one hour. A verification that takes longer has failed.
MAX_TIMEOUT_S = 3600.0

_PEER_PATTERN = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>\[[0-9A-Fa-f:.]+\]|[^:@\[\]]+):(?P<port>[0-9]{1,5})$")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "peer",
        metavar="AE@HOST:PORT",
        help="called AE title, host name or IP address (IPv6 in brackets) and TCP port, e.g. ORTHANC@127.0.0.1:4242",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="node.toml whose [node] AE title, timeouts and maximum PDU size to use (default: built-in defaults)",
    )
    parser.add_argument(
        "--calling-ae-title",
        default=None,
        help="calling AE title to present (default: ae_title from --config, else CACS_NODE)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="ACSE, DIMSE and network timeout in seconds (default: from --config, else 30/60/60 s)",
    )


def parse_peer(text: str) -> tuple[str, str, int]:
    """Split "AE@HOST:PORT" into AE title, host and port.

    Raises
    ------
    ValueError
        If the text does not have that form or the port is outside 1-65535.
    """
    match = _PEER_PATTERN.match(text.strip())
    if match is None:
        raise ValueError(
            f"invalid peer {text!r}: expected AE@HOST:PORT with an AE title of 1-16 "
            "characters, e.g. ORTHANC@127.0.0.1:4242"
        )
    port = int(match["port"])
    if not 1 <= port <= 65535:
        raise ValueError(f"invalid port {port} in {text!r}: expected 1-65535")
    return match["ae"], match["host"].strip("[]"), port


def run(args: argparse.Namespace) -> int:
    from node.config import ConfigError, NodeSection, ae_title_problem, load_settings
    from node.scu import echo

    try:
        ae_title, host, port = parse_peer(args.peer)
    except ValueError as error:
        print(f"cacs-node echo: {error}", file=sys.stderr)
        return 2

    section = NodeSection()
    if args.config:
        try:
            section = load_settings(args.config).node
        except ConfigError as error:
            print(f"cacs-node echo: {error}", file=sys.stderr)
            return 2
    if args.timeout is not None and not 0 < args.timeout <= MAX_TIMEOUT_S:
        print(f"cacs-node echo: invalid --timeout {args.timeout}: expected seconds > 0 and at most "
              f"{MAX_TIMEOUT_S:g}", file=sys.stderr)
        return 2

    calling_ae_title = args.calling_ae_title or section.ae_title
    for option, title in (("called AE title", ae_title), ("--calling-ae-title", calling_ae_title)):
        problem = ae_title_problem(title)
        if problem:
            print(f"cacs-node echo: invalid {option} {title!r}: {problem}", file=sys.stderr)
            return 2
    result = echo(
        ae_title,
        host,
        port,
        calling_ae_title=calling_ae_title,
        acse_timeout_s=args.timeout or section.acse_timeout_s,
        dimse_timeout_s=args.timeout or section.dimse_timeout_s,
        network_timeout_s=args.timeout or section.network_timeout_s,
        max_pdu_size=section.max_pdu_size,
    )
    stream = sys.stdout if result.success else sys.stderr
    print(f"{result.message} ({result.round_trip_s:.3f} s, calling AE title {calling_ae_title})", file=stream)
    return 0 if result.success else 1
