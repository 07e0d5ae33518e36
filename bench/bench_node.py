"""Benchmark of the node's network path: ingest rate, memory while receiving, result latency.

Run by hand from the repository root (needs DCMTK, Orthanc and the real QRM
scan beside the checkout, or $CACS_SHARED_DATA):

    python bench/bench_node.py                 # all three measurements
    python bench/bench_node.py --skip-latency  # without the model

1. Ingest: DCMTK storescu sends a 600-slice CT series (the QRM slices repeated
   with new UIDs and positions) to `cacs-node serve`, then the same files to
   DCMTK storescp, in the same run. Printed: images per second of each and
   their ratio (target: node ≥ 0.8 × storescp).
2. Memory: the node's resident set size (VmRSS from /proc) is sampled every
   50 ms during that receive. Printed: RSS before, after each quarter of the
   series, and the peak (target: flat, growth far below the series size).
3. Latency: a 50-slice digital phantom study is sent to a node whose
   destination is Orthanc. Printed: seconds from storescu's return (last
   instance acknowledged) until the SEG and SR are found in Orthanc, with and
   without the quiet period (target ≤ 20 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from pydicom import dcmread  # noqa: E402

from tests.orthanc import free_port, run_orthanc  # noqa: E402

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"
SCANNER_AE_TITLE = "BENCH_SCU"


def _shared_data_dir() -> Path:
    configured = os.environ.get("CACS_SHARED_DATA")
    return Path(configured) if configured else REPOSITORY.parent / "shared" / "data"


def _dcmtk(name: str) -> str:
    for candidate in (f"/usr/bin/{name}", shutil.which(name)):
        if candidate and "dcmtk" in subprocess.run([candidate, "--version"], capture_output=True, text=True).stdout.lower():
            return candidate
    raise SystemExit(f"DCMTK {name} not found; install the Debian package dcmtk")


def write_long_series(source: Path, target: Path, count: int) -> int:
    """Write `count` CT slices cycling through the QRM slices, 3 mm apart, with new UIDs; return the bytes written."""
    from pydicom.uid import generate_uid

    target.mkdir(parents=True)
    slices = sorted(
        (dcmread(path) for path in source.iterdir() if path.is_file()),
        key=lambda dataset: float(dataset.ImagePositionPatient[2]),
    )
    series_uid = generate_uid()
    study_uid = generate_uid()
    origin = [float(value) for value in slices[0].ImagePositionPatient]
    total = 0
    for index in range(count):
        dataset = copy.deepcopy(slices[index % len(slices)])
        sop_uid = generate_uid()
        dataset.SOPInstanceUID = sop_uid
        dataset.file_meta.MediaStorageSOPInstanceUID = sop_uid
        dataset.SeriesInstanceUID = series_uid
        dataset.StudyInstanceUID = study_uid
        dataset.InstanceNumber = index + 1
        dataset.ImagePositionPatient = [origin[0], origin[1], origin[2] + 3.0 * index]
        dataset.SliceLocation = origin[2] + 3.0 * index
        path = target / f"{index:04d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def _settings(
    work: Path, port: int, *, quiet_period_s: float, destination: str = "", model: str = "", runtime: str = "auto"
) -> Path:
    text = f"""
[node]
ae_title = "CACS_NODE"
bind_address = "127.0.0.1"
port = {port}

[[peers]]
ae_title = "{SCANNER_AE_TITLE}"
host = "127.0.0.1"
{destination}
[storage]
root = "{(work / "node").as_posix()}"
min_free_space_mb = 64

