"""`cacs-node evaluate`: detection and agreement metrics of one or more models on annotated series."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from node.commands.train import output_file_problem, parse_seeds, positive_int, thread_count

HELP = (
    "evaluate models on held-out phantom seeds or annotated series; prints the detection "
    "table (volume, lesion, CAR and multiclass F1) and the risk agreement table"
)

logger = logging.getLogger(__name__)


def warn_if_trained_on(prefix: str, metadata: dict, cases: Sequence) -> None:
    """Warn on standard error when the model was trained on some of `cases`, whose results then flatter it."""
    from scoring.checkpoint import seen_in_training

    seen = seen_in_training(metadata, [case.name for case in cases])
    if seen:
        listed = ", ".join(seen[:10]) + (f" and {len(seen) - 10} more" if len(seen) > 10 else "")
        print(f"{prefix}: warning: {len(seen)} of the {len(cases)} series were training series of this "
              f"model ({listed}), so its results on them overstate it; use series it has not seen",
              file=sys.stderr)


def parse_model(text: str) -> tuple[str, Path | None]:
    """Parse "NAME=PATH", "PATH" (named after the file) or "default" (the shipped model)."""
    if text.strip() == "default":
        return "default", None
    if "=" in text:
        name, path = text.split("=", 1)
        if not name or not path:
            raise argparse.ArgumentTypeError(
                f"invalid model {text!r}: expected NAME=PATH, PATH or default"
            )
        return name, Path(path)
    return Path(text).stem, Path(text)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", dest="models", type=parse_model, action="append",
                        help="model to evaluate as NAME=PATH, PATH or default (the shipped "
                             "model); repeat to compare models (default: default)")
    parser.add_argument("--phantom-seeds", type=parse_seeds, default=None,
                        help="held-out phantom seeds, e.g. 2000-2019 (default 2000-2019 unless "
                             "--data)")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder of annotated series: case folders holding dicom/ and labels.*")
    parser.add_argument("--json", type=Path, default=None, dest="json_path",
                        help="also write all metrics and per-scan scores to this JSON file")
    parser.add_argument("--runtime", choices=["auto", "torch", "onnx"], default="auto",
                        help="how the models run: auto (ONNX Runtime on the CPU, torch on a GPU), "
                             "torch or onnx (default auto)")
    add_run_options(parser)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Add the options that set the phantom length and how the network runs."""
    parser.add_argument("--phantom-slices", type=positive_int, default=None,
                        help="slices per phantom series (default: the phantom's own default)")
    parser.add_argument("--device", default="auto",
                        help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--batch-size", type=positive_int, default=4,
                        help="slices per forward pass (default 4)")
    parser.add_argument("--threads", type=thread_count, default=None,
                        help="torch CPU threads (default: torch's choice)")


def load_cases(seeds: list[int] | None, phantom_slices: int | None, data: Path | None) -> list:
    """Phantom series for `seeds` followed by the annotated series under `data`.

    Raises FileNotFoundError, SeriesError or LabelError for unreadable data.
    """
    from scoring import evaluation

    cases = []
    if seeds:
        options = {} if phantom_slices is None else {"slices": phantom_slices}
        cases += evaluation.phantom_evaluation_cases(seeds, **options)
    if data is not None:
        cases += evaluation.folder_evaluation_cases(data)
    return cases


def run(args: argparse.Namespace) -> int:
    import torch

    from scoring import evaluation, metrics
    from scoring.errors import LabelError, SeriesError
    from scoring.inference import ModelError, default_model_path, load_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    models = args.models or [("default", None)]
    seeds = args.phantom_seeds
    if seeds is None and args.data is None:
        seeds = list(range(2000, 2020))

    names = [name for name, _ in models]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        print(f"cacs-node evaluate: model name {', '.join(repeated)} is given more than once; "
              "name each model with --model NAME=PATH", file=sys.stderr)
        return 2
    if args.json_path is not None:
        sources = [default_model_path() if path is None else path for _, path in models]
        problem = output_file_problem(args.json_path, sources)
        if problem is not None:
            print(f"cacs-node evaluate: {problem}", file=sys.stderr)
            return 2

    try:
        cases = load_cases(seeds, args.phantom_slices, args.data)
    except (FileNotFoundError, SeriesError, LabelError, ValueError) as error:
        print(f"cacs-node evaluate: {error}", file=sys.stderr)
        return 2

    reports = {}
    versions = {}
    for name, path in models:
        try:
            loaded = load_model(path, args.device)
        except ModelError as error:
            print(f"cacs-node evaluate: model {name}: {error}", file=sys.stderr)
            return 2
        versions[name] = loaded.model_version
        warn_if_trained_on(f"cacs-node evaluate: model {name}", loaded.metadata, cases)
        reports[name] = evaluation.evaluate_model(
            name, loaded, cases, batch_size=args.batch_size, runtime=args.runtime
        )

    for name, version in versions.items():
        print(f"{name}: model {version}")
    print(f"Detection on {len(cases)} series")
    print(metrics.format_detection_table(list(reports.values())))
    for report in reports.values():
        print()
        print(metrics.format_agreement_table(report))
    if args.json_path is not None:
        document = {
            "series": [case.name for case in cases],
            "model_versions": versions,
            "models": metrics.summary_rows(reports),
        }
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(document, indent=2))
        print(f"\nwrote {args.json_path}")
    return 0
