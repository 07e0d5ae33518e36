"""`cacs-node calibrate`: choose a model's lesion threshold on validation series."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from node.commands.evaluate import add_run_options, load_cases, parse_model, warn_if_trained_on
from node.commands.train import output_file_problem, parse_seeds

HELP = (
    "choose the CAC probability above which the model calls a pixel calcium, by the "
    "multiclass micro-F1 on validation series, and write a copy of the model that uses it"
)


#: Most lesion thresholds one calibration tries.
MAX_THRESHOLDS = 1000


def parse_thresholds(text: str) -> list[float]:
    """Parse "START:STOP:STEP" (STOP included when a step lands on it) or a list such as 0.6,0.7."""
    try:
        if ":" in text:
            start, stop, step = (float(part) for part in text.split(":"))
            if step <= 0:
                raise ValueError
            if stop < start:
                raise argparse.ArgumentTypeError(
                    f"invalid thresholds {text!r}: STOP is below START"
                )
            # The margin keeps STOP when floating-point rounding leaves
            # (STOP − START) / STEP just below a whole number.
            count = math.floor((stop - start) / step + 1e-9) + 1
            if count > MAX_THRESHOLDS:
                raise argparse.ArgumentTypeError(
                    f"thresholds {text!r} name {count:,} values; each is scored on every "
                    f"validation voxel, so give at most {MAX_THRESHOLDS:,} (a larger STEP)"
                )
            values = [round(start + step * index, 6) for index in range(count)]
        else:
            values = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid thresholds {text!r}: expected START:STOP:STEP or a list such as 0.6,0.7"
        ) from None
    if len(values) > MAX_THRESHOLDS:
        raise argparse.ArgumentTypeError(
            f"thresholds {text!r} name {len(values):,} values; give at most {MAX_THRESHOLDS:,}"
        )
    if not all(0.0 < value < 1.0 for value in values):
        raise argparse.ArgumentTypeError(
            f"invalid thresholds {text!r}: each must lie strictly between 0 and 1"
        )
    return values


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=parse_model,
                        help="checkpoint to calibrate: PATH, NAME=PATH or default")
    parser.add_argument("output", type=Path,
                        help="path of the calibrated copy (weights unchanged, no training "
                             "state); missing folders are created")
    parser.add_argument("--phantom-seeds", type=parse_seeds, default=None,
                        help="validation phantom seeds, e.g. 1000-1003 (default 1000-1003 unless "
                             "--data); never the seeds the model is tested on")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder of annotated validation series: case folders holding dicom/ "
                             "and labels.*")
    parser.add_argument("--thresholds", type=parse_thresholds, default=None,
                        help="CAC probabilities to try, START:STOP:STEP or a list "
                             "(default 0.5:0.95:0.01); the argmax rule is always tried too")
    add_run_options(parser)


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from scoring import evaluation
    from scoring.checkpoint import CheckpointError
    from scoring.errors import LabelError, SeriesError
    from scoring.inference import ModelError, default_model_path, load_model
    from scoring.result import LAD, LCX, RCA

    coronary = (LAD, LCX, RCA)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    name, path = args.model
    source = default_model_path() if path is None else path
    problem = output_file_problem(args.output, [source])
    if problem is not None:
        print(f"cacs-node calibrate: {problem}", file=sys.stderr)
        return 2
    seeds = args.phantom_seeds
    if seeds is None and args.data is None:
        seeds = list(range(1000, 1004))
    try:
        loaded = load_model(source, args.device)
        cases = load_cases(seeds, args.phantom_slices, args.data)
    except ModelError as error:
        print(f"cacs-node calibrate: model {name}: {error}", file=sys.stderr)
        return 2
    except (FileNotFoundError, SeriesError, LabelError, ValueError) as error:
        print(f"cacs-node calibrate: {error}", file=sys.stderr)
        return 2
    if not cases:
        print("cacs-node calibrate: no validation series: give --phantom-seeds or --data",
              file=sys.stderr)
        return 2
    warn_if_trained_on(f"cacs-node calibrate: model {name}", loaded.metadata, cases)
    if not any(np.isin(case.labels, coronary).any() for case in cases):
        print("cacs-node calibrate: the validation series contain no coronary calcium, so "
              "no threshold can be judged; add series with calcium (more seeds or slices)",
              file=sys.stderr)
        return 2

    thresholds = args.thresholds or list(evaluation.DEFAULT_THRESHOLDS)
    results = evaluation.lesion_threshold_sweep(
        loaded, cases, thresholds, batch_size=args.batch_size
    )
    chosen = evaluation.best_threshold(results)
    print(f"Multiclass CAC on {len(cases)} validation series, weights of model "
          f"{loaded.model_version} (any lesion threshold it carries is not used here)")
    print("| Lesion decision | TP | FP | FN | PPV | Sensitivity | Micro-F1 |")
    print("|---|---|---|---|---|---|---|")
    for result in results:
        counts = result.counts
        decision = "argmax" if result.threshold is None else f"P(CAC) > {result.threshold:g}"
        marker = " (chosen)" if result is chosen else ""
        print(f"| {decision}{marker} | {counts.true_positives} | {counts.false_positives} | "
              f"{counts.false_negatives} | {counts.ppv:.3f} | {counts.sensitivity:.3f} | "
              f"{counts.f1:.3f} |")
    try:
        version = evaluation.write_calibrated_model(
            Path(source), args.output, chosen, results,
            [f"{case.name} ({case.labels.shape[0]} slices)" for case in cases],
        )
    except (CheckpointError, OSError) as error:
        print(f"cacs-node calibrate: cannot write {args.output}: {error}", file=sys.stderr)
        return 1
    print(f"\nwrote {args.output}: model {version}")
    return 0
