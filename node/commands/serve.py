"""`cacs-node serve`: run the node until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

HELP = "run the DICOM node: receive series, score them and send SEG, SR and summary image"

logger = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help="settings file (default: $CACS_NODE_CONFIG, else ./node.toml)",
    )


def run(args: argparse.Namespace) -> int:
    from node.config import ConfigError, default_config_path, load_settings, settings_warnings
    from node.logs import reduce_library_log_noise
    from node.pipeline import ModelUnavailableError, ScoringPipeline
    from node.server import NodeServer
    from node.storage import NodeLock, StorageError

    path = args.config or default_config_path()
    try:
        settings = load_settings(path)
    except ConfigError as error:
        print(f"cacs-node serve: not starting: {error}", file=sys.stderr)
        return 2

    reduce_library_log_noise()
    for warning in settings_warnings(settings):
        logger.warning("%s: %s", path, warning)

    # Loading the model takes seconds, so a second node on the same root is
    # turned away first; NodeServer.start takes the lock itself.
    try:
        NodeLock.check_free(settings.storage.root)
    except StorageError as error:
        print(f"cacs-node serve: not starting: {error}", file=sys.stderr)
        return 1

    # A node that cannot load its model would acknowledge series it can never score.
    pipeline = ScoringPipeline(settings)
    try:
        model_version = pipeline.check_model()
    except ModelUnavailableError as error:
        print(f"cacs-node serve: not starting: {error}", file=sys.stderr)
        return 1
    logger.info("model version %s ready, runtime %s", model_version, pipeline.runtime)
    caution = pipeline.model_caution()
    if caution:
        logger.warning("model %s: %s; every SEG, SR and summary image states this", model_version, caution)

    server = NodeServer(settings, pipeline=pipeline)
    try:
        server.start()
    except StorageError as error:
        # Its message names the storage root and what to change.
        print(f"cacs-node serve: not starting: {error}", file=sys.stderr)
        return 1
    except OSError as error:
        print(
            f"cacs-node serve: not starting: {error}; check [node] bind_address/port and [storage] root in {path}",
            file=sys.stderr,
        )
        return 1

    stop = threading.Event()

    def request_stop(signal_number: int, _frame: object) -> None:
        logger.info("received %s, stopping", signal.Signals(signal_number).name)
        stop.set()

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        server.stop()
    return 0
