"""`cacs-node check-config`: validate node.toml and list every problem."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.config import NodeSettings
    from node.pipeline import ScoringPipeline

HELP = "validate the node settings file and list every problem with how to fix it"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help="settings file to check (default: $CACS_NODE_CONFIG, else ./node.toml)",
    )


def run(args: argparse.Namespace) -> int:
    from node.config import ConfigError, NodeSettings, default_config_path, load_settings, storage_root_problem

    path = args.config or default_config_path()
    problems: list[str] = []
    try:
        settings = load_settings(path)
        sections = {"storage": settings.storage, "scoring": settings.scoring}
    except ConfigError as error:
        problems.extend(error.problems)
        sections = error.valid_sections
    # The storage root and the model are tested whenever their own sections
    # are valid, so one run lists every problem.
    storage_problem = storage_root_problem(sections["storage"].root) if "storage" in sections else None
    pipeline = model_version = model_problem = None
    if "scoring" in sections:
        pipeline, model_version, model_problem = _check_model(NodeSettings(scoring=sections["scoring"]))
    problems.extend(problem for problem in (storage_problem, model_problem) if problem)
    if problems:
        print(f"cacs-node check-config: {ConfigError(str(path), problems)}", file=sys.stderr)
        return 1
    assert pipeline is not None and model_version is not None  # no problems: the model loaded
    _print_settings(path, settings, pipeline, model_version)
    return 0


def _check_model(settings: NodeSettings) -> tuple[ScoringPipeline | None, str | None, str | None]:
    """Load the model of settings.scoring: (pipeline, model version, None), or (None, None, problem)."""
    from node.pipeline import ModelUnavailableError, ScoringPipeline

    if settings.scoring.model_path is None:
        from scoring.inference import default_model_path

        shipped = default_model_path()
        if not shipped.is_file():
            return None, None, (f"[scoring] model_path is empty, but the shipped model {shipped} is missing; "
                                "reinstall cacs-node or set model_path to a model file")
    pipeline = ScoringPipeline(settings)
    try:
        return pipeline, pipeline.check_model(), None
    except ModelUnavailableError as error:
        return None, None, f"[scoring] model: {error}"


def _print_settings(path: str | Path, settings: NodeSettings, pipeline: ScoringPipeline, model_version: str) -> None:
    from node.config import settings_warnings
    from scoring.inference import default_model_path

    model_path = settings.scoring.model_path or default_model_path()
    node = settings.node
    print(f"{path}: valid")
    print(f"  AE title {node.ae_title} on {node.bind_address}:{node.port}, at most {node.max_associations} associations")
    peers = ", ".join(f"{peer.ae_title}@{peer.host}" for peer in settings.peers) or "none"
    print(f"  peers: {peers}{' (unknown peers accepted)' if node.accept_unknown_peers else ''}")
    for destination in settings.destinations:
        outputs = ", ".join(sorted(destination.outputs))
        print(
            f"  destination {destination.name}: {destination.ae_title}@{destination.host}:{destination.port} "
            f"receives {outputs}"
        )
    if not settings.destinations:
        print("  no destinations: results stay under the storage root")
    print(f"  storage root {settings.storage.root}, minimum free space {settings.storage.min_free_space_mb} MiB")
    print(
        f"  model {model_path} (version {model_version}) on device {settings.scoring.device}, "
        f"runtime {pipeline.runtime or settings.scoring.runtime}, "
        f"{settings.scoring.threads or 'automatic'} CPU threads, quiet period {settings.scoring.quiet_period_s} s"
    )
    caution = pipeline.model_caution()
    if caution:
        print(f"  caution: model {model_version}: {caution}")
    for warning in settings_warnings(settings):
        print(f"  warning: {warning}")
    if node.uid_root == "1.2.826.0.1.3680043.8.498.":
        print("  note: uid_root is pydicom's example root; set your organisation's registered root for clinical use")
