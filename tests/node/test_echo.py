"""Tests of `cacs-node echo` against a pynetdicom Verification SCP on 127.0.0.1."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.cli import main
from node.commands.echo import parse_peer


@pytest.fixture
def verification_port() -> Iterator[int]:
    """Port of a Verification SCP with AE title ECHO_SCP that checks the called AE title."""
    ae = AE(ae_title="ECHO_SCP")
    ae.require_called_aet = True
    ae.add_supported_context(Verification)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    yield server.server_address[1]
    server.shutdown()


def test_parse_peer_ipv4_returns_parts() -> None:
    assert parse_peer("ORTHANC@127.0.0.1:4242") == ("ORTHANC", "127.0.0.1", 4242)


def test_parse_peer_bracketed_ipv6_strips_brackets() -> None:
    assert parse_peer("PACS@[::1]:104") == ("PACS", "::1", 104)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ORTHANC127.0.0.1:4242", "expected AE@HOST:PORT"),
        ("ORTHANC@127.0.0.1", "expected AE@HOST:PORT"),
        ("A_TITLE_LONGER_THAN_16@host:104", "expected AE@HOST:PORT"),
        ("PACS@host:70000", "invalid port 70000"),
        ("PACS@host:0", "invalid port 0"),
    ],
)
def test_parse_peer_malformed_raises(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_peer(text)


def test_echo_command_running_peer_exits_zero(verification_port: int, capsys) -> None:
    code = main(["echo", f"ECHO_SCP@127.0.0.1:{verification_port}", "--timeout", "5"])

    output = capsys.readouterr().out
    assert code == 0
    assert output.startswith(f"C-ECHO to ECHO_SCP@127.0.0.1:{verification_port} succeeded (")
    assert output.rstrip().endswith("calling AE title CACS_NODE)")


def test_echo_command_wrong_called_ae_exits_one(verification_port: int, capsys) -> None:
    code = main(["echo", f"WRONG@127.0.0.1:{verification_port}", "--timeout", "5"])

    assert code == 1
    assert "reason 7 (Called AE title not recognised)" in capsys.readouterr().err


def test_echo_command_closed_port_exits_one(capsys) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        port = blocker.getsockname()[1]
        code = main(["echo", f"PACS@127.0.0.1:{port}", "--timeout", "5"])

    assert code == 1
    assert f"no association with PACS@127.0.0.1:{port}: connection failed" in capsys.readouterr().err


def test_echo_command_malformed_peer_exits_two(capsys) -> None:
    code = main(["echo", "not-a-peer"])

    assert code == 2
    assert "invalid peer 'not-a-peer'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["A\\B@127.0.0.1:104"], "invalid called AE title 'A\\\\B': an AE title may contain only printable ASCII"),
        (["CÄCS@127.0.0.1:104"], "invalid called AE title 'CÄCS': an AE title may contain only printable ASCII"),
        (["PACS@127.0.0.1:104", "--calling-ae-title", "A" * 17],
         f"invalid --calling-ae-title '{'A' * 17}': 17 characters, an AE title has at most 16"),
        (["PACS@127.0.0.1:104", "--timeout", "inf"], "invalid --timeout inf: expected seconds > 0 and at most 3600"),
        (["PACS@127.0.0.1:104", "--timeout", "nan"], "invalid --timeout nan: expected seconds > 0 and at most 3600"),
    ],
    ids=["backslash", "non-ascii", "long-calling", "infinite-timeout", "nan-timeout"],
)
def test_echo_command_invalid_option_exits_two(arguments: list[str], message: str, capsys) -> None:
    code = main(["echo", *arguments])

    assert code == 2
    assert capsys.readouterr().err.startswith(f"cacs-node echo: {message}")
