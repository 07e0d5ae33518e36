"""End-to-end tests of the node with real DICOM peers: DCMTK storescu as the scanner, Orthanc as the PACS.

One node runs for the whole module, with two destinations:

- "orthanc": a real Orthanc (Debian package) that stores every output,
  including the not-scored notice of a refused series;
- "no-seg-pacs": a pynetdicom Storage SCP that rejects the Segmentation
  Storage presentation context, as an archive without SEG support does.
  Orthanc 1.10 cannot stand in for it: its Lua ReceivedInstanceFilter drops
  a refused instance but still answers 0x0000 Success, so the node could not
  see the refusal.

DCMTK's storescu sends four series to the node: the real QRM phantom scan, a
digital phantom series with coronary calcium, and two series that the node
must refuse: the contrast-enhanced abdominal series (given UIDs here) and a
real CT angiogram whose header records no contrast agent. The pipeline
uses the default model shipped in scoring/models/, so these tests skip until
that model is there.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage

from node.config import parse_settings
from node.folder_scp import FolderStorageSCP
from node.jobs import Job
from tests.dicom_validation import ACCEPTED_WARNINGS, assert_dciodvfy_clean
from tests.factories import make_series_dir
from tests.orthanc import OrthancServer, find_orthanc, free_port, run_orthanc

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"

NODE_AE_TITLE = "CACS_NODE"
SCANNER_AE_TITLE = "SCANNER"

#: UIDs given to the abdominal series, whose files carry none.
ABDOMEN_UID_ROOT = "1.2.826.0.1.3680043.8.498.77."
ABDOMEN_STUDY_UID = ABDOMEN_UID_ROOT + "1"
ABDOMEN_SERIES_UID = ABDOMEN_UID_ROOT + "2"

#: Seconds allowed for scoring the three series on 2 CPU cores, an
#: estimate with a wide margin: inference takes CPU seconds per series.
JOBS_TIMEOUT_S = 900.0


def _dcmtk_tool(name: str) -> str:
    """Return the path of a DCMTK tool; pynetdicom installs apps of the same name earlier on PATH."""
    for candidate in (f"/usr/bin/{name}", shutil.which(name)):
        if not candidate:
            continue
        version = subprocess.run([candidate, "--version"], capture_output=True, text=True, check=False)
        if "dcmtk" in version.stdout.lower():
            return candidate
    pytest.skip(f"DCMTK {name} not found; install the Debian package dcmtk (scripts/test.sh does)")


def _require_default_model() -> None:
    from scoring.inference import default_model_path

    path = default_model_path()
    if not path.is_file():
        pytest.skip(f"the default model {path} is not there yet; the main job needs it")


def _write_abdomen_series(source: Path, target: Path) -> list[str]:
    """Copy the abdominal slices with the SOP Class and UIDs they lack; return their SOP Instance UIDs."""
    target.mkdir(parents=True)
    uids = []
    for index, path in enumerate(sorted(source.iterdir()), start=1):
        dataset = dcmread(path)
        sop_instance_uid = f"{ABDOMEN_UID_ROOT}3.{index}"
        dataset.SOPClassUID = CTImageStorage
        dataset.SOPInstanceUID = sop_instance_uid
        dataset.StudyInstanceUID = ABDOMEN_STUDY_UID
        dataset.SeriesInstanceUID = ABDOMEN_SERIES_UID
        dataset.file_meta.MediaStorageSOPClassUID = CTImageStorage
        dataset.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
        dataset.save_as(target / f"{index:03d}.dcm", enforce_file_format=True)
        uids.append(sop_instance_uid)
    return uids


def _storescu(storescu: str, port: int, folder: Path, *extra: str) -> None:
    command = [
        storescu,
        *extra,
        "--scan-directories",
        "--recurse",
        "-aet",
        SCANNER_AE_TITLE,
        "-aec",
        NODE_AE_TITLE,
        "127.0.0.1",
        str(port),
        str(folder),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert completed.returncode == 0, f"storescu failed ({completed.returncode}): {completed.stderr}"


def _series_uid(folder: Path) -> tuple[str, str]:
    first = next(path for path in sorted(folder.rglob("*")) if path.is_file())
    dataset = dcmread(first, stop_before_pixels=True)
    return str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID)


@dataclass
class MainJobRun:
    """Everything the module's node run produced, for the tests to inspect."""

    orthanc: OrthancServer
    no_seg_received: list[Any]
    jobs: dict[str, Job]
    sends: dict[int, list[dict[str, Any]]]
    series: dict[str, tuple[str, str, Path]]
    abdomen_instances: list[str]
    storage_root: Path
    settings_path: Path


