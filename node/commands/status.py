"""`cacs-node status`: list jobs with their states and reasons, or one job in detail."""

from __future__ import annotations

import argparse
import datetime
import json
import sys

HELP = "list the node's jobs with their states and reasons (--json for scripts)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", nargs="?", type=int, help="show this job in detail: states, outputs and sends")
    parser.add_argument(
        "--config",
        default=None,
        help="settings file naming the storage root (default: $CACS_NODE_CONFIG, else ./node.toml)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--limit", type=int, default=50, help="number of newest jobs listed (default 50)")


def _time(value: float) -> str:
    return datetime.datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")


def run(args: argparse.Namespace) -> int:
    from node.config import ConfigError, default_config_path, load_settings
    from node.jobs import JobStore, JobStoreError
    from node.storage import InstanceStore, NodeLock

    path = args.config or default_config_path()
    try:
        settings = load_settings(path)
    except ConfigError as error:
        print(f"cacs-node status: {error}", file=sys.stderr)
        return 2
    database = InstanceStore(settings.storage.root, settings.storage.min_free_space_mb).database_path
    if args.limit < 1:
        print(f"cacs-node status: invalid --limit {args.limit}: expected 1 or more", file=sys.stderr)
        return 2
    holder = NodeLock.holder(settings.storage.root)
    if not database.is_file():
        if args.job is not None:
            print(f"cacs-node status: no job {args.job}: there is no job database at {database} yet",
                  file=sys.stderr)
            return 1
        if args.json:
            print(json.dumps({"node": _node_json(holder), "jobs": [], "receiving": []}, indent=2))
        else:
            _print_node(holder, settings.storage.root)
            print(f"no jobs yet (no job database at {database}: the node has not received anything)")
        return 0

    store = JobStore(database)
    try:
        if args.job is not None:
            try:
                job = store.job(args.job)
            except JobStoreError as error:
                print(f"cacs-node status: {error}", file=sys.stderr)
                return 1
            detail = job.to_json()
            detail["outputs"] = {kind: {"path": p, "sop_instance_uid": uid} for kind, (p, uid) in store.outputs(job.id).items()}
            detail["sends"] = store.sends(job.id)
            detail["events"] = store.events(job.id)
            if args.json:
                print(json.dumps(detail, indent=2))
            else:
                _print_detail(detail)
            return 0

        jobs = store.jobs(limit=args.limit)
        receiving = store.receiving_series()
        if args.json:
            print(json.dumps({"node": _node_json(holder), "jobs": [job.to_json() for job in jobs],
                              "receiving": receiving}, indent=2))
            return 0
        _print_node(holder, settings.storage.root)
        _print_receiving(receiving, settings.scoring.quiet_period_s)
        if not jobs:
            print("no jobs yet")
            return 0
        print(f"{'JOB':>5}  {'STATE':<9}  {'UPDATED':<19}  {'INST':>4}  {'AGATSTON':>9}  SERIES / REASON")
        for job in jobs:
            total = job.to_json()["agatston_total"]
            score = f"{total:9.1f}" if isinstance(total, (int, float)) else f"{'-':>9}"
            print(f"{job.id:>5}  {job.state:<9}  {_time(job.updated_at)}  {job.instance_count:>4}  {score}  "
                  f"{job.series_instance_uid}")
            if job.reason:
                print(f"{'':>5}  {job.reason}")
        return 0
    finally:
        store.close()


def _node_json(holder: int | None) -> dict:
    return {"running": holder is not None, "process_id": holder or None}


def _print_node(holder: int | None, root: object) -> None:
    """Print whether a node runs on the storage root (`NodeLock.holder`)."""
    if holder is None:
        print(f"node: not running (no cacs-node serve holds {root}); received series and unfinished "
              "jobs wait for the next start")
    else:
        print(f"node: running{f' (process {holder})' if holder else ''}")


def _print_receiving(receiving: list[dict], quiet_period_s: float) -> None:
    """Print the series still in their quiet period and those held for a conflict."""
    for series in receiving:
        state = f"receiving (quiet period {quiet_period_s:g} s)" if series["pending"] else "held"
        origin = f" from {series['calling_ae_title']}" if series["calling_ae_title"] else ""
        print(f"series {series['series_instance_uid']}: {state}{origin}, {series['instance_count']} instance(s), "
              f"last at {_time(series['last_received_at'])}")
        if series["conflict"]:
            print(f"  conflict ({series['conflict_count']} re-sent copy(ies)): {series['conflict']}")
    if receiving:
        print()


def _print_detail(detail: dict) -> None:
    for key in ("id", "state", "reason", "study_instance_uid", "series_instance_uid", "instance_count",
                "model_version", "supersedes_job_id", "agatston_total", "risk_category", "attempts"):
        print(f"{key}: {detail[key]}")
    for kind, output in sorted(detail["outputs"].items()):
        print(f"output {kind}: {output['sop_instance_uid']} ({output['path']})")
    for send in detail["sends"]:
        status = "sent" if send["sent"] else "not sent"
        code = f" status 0x{send['status']:04X}" if send["status"] is not None else ""
        comment = f" ({send['error_comment']})" if send["error_comment"] else ""
        reason = f": {send['reason']}" if send["reason"] and not send["sent"] else ""
        print(f"send {send['kind']} to {send['destination']}: {status}{code}{comment}{reason}")
    for event in detail["events"]:
        message = f" {event['message']}" if event["message"] else ""
        print(f"{_time(event['at'])} {event['state']}{message}")
