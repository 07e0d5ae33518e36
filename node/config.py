"""Settings of the node, loaded from `node.toml` into typed, frozen objects.

`load_settings` validates the whole file and raises `ConfigError` listing every
problem at once, so an operator fixes the file in one pass. Nothing is silently
replaced by a default: a key that is present must hold a valid value, and a key
that is unknown is an error (it is usually a typo of a real key).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import shlex
import shutil
import socket
import tempfile
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scoring.config import DEFAULT_MASS_CALIBRATION_FACTOR, ProtocolPolicy, ScoringParameters

#: Output kinds a destination can receive: the CAC SEG, the coronary artery
#: region SEG, the TID 1500 SR and the summary Secondary Capture image.
OUTPUT_KINDS: frozenset[str] = frozenset({"seg", "region_seg", "sr", "summary", "notice"})
#: The output kind written only for a refused series: the not-scored notice.
NOTICE = "notice"

#: Maximum length of an AE title (PS3.5 Table 6.2-1, VR AE).
AE_TITLE_MAX_LENGTH = 16

#: Longest UID root accepted, so that at least 24 digits of a 64-character UID
#: (PS3.5 section 9.1) are left for the unique part that pydicom appends.
UID_ROOT_MAX_LENGTH = 40

_UID_ROOT_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$")
_HOST_NAME_PATTERN = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_DOTTED_NUMBERS_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|cuda|cuda:[0-9]+)$")
_MAX_PDU_LIMIT = 2**32 - 1

#: Environment variable naming the settings file when --config is not given.
CONFIG_ENVIRONMENT_VARIABLE = "CACS_NODE_CONFIG"
_MIN_PDU_SIZE = 4096


class ConfigError(ValueError):
    """`node.toml` is missing, unreadable or contains invalid values.

    problems: one sentence per problem, each naming the key, the value found,
        what is allowed and how to fix it.
    valid_sections: the sections whose own keys were all valid, by name
        ("storage", "scoring"), so that `check-config` can still test the
        storage root and the model while other keys are wrong.
    """

    def __init__(self, source: str, problems: list[str], valid_sections: Mapping[str, Any] | None = None) -> None:
        self.source = source
        self.problems = list(problems)
        self.valid_sections = dict(valid_sections or {})
        lines = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{source}: {len(self.problems)} problem(s) in the node settings:\n{lines}")


@dataclass(frozen=True)
class NodeSection:
    """The `[node]` table: how the node listens and identifies itself.

    ae_title: called AE title of this node (default "CACS_NODE").
    bind_address: address the Storage SCP listens on (default "0.0.0.0").
    port: TCP port of the SCP (default 11112).
    max_associations: associations served at once; one more is rejected with
        (2, 3, 2) (default 10).
    acse_timeout_s, dimse_timeout_s, network_timeout_s: pynetdicom timeouts in
        seconds (defaults 30, 60, 60).
    max_pdu_size: maximum PDU length received, bytes, 0 for unlimited (default 16382).
    uid_root: root of the UIDs of the objects the node creates, ending with "."
        (default pydicom's root "1.2.826.0.1.3680043.8.498.").
    accept_unknown_peers: accept calling AE titles that are not in [[peers]]
        (default false).
    log_patient_identifiers: allow PatientName and PatientID in log lines
        (default false).
    """

    ae_title: str = "CACS_NODE"
    bind_address: str = "0.0.0.0"
    port: int = 11112
    max_associations: int = 10
    acse_timeout_s: float = 30.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    max_pdu_size: int = 16382
    uid_root: str = "1.2.826.0.1.3680043.8.498."
    accept_unknown_peers: bool = False
    log_patient_identifiers: bool = False


@dataclass(frozen=True)
class Peer:
    """One `[[peers]]` entry: a calling AE title allowed from one host."""

    ae_title: str
    host: str


@dataclass(frozen=True)
class Destination:
    """One `[[destinations]]` entry: a Storage SCP that receives the node's outputs.

    outputs: subset of OUTPUT_KINDS sent there (default seg, sr, summary).
    max_attempts: association attempts before a send counts as failed (default 5).
    retry_backoff_s: wait before the second attempt, doubled after each failure
        (default 10 s).
    """

    name: str
    ae_title: str
    host: str
    port: int
    outputs: frozenset[str] = frozenset({"seg", "sr", "summary"})
    max_attempts: int = 5
    retry_backoff_s: float = 10.0


@dataclass(frozen=True)
class StorageSection:
    """The `[storage]` table.

    root: folder holding received instances, outputs and the job database
        (default /var/lib/cacs-node). A relative path is resolved against the
        folder of the settings file.
    min_free_space_mb: free space, in MiB, below which C-STORE requests get
        status 0xA700 Out of Resources (default 1024).
    """

    root: Path = Path("/var/lib/cacs-node")
    min_free_space_mb: int = 1024


@dataclass(frozen=True)
class ScoringSection:
    """The `[scoring]` table.

    model_path: model file, None for the model shipped in scoring/models/
        (default "" in the file, meaning None).
    device: "auto", "cpu", "cuda" or "cuda:N" (default "auto").
    quiet_period_s: seconds without a new instance after which a series counts
        as complete (default 30).
    kvp_policy, thickness_policy, contrast_policy, body_part_policy: "flag" or
        "refuse" (defaults flag, flag, refuse, flag).
    mass_calibration_factor: mg HA per cm³ per HU when the series carries none
        (default 0.743).
    write_region_seg: also write the coronary artery region SEG (default false).
    runtime: "auto" (ONNX Runtime when the model runs on the CPU, torch on a
        GPU), "torch", or "onnx". ONNX Runtime was about 2.5 times faster than
        torch on 2 cores with identical labels on the phantom benchmark
        (default "auto").
    threads: CPU threads the model uses; 0 leaves the choice to torch, one
        per core (default 0).
    """

    model_path: Path | None = None
    device: str = "auto"
    quiet_period_s: float = 30.0
    kvp_policy: str = "flag"
    thickness_policy: str = "flag"
    contrast_policy: str = "refuse"
    body_part_policy: str = "flag"
    mass_calibration_factor: float = DEFAULT_MASS_CALIBRATION_FACTOR
    write_region_seg: bool = False
    runtime: str = "auto"
    threads: int = 0

    def protocol_policy(self) -> ProtocolPolicy:
        """Build the ProtocolPolicy that `scoring.series.load_series` applies."""
        return ProtocolPolicy(
            kvp=self.kvp_policy,  # type: ignore[arg-type]
            thickness=self.thickness_policy,  # type: ignore[arg-type]
            contrast=self.contrast_policy,  # type: ignore[arg-type]
            body_part=self.body_part_policy,  # type: ignore[arg-type]
        )

    def scoring_parameters(self) -> ScoringParameters:
        """Build ScoringParameters with this section's mass calibration factor."""
        return ScoringParameters(mass_calibration_factor=self.mass_calibration_factor)


@dataclass(frozen=True)
class NodeSettings:
    """All settings of one node; built by `load_settings` or directly in tests."""

    node: NodeSection = field(default_factory=NodeSection)
    peers: tuple[Peer, ...] = ()
    destinations: tuple[Destination, ...] = ()
    storage: StorageSection = field(default_factory=StorageSection)
    scoring: ScoringSection = field(default_factory=ScoringSection)
    #: The settings file these came from (absolute), None when not read from a file.
    path: Path | None = None


def ae_title_problem(value: str) -> str | None:
    """Describe why `value` (leading and trailing spaces ignored) is not a valid AE title, or return None."""
    title = value.strip(" ")
    if not title:
        return "an AE title must not be empty or only spaces"
    if len(title) > AE_TITLE_MAX_LENGTH:
        return f"{len(title)} characters, an AE title has at most {AE_TITLE_MAX_LENGTH}; shorten it"
    if any(ord(c) < 0x20 or ord(c) > 0x7E or c == "\\" for c in title):
        return ("an AE title may contain only printable ASCII characters without backslash (PS3.5 VR AE); "
                "remove the other characters")
    return None


def uid_root_problem(root: str) -> str:
    """Return why `root` is not a valid UID root ("" when it is), starting with the root itself."""
    if _UID_ROOT_PATTERN.match(root) and len(root) <= UID_ROOT_MAX_LENGTH:
        return ""
    return (
        f"{root!r}: expected digits in dot-separated components without leading zeros, ending with '.', "
        f"at most {UID_ROOT_MAX_LENGTH} characters (for example your organisation's registered root "
        "followed by '.', such as '1.2.826.0.1.3680043.10.1234.')"
    )


#: Host names and addresses under which a node bound to all interfaces receives its own associations.
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


#: Most CPU threads a command or node.toml may give the model: a guard against
#: typing errors (torch 2.13 ended with a segmentation fault at 100,000 threads).
MAX_THREADS = 1024


def onnx_off_cpu(runtime: str, device: str) -> bool:
    """Return whether the ONNX runtime, which has only its CPU provider here, is asked to run on a GPU."""
    return runtime == "onnx" and device.startswith("cuda")


def names_shipped_model(text: str | None) -> bool:
    """Return whether a model setting or option names the shipped model: unset, empty or "default"."""
    return text is None or text.strip() in ("", "default")


def settings_warnings(settings: NodeSettings) -> list[str]:
    """List settings that are valid but probably not meant, one sentence each with what to change.

    These do not stop the node: `cacs-node check-config` prints them and
    `cacs-node serve` logs them.
    """
    warnings: list[str] = []
    node = settings.node
    if not settings.peers and not node.accept_unknown_peers:
        warnings.append(
            "no [[peers]] and accept_unknown_peers = false: every calling AE title is rejected (1, 1, 3); "
            "add a [[peers]] entry per scanner or PACS"
        )
    for index, destination in enumerate(settings.destinations):
        where = f"[[destinations]] #{index + 1} ({destination.name})"
        if "region_seg" in destination.outputs and not settings.scoring.write_region_seg:
            warnings.append(
                f"{where} lists region_seg, but [scoring] write_region_seg = false, so no region SEG is "
                "written or sent; set write_region_seg = true or remove region_seg"
            )
        local_hosts = _LOCAL_HOSTS | {node.bind_address}
        if node.bind_address in ("0.0.0.0", "::"):
            local_hosts |= {socket.gethostname()}
        if destination.ae_title == node.ae_title and destination.port == node.port and destination.host in local_hosts:
            warnings.append(
                f"{where} is this node itself ({destination.ae_title}@{destination.host}:{destination.port}); "
                "give the AE title, host and port of the PACS"
            )
    cores = os.cpu_count()
    if cores and settings.scoring.threads > cores:
        warnings.append(
            f"[scoring] threads = {settings.scoring.threads} is more than the {cores} CPU cores of this "
            "machine, which slows scoring down; give at most the core count, or 0"
        )
    free_mb = _free_space_mb(settings.storage.root)
    if free_mb is not None and free_mb < settings.storage.min_free_space_mb:
        warnings.append(
            f"[storage] min_free_space_mb = {settings.storage.min_free_space_mb}, but only {free_mb} MiB are free "
            f"under {settings.storage.root}: every C-STORE is answered 0xA700 until space is freed; "
            "free space or lower the minimum"
        )
    return warnings


def storage_root_problem(root: Path) -> str | None:
    """Describe why this process cannot create or write the storage root, or return None.

    The root may be missing: then `serve` creates it in its nearest existing
    parent. A folder is made and removed there to test that, because
    permissions alone do not tell (root may write anywhere but in /proc).
    """
    for folder in (root, *root.parents):
        if not folder.exists():
            continue
        if not folder.is_dir():
            return f"[storage] root {root}: {folder} is not a folder"
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".cacs-node-check-", dir=folder))
        except OSError as error:
            action = "write to" if folder == root else f"create {root} in"
            return (f"[storage] root {root}: this user cannot {action} {folder} ({error.strerror}); "
                    "choose another root or give the node's user write access")
        return None
    return f"[storage] root {root}: no part of the path exists"


