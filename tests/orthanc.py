"""A real Orthanc PACS for tests: started on 127.0.0.1 with free ports and a temporary configuration.

`run_orthanc` starts `/usr/sbin/Orthanc` (Debian package `orthanc`) with its
storage in a temporary folder, no plugins and no remote access, waits until
its REST API responds to `/system`, and stops it afterwards. `OrthancServer`
queries it over REST with urllib.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ORTHANC_BINARY_CANDIDATES = ("/usr/sbin/Orthanc", "Orthanc")


def find_orthanc() -> str | None:
    """Return the path of the Orthanc executable, or None when it is not installed."""
    for candidate in ORTHANC_BINARY_CANDIDATES:
        path = shutil.which(candidate) if os.sep not in candidate else candidate
        if path and os.access(path, os.X_OK):
            return path
    return None


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass(frozen=True)
class OrthancServer:
    """A running Orthanc: REST base URL, DICOM port and AE title."""

    rest_url: str
    dicom_port: int
    ae_title: str
    storage_dir: Path

    def get_json(self, path: str) -> Any:
        """GET `path` from the REST API and decode the JSON body."""
        with urllib.request.urlopen(self.rest_url + path, timeout=30) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> bytes:
        """GET `path` from the REST API and return the raw body."""
        with urllib.request.urlopen(self.rest_url + path, timeout=60) as response:
            return response.read()

    def post_json(self, path: str, body: Any) -> Any:
        """POST a JSON body to `path` and decode the JSON response."""
        request = urllib.request.Request(
            self.rest_url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def find_instances(self, query: Mapping[str, str], level: str = "Instance") -> list[dict[str, Any]]:
        """Run /tools/find at `level` with DICOM keyword queries; return expanded resources."""
        return self.post_json("/tools/find", {"Level": level, "Query": dict(query), "Expand": True})

    def instances_of_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Return every instance of a study with its main DICOM tags and SOP Class UID."""
        found = []
        for instance in self.find_instances({"StudyInstanceUID": study_instance_uid}):
            tags = self.get_json(f"/instances/{instance['ID']}/simplified-tags")
            found.append({"ID": instance["ID"], "tags": tags})
        return found

    def instance_file(self, orthanc_id: str) -> bytes:
        """Return the stored DICOM file of an instance."""
        return self.get_bytes(f"/instances/{orthanc_id}/file")


def _wait_for_rest(url: str, process: subprocess.Popen, deadline_s: float, log_path: Path) -> None:
    deadline = time.monotonic() + deadline_s
    last_error = ""
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"Orthanc exited with code {process.returncode} while starting; its log "
                f"{log_path} ends with:\n{_tail(log_path)}"
            )
        try:
            with urllib.request.urlopen(url + "/system", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError) as error:
            last_error = str(error)
        time.sleep(0.1)  # poll interval while Orthanc opens its database
    raise TimeoutError(
        f"Orthanc did not respond to {url}/system within {deadline_s:g} s (last error: {last_error}); "
        f"its log {log_path} ends with:\n{_tail(log_path)}"
    )


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"(log not readable: {error})"


@contextmanager
def run_orthanc(
    work_dir: Path,
    *,
    ae_title: str = "ORTHANC",
    modalities: Mapping[str, Sequence[Any]] | None = None,
    lua_script: str | None = None,
    start_timeout_s: float = 60.0,
) -> Iterator[OrthancServer]:
    """Start Orthanc on free 127.0.0.1 ports, yield it, and stop it.

    Parameters
    ----------
    work_dir
        Empty folder for the configuration, database, storage and log.
    ae_title
        Orthanc's own AE title.
    modalities
        DicomModalities entries, name -> [AE title, host, port].
    lua_script
        Lua code loaded at start-up. NOTE: in Orthanc 1.10 a
        ReceivedInstanceFilter that returns false drops the instance but the
        C-STORE response is still 0x0000, so it cannot simulate a refusal.

    Raises
    ------
    RuntimeError
        If Orthanc is not installed or exits while starting.
    TimeoutError
        If its REST API does not respond within `start_timeout_s`.
    """
    binary = find_orthanc()
    if binary is None:
        raise RuntimeError("Orthanc is not installed; install the Debian package 'orthanc'")

    work_dir.mkdir(parents=True, exist_ok=True)
    storage_dir = work_dir / "storage"
    storage_dir.mkdir(exist_ok=True)
    http_port = free_port()
    dicom_port = free_port()
    while dicom_port == http_port:
        dicom_port = free_port()
    config: dict[str, Any] = {
        "Name": "cacs-node-test",
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": ae_title,
        "DicomCheckCalledAet": True,
        "StorageDirectory": str(storage_dir),
        "IndexDirectory": str(storage_dir),
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "HttpServerEnabled": True,
        "DicomServerEnabled": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowEcho": True,
        "DicomModalities": {name: list(entry) for name, entry in (modalities or {}).items()},
        "Plugins": [],
        "LuaScripts": [],
        "StorageCompression": False,
        "ConcurrentJobs": 1,
    }
    if lua_script is not None:
        lua_path = work_dir / "filter.lua"
        lua_path.write_text(lua_script)
        config["LuaScripts"] = [str(lua_path)]
    config_path = work_dir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))

    log_path = work_dir / "orthanc.log"
    rest_url = f"http://127.0.0.1:{http_port}"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [binary, str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=work_dir,
        )
    try:
        _wait_for_rest(rest_url, process, start_timeout_s, log_path)
        yield OrthancServer(rest_url, dicom_port, ae_title, storage_dir)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)
