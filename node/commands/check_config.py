"""`cacs-node check-config`: validate node.toml and list every problem."""

from __future__ import annotations

import argparse
import sys

HELP = "validate the node settings file and list every problem with how to fix it"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help="settings file to check (default: $CACS_NODE_CONFIG, else ./node.toml)",
    )


def run(args: argparse.Namespace) -> int:
    from node.config import (
        ConfigError, default_config_path, load_settings, settings_warnings, storage_root_problem,
    )

    path = args.config or default_config_path()
    try:
        settings = load_settings(path)
    except ConfigError as error:
        print(f"cacs-node check-config: {error}", file=sys.stderr)
        return 1

    problem = storage_root_problem(settings.storage.root)
    if problem:
        print(f"cacs-node check-config: {path}: {problem}", file=sys.stderr)
        return 1

    model_path = settings.scoring.model_path
    if model_path is None:
        from scoring.inference import default_model_path

        model_path = default_model_path()
        if not model_path.is_file():
            print(
                f"cacs-node check-config: {path}: [scoring] model_path is empty, but the shipped model "
                f"{model_path} is missing; reinstall cacs-node or set model_path to a model file",
                file=sys.stderr,
            )
            return 1

    from node.pipeline import ModelUnavailableError, ScoringPipeline

    pipeline = ScoringPipeline(settings)
    try:
        model_version = pipeline.check_model()
    except ModelUnavailableError as error:
        print(f"cacs-node check-config: {path}: [scoring]: {error}", file=sys.stderr)
        return 1

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
    return 0