@pytest.fixture(scope="module")
def main_job_run(
    tmp_path_factory: pytest.TempPathFactory, qrm_dicom_dir: Path, abdomen_dicom_dir: Path, chest_cta_hu: np.ndarray
) -> Iterator[MainJobRun]:
    if find_orthanc() is None:
        pytest.skip("Orthanc not found; install the Debian package orthanc (scripts/test.sh does)")
    storescu = _dcmtk_tool("storescu")
    _require_default_model()
    from node.server import NodeServer
    from scoring.phantom import generate_phantom

    work = tmp_path_factory.mktemp("integration")
    # Moderate calcium burden, so the model has coronary calcium to find and a SEG is written.
    generate_phantom(work / "phantom", 7, mode="patient", burden="moderate")
    abdomen_instances = _write_abdomen_series(abdomen_dicom_dir, work / "abdomen")
    # A real CT angiogram whose header records no contrast agent.
    make_series_dir(work / "cta", chest_cta_hu, pixel_spacing=(1.5, 1.5), uid_seed="cta")
    node_port = free_port()

    with run_orthanc(
        work / "orthanc", modalities={"cacs": [NODE_AE_TITLE, "127.0.0.1", node_port]}
    ) as orthanc, FolderStorageSCP(
        work / "no-seg-pacs", ae_title="NO_SEG_PACS", rejected_sop_classes=frozenset({SEG_STORAGE})
    ) as no_seg_pacs:
        settings_text = f"""
[node]
ae_title = "{NODE_AE_TITLE}"
bind_address = "127.0.0.1"
port = {node_port}

[[peers]]
ae_title = "{SCANNER_AE_TITLE}"
host = "127.0.0.1"

[[destinations]]
name = "orthanc"
ae_title = "{orthanc.ae_title}"
host = "127.0.0.1"
port = {orthanc.dicom_port}
outputs = ["seg", "sr", "summary", "notice"]
max_attempts = 2
retry_backoff_s = 0.5

[[destinations]]
name = "no-seg-pacs"
ae_title = "NO_SEG_PACS"
host = "127.0.0.1"
port = {no_seg_pacs.port}
outputs = ["seg", "sr"]
max_attempts = 2
retry_backoff_s = 0.5

[storage]
root = "{(work / "node").as_posix()}"
min_free_space_mb = 16

[scoring]
device = "cpu"
quiet_period_s = 1.0
"""
        settings_path = work / "node.toml"
        settings_path.write_text(settings_text)
        settings = parse_settings(settings_text, base_dir=work, source=str(settings_path))
        server = NodeServer(settings)
        server.start()
        try:
            _storescu(storescu, node_port, qrm_dicom_dir)
            _storescu(storescu, node_port, work / "phantom" / "dicom")
            # -xv proposes JPEG 2000 Lossless, so the files travel compressed as stored.
            _storescu(storescu, node_port, work / "abdomen", "-xv")
            _storescu(storescu, node_port, work / "cta")
            assert server.wait_idle(JOBS_TIMEOUT_S), f"jobs not finished within {JOBS_TIMEOUT_S:g} s"

            assert server.jobs is not None
            series = {
                "qrm": (*_series_uid(qrm_dicom_dir), qrm_dicom_dir),
                "phantom": (*_series_uid(work / "phantom" / "dicom"), work / "phantom" / "dicom"),
                "abdomen": (ABDOMEN_STUDY_UID, ABDOMEN_SERIES_UID, work / "abdomen"),
                "cta": (*_series_uid(work / "cta"), work / "cta"),
            }
            jobs = {}
            sends = {}
            for name, (_, series_uid, _) in series.items():
                series_jobs = server.jobs.jobs_of_series(series_uid)
                assert len(series_jobs) == 1, f"{name}: expected one job, found {series_jobs}"
                jobs[name] = series_jobs[0]
                sends[series_jobs[0].id] = server.jobs.sends(series_jobs[0].id)
        finally:
            server.stop()

        yield MainJobRun(
            orthanc=orthanc,
            no_seg_received=no_seg_pacs.received,
            jobs=jobs,
            sends=sends,
            series=series,
            abdomen_instances=abdomen_instances,
            storage_root=work / "node",
            settings_path=settings_path,
        )


def _outputs_in_orthanc(orthanc: OrthancServer, study_uid: str, source_series_uid: str) -> dict[str, list[Any]]:
    """Return the datasets Orthanc stores in a study besides the source series, by SOP Class UID."""
    found: dict[str, list[Any]] = {}
    for instance in orthanc.instances_of_study(study_uid):
        if instance["tags"].get("SeriesInstanceUID") == source_series_uid:
            continue
        dataset = dcmread(BytesIO(orthanc.instance_file(instance["ID"])))
        found.setdefault(str(dataset.SOPClassUID), []).append(dataset)
    return found