[scoring]
model_path = "{model}"
device = "cpu"
quiet_period_s = {quiet_period_s}
runtime = "{runtime}"
"""
    path = work / "node.toml"
    path.write_text(text)
    return path


@dataclass
class RssSampler:
    """Samples VmRSS of a process every 50 ms in a thread."""

    pid: int
    samples: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def start(self) -> None:
        def sample() -> None:
            while not self._stop.is_set():
                try:
                    self.samples.append((time.monotonic(), self.rss_kib()))
                except OSError:
                    return
                self._stop.wait(0.05)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def _wait_for_echo(port: int, ae_title: str, deadline_s: float = 60.0) -> None:
    from node.scu import echo

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if echo(ae_title, "127.0.0.1", port, calling_ae_title=SCANNER_AE_TITLE, acse_timeout_s=2.0).success:
            return
        time.sleep(0.2)
    raise SystemExit(f"{ae_title} on port {port} did not respond to C-ECHO within {deadline_s:g} s")


def _start_node(config: Path, log: Path, level: str = "WARNING") -> subprocess.Popen:
    with open(log, "wb") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "node.cli", "--log-level", level, "serve", "--config", str(config)],
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=REPOSITORY,
        )


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _storescu(storescu: str, called: str, port: int, folder: Path) -> float:
    started = time.monotonic()
    subprocess.run(
        [storescu, "--scan-directories", "-aet", SCANNER_AE_TITLE, "-aec", called, "127.0.0.1", str(port), str(folder)],
        check=True,
        capture_output=True,
    )
    return time.monotonic() - started


def bench_ingest_and_memory(work: Path, qrm: Path, count: int) -> None:
    storescu = _dcmtk("storescu")
    storescp = _dcmtk("storescp")
    series = work / "long-series"
    size = write_long_series(qrm, series, count)
    print(f"series: {count} slices, {size / 2**20:.0f} MiB")

    # Node: a quiet period far longer than the run, so nothing is scored meanwhile.
    node_port = free_port()
    (work / "ingest").mkdir()
    config = _settings(work / "ingest", node_port, quiet_period_s=36000.0)
    node = _start_node(config, work / "ingest" / "node.log")
    try:
        _wait_for_echo(node_port, "CACS_NODE")
        sampler = RssSampler(node.pid)
        baseline = sampler.rss_kib()
        sampler.start()
        started = time.monotonic()
        node_seconds = _storescu(storescu, "CACS_NODE", node_port, series)
        sampler.stop()
        peak = max(rss for _, rss in sampler.samples)
        quarters = []
        for fraction in (0.25, 0.5, 0.75, 1.0):
            moment = started + fraction * node_seconds
            quarters.append(min(sampler.samples, key=lambda sample: abs(sample[0] - moment))[1])
    finally:
        _stop(node)

    # DCMTK storescp on the same files.
    scp_dir = work / "storescp"
    scp_dir.mkdir()
    scp_port = free_port()
    scp = subprocess.Popen([storescp, "--output-directory", str(scp_dir), "-aet", "STORESCP", str(scp_port)])
    try:
        _wait_for_echo(scp_port, "STORESCP")
        scp_seconds = _storescu(storescu, "STORESCP", scp_port, series)
    finally:
        scp.terminate()
        scp.wait(timeout=30)

    node_rate = count / node_seconds
    scp_rate = count / scp_seconds
    print(f"ingest: node {node_rate:.1f} images/s, DCMTK storescp {scp_rate:.1f} images/s, "
          f"ratio {node_rate / scp_rate:.2f} (target >= 0.80)")
    print(f"memory of the node while receiving (MiB): before {baseline / 1024:.0f}, after 25/50/75/100 %: "
          + ", ".join(f"{value / 1024:.0f}" for value in quarters)
          + f"; peak {peak / 1024:.0f}, growth {(peak - baseline) / 1024:.0f} MiB for a {size / 2**20:.0f} MiB series")


def _find_outputs(rest_url: str, study_uid: str) -> set[str]:
    request = urllib.request.Request(
        rest_url + "/tools/find",
        data=json.dumps({"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        instances = json.loads(response.read())
    classes = set()
    for instance in instances:
        with urllib.request.urlopen(f"{rest_url}/instances/{instance['ID']}/simplified-tags", timeout=10) as response:
            classes.add(json.loads(response.read()).get("SOPClassUID", ""))
    return classes


#: Node log messages that mark the steps of a job, in the order they happen.
STEP_MESSAGES = ("scoring started", "segmented series", ": scored ", ": wrote ", ": sent ")


def step_times(log: Path, since_wall: float) -> list[tuple[float, str]]:
    """(seconds after `since_wall`, message) of each job step in a node log written at INFO."""
    steps = []
    for line in log.read_text(errors="replace").splitlines():
        if not any(marker in line for marker in STEP_MESSAGES):
            continue
        try:
            stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        except ValueError:
            continue
        message = re.sub(r"^job (\d+) study \S+ series \S+[^:]*:", r"job \1:", line[24:].split(": ", 1)[-1])
        message = re.sub(r"series [0-9.]+", "series", message)
        steps.append((stamp - since_wall, message[:110]))
    return steps


def bench_latency(
    work: Path, slices: int, quiet_period_s: float, model: str, timeout_s: float, runtime: str = "auto"
) -> None:
    from scoring.phantom import generate_phantom

    storescu = _dcmtk("storescu")
    work.mkdir()
    case = generate_phantom(work / "phantom", 11, mode="patient", slices=slices, burden="moderate")
    study_uid = case.study_instance_uid
    node_port = free_port()
    with run_orthanc(work / "orthanc") as orthanc:
        destination = f"""