def _free_space_mb(root: Path) -> int | None:
    """Return the free MiB on the file system of `root` or its nearest existing parent, None when unknown."""
    for folder in (root, *root.parents):
        if folder.exists():
            try:
                return int(shutil.disk_usage(folder).free // 2**20)
            except OSError:
                return None
    return None


def config_option(path: Path | None) -> str:
    """Return " --config PATH", quoted for a shell, for commands that messages suggest, or "" without a path."""
    return f" --config {shlex.quote(str(path))}" if path is not None else ""


def default_config_path() -> Path:
    """Return the settings file used without --config: $CACS_NODE_CONFIG, else ./node.toml."""
    return Path(os.environ.get(CONFIG_ENVIRONMENT_VARIABLE) or "node.toml")


def load_settings(path: str | Path) -> NodeSettings:
    """Read and validate a `node.toml` file.

    Parameters:
        path: the settings file. Relative paths inside it (storage root,
            model path) are resolved against its folder.

    Returns:
        The validated settings.

    Raises:
        ConfigError: the file cannot be read, is not valid TOML, or contains one or
            more invalid values; `problems` lists all of them.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(
            str(path),
            [f"cannot read the settings file ({error.strerror}); check the path given with --config, "
             f"else in ${CONFIG_ENVIRONMENT_VARIABLE}, else ./node.toml"],
        ) from error
    except UnicodeDecodeError as error:
        raise ConfigError(str(path), [f"the file is not UTF-8 text ({error}); save it as UTF-8"]) from error
    settings = parse_settings(text, base_dir=path.resolve().parent, source=str(path))
    return dataclasses.replace(settings, path=path.resolve())


def parse_settings(text: str, *, base_dir: Path, source: str = "node.toml") -> NodeSettings:
    """Validate the TOML text of a settings file; see `load_settings`.

    base_dir: folder against which relative paths are resolved.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(source, [f"the file is not valid TOML: {error}; fix the syntax at that line"]) from error
    return _Validator(data, base_dir, source).settings()


class _Validator:
    """Collects every problem in one pass over the parsed TOML document."""

    def __init__(self, data: dict[str, Any], base_dir: Path, source: str) -> None:
        self.data = data
        self.base_dir = base_dir
        self.source = source
        self.problems: list[str] = []

    def settings(self) -> NodeSettings:
        self._check_keys("", self.data, {"node", "peers", "destinations", "storage", "scoring"})
        node = self._node_section(self._table("node"))
        peers = self._peers(self._array_of_tables("peers"))
        destinations = self._destinations(self._array_of_tables("destinations"))
        valid_sections: dict[str, Any] = {}
        for name, parse in (("storage", self._storage_section), ("scoring", self._scoring_section)):
            known = len(self.problems)
            valid_sections[name] = parse(self._table(name))
            if len(self.problems) > known:
                del valid_sections[name]
        if self.problems:
            raise ConfigError(self.source, self.problems, valid_sections)
        storage, scoring = valid_sections["storage"], valid_sections["scoring"]
        return NodeSettings(node=node, peers=peers, destinations=destinations, storage=storage, scoring=scoring)

    # Structure.

    def _table(self, name: str) -> dict[str, Any]:
        value = self.data.get(name, {})
        if not isinstance(value, dict):
            self.problems.append(f"[{name}] must be a table, found {type(value).__name__}; write it as a [{name}] section")
            return {}
        return value

    def _array_of_tables(self, name: str) -> list[dict[str, Any]]:
        value = self.data.get(name, [])
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            self.problems.append(f"{name} must be an array of tables; write each entry as a [[{name}]] section")
            return []
        return value

    def _check_keys(self, where: str, table: Mapping[str, Any], allowed: set[str]) -> None:
        for key in table:
            if key not in allowed:
                self.problems.append(
                    f"{where}{key}: unknown key; allowed keys here are {', '.join(sorted(allowed))}; "
                    "remove it or correct its spelling"
                )

    # Typed values. Each returns the default after recording a problem, so the
    # remaining keys are still checked.

    def _value(self, where: str, table: Mapping[str, Any], key: str, default: Any, kind: str) -> Any:
        if key not in table:
            return default
        value = table[key]
        checks: dict[str, Callable[[Any], bool]] = {
            "str": lambda v: isinstance(v, str),
            "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
            "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
            "bool": lambda v: isinstance(v, bool),
        }
        if not checks[kind](value):
            expected = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}[kind]
            self.problems.append(f"{where}{key} = {value!r}: expected {expected}")
            return default
        if kind == "float" and not math.isfinite(value):
            # TOML allows nan and inf, and a literal such as 1e400 overflows to inf.
            self.problems.append(
                f"{where}{key} = {value!r}: expected a finite number; write a number such as {default}"
            )
            return default
        return float(value) if kind == "float" else value

    def _ae_title(self, where: str, key: str, value: str) -> str:
        problem = ae_title_problem(value)
        if problem:
            self.problems.append(f"{where}{key} = {value!r}: {problem}")
        return value.strip(" ")

    def _host(self, where: str, key: str, value: str) -> str:
        try:
            ipaddress.ip_address(value)
            return value
        except ValueError:
            pass
        if _DOTTED_NUMBERS_PATTERN.match(value):
            # The host name pattern allows digits, so "999.1.1.1" would pass as a name.
            self.problems.append(
                f"{where}{key} = {value!r}: not a valid IPv4 address; expected four numbers from 0 to 255 "
                "separated by dots, or a host name"
            )
        elif not _HOST_NAME_PATTERN.match(value):
            self.problems.append(f"{where}{key} = {value!r}: expected an IP address or a host name")
        return value

    def _port(self, where: str, key: str, value: int) -> int:
        if not 1 <= value <= 65535:
            self.problems.append(f"{where}{key} = {value}: a TCP port is between 1 and 65535")
        return value

    def _positive(self, where: str, key: str, value: float, *, allow_zero: bool = False) -> float:
        if value < 0 or (value == 0 and not allow_zero):
            bound = "0 or more" if allow_zero else "more than 0"
            self.problems.append(f"{where}{key} = {value}: must be {bound}")
        return value

    def _policy(self, where: str, key: str, value: str) -> str:
        if value not in ("flag", "refuse"):
            self.problems.append(
                f'{where}{key} = {value!r}: allowed values are "flag" (score and mark the deviation) '
                'and "refuse" (do not score the series)'
            )
        return value

    def _path(self, value: str) -> Path:
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    # Sections.

    def _node_section(self, table: dict[str, Any]) -> NodeSection:
        where = "[node] "
        defaults = NodeSection()
        self._check_keys(where, table, set(NodeSection.__dataclass_fields__))
        value = {
            "ae_title": self._value(where, table, "ae_title", defaults.ae_title, "str"),
            "bind_address": self._value(where, table, "bind_address", defaults.bind_address, "str"),
            "port": self._value(where, table, "port", defaults.port, "int"),
            "max_associations": self._value(where, table, "max_associations", defaults.max_associations, "int"),
            "acse_timeout_s": self._value(where, table, "acse_timeout_s", defaults.acse_timeout_s, "float"),
            "dimse_timeout_s": self._value(where, table, "dimse_timeout_s", defaults.dimse_timeout_s, "float"),
            "network_timeout_s": self._value(where, table, "network_timeout_s", defaults.network_timeout_s, "float"),
            "max_pdu_size": self._value(where, table, "max_pdu_size", defaults.max_pdu_size, "int"),
            "uid_root": self._value(where, table, "uid_root", defaults.uid_root, "str"),
            "accept_unknown_peers": self._value(
                where, table, "accept_unknown_peers", defaults.accept_unknown_peers, "bool"
            ),
            "log_patient_identifiers": self._value(
                where, table, "log_patient_identifiers", defaults.log_patient_identifiers, "bool"
            ),
        }

        value["ae_title"] = self._ae_title(where, "ae_title", value["ae_title"])
        self._host(where, "bind_address", value["bind_address"])
        self._port(where, "port", value["port"])
        if value["max_associations"] < 1:
            self.problems.append(f"{where}max_associations = {value['max_associations']}: must be 1 or more")
        for key in ("acse_timeout_s", "dimse_timeout_s", "network_timeout_s"):
            self._positive(where, key, value[key])
        pdu = value["max_pdu_size"]
        if pdu != 0 and not _MIN_PDU_SIZE <= pdu <= _MAX_PDU_LIMIT:
            self.problems.append(
                f"{where}max_pdu_size = {pdu}: use 0 (unlimited) or a length in bytes between "
                f"{_MIN_PDU_SIZE} and {_MAX_PDU_LIMIT}"
            )
        problem = uid_root_problem(value["uid_root"])
        if problem:
            self.problems.append(f"{where}uid_root = {problem}")
        return NodeSection(**value)

    def _peers(self, tables: list[dict[str, Any]]) -> tuple[Peer, ...]:
        peers: list[Peer] = []
        for index, table in enumerate(tables):
            where = f"[[peers]] #{index + 1} "
            self._check_keys(where, table, {"ae_title", "host"})
            missing = [key for key in ("ae_title", "host") if key not in table]
            for key in missing:
                self.problems.append(f"{where}{key}: missing; every peer needs ae_title and host")
            ae_title = self._value(where, table, "ae_title", "", "str")
            host = self._value(where, table, "host", "", "str")
            # Each key present is checked even when the other is missing, so one run lists every problem.
            peer = Peer(
                ae_title=self._ae_title(where, "ae_title", ae_title) if "ae_title" in table else "",
                host=self._host(where, "host", host) if "host" in table else "",
            )
            if missing:
                continue
            if peer in peers:
                self.problems.append(f"{where.rstrip()}: duplicate of an earlier peer {peer.ae_title}@{peer.host}; "
                                     "remove one")
            peers.append(peer)
        return tuple(peers)

    def _destinations(self, tables: list[dict[str, Any]]) -> tuple[Destination, ...]:
        destinations: list[Destination] = []
        required = ("name", "ae_title", "host", "port")
        for index, table in enumerate(tables):
            where = f"[[destinations]] #{index + 1} "
            self._check_keys(where, table, set(Destination.__dataclass_fields__))
            missing = [key for key in required if key not in table]
            for key in missing:
                self.problems.append(f"{where}{key}: missing; every destination needs {', '.join(required)}")
            name = self._value(where, table, "name", "", "str")
            ae_title = self._value(where, table, "ae_title", "", "str")
            host = self._value(where, table, "host", "", "str")
            port = self._value(where, table, "port", 0, "int")
            outputs = self._outputs(where, table)
            max_attempts = self._value(where, table, "max_attempts", 5, "int")
            backoff = self._value(where, table, "retry_backoff_s", 10.0, "float")
            if max_attempts < 1:
                self.problems.append(f"{where}max_attempts = {max_attempts}: must be 1 or more")
            self._positive(where, "retry_backoff_s", backoff, allow_zero=True)
            if missing:
                continue
            if not name.strip():
                self.problems.append(f"{where}name = {name!r}: give the destination a non-empty name")
            if name in (d.name for d in destinations):
                self.problems.append(f"{where}name = {name!r}: used by an earlier destination; names must be unique")
            destinations.append(
                Destination(
                    name=name,
                    ae_title=self._ae_title(where, "ae_title", ae_title),
                    host=self._host(where, "host", host),
                    port=self._port(where, "port", port),
                    outputs=outputs,
                    max_attempts=max_attempts,
                    retry_backoff_s=backoff,
                )
            )
        return tuple(destinations)

    def _outputs(self, where: str, table: Mapping[str, Any]) -> frozenset[str]:
        default = frozenset({"seg", "sr", "summary"})
        if "outputs" not in table:
            return default
        value = table["outputs"]
        allowed = ", ".join(sorted(OUTPUT_KINDS))
        if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
            self.problems.append(f"{where}outputs = {value!r}: expected a non-empty list of strings from {allowed}")
            return default
        unknown = sorted(set(value) - OUTPUT_KINDS)
        if unknown:
            self.problems.append(f"{where}outputs = {value!r}: unknown output(s) {', '.join(unknown)}; allowed: {allowed}")
            return default
        repeated = sorted({kind for kind in value if value.count(kind) > 1})
        if repeated:
            self.problems.append(f"{where}outputs = {value!r}: {', '.join(repeated)} listed more than once; list each once")
        return frozenset(value)

    def _storage_section(self, table: dict[str, Any]) -> StorageSection:
        where = "[storage] "
        defaults = StorageSection()
        self._check_keys(where, table, set(StorageSection.__dataclass_fields__))
        root = self._value(where, table, "root", str(defaults.root), "str")
        minimum = self._value(where, table, "min_free_space_mb", defaults.min_free_space_mb, "int")
        if not root.strip():
            self.problems.append(f"{where}root = {root!r}: give the folder for received instances and the job database")
        root_path = self._path(root)
        try:
            root_path.resolve()
        except (OSError, RuntimeError) as error:
            # Python 3.11 raises RuntimeError for a symbolic link loop.
            self.problems.append(
                f"{where}root = {root!r}: the path cannot be resolved ({error}), for example because a "
                "symbolic link in it points back into itself; fix the path or choose another folder"
            )
        else:
            if root_path.exists() and not root_path.is_dir():
                self.problems.append(f"{where}root = {root!r}: exists but is not a folder; choose a folder path")
        self._positive(where, "min_free_space_mb", minimum, allow_zero=True)
        return StorageSection(root=root_path, min_free_space_mb=minimum)

    def _scoring_section(self, table: dict[str, Any]) -> ScoringSection:
        where = "[scoring] "
        defaults = ScoringSection()
        self._check_keys(where, table, set(ScoringSection.__dataclass_fields__))

        model = self._value(where, table, "model_path", "", "str")
        model_path = None if names_shipped_model(model) else self._path(model)
        if model_path is not None and not model_path.is_file():
            found = "a folder" if model_path.is_dir() else "no file"
            self.problems.append(
                f"{where}model_path = {model!r}: {found} at {model_path}; give an existing model file "
                'or "" (or "default") for the model shipped with cacs-node'
            )

        device = self._value(where, table, "device", defaults.device, "str")
        if not _DEVICE_PATTERN.match(device):
            self.problems.append(f'{where}device = {device!r}: allowed values are "auto", "cpu", "cuda" or "cuda:N"')
        quiet = self._value(where, table, "quiet_period_s", defaults.quiet_period_s, "float")
        self._positive(where, "quiet_period_s", quiet)

        policies = {
            key: self._policy(where, key, self._value(where, table, key, getattr(defaults, key), "str"))
            for key in ("kvp_policy", "thickness_policy", "contrast_policy", "body_part_policy")
        }
        factor = self._value(where, table, "mass_calibration_factor", defaults.mass_calibration_factor, "float")
        self._positive(where, "mass_calibration_factor", factor)
        region_seg = self._value(where, table, "write_region_seg", defaults.write_region_seg, "bool")
        runtime = self._value(where, table, "runtime", defaults.runtime, "str")
        if runtime not in ("auto", "torch", "onnx"):
            self.problems.append(f'{where}runtime = {runtime!r}: allowed values are "auto", "torch" or "onnx"')
        elif onnx_off_cpu(runtime, device):
            self.problems.append(
                f'{where}runtime = "onnx" runs on the CPU only, but device = {device!r}; '
                'set device = "cpu" or "auto", or runtime = "auto" to use ONNX Runtime only on the CPU'
            )
        threads = self._value(where, table, "threads", defaults.threads, "int")
        if not 0 <= threads <= MAX_THREADS:
            self.problems.append(
                f"{where}threads = {threads}: give 0 to let torch choose (one per core) or a count "
                f"from 1 to {MAX_THREADS}"
            )
        return ScoringSection(
            model_path=model_path,
            device=device,
            quiet_period_s=quiet,
            mass_calibration_factor=factor,
            write_region_seg=region_seg,
            runtime=runtime,
            threads=threads,
            **policies,
        )
