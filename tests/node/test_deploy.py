"""Checks of the deployment files in deploy/: they parse and agree with the package."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from node.config import load_settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
REPOSITORY = DEPLOY.parent


def _unit_settings(path: Path) -> dict[str, list[str]]:
    """Parse a systemd unit into key -> values (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_unit_runs_serve_as_dedicated_user() -> None:
    settings = _unit_settings(DEPLOY / "cacs-node.service")

    assert settings["User"] == ["cacs-node"]
    assert settings["ExecStart"] == ["/opt/cacs-node/.venv/bin/cacs-node serve --config /etc/cacs-node/node.toml"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["StateDirectory"] == ["cacs-node"]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("ReadWritePaths", "/var/lib/cacs-node"),
        ("CapabilityBoundingSet", ""),
    ],
)
def test_systemd_unit_hardening_option_set(key: str, value: str) -> None:
    assert _unit_settings(DEPLOY / "cacs-node.service")[key] == [value]


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfile_copied_paths_exist(name: str) -> None:
    text = (DEPLOY / name).read_text()
    sources = re.findall(r"^COPY\s+(\S+)\s+\S+$", text, flags=re.MULTILINE)

    assert sources, f"{name} copies nothing"
    for source in sources:
        assert (REPOSITORY / source).exists(), f"{name} copies {source}, which is not in the repository"


def test_dockerfile_cpu_uses_cpu_wheel_index() -> None:
    text = (DEPLOY / "Dockerfile").read_text()

    assert text.startswith("# Container image of cacs-node, CPU only.")
    assert "FROM python:3.11-slim" in text
    assert 'pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"' in text


def test_compose_file_node_beside_orthanc() -> None:
    yaml = pytest.importorskip("yaml", reason="PyYAML parses the compose file")
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())

    assert sorted(compose["services"]) == ["cacs-node", "orthanc"]
    node = compose["services"]["cacs-node"]
    assert node["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert "11112:11112" in node["ports"]
    assert "./node.container.toml:/etc/cacs-node/node.toml:ro" in node["volumes"]
    for mount in compose["services"]["orthanc"]["volumes"] + node["volumes"]:
        source = mount.split(":")[0]
        if source.startswith("./"):
            assert (DEPLOY / source).exists(), f"compose mounts {source}, which is not in deploy/"


def test_container_settings_valid_and_match_orthanc() -> None:
    settings = load_settings(DEPLOY / "node.container.toml")
    orthanc = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())

    (destination,) = settings.destinations
    assert (destination.ae_title, destination.host, destination.port) == (
        orthanc["DicomAet"],
        "orthanc",
        orthanc["DicomPort"],
    )
    # Orthanc's modality CACS must point at the node's AE title and port.
    assert orthanc["DicomModalities"]["CACS"] == [settings.node.ae_title, "cacs-node", settings.node.port]
    assert ("ORTHANC", "orthanc") in {(peer.ae_title, peer.host) for peer in settings.peers}
