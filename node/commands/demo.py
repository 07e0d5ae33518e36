"""`cacs-node demo`: run the node's main job end to end on 127.0.0.1 with a phantom series."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HELP = (
    "run the main job on 127.0.0.1: start a node, send it a digital phantom series, "
    "receive its SEG, SR and summary image in a folder and print the scores"
)

#: AE titles of the parts the demo starts.
NODE_AE_TITLE = "CACS_NODE"
SCANNER_AE_TITLE = "DEMO_SCANNER"
RESULTS_AE_TITLE = "DEMO_PACS"

#: Output kinds the demo destination receives; a SEG is only written when calcium is found.
DEMO_OUTPUTS = ("seg", "sr", "summary")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="folder for the phantom, the node's storage and the results (default: a new temporary folder, kept afterwards)",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the digital phantom (default 1)")
    parser.add_argument(
        "--device",
        default="auto",
        help='where the model runs: "auto", "cpu", "cuda" or "cuda:N" (default auto)',
    )
    parser.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model checkpoint (default: the model shipped in scoring/models/)",
    )
    parser.add_argument(
        "--quiet-period",
        type=float,
        default=2.0,
        help="seconds without a new instance before the series counts as complete (default 2; a real node uses 30)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="seconds to wait for the results after the series is sent (default 900)",
    )


def run(args: argparse.Namespace) -> int:
    import logging

    from node.config import ConfigError

    # pynetdicom logs every association step at INFO; the demo shows only its problems.
    if logging.getLogger().getEffectiveLevel() >= logging.INFO:
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)

    if args.timeout <= 0 or args.quiet_period <= 0:
        print("cacs-node demo: --timeout and --quiet-period must be greater than 0 seconds", file=sys.stderr)
        return 2
    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="cacs-node-demo-"))
    work_dir = work_dir.resolve()
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print(f"cacs-node demo: cannot create the working folder {work_dir} ({error.strerror}); give "
              "--work-dir a folder you can write to", file=sys.stderr)
        return 2
    print(f"working folder: {work_dir}")

    try:
        return _run_demo(work_dir, args)
    except ConfigError as error:
        print(f"cacs-node demo: the generated settings are invalid: {error}", file=sys.stderr)
        return 1


def _run_demo(work_dir: Path, args: argparse.Namespace) -> int:
    from node.config import Destination, parse_settings
    from node.folder_scp import FolderStorageSCP
    from node.scu import send_files
    from node.server import NodeServer
    from scoring.phantom import generate_phantom

    results_dir = work_dir / "results"
    receiver = FolderStorageSCP(results_dir, ae_title=RESULTS_AE_TITLE)
    receiver.start()
    try:
        node_port = _free_port()
        settings_text = _settings_text(work_dir, node_port, receiver.port, args)
        (work_dir / "node.toml").write_text(settings_text)
        settings = parse_settings(settings_text, base_dir=work_dir, source=str(work_dir / "node.toml"))

        print(f"generating phantom series (seed {args.seed}) ...")
        generate_phantom(work_dir / "phantom", args.seed, mode="patient")
        files = sorted(path for path in (work_dir / "phantom" / "dicom").rglob("*") if path.is_file())

        server = NodeServer(settings)
        server.start()
        try:
            print(f"node {NODE_AE_TITLE} listening on 127.0.0.1:{node_port}; sending {len(files)} instances ...")
            scanner = Destination(name="demo node", ae_title=NODE_AE_TITLE, host="127.0.0.1", port=node_port)
            report = send_files(files, scanner, calling_ae_title=SCANNER_AE_TITLE, node_section=settings.node)
            if not report.all_sent:
                print(f"cacs-node demo: sending the phantom failed: {report.failure_reason()}", file=sys.stderr)
                return 1

            sent_at = time.monotonic()
            print("waiting for the node to score the series and send the results ...")
            job = _wait_for_final_job(settings.storage.root, server, args.timeout)
            elapsed = time.monotonic() - sent_at
            caution = server.pipeline.model_caution() if job is not None and job.state == "done" else None
        finally:
            server.stop()
    finally:
        receiver.stop()

    if job is None:
        print(f"cacs-node demo: no job finished within {args.timeout:g} s; see the log above", file=sys.stderr)
        return 1
    print(f"job {job.id}: {job.state} after {elapsed:.1f} s{': ' + job.reason if job.reason else ''}")
    if job.state != "done":
        return 1

    truth = _read_truth(work_dir / "phantom" / "truth.json")
    _print_scores(job.result or {}, truth)
    print(f"  model {job.model_version}")
    if caution:
        print(f"  CAUTION, model: {caution}")
    received = receiver.received
    print(f"\nresults received by {RESULTS_AE_TITLE} in {results_dir}:")
    for item in received:
        print(f"  {item.path.name}  ({_sop_class_name(item.sop_class_uid)})")
    missing = _missing_outputs(received, job.result or {})
    if missing:
        print(f"cacs-node demo: expected {', '.join(missing)} but it did not arrive", file=sys.stderr)
        return 1
    return 0


def _free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _settings_text(work_dir: Path, node_port: int, results_port: int, args: argparse.Namespace) -> str:
    """Write the demo's node.toml: everything on 127.0.0.1, storage inside the working folder."""
    outputs = ", ".join(f'"{kind}"' for kind in DEMO_OUTPUTS)
    return f"""# node.toml written by `cacs-node demo`
[node]
ae_title = "{NODE_AE_TITLE}"
bind_address = "127.0.0.1"
port = {node_port}

[[peers]]
ae_title = "{SCANNER_AE_TITLE}"
host = "127.0.0.1"

[[destinations]]
name = "demo-pacs"
ae_title = "{RESULTS_AE_TITLE}"
host = "127.0.0.1"
port = {results_port}
outputs = [{outputs}]
max_attempts = 2
retry_backoff_s = 1.0

[storage]
root = "{(work_dir / "node").as_posix()}"
min_free_space_mb = 64

[scoring]
model_path = "{Path(args.model).resolve().as_posix() if args.model else ""}"
device = "{args.device}"
quiet_period_s = {float(args.quiet_period)}
"""


