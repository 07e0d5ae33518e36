"""Tests of series completion, the job runner, restart and retry, with a fast stand-in pipeline.

The real pipeline (model, writers, SCU) runs in the integration tests. Here
`FakePipeline` scores a series as 10 Agatston per instance and writes two
small stand-in objects (kinds "seg" and "sr"). So the job machinery runs in
well under a second per series.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.cli import main
from node.commands.retry import RetryError, retry_job
from node.config import Destination, NodeSettings
from node.jobs import DONE, FAILED, RECEIVED, REFUSED, InstanceRecord, Job, JobStore
from node.pipeline import ScoringPipeline
from node.scheduler import CompletionScheduler
from node.server import NodeServer
from node.worker import cli_command
from node.storage import InstanceStore
from scoring.errors import NoEligibleSeriesError, SliceSpacingError
from tests.factories import make_ct_datasets
from tests.node.helpers import (
    FakePipeline, make_settings, store_all, untrained_model_version, wait_for, write_untrained_model,
)

PACS = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104, outputs=frozenset({"seg", "sr"}))
ARCHIVE = Destination(name="archive", ae_title="ARCHIVE", host="127.0.0.1", port=105, outputs=frozenset({"seg", "sr"}))


@pytest.fixture
def settings(tmp_path: Path) -> NodeSettings:
    return make_settings(tmp_path / "storage", destinations=(PACS, ARCHIVE))


@pytest.fixture
def pipeline() -> FakePipeline:
    return FakePipeline()


@pytest.fixture
def node(settings: NodeSettings, pipeline: FakePipeline) -> Iterator[NodeServer]:
    server = NodeServer(settings, pipeline=pipeline)
    server.start()
    yield server
    server.stop()


def _score_one_series(settings: NodeSettings, pipeline: FakePipeline, series: str | list[pydicom.Dataset]) -> Job:
    """Start a node, send it one series, wait until its job ends, stop the node; return the job.

    series: the datasets to send, or the UID seed of a new `make_ct_datasets` series.
    """
    server = NodeServer(settings, pipeline=pipeline)
    server.start()
    try:
        datasets = make_ct_datasets(uid_seed=series) if isinstance(series, str) else series
        store_all(server.port, datasets)
        assert server.wait_idle(20)
        return _jobs(server).jobs_of_series(str(datasets[0].SeriesInstanceUID))[0]
    finally:
        server.stop()


def _jobs(server: NodeServer) -> JobStore:
    if server.jobs is None:
        raise AssertionError("node not started")
    return server.jobs


# Series completion without sockets: the clock is passed to poll().


def _record(store: JobStore, series: str, sop: str, at: float) -> None:
    record = InstanceRecord(sop, series, "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1", f"{sop}.dcm", sop, 1, at)
    store.record_instance(record, "1.2.9")


def test_scheduler_quiet_period_spans_pauses(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    submitted: list[int] = []
    scheduler = CompletionScheduler(store, 3.0, submitted.append, lambda _job_id: False)
    scheduler.started_at = 1000.0
    # Three bursts 2 s apart (shorter than the 3 s quiet period), as three associations would send them.
    for index, at in enumerate((1000.0, 1002.0, 1004.0)):
        _record(store, "1.2.3", f"1.2.3.{index}", at)

    assert scheduler.poll(now=1006.9) == []
    assert scheduler.poll(now=1007.1) == [1]
    assert store.job(1).instance_count == 3
    assert scheduler.poll(now=1100.0) == [1]  # still received: submitted again since the worker does not hold it
    store.close()


def test_scheduler_restart_counts_quiet_period_from_start(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    _record(store, "1.2.3", "1.2.3.1", 1000.0)
    scheduler = CompletionScheduler(store, 3.0, lambda _job_id: None, lambda _job_id: True)
    scheduler.started_at = 2000.0  # the node restarted long after the last instance

    assert store.due_series(3.0, 2002.0, scheduler.started_at) == []
    assert store.due_series(3.0, 2003.0, scheduler.started_at) == ["1.2.3"]
    store.close()


def test_open_job_for_series_unstarted_job_absorbs_instances(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite3")
    _record(store, "1.2.3", "1.2.3.1", 1000.0)
    first = store.open_job_for_series("1.2.3")
    _record(store, "1.2.3", "1.2.3.2", 1001.0)

    second = store.open_job_for_series("1.2.3")

    assert first is not None and first.state == RECEIVED
    assert second is None
    assert store.pending_series_count() == 0
    store.close()


# The node end to end with the stand-in pipeline.


def test_series_split_over_three_associations_scored_once(tmp_path: Path, pipeline: FakePipeline) -> None:
    # The quiet period is 3 s, so the pauses between associations stay shorter even on a loaded test machine.
    settings = make_settings(tmp_path / "storage", destinations=(PACS, ARCHIVE), quiet_period_s=3.0)
    node = NodeServer(settings, pipeline=pipeline)
    node.start()
    try:
        datasets = make_ct_datasets(uid_seed="split")
        for part in (datasets[:2], datasets[2:4], datasets[4:]):
            assert store_all(node.port, part) == [0x0000] * len(part)
        assert node.wait_idle(20)
        jobs = _jobs(node).jobs_of_series(str(datasets[0].SeriesInstanceUID))
    finally:
        node.stop()

    assert [(job.state, job.instance_count) for job in jobs] == [(DONE, 5)]
    assert len(pipeline.scored) == 1
    assert len(pipeline.scored[0]) == 5
    # 10 Agatston per instance in the stand-in pipeline: 5 × 10.
    assert jobs[0].result is not None and jobs[0].result["agatston"]["total"] == 50.0
    assert sorted(pipeline.sent) == [("archive", ["seg", "sr"]), ("pacs", ["seg", "sr"])]


def test_late_instance_rescore_supersedes_sr(node: NodeServer, pipeline: FakePipeline) -> None:
    datasets = make_ct_datasets(uid_seed="late")
    store_all(node.port, datasets[:4])
    assert node.wait_idle(20)
    store_all(node.port, datasets[4:])
    assert node.wait_idle(20)

    store = _jobs(node)
    first, second = store.jobs_of_series(str(datasets[0].SeriesInstanceUID))
    assert (first.state, first.instance_count) == (DONE, 4)
    assert (second.state, second.instance_count, second.supersedes_job_id) == (DONE, 5, first.id)
    # The second write got the first job's SR as predecessor.
    first_sr_uid = store.outputs(first.id)["sr"][1]
    assert pipeline.predecessors[0] is None
    assert str(pipeline.predecessors[1].SOPInstanceUID) == first_sr_uid


def test_instance_during_scoring_triggers_second_job(settings: NodeSettings) -> None:
    pipeline = FakePipeline(score_delay_s=1.0)
    server = NodeServer(settings, pipeline=pipeline)
    server.start()
    try:
        datasets = make_ct_datasets(uid_seed="during")
        store_all(server.port, datasets[:4])
        wait_for(pipeline.started.is_set, 20, "scoring did not start")
        store_all(server.port, datasets[4:])
        assert server.wait_idle(30)
        jobs = _jobs(server).jobs_of_series(str(datasets[0].SeriesInstanceUID))
    finally:
        server.stop()

    assert [(job.state, job.instance_count) for job in jobs] == [(DONE, 4), (DONE, 5)]
    assert jobs[1].supersedes_job_id == jobs[0].id
    assert [len(paths) for paths in pipeline.scored] == [4, 5]


def test_restart_mid_series_loses_nothing(settings: NodeSettings) -> None:
    datasets = make_ct_datasets(uid_seed="restart")
    first = NodeServer(settings, pipeline=FakePipeline())
    first.start()
    assert store_all(first.port, datasets[:3]) == [0x0000] * 3
    first.stop()

    pipeline = FakePipeline()
    second = NodeServer(settings, pipeline=pipeline)
    second.start()
    try:
        assert store_all(second.port, datasets[3:]) == [0x0000] * 2
        assert second.wait_idle(20)
        jobs = _jobs(second).jobs_of_series(str(datasets[0].SeriesInstanceUID))
    finally:
        second.stop()

    assert [(job.state, job.instance_count) for job in jobs] == [(DONE, 5)]
    assert len(pipeline.scored[0]) == 5


def test_restart_during_scoring_scores_again(settings: NodeSettings) -> None:
    datasets = make_ct_datasets(uid_seed="interrupted")
    slow = FakePipeline(score_delay_s=1.0)
    first = NodeServer(settings, pipeline=slow)
    first.start()
    store_all(first.port, datasets)
    wait_for(slow.started.is_set, 20, "scoring did not start")
    first.stop()

    pipeline = FakePipeline()
    second = NodeServer(settings, pipeline=pipeline)
    second.start()
    try:
        assert second.wait_idle(20)
        store = _jobs(second)
        jobs = store.jobs_of_series(str(datasets[0].SeriesInstanceUID))
        events = [event["message"] for event in store.events(jobs[0].id)]
    finally:
        second.stop()

    assert [(job.state, job.attempts) for job in jobs] == [(DONE, 2)]
    assert "interrupted by a stop of the node; scoring again" in events
    assert len(pipeline.scored) == 1


def test_series_error_refuses_job_with_message(settings: NodeSettings) -> None:
    message = "series 1.2.3 has slices 4.5 and 9.0 mm apart; expected a uniform 3.0 mm spacing"
    job = _score_one_series(settings, FakePipeline(refuse_with=SliceSpacingError(message)), "refused")

    assert (job.state, job.reason) == (REFUSED, message)


NOTICE_PACS = Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=104,
                          outputs=frozenset({"seg", "sr", "notice"}))


def test_refused_series_sends_notice(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "storage", destinations=(NOTICE_PACS, ARCHIVE))
    message = "series 1.2.3 has slices 4.5 and 9.0 mm apart; expected a uniform 3.0 mm spacing"
    pipeline = FakePipeline(refuse_with=SliceSpacingError(message))
    job = _score_one_series(settings, pipeline, "notice")

    # The job stays refused with its reason; only the destination listing "notice" gets the notice.
    assert (job.state, job.reason) == (REFUSED, message)
    assert pipeline.notices == [message]
    assert pipeline.sent == [("pacs", ["notice"])]
    store = JobStore(settings.storage.root / "jobs.sqlite3")
    try:
        outputs = store.outputs(job.id)
        sends = store.sends(job.id)
    finally:
        store.close()
    assert list(outputs) == ["notice"]
    assert [(row["destination"], row["kind"], row["sent"]) for row in sends] == [("pacs", "notice", 1)]


def test_notice_not_sent_is_named_in_reason(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "storage", destinations=(NOTICE_PACS,))
    pipeline = FakePipeline(refuse_with=SliceSpacingError("series has a gap"), refused_kinds={"pacs": {"notice"}})
    job = _score_one_series(settings, pipeline, "notice-refused")

    assert job.state == REFUSED
    assert job.reason.startswith("series has a gap. The not-scored notice was not sent: ")
    assert "notice not accepted" in job.reason


def test_notice_not_written_is_named_in_reason(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "storage", destinations=(NOTICE_PACS,))
    pipeline = FakePipeline(refuse_with=SliceSpacingError("series has a gap"),
                            notice_error=ValueError("no readable header"))
    job = _score_one_series(settings, pipeline, "notice-unwritten")

    assert (job.state, job.reason) == (
        REFUSED, "series has a gap. The not-scored notice could not be written: ValueError: no readable header")
    assert pipeline.sent == []


def test_series_without_ct_images_gets_no_notice(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "storage", destinations=(NOTICE_PACS,))
    pipeline = FakePipeline(refuse_with=NoEligibleSeriesError("the series has 2 localizer image(s)"))
    job = _score_one_series(settings, pipeline, "notice-localizer")

    assert job.state == REFUSED
    assert pipeline.notices == []
    assert pipeline.sent == []


def test_destination_refusing_seg_fails_job_other_sends_continue(settings: NodeSettings) -> None:
    pipeline = FakePipeline(refused_kinds={"pacs": {"seg"}})
    server = NodeServer(settings, pipeline=pipeline)
    server.start()
    try:
        datasets = make_ct_datasets(uid_seed="refuse-seg")
        store_all(server.port, datasets)
        assert server.wait_idle(20)
        store = _jobs(server)
        job = store.jobs_of_series(str(datasets[0].SeriesInstanceUID))[0]
        sends = {(row["destination"], row["kind"]): (row["sent"], row["status"]) for row in store.sends(job.id)}

        assert job.state == FAILED
        assert "destination 'pacs' refused" in job.reason
        assert "status 0xA900 seg not accepted" in job.reason
        assert f"cacs-node retry {job.id}" in job.reason
        assert sends == {
            ("archive", "seg"): (1, 0x0000),
            ("archive", "sr"): (1, 0x0000),
            ("pacs", "seg"): (0, 0xA900),
            ("pacs", "sr"): (1, 0x0000),
        }

        # The operator fixes the PACS and retries: only the refused SEG is sent again.
        pipeline.refused_kinds.clear()
        pipeline.sent.clear()
        message = retry_job(settings, job.id)
        assert message == f"job {job.id} queued: the running node sends the outputs not yet stored"
        wait_for(lambda: store.job(job.id).state == DONE, 20, "retried job did not finish")
    finally:
        server.stop()

    assert pipeline.sent == [("pacs", ["seg"])]
    assert len(pipeline.scored) == 1


def test_retry_done_job_needs_force_then_rescores(node: NodeServer, settings: NodeSettings, pipeline: FakePipeline) -> None:
    datasets = make_ct_datasets(uid_seed="force")
    store_all(node.port, datasets)
    assert node.wait_idle(20)
    job = _jobs(node).jobs_of_series(str(datasets[0].SeriesInstanceUID))[0]

    first_sr_uid = _jobs(node).outputs(job.id)["sr"][1]

    with pytest.raises(RetryError, match=f"job {job.id} is done; add --force"):
        retry_job(settings, job.id)
    retry_job(settings, job.id, force=True)
    wait_for(lambda: _jobs(node).job(job.id).state == DONE and len(pipeline.scored) == 2, 20, "forced job not rescored")

    # The SR of the forced re-run supersedes the SR the same job sent before.
    assert str(pipeline.predecessors[1].SOPInstanceUID) == first_sr_uid
    assert _jobs(node).outputs(job.id)["sr"][1] != first_sr_uid


def test_rescored_job_refused_drops_earlier_score(node: NodeServer, settings: NodeSettings,
                                                  pipeline: FakePipeline) -> None:
    datasets = make_ct_datasets(uid_seed="drop-score")
    store_all(node.port, datasets)
    assert node.wait_idle(20)
    store = _jobs(node)
    job = store.jobs_of_series(str(datasets[0].SeriesInstanceUID))[0]
    assert store.job(job.id).to_json()["agatston_total"] == 50.0

    pipeline.refuse_with = SliceSpacingError("series has a gap")
    retry_job(settings, job.id, force=True)
    wait_for(lambda: store.job(job.id).state == REFUSED, 20, "forced job not refused")

    refused = store.job(job.id).to_json()
    assert (refused["agatston_total"], refused["risk_category"]) == (None, None)


def test_same_instances_same_model_not_scored_twice(node: NodeServer, pipeline: FakePipeline) -> None:
    datasets = make_ct_datasets(uid_seed="once")
    store_all(node.port, datasets)
    assert node.wait_idle(20)
    store = _jobs(node)
    first = store.jobs_of_series(str(datasets[0].SeriesInstanceUID))[0]

    # A second job over the same instances, as a copy of the series arriving under a new job would make.
    with store._transaction() as cursor:  # noqa: SLF001 - test reaches into the store to build the case
        cursor.execute(
            "INSERT INTO jobs (series_instance_uid, study_instance_uid, state, created_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?)",
            (first.series_instance_uid, first.study_instance_uid, RECEIVED, time.time(), time.time()),
        )
    wait_for(lambda: store.active_job_count() == 0, 20, "second job did not finish")

    second = store.jobs_of_series(first.series_instance_uid)[1]
    assert second.state == DONE
    assert second.reason.startswith(f"not scored again: job {first.id} already scored these 5 instance(s)")
    assert len(pipeline.scored) == 1


def test_retry_conflict_needs_choice_then_keep_stored_scores(node: NodeServer, settings: NodeSettings,
                                                             pipeline: FakePipeline) -> None:
    datasets = make_ct_datasets(uid_seed="resolve")
    changed = make_ct_datasets(uid_seed="resolve")
    changed[0].WindowWidth = 1500
    store_all(node.port, datasets)
    store_all(node.port, changed[:1])
    assert node.wait_idle(20)
    store = _jobs(node)
    job = store.jobs_of_series(str(datasets[0].SeriesInstanceUID))[-1]
    assert job.state == REFUSED

    with pytest.raises(RetryError, match="Add --keep-stored or --take-new"):
        retry_job(settings, job.id)
    message = retry_job(settings, job.id, keep_stored=True)
    wait_for(lambda: store.job(job.id).state == DONE, 20, "job not scored after the conflict was resolved")

    assert "kept the stored copies and deleted 1 re-sent copy(ies)" in message
    assert store.series_conflict(job.series_instance_uid) == ""
    assert list(node.store.conflicts.rglob("*.dcm")) == []
    assert len(pipeline.scored) == 1


def test_retry_conflict_take_new_replaces_instance(node: NodeServer, settings: NodeSettings) -> None:
    datasets = make_ct_datasets(uid_seed="take-new")
    changed = make_ct_datasets(uid_seed="take-new")
    changed[1].WindowWidth = 1500
    store_all(node.port, datasets)
    store_all(node.port, changed[1:2])
    assert node.wait_idle(20)
    store = _jobs(node)
    job = store.jobs_of_series(str(datasets[0].SeriesInstanceUID))[-1]

    retry_job(settings, job.id, take_new=True)
    wait_for(lambda: store.job(job.id).state == DONE, 20, "job not scored after taking the new copy")

    record = store.find_instance(str(changed[1].SOPInstanceUID))
    assert record is not None
    assert pydicom.dcmread(node.store.absolute(record.path)).WindowWidth == 1500


def test_damaged_instance_set_aside_by_retry(
    settings: NodeSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The node was started from a settings file, so the advice names it.
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\nroot = "{settings.storage.root}"\n', encoding="utf-8")
    pipeline = FakePipeline(load_series=True)
    server = NodeServer(dataclasses.replace(settings, path=config), pipeline=pipeline)
    server.start()
    try:
        datasets = make_ct_datasets(uid_seed="damaged")
        # The last slice by position: without it the series still has no gap.
        del datasets[-1].PixelData
        damaged_uid = str(datasets[-1].SOPInstanceUID)
        store_all(server.port, datasets)
        assert server.wait_idle(20)
        store = _jobs(server)
        job = store.jobs_of_series(str(datasets[0].SeriesInstanceUID))[0]
        assert job.state == REFUSED
        assert "is a CT image without PixelData (7FE0,0010)" in job.reason
        advice = f"{cli_command()} retry --config {config} {job.id} --remove-instance {damaged_uid}"
        assert f"To score the series without the damaged instance(s), run `{advice}`. " in job.reason
        assert job.reason.endswith("without a middle slice the series has a gap")
        # The command is the one installed beside the running Python, so it runs outside the virtual environment.
        assert Path(cli_command()).is_file()
        stored = store.find_instance(damaged_uid)
        assert stored is not None
        stored_bytes = server.store.absolute(stored.path).read_bytes()

        with pytest.raises(RetryError, match=f"has no stored instance 1.2.3.4; `cacs-node status {job.id}`"):
            retry_job(settings, job.id, remove=["1.2.3.4"])
        # Settings read from a file: the suggested command names it.
        with pytest.raises(RetryError, match=f"`cacs-node status --config {config} {job.id}` names the series"):
            retry_job(dataclasses.replace(settings, path=config), job.id, remove=["1.2.3.4"])
        all_uids = [str(dataset.SOPInstanceUID) for dataset in datasets]
        with pytest.raises(RetryError, match="removing 5 instance\\(s\\) would leave series .* empty"):
            retry_job(settings, job.id, remove=all_uids)
        assert len(store.series_instances(job.series_instance_uid)) == 5

        # The advice runs as given.
        assert main(shlex.split(advice)[1:]) == 0
        wait_for(lambda: store.job(job.id).state == DONE, 20, "job not scored after the instance was set aside")
        assert store.find_instance(damaged_uid) is None
    finally:
        server.stop()

    assert capsys.readouterr().out == (f"job {job.id} queued: the running node scores the series again "
                                       f"(set aside instance(s) {damaged_uid} under {server.store.removed})\n")
    # The four remaining slices were scored; the set-aside file is kept byte for byte.
    assert [len(paths) for paths in pipeline.scored] == [5, 4]
    set_aside_file = server.store.removed_path(job.series_instance_uid, damaged_uid, stored.digest)
    assert set_aside_file.read_bytes() == stored_bytes
    assert not server.store.absolute(stored.path).exists()


@pytest.mark.parametrize("damaged_indices", [(0, 4), (0, 1, 2, 3, 4)], ids=["two", "all"])
def test_damaged_instances_named_in_one_reason(settings: NodeSettings, damaged_indices: tuple[int, ...]) -> None:
    datasets = make_ct_datasets(uid_seed=f"damaged-{len(damaged_indices)}")
    for index in damaged_indices:
        del datasets[index].PixelData
    job = _score_one_series(settings, FakePipeline(load_series=True), datasets)

    assert job.state == REFUSED
    assert job.reason.startswith(f"{len(damaged_indices)} instances are damaged: ")
    if len(damaged_indices) == len(datasets):
        assert job.reason.endswith("Every instance of the series is damaged: re-send the series")
    else:
        options = " ".join(f"--remove-instance {datasets[index].SOPInstanceUID}" for index in sorted(
            damaged_indices, key=lambda index: str(datasets[index].SOPInstanceUID)))
        assert f"run `{cli_command()} retry {job.id} {options}`. " in job.reason


@pytest.mark.parametrize("option", ["--keep-stored", "--take-new"])
def test_retry_resolution_without_conflict_rejected(node: NodeServer, tmp_path: Path, option: str,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = node.pipeline
    assert isinstance(pipeline, FakePipeline)
    pipeline.refuse_with = SliceSpacingError("series has a gap")
    datasets = make_ct_datasets(uid_seed=f"no-conflict{option}")
    store_all(node.port, datasets)
    assert node.wait_idle(20)
    job = _jobs(node).jobs_of_series(str(datasets[0].SeriesInstanceUID))[0]
    assert job.state == REFUSED
    path = tmp_path / "node.toml"
    path.write_text(f'[storage]\nroot = "{node.store.root}"\n', encoding="utf-8")

    status = main(["retry", str(job.id), option, "--config", str(path)])

    assert status == 1
    assert capsys.readouterr().err == (
        f"cacs-node retry: job {job.id}: series {job.series_instance_uid} has no conflicting instances, "
        f"so {option} has nothing to resolve; run `cacs-node retry {job.id}` without it\n"
    )
    # The job was not queued again.
    assert _jobs(node).job(job.id).state == REFUSED


# Command line.


def test_check_config_bad_file_lists_problems_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[node]\nport = 0\nae_title = ""\n[scoring]\ndevice = "tpu"\n', encoding="utf-8")

    status = main(["check-config", "--config", str(path)])

    error = capsys.readouterr().err
    assert status == 1
    assert "3 problem(s)" in error
    assert "[node] port = 0" in error
    assert "[node] ae_title = ''" in error
    assert "[scoring] device = 'tpu'" in error


def test_check_config_valid_file_exits_0(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_untrained_model(tmp_path / "model.pt")
    path = tmp_path / "node.toml"
    path.write_text('[storage]\nroot = "data"\n[scoring]\nmodel_path = "model.pt"\ndevice = "cpu"\n',
                    encoding="utf-8")

    assert main(["check-config", "--config", str(path)]) == 0
    output = capsys.readouterr().out
    assert f"storage root {tmp_path / 'data'}" in output
    # The version comes from the checkpoint's weights, so the model was really loaded.
    assert f"(version {untrained_model_version(tmp_path / 'model.pt')})" in output
    # The file lists no peers, so every caller would be rejected.
    assert "  warning: no [[peers]] and accept_unknown_peers = false: every calling AE title is rejected" in output


def test_check_config_random_bytes_model_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "model.pt").write_bytes(bytes(range(256)) * 8)
    path = tmp_path / "node.toml"
    path.write_text('[storage]\nroot = "data"\n[scoring]\nmodel_path = "model.pt"\ndevice = "cpu"\n',
                    encoding="utf-8")

    assert main(["check-config", "--config", str(path)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"model file {tmp_path / 'model.pt'} cannot be read (UnpicklingError): it is damaged" in captured.err
    # torch's own explanation of weights_only loading is left out.
    assert "weights_only" not in captured.err
    assert captured.err.splitlines()[0] == f"cacs-node check-config: {path}: 1 problem(s) in the node settings:"
    assert len(captured.err.splitlines()) == 2


def test_check_config_lists_all_problem_kinds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "model.pt").write_bytes(b"not a model")
    path = tmp_path / "node.toml"
    path.write_text('[node]\nport = 0\n[storage]\nroot = "/proc/cacs-node-data"\n'
                    '[scoring]\nmodel_path = "model.pt"\ndevice = "cpu"\n', encoding="utf-8")

    assert main(["check-config", "--config", str(path)]) == 1
    lines = capsys.readouterr().err.splitlines()
    # One run names the key, the storage root and the model, so the engineer fixes all three at once.
    assert lines[0] == f"cacs-node check-config: {path}: 3 problem(s) in the node settings:"
    assert lines[1] == "  - [node] port = 0: a TCP port is between 1 and 65535"
    assert lines[2].startswith("  - [storage] root /proc/cacs-node-data: this user cannot create "
                               "/proc/cacs-node-data in /proc")
    assert lines[3].startswith(f"  - [scoring] model: model file {tmp_path / 'model.pt'} cannot be read")
    assert len(lines) == 4


def test_serve_unloadable_model_refuses_to_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "model.pt").write_bytes(b"not a model")
    path = tmp_path / "node.toml"
    path.write_text('[storage]\nroot = "data"\n[scoring]\nmodel_path = "model.pt"\ndevice = "cpu"\n',
                    encoding="utf-8")

    assert main(["serve", "--config", str(path)]) == 1
    error = capsys.readouterr().err
    assert f"cacs-node serve: not starting: model file {tmp_path / 'model.pt'} cannot be read" in error
    # Nothing was created: the node did not start.
    assert not (tmp_path / "data").exists()


def test_check_config_missing_shipped_model_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import scoring.inference

    monkeypatch.setattr(scoring.inference, "default_model_path", lambda: tmp_path / "absent.pt")
    path = tmp_path / "node.toml"
    path.write_text('[storage]\nroot = "data"\n', encoding="utf-8")

    assert main(["check-config", "--config", str(path)]) == 1
    assert f"the shipped model {tmp_path / 'absent.pt'} is missing" in capsys.readouterr().err


def test_serve_bad_config_refuses_to_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.toml"
    path.write_text('[node]\nmax_associations = 0\n', encoding="utf-8")

    status = main(["serve", "--config", str(path)])

    assert status == 2
    assert "not starting" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_status_json_lists_jobs(node: NodeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    datasets = make_ct_datasets(uid_seed="status")
    store_all(node.port, datasets)
    assert node.wait_idle(20)
    path = tmp_path / "node.toml"
    path.write_text(f'[storage]\nroot = "{node.store.root}"\n', encoding="utf-8")

    assert main(["status", "--config", str(path), "--json"]) == 0

    listed = json.loads(capsys.readouterr().out)["jobs"]
    assert [(job["state"], job["instance_count"], job["agatston_total"]) for job in listed] == [(DONE, 5, 50.0)]
    assert listed[0]["series_instance_uid"] == str(datasets[0].SeriesInstanceUID)


def test_stop_with_open_association_keeps_acknowledged(settings: NodeSettings) -> None:
    from tests.node.helpers import associate

    datasets = make_ct_datasets(uid_seed="open-association")
    first = NodeServer(settings, pipeline=FakePipeline())
    first.start()
    ae, assoc = associate(first.port)
    statuses = [int(assoc.send_c_store(dataset).Status) for dataset in datasets[:3]]
    first.stop()  # the association is still open and gets aborted
    aborted = assoc.is_aborted
    ae.shutdown()

    pipeline = FakePipeline()
    second = NodeServer(settings, pipeline=pipeline)
    second.start()
    try:
        assert store_all(second.port, datasets[3:]) == [0x0000] * 2
        assert second.wait_idle(20)
        jobs = _jobs(second).jobs_of_series(str(datasets[0].SeriesInstanceUID))
    finally:
        second.stop()

    assert statuses == [0x0000] * 3
    assert aborted
    assert [(job.state, job.instance_count) for job in jobs] == [(DONE, 5)]


def test_node_logs_omit_patient_identifiers(node: NodeServer, caplog: pytest.LogCaptureFixture) -> None:
    datasets = make_ct_datasets(uid_seed="privacy", patient_name="DOE^JANE", patient_id="MRN-123456")

    with caplog.at_level("DEBUG"):
        store_all(node.port, datasets)
        assert node.wait_idle(20)

    # Logged: the series and job lines; never the patient's name or ID.
    assert str(datasets[0].SeriesInstanceUID) in caplog.text
    assert "DOE" not in caplog.text
    assert "MRN-123456" not in caplog.text


def test_start_registers_file_left_unregistered(settings: NodeSettings, pipeline: FakePipeline) -> None:
    from node.storage import TEMPORARY_PREFIX, InstanceStore

    # A stop between the rename and the database insert leaves a file the job store does not know.
    datasets = make_ct_datasets(uid_seed="orphan")[:2]
    store = InstanceStore(settings.storage.root, 0)
    store.create_layout()
    for dataset in datasets:
        path = store.instance_path(str(dataset.StudyInstanceUID), str(dataset.SeriesInstanceUID),
                                   str(dataset.SOPInstanceUID))
        path.parent.mkdir(parents=True, exist_ok=True)
        dataset.save_as(path, enforce_file_format=True)
    stale = path.parent / f"{TEMPORARY_PREFIX}x.tmp"
    stale.write_bytes(b"partial")

    server = NodeServer(settings, pipeline=pipeline)
    server.start()
    try:
        assert server.wait_idle(20)
        jobs = _jobs(server).jobs_of_series(str(datasets[0].SeriesInstanceUID))
        # The registered digest equals the SCP's, so re-sending the same instance is a duplicate.
        assert store_all(server.port, datasets[:1]) == [0x0000]
        assert _jobs(server).series_conflict(str(datasets[0].SeriesInstanceUID)) == ""
    finally:
        server.stop()

    assert [(job.state, job.instance_count) for job in jobs] == [(DONE, 2)]
    assert not stale.exists()


def test_serve_runs_until_sigterm_exits_0(tmp_path: Path) -> None:
    import signal
    import socket
    import subprocess
    import sys

    from tests.node.helpers import SCANNER_AE, dcmtk_tool, free_port

    port = free_port()
    write_untrained_model(tmp_path / "model.pt")
    path = tmp_path / "node.toml"
    path.write_text(
        f'[node]\nbind_address = "127.0.0.1"\nport = {port}\n'
        f'[[peers]]\nae_title = "{SCANNER_AE}"\nhost = "127.0.0.1"\n'
        f'[storage]\nroot = "data"\nmin_free_space_mb = 0\n[scoring]\nmodel_path = "model.pt"\n',
        encoding="utf-8",
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "serve", "--config", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        echo = [dcmtk_tool("echoscu"), "-aet", SCANNER_AE, "-aec", "CACS_NODE", "127.0.0.1", str(port)]
        wait_for(lambda: subprocess.run(echo, capture_output=True, timeout=10).returncode == 0, 60,
                 "serve did not answer C-ECHO")
        invalid = make_ct_datasets(uid_seed="serve-invalid-uid")[0]
        invalid.StudyInstanceUID = "1.2.3/../../etc"
        invalid_status = store_all(port, [invalid])
        # An A-ASSOCIATE-RQ PDU (type 0x01) whose 20-byte body is not a valid request.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
            connection.sendall(b"\x01\x00\x00\x00\x00\x14" + b"\xab" * 20)
            connection.recv(1024)
        wait_for(lambda: subprocess.run(echo, capture_output=True, timeout=10).returncode == 0, 60,
                 "serve stopped answering C-ECHO after the garbage PDU")
    finally:
        process.send_signal(signal.SIGTERM)
        _stdout, stderr = process.communicate(timeout=60)

    assert process.returncode == 0, stderr
    assert invalid_status == [0xC211]
    # One line for the invalid UID, no pydicom value warnings, no traceback for the garbage PDU.
    assert sum("response status 0xC211" in line for line in stderr.splitlines()) == 1
    assert "Invalid value for VR UI" not in stderr
    assert "Traceback" not in stderr, stderr
    assert "received SIGTERM, stopping" in stderr
    assert "cacs-node CACS_NODE stopped" in stderr
    assert (tmp_path / "data" / "jobs.sqlite3").is_file()


class _LoaderOnlyPipeline(ScoringPipeline):
    """The real pipeline without a model: load_series runs, and reaching the model fails the job."""

    def model_version(self) -> str:
        return "no-model-1"

    def _loaded_model(self) -> object:
        raise RuntimeError("the test pipeline has no model; load_series should have refused the series")


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "PatientID", "FrameOfReferenceUID"])
def test_series_mixed_identity_refused_naming_attribute(settings: NodeSettings, keyword: str) -> None:
    datasets = make_ct_datasets(uid_seed=f"mixed-{keyword}")
    odd = datasets[2]
    setattr(odd, keyword, generate_uid() if keyword != "PatientID" else "OTHER-PATIENT-77")
    server = NodeServer(settings, pipeline=_LoaderOnlyPipeline(settings))
    server.start()
    try:
        assert store_all(server.port, datasets) == [0x0000] * len(datasets)
        assert server.wait_idle(30)
        jobs = _jobs(server).jobs_of_series(str(datasets[0].SeriesInstanceUID))
    finally:
        server.stop()

    # One series UID means one job; it is refused by the loader before any model run.
    assert [job.state for job in jobs] == [REFUSED]
    reason = jobs[0].reason
    # 5 instances, 4 with the common value and 1 with the odd one.
    assert "has 5 instances with 2 different values" in reason
    assert f"of {keyword}" in reason
    assert str(odd.SOPInstanceUID) in reason
    assert "OTHER-PATIENT-77" not in reason


def test_series_contrast_with_gap_refused_for_contrast(settings: NodeSettings) -> None:
    datasets = make_ct_datasets(hu=None, uid_seed="contrast-gap")
    for dataset in datasets:
        dataset.ContrastBolusAgent = "IOPAMIDOL"
    del datasets[2]  # a gap between slices 2 and 4
    server = NodeServer(settings, pipeline=_LoaderOnlyPipeline(settings))
    server.start()
    try:
        store_all(server.port, datasets)
        assert server.wait_idle(30)
        jobs = _jobs(server).jobs_of_series(str(datasets[0].SeriesInstanceUID))
    finally:
        server.stop()

    # contrast_policy defaults to "refuse"; re-sending would close the gap but
    # never remove the contrast agent, so the contrast is the reason given.
    assert [job.state for job in jobs] == [REFUSED]
    assert "contrast" in jobs[0].reason.lower()
    assert "gap" not in jobs[0].reason.lower()


def test_instance_uid_reused_in_other_series_refused_naming_both(node: NodeServer, settings: NodeSettings) -> None:
    datasets = make_ct_datasets(uid_seed="reused-first")
    store_all(node.port, datasets)
    assert node.wait_idle(20)
    reused = make_ct_datasets(uid_seed="reused-first")[0]
    reused.SeriesInstanceUID = generate_uid()
    first_series, second_series = str(datasets[0].SeriesInstanceUID), str(reused.SeriesInstanceUID)

    assert store_all(node.port, [reused]) == [0x0000]
    assert node.wait_idle(20)
    store = _jobs(node)
    second_jobs = store.jobs_of_series(second_series)

    # The stored series keeps its instance and its done job.
    assert [job.state for job in store.jobs_of_series(first_series)] == [DONE]
    assert store.find_instance(str(reused.SOPInstanceUID)).series_instance_uid == first_series
    assert [(job.state, job.instance_count) for job in second_jobs] == [(REFUSED, 0)]
    assert second_jobs[0].reason.startswith(
        f"series {second_series} reuses 1 SOP Instance UID(s) ({reused.SOPInstanceUID}) already stored in "
        f"series {first_series}: "
    )
    with pytest.raises(RetryError, match=f"--take-new would move instance {reused.SOPInstanceUID} out of series"):
        retry_job(settings, second_jobs[0].id, take_new=True)


def test_status_shows_receiving_series_and_conflict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "storage"
    root.mkdir()
    store = JobStore(InstanceStore(root, 0).database_path)
    received_at = time.time()
    for index in range(3):
        _record(store, "1.2.3", f"1.2.3.{index}", received_at)
    # 1.2.4 arrives a second later, so it is listed first.
    _record(store, "1.2.4", "1.2.4.1", received_at + 1)
    store.record_conflict("1.2.4.1", "1.2.4", "1.2", "conflicts/x.dcm", "f" * 64, received_at=received_at + 1)
    store.close()
    path = tmp_path / "node.toml"
    path.write_text(f'[storage]\nroot = "{root}"\n', encoding="utf-8")

    assert main(["status", "--config", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    # No node has the storage root locked, so the series wait for its next start.
    assert lines[0] == (f"node: not running (no cacs-node serve holds {root}); received series and "
                        "unfinished jobs wait for the next start")
    # Both series are in their quiet period (default 30 s); 1.2.4 also holds one re-sent copy.
    assert lines[1].startswith("series 1.2.4: receiving (quiet period 30 s), 1 instance(s), last at ")
    assert lines[2].startswith("  conflict (1 re-sent copy(ies)): series has conflicting instances: 1 SOP instance(s)")
    assert lines[3].startswith("series 1.2.3: receiving (quiet period 30 s), 3 instance(s), last at ")
    assert lines[-1] == "no jobs yet"

    assert main(["status", "--config", str(path), "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["node"] == {"running": False, "process_id": None}
    receiving = document["receiving"]
    assert [(s["series_instance_uid"], s["instance_count"], s["conflict_count"]) for s in receiving] == [
        ("1.2.4", 1, 1),
        ("1.2.3", 3, 0),
    ]


def test_localizer_series_refused_naming_localizers(settings: NodeSettings) -> None:
    datasets = make_ct_datasets(uid_seed="localizer")[:3]
    for dataset in datasets:
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    server = NodeServer(settings, pipeline=_LoaderOnlyPipeline(settings))
    server.start()
    try:
        store_all(server.port, datasets)
        assert server.wait_idle(30)
        jobs = _jobs(server).jobs_of_series(str(datasets[0].SeriesInstanceUID))
    finally:
        server.stop()

    assert [job.state for job in jobs] == [REFUSED]
    # 3 instances sent, all of them localizers.
    assert jobs[0].reason.startswith(
        "the series has 3 localizer image(s) (ImageType LOCALIZER), which are not scored; no axial CT image series"
    )


def test_status_running_node(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    from tests.node.helpers import held_storage_root

    root = tmp_path / "storage"
    root.mkdir()
    JobStore(InstanceStore(root, 0).database_path).close()
    path = tmp_path / "node.toml"
    path.write_text(f'[storage]\nroot = "{root}"\n', encoding="utf-8")
    with held_storage_root(root):
        assert main(["status", "--config", str(path)]) == 0
        assert capsys.readouterr().out.splitlines()[0] == f"node: running (process {os.getpid()})"
        assert main(["status", "--config", str(path), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["node"] == {"running": True, "process_id": os.getpid()}


def test_status_before_anything_arrived(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "storage"
    path = tmp_path / "node.toml"
    path.write_text(f'[storage]\nroot = "{root}"\n', encoding="utf-8")

    assert main(["status", "--config", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("node: not running (no cacs-node serve holds ")
    assert lines[1] == (f"no jobs yet (no job database at {root / 'jobs.sqlite3'}: the node has not "
                        "received anything)")
    assert main(["status", "--config", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "node": {"running": False, "process_id": None}, "jobs": [], "receiving": [],
    }
    assert main(["status", "3", "--config", str(path)]) == 1
    assert "no job 3: there is no job database at" in capsys.readouterr().err
    # Status only reads: it creates neither the root nor a database.
    assert not root.exists()


def test_retry_without_running_node(settings: NodeSettings, pipeline: FakePipeline) -> None:
    job = _score_one_series(settings, pipeline, "stopped")

    message = retry_job(settings, job.id, force=True)

    assert message == f"job {job.id} queued: the node, once started, scores the series again"