[[destinations]]
name = "orthanc"
ae_title = "{orthanc.ae_title}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
outputs = ["seg", "sr", "summary"]
"""
        config = _settings(
            work, node_port, quiet_period_s=quiet_period_s, destination=destination, model=model, runtime=runtime
        )
        node = _start_node(config, work / "node.log", level="INFO")
        try:
            _wait_for_echo(node_port, "CACS_NODE")
            _storescu(storescu, "CACS_NODE", node_port, work / "phantom" / "dicom")
            last_acknowledged = time.monotonic()
            last_acknowledged_wall = time.time()
            deadline = last_acknowledged + timeout_s
            found: set[str] = set()
            while time.monotonic() < deadline:
                found = _find_outputs(orthanc.rest_url, study_uid)
                if SR_STORAGE in found and SEG_STORAGE in found:
                    break
                time.sleep(0.1)
            latency = time.monotonic() - last_acknowledged
        finally:
            _stop(node)
    if SR_STORAGE not in found:
        print(f"latency: no SR in Orthanc within {timeout_s:g} s; see {work / 'node.log'}")
        return
    seg_note = "" if SEG_STORAGE in found else " (no SEG: the model found no coronary calcium)"
    print(f"latency ({runtime} runtime), last instance acknowledged -> SEG and SR in Orthanc, {slices} slices: "
          f"{latency:.1f} s, "
          f"of which quiet period {quiet_period_s:g} s, processing {latency - quiet_period_s:.1f} s "
          f"(target <= 20 s){seg_note}")
    for offset, message in step_times(work / "node.log", last_acknowledged_wall):
        print(f"  {offset:+6.1f} s  {message}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ingest-slices", type=int, default=600, help="slices of the ingest/memory series (default 600)")
    parser.add_argument("--latency-slices", type=int, default=50, help="slices of the latency study (default 50)")
    parser.add_argument("--quiet-period", type=float, default=2.0, help="quiet period of the latency node, s (default 2)")
    parser.add_argument("--model", default="", help="model checkpoint (default: the shipped model)")
    parser.add_argument("--runtime", default="auto", choices=["auto", "torch", "onnx"],
                        help="[scoring] runtime of the latency node (default auto: ONNX Runtime on the CPU)")
    parser.add_argument("--timeout", type=float, default=600.0, help="latency wait limit, s (default 600)")
    parser.add_argument("--skip-ingest", action="store_true", help="skip the ingest and memory measurement")
    parser.add_argument("--skip-latency", action="store_true", help="skip the latency measurement")
    parser.add_argument("--keep", action="store_true", help="keep the working folder")
    args = parser.parse_args()

    qrm = _shared_data_dir() / "qrm-phantom-toshiba" / "dicom"
    work = Path(tempfile.mkdtemp(prefix="cacs-bench-node-"))
    print(f"working folder {work}; CPU cores available: {len(os.sched_getaffinity(0))}; "
          f"load average {os.getloadavg()[0]:.1f}")
    try:
        if not args.skip_ingest:
            bench_ingest_and_memory(work, qrm, args.ingest_slices)
        if not args.skip_latency:
            bench_latency(
                work / "latency", args.latency_slices, args.quiet_period, args.model, args.timeout, args.runtime
            )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