def _wait_for_final_job(storage_root: Path, server: Any, timeout_s: float) -> Any:
    """Poll the job store until a job of the demo series is done, failed or refused."""
    from node.jobs import FINAL_STATES, JobStore
    from node.storage import DATABASE_NAME

    deadline = time.monotonic() + timeout_s
    store = JobStore(storage_root / DATABASE_NAME)
    try:
        while time.monotonic() < deadline:
            jobs = store.jobs()
            finished = [job for job in jobs if job.state in FINAL_STATES]
            if finished and store.active_job_count() == 0:
                return max(finished, key=lambda job: job.id)
            time.sleep(0.5)  # poll interval; scoring takes seconds to minutes
    finally:
        store.close()
    return None


def _read_truth(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _print_scores(result: dict[str, Any], truth: dict[str, Any]) -> None:
    agatston = result.get("agatston", {})
    volume = result.get("volume_mm3", {})
    mass = result.get("mass_mg", {})
    truth_agatston = truth.get("agatston", {}) if isinstance(truth.get("agatston"), dict) else {}
    print("\n           Agatston   volume mm3    mass mg   phantom truth (Agatston)")
    for artery in ("LAD", "LCX", "RCA", "total"):
        expected = truth_agatston.get(artery)
        expected_text = f"{expected:10.1f}" if isinstance(expected, (int, float)) else "         -"
        print(
            f"  {artery:<6} {agatston.get(artery, 0.0):10.1f} {volume.get(artery, 0.0):12.1f} "
            f"{mass.get(artery, 0.0):10.1f}   {expected_text}"
        )
    print(f"  risk category: {result.get('risk_category', '-')}, CAC-DRS: {result.get('cac_drs', '-')}")
    true_category = truth.get("risk_category")
    if true_category is not None and true_category != result.get("risk_category"):
        print(f"  the phantom's true risk category is {true_category}: the model's differs. Its accuracy "
              "on held-out phantom series is in scoring/models/MODEL_CARD.md")
    flags = result.get("flags") or []
    if flags:
        print(f"  protocol flags: {', '.join(str(flag) for flag in flags)}")


_SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"


def _missing_outputs(received: list[Any], result: dict[str, Any]) -> list[str]:
    """Name the expected outputs that did not arrive; a SEG is expected only when calcium was found."""
    sop_classes = [item.sop_class_uid for item in received]
    missing = []
    if not any(uid.startswith(_SR_SOP_CLASS_PREFIX) for uid in sop_classes):
        missing.append("the SR")
    if not any(uid.startswith(_SECONDARY_CAPTURE_PREFIX) for uid in sop_classes):
        missing.append("the summary image")
    calcium_found = float(result.get("agatston", {}).get("total", 0.0) or 0.0) > 0.0
    if calcium_found and _SEG_SOP_CLASS not in sop_classes:
        missing.append("the SEG")
    return missing


def _sop_class_name(uid: str) -> str:
    from pydicom.uid import UID

    return UID(uid).name