def _sr_total_agatston(sr: Any) -> float:
    from sr_writer import codes
    from sr_writer.sr import find_measurement

    return find_measurement(sr, codes.CORONARY_ARTERY, codes.CORONARY_ARTERY_CALCIUM_SCORE)


def _cli_score(folder: Path, settings_path: Path) -> dict[str, Any]:
    """Run `cacs-node score --json` in a subprocess with the node's settings (mass calibration, policies)."""
    completed = subprocess.run(
        [sys.executable, "-m", "node.cli", "score", str(folder), "--json", "--config", str(settings_path)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, f"cacs-node score failed: {completed.stderr}"
    return json.loads(completed.stdout)


@pytest.mark.parametrize("name", ["qrm", "phantom"])
def test_main_job_scored_series_done(main_job_run: MainJobRun, name: str) -> None:
    job = main_job_run.jobs[name]
    assert job.result is not None

    # no-seg-pacs rejects every SEG, so a job with calcium (and so a SEG)
    # ends failed after sending everything else; a job without one is done.
    expected_state = "failed" if job.result["agatston"]["total"] > 0 else "done"
    assert job.state == expected_state, job.reason
    assert job.instance_count == len([path for path in main_job_run.series[name][2].rglob("*") if path.is_file()])


@pytest.mark.parametrize("name", ["qrm", "phantom"])
def test_main_job_outputs_in_orthanc_same_study(main_job_run: MainJobRun, name: str) -> None:
    study_uid, series_uid, _ = main_job_run.series[name]
    job = main_job_run.jobs[name]

    outputs = _outputs_in_orthanc(main_job_run.orthanc, study_uid, series_uid)

    assert len(outputs.get(COMPREHENSIVE_3D_SR_STORAGE, [])) == 1
    assert len(outputs.get(SECONDARY_CAPTURE_STORAGE, [])) == 1
    # A SEG is written only when calcium was found in a coronary artery.
    expected_seg_count = 1 if job.result["agatston"]["total"] > 0 else 0
    assert len(outputs.get(SEG_STORAGE, [])) == expected_seg_count
    for datasets in outputs.values():
        for dataset in datasets:
            assert dataset.StudyInstanceUID == study_uid


def test_main_job_phantom_has_seg(main_job_run: MainJobRun) -> None:
    study_uid, series_uid, _ = main_job_run.series["phantom"]

    outputs = _outputs_in_orthanc(main_job_run.orthanc, study_uid, series_uid)

    # The phantom has a moderate coronary calcium burden, so the model's
    # SEG must reach Orthanc.
    assert main_job_run.jobs["phantom"].result["agatston"]["total"] > 0
    (seg,) = outputs[SEG_STORAGE]
    referenced = {item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence}
    assert referenced == {series_uid}


@pytest.mark.parametrize("name", ["qrm", "phantom"])
def test_main_job_sr_total_equals_score_cli(main_job_run: MainJobRun, name: str) -> None:
    study_uid, series_uid, folder = main_job_run.series[name]
    (sr,) = _outputs_in_orthanc(main_job_run.orthanc, study_uid, series_uid)[COMPREHENSIVE_3D_SR_STORAGE]

    printed = _cli_score(folder, main_job_run.settings_path)

    # Same files, same default model on the CPU, same scoring: the SR's total
    # Agatston must equal what `cacs-node score --json` prints.
    assert _sr_total_agatston(sr) == pytest.approx(printed["agatston"]["total"], abs=1e-6)
    assert printed["series_instance_uid"] == series_uid


def test_destination_refusing_seg_fails_job_with_reason(main_job_run: MainJobRun) -> None:
    job = main_job_run.jobs["phantom"]

    assert job.state == "failed"
    assert "destination 'no-seg-pacs'" in job.reason
    assert "rejected every presentation context for Segmentation Storage" in job.reason
    assert f"cacs-node retry {job.id}" in job.reason


def test_destination_refusing_seg_still_receives_sr(main_job_run: MainJobRun) -> None:
    job = main_job_run.jobs["phantom"]
    sends = {(row["destination"], row["kind"]): row for row in main_job_run.sends[job.id]}

    received_classes = [item.sop_class_uid for item in main_job_run.no_seg_received]
    assert COMPREHENSIVE_3D_SR_STORAGE in received_classes
    assert SEG_STORAGE not in received_classes
    assert sends[("no-seg-pacs", "sr")]["sent"] == 1
    assert sends[("no-seg-pacs", "seg")]["sent"] == 0
    assert sends[("no-seg-pacs", "seg")]["status"] is None
    # The failing destination does not hold back the other one.
    assert sends[("orthanc", "seg")]["sent"] == 1


def test_abdomen_contrast_series_refused_with_reason(main_job_run: MainJobRun) -> None:
    job = main_job_run.jobs["abdomen"]

    assert job.state == "refused"
    assert "contrast" in job.reason.lower()
    assert job.instance_count == len(main_job_run.abdomen_instances)


def test_abdomen_series_stored_as_jpeg2000(main_job_run: MainJobRun) -> None:
    stored = sorted(
        path for path in (main_job_run.storage_root).rglob("*.dcm") if ABDOMEN_SERIES_UID in str(path)
    )

    assert len(stored) == 20
    dataset = dcmread(stored[0])
    assert dataset.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    # The node decodes JPEG 2000 Lossless: the refusal is about contrast, not pixel data.
    assert dataset.pixel_array.shape == (dataset.Rows, dataset.Columns)


def _notice_in_orthanc(main_job_run: MainJobRun, name: str) -> Any:
    """Return the only instance Orthanc stores in the study of a refused series, checked to be its notice."""
    study_uid, series_uid, _ = main_job_run.series[name]
    instances = main_job_run.orthanc.instances_of_study(study_uid)
    assert len(instances) == 1, f"{name}: expected only the not-scored notice, found {len(instances)} instance(s)"
    notice = dcmread(BytesIO(main_job_run.orthanc.instance_file(instances[0]["ID"])))
    assert notice.SOPClassUID == SecondaryCaptureImageStorage
    assert notice.SeriesInstanceUID != series_uid
    assert notice.SeriesDescription == "CAC not scored (cacs-node 1.0)"
    return notice


def test_abdomen_series_only_notice_sent(main_job_run: MainJobRun) -> None:
    job = main_job_run.jobs["abdomen"]

    # Only the destination that lists "notice" receives one; the other gets nothing.
    assert [(row["destination"], row["kind"], row["sent"]) for row in main_job_run.sends[job.id]] == [
        ("orthanc", "notice", 1)]
    notice = _notice_in_orthanc(main_job_run, "abdomen")
    assert notice.ImageComments.startswith("Calcium score not computed: ")
    assert "contrast" in notice.ImageComments.lower()


def test_cta_without_agent_refused_with_notice(main_job_run: MainJobRun, tmp_path: Path) -> None:
    job = main_job_run.jobs["cta"]

    assert job.state == "refused"
    assert "a 48 mm wide region of 180–700 HU (median 488 HU) around slice 42 of 82 in position order" in job.reason
    assert "as blood enhanced by contrast agent; the header records no agent" in job.reason
    assert job.instance_count == 82
    notice = _notice_in_orthanc(main_job_run, "cta")
    # The comment carries the job's reason, spelled in ASCII.
    assert notice.ImageComments == f"Calcium score not computed: {job.reason.replace('–', '-')}"
    path = tmp_path / "notice.dcm"
    notice.save_as(path, enforce_file_format=True)
    # The test series has no StudyDate and StudyTime, and the notice copies the Study module verbatim.
    assert_dciodvfy_clean(path, accepted=[*ACCEPTED_WARNINGS, "DICOMDIR - Study Date", "DICOMDIR - Study Time"])


def test_orthanc_fixture_answers_rest_and_echo(tmp_path: Path) -> None:
    if find_orthanc() is None:
        pytest.skip("Orthanc not found; install the Debian package orthanc (scripts/test.sh does)")
    from node.scu import echo

    with run_orthanc(tmp_path / "orthanc") as orthanc:
        system = orthanc.get_json("/system")
        result = echo(orthanc.ae_title, "127.0.0.1", orthanc.dicom_port, acse_timeout_s=10.0)

    assert system["DicomAet"] == "ORTHANC"
    assert system["DicomPort"] == orthanc.dicom_port
    assert result.success


def test_send_files_to_orthanc_stored_and_found(tmp_path: Path) -> None:
    if find_orthanc() is None:
        pytest.skip("Orthanc not found; install the Debian package orthanc (scripts/test.sh does)")
    from node.config import Destination, NodeSection
    from node.scu import send_files
    from tests.node.helpers import write_stand_in

    path, sop_instance_uid = write_stand_in(tmp_path, SECONDARY_CAPTURE_STORAGE, PatientID="TEST", Modality="OT")

    with run_orthanc(tmp_path / "orthanc") as orthanc:
        destination = Destination(name="orthanc", ae_title=orthanc.ae_title, host="127.0.0.1", port=orthanc.dicom_port)
        report = send_files([path], destination, calling_ae_title=NODE_AE_TITLE, node_section=NodeSection())
        found = orthanc.find_instances({"SOPInstanceUID": sop_instance_uid})

    assert report.all_sent
    assert report.instances[0].status == 0x0000
    assert len(found) == 1
