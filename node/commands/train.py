"""`cacs-node train`: train the multi-task U-Net (or a comparison model) on annotated series."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

HELP = (
    "train the calcium segmentation network on the digital phantom and/or a folder of "
    "annotated series; runs under torchrun for several GPUs or nodes"
)

logger = logging.getLogger(__name__)


def positive_int(text: str) -> int:
    """Parse a whole number of at least 1 (threads, batch sizes, slice counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: expected a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid number {value}: expected 1 or more")
    return value


def thread_count(text: str) -> int:
    """Parse a CPU thread count: a whole number from 1 to MAX_THREADS."""
    from node.config import MAX_THREADS

    value = positive_int(text)
    if value > MAX_THREADS:
        raise argparse.ArgumentTypeError(f"invalid thread count {value}: expected at most {MAX_THREADS}")
    return value


def output_file_problem(output: Path, inputs: Sequence[Path | None] = ()) -> str | None:
    """Describe why a file cannot be written to `output`, or return None.

    Commands check this before their long work starts. inputs: files the
    command reads, which the output must not replace (None entries are skipped).
    """
    output = Path(output)
    if output.is_dir():
        return f"output {output} is a folder; give the path of a new file"
    for source in inputs:
        if source is not None and output.resolve() == Path(source).resolve():
            return f"output {output} is also an input of this command; give a new path"
    return folder_problem(output.parent, f"output {output}")


def folder_problem(folder: Path, description: str) -> str | None:
    """Describe why `folder` cannot be created or used, or return None.

    description: how the message names the folder, e.g. "output folder runs/a".
    """
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{description} cannot be created: {existing} is a file, not a folder"
    return None


#: Maximum count of numbers in a seed or epoch list. Every phantom series is held in
#: memory during training (about 50 MB each at 48 slices of 512²), so longer
#: lists are typing errors rather than runs.
MAX_LIST_LENGTH = 10_000


def parse_seeds(text: str) -> list[int]:
    """Parse "0-39", "5" or "0-9,20,30-31" into a sorted list of distinct numbers (seeds, epochs)."""
    seeds: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                first, last = (int(value) for value in part.split("-", 1))
                if last < first:
                    raise ValueError
                if len(seeds) + last - first + 1 > MAX_LIST_LENGTH:
                    raise argparse.ArgumentTypeError(
                        f"list {text!r} names more than {MAX_LIST_LENGTH:,} numbers; "
                        "give fewer seeds or epochs"
                    )
                seeds.update(range(first, last + 1))
            else:
                seeds.add(int(part))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid list {text!r}: expected numbers and ranges such as 0-39,50"
            ) from None
    if not seeds:
        raise argparse.ArgumentTypeError(f"list {text!r} names no number")
    return sorted(seeds)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", type=Path,
                        help="folder for last.pt, best.pt and history.json")
    data = parser.add_argument_group("data")
    data.add_argument("--phantom-seeds", type=parse_seeds, default=None,
                      help="phantom seeds to train on, e.g. 0-39 (default 0-39 unless --data)")
    data.add_argument("--validation-seeds", type=parse_seeds, default=None,
                      help="phantom seeds for validation, e.g. 1000-1003 (default 1000-1003 "
                           "unless --validation-data)")
    data.add_argument("--phantom-slices", type=int, default=None,
                      help="slices per phantom series (default: the phantom's own default)")
    data.add_argument("--data", type=Path, default=None,
                      help="folder of annotated series: case folders holding dicom/, labels.* "
                           "and regions.*")
    data.add_argument("--validation-data", type=Path, default=None,
                      help="folder of annotated validation series, same layout as --data")

    model = parser.add_argument_group("model")
    model.add_argument("--architecture", choices=["mtl", "single", "sequential"], default="mtl",
                       help="network: multi-task (default), single-task multiclass, sequential")
    model.add_argument("--weighting", choices=["uncertainty", "static"], default="uncertainty",
                       help="task loss weighting (default uncertainty)")
    model.add_argument("--alpha", type=float, default=0.4,
                       help="region share of the static weighting (default 0.4)")

    run = parser.add_argument_group("optimisation")
    run.add_argument("--epochs", type=int, default=100, help="maximum epochs (default 100)")
    run.add_argument("--steps-per-epoch", type=int, default=50,
                     help="optimisation steps per epoch (default 50)")
    run.add_argument("--batch-size", type=int, default=8,
                     help="slices per step and process (default 8)")
    run.add_argument("--learning-rate", type=float, default=None,
                     help="initial Adam learning rate (default 5e-4, or 1e-4 with "
                          "--continue-from)")
    run.add_argument("--weight-decay", type=float, default=1e-4,
                     help="L2 weight decay (default 1e-4)")
    run.add_argument("--patience", type=int, default=10,
                     help="validations without a better micro-F1 before stopping (default 10)")
    run.add_argument("--crop-size", type=int, default=256,
                     help="side of the square training crops in pixels, a multiple of 256 "
                          "(default 256)")
    run.add_argument("--body-crop-fraction", type=float, default=0.5,
                     help="share of crops without calcium centred on a random body pixel "
                          "instead of the heart annotation (default 0.5)")
    run.add_argument("--candidate-crop-fraction", type=float, default=0.0,
                     help="share of crops without calcium centred on a random pixel of 130 HU "
                          "or more that is not coronary calcium (bone, noise, metal; default 0)")
    run.add_argument("--validation", choices=["crops", "volumes"], default="crops",
                     help="validate on fixed crops around the heart (default) or on the whole "
                          "validation series, as the node segments them")
    run.add_argument("--selection", choices=["argmax", "calibrated"], default="argmax",
                     help="lesion decision that validation scores each epoch by: the argmax "
                          "(default, the paper's rule) or the best lesion threshold, which "
                          "the checkpoints then carry; calibrated needs --validation volumes")
    run.add_argument("--validation-every", type=int, default=1,
                     help="epochs between validations (default 1)")
    run.add_argument("--validation-crops", type=int, default=32,
                     help="fixed validation crops (default 32)")
    run.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                     help="forward passes in float32 (default) or under bfloat16 autocast, "
                          "which was 1.8 times faster per step on a CPU with AVX512-BF16")
    run.add_argument("--snapshot-epochs", type=parse_seeds, default=(),
                     help="epochs whose checkpoint is also kept as epoch-NNN.pt, e.g. 20,40")
    run.add_argument("--ema-decay", type=float, default=0.0,
                     help="keep a moving average of the weights with this decay per step, "
                          "e.g. 0.999, and validate and save the average (default 0: off)")
    run.add_argument("--time-limit", type=float, default=None, metavar="MINUTES",
                     help="validate and stop after the first epoch that ends this many minutes "
                          "after the first epoch began, i.e. not counting the generation of "
                          "phantom series (default: no limit)")
    run.add_argument("--seed", type=int, default=0, help="seed of weights and sampling (default 0)")
    run.add_argument("--threads", type=thread_count, default=None,
                     help="torch CPU threads (default: torch's choice)")
    run.add_argument("--device", default="auto",
                     help="auto (CUDA when available), cpu, cuda or cuda:N (default auto)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", type=Path, default=None,
                       help="continue an interrupted run from its last.pt")
    start.add_argument("--continue-from", type=Path, default=None,
                       help="start a new run from these weights, at learning rate 1e-4 unless "
                            "--learning-rate is given (active learning)")
    parser.add_argument("--export", type=Path, default=None,
                        help="after training, write best.pt without training state to this path")
    parser.add_argument("--export-fp16", action="store_true",
                        help="store the exported weights as float16")


def run(args: argparse.Namespace) -> int:
    from scoring import training
    from scoring.checkpoint import CheckpointError

    try:
        config = training.TrainingConfig(
            architecture=args.architecture,
            weighting=args.weighting,
            alpha=args.alpha,
            batch_size=args.batch_size,
            **({} if args.learning_rate is None else {
                "learning_rate": args.learning_rate, "continue_learning_rate": args.learning_rate,
            }),
            weight_decay=args.weight_decay,
            epochs=args.epochs,
            steps_per_epoch=args.steps_per_epoch,
            patience=args.patience,
            crop_size=args.crop_size,
            validation_crops=args.validation_crops,
            body_crop_fraction=args.body_crop_fraction,
            candidate_crop_fraction=args.candidate_crop_fraction,
            validation=args.validation,
            validation_every=args.validation_every,
            selection=args.selection,
            precision=args.precision,
            snapshot_epochs=tuple(args.snapshot_epochs),
            ema_decay=args.ema_decay,
            time_limit_minutes=args.time_limit,
            seed=args.seed,
            threads=args.threads,
            device=args.device,
        )
    except ValueError as error:
        print(f"cacs-node train: {error}", file=sys.stderr)
        return 2

    if args.export_fp16 and args.export is None:
        print("cacs-node train: --export-fp16 needs --export PATH, the file to write",
              file=sys.stderr)
        return 2
    if args.resume is not None and args.learning_rate is not None:
        print("cacs-node train: --learning-rate cannot change a resumed run, which keeps its "
              "optimiser and schedule; use --continue-from to start a new run from its weights",
              file=sys.stderr)
        return 2
    from scoring.inference import ModelError, resolve_device

    try:
        resolve_device(args.device)
    except ModelError as error:
        print(f"cacs-node train: {error}", file=sys.stderr)
        return 2
    if args.output_dir.exists() and not args.output_dir.is_dir():
        print(f"cacs-node train: {args.output_dir} is a file; give a folder for the checkpoints",
              file=sys.stderr)
        return 2
    problem = folder_problem(args.output_dir, f"output folder {args.output_dir}")
    if problem is None and args.resume is None and (args.output_dir / "last.pt").exists():
        problem = (
            f"{args.output_dir} already contains a run (last.pt); continue it with --resume "
            f"{args.output_dir / 'last.pt'}, or give a new folder"
        )
    if (problem is None and args.resume is not None and (args.output_dir / "last.pt").exists()
            and args.resume.resolve().parent != args.output_dir.resolve()):
        problem = (
            f"{args.output_dir} already contains another run (last.pt), which resuming "
            f"{args.resume} there would replace; give a new folder, or the folder of {args.resume}"
        )
    if problem is None and args.export is not None:
        run_files = [args.output_dir / "best.pt", args.output_dir / "last.pt"]
        problem = output_file_problem(
            args.export, [args.resume, args.continue_from, *run_files]
        )
    if problem is None:
        problem = _shared_folder_problem(args.data, args.validation_data)
    if problem is not None:
        print(f"cacs-node train: {problem}", file=sys.stderr)
        return 2
    # The starting checkpoint is checked before the data, whose generation takes minutes.
    try:
        training.starting_checkpoint(config, resume=args.resume, continue_from=args.continue_from)
    except (CheckpointError, ValueError) as error:
        print(f"cacs-node train: {error}", file=sys.stderr)
        return 2
    phantom_options = {}
    if args.phantom_slices is not None:
        phantom_options["slices"] = args.phantom_slices
    train_seeds = args.phantom_seeds
    if train_seeds is None and args.data is None:
        train_seeds = list(range(40))
    validation_seeds = args.validation_seeds
    if validation_seeds is None and args.validation_data is None:
        validation_seeds = list(range(1000, 1004))
    overlap = set(train_seeds or ()) & set(validation_seeds or ())
    if overlap:
        print(
            f"cacs-node train: seeds {sorted(overlap)} are in both the training and the "
            "validation set; choose disjoint seeds",
            file=sys.stderr,
        )
        return 2

    try:
        train_cases = []
        validation_cases = []
        if train_seeds:
            logger.info("generating %d phantom training series", len(train_seeds))
            train_cases += training.phantom_cases(train_seeds, **phantom_options)
        if args.data is not None:
            train_cases += training.folder_cases(args.data)
        if validation_seeds:
            validation_cases += training.phantom_cases(validation_seeds, **phantom_options)
        if args.validation_data is not None:
            validation_cases += training.folder_cases(args.validation_data)
    except (FileNotFoundError, ValueError) as error:
        print(f"cacs-node train: {error}", file=sys.stderr)
        return 2

    description = _describe_data(train_seeds, validation_seeds, args)
    try:
        outcome = training.train(
            config,
            train_cases,
            validation_cases,
            args.output_dir,
            resume=args.resume,
            continue_from=args.continue_from,
            data_description=description,
            progress=not args.no_progress,
        )
    except (CheckpointError, ValueError) as error:
        print(f"cacs-node train: {error}", file=sys.stderr)
        return 2

    history_path = args.output_dir / "history.json"
    if outcome.history:
        history = [
            {key: None if isinstance(value, float) and not math.isfinite(value) else value
             for key, value in record.items()}
            for record in outcome.history
        ]
        history_path.write_text(json.dumps(history, indent=2, allow_nan=False))
    print(
        f"trained {config.model_name} for {outcome.epochs_run} "
        f"epoch{'' if outcome.epochs_run == 1 else 's'}; best validation "
        f"micro-F1 {outcome.best_micro_f1:.3f} at epoch {outcome.best_epoch}"
    )
    written = [
        f"{path} ({role})"
        for path, role in ((outcome.best_checkpoint_path, "best"), (outcome.checkpoint_path, "last"))
        if Path(path).is_file()
    ]
    print(f"checkpoints: {', '.join(written) or 'none written'}")
    if args.export is not None:
        if not Path(outcome.best_checkpoint_path).is_file():
            print(
                f"cacs-node train: nothing to export: {outcome.best_checkpoint_path} does not exist "
                "(no validation improved on the resumed run's best)",
                file=sys.stderr,
            )
            return 2
        version = training.export_model(
            outcome.best_checkpoint_path, args.export, half_precision=args.export_fp16
        )
        print(f"exported model {version} to {args.export}")
    return 0


def _shared_folder_problem(data: Path | None, validation_data: Path | None) -> str | None:
    """Describe why --data and --validation-data overlap, or return None.

    Series in both sets would make the validation F1 a training score.
    """
    if data is None or validation_data is None:
        return None
    training_folder, validation_folder = data.resolve(), validation_data.resolve()
    if training_folder == validation_folder:
        return (f"--data and --validation-data name the same folder {data}; validate on "
                "series the model does not train on")
    if training_folder in validation_folder.parents or validation_folder in training_folder.parents:
        return (f"--data {data} and --validation-data {validation_data} lie one inside the "
                "other, so series could be in both sets; give separate folders")
    return None


def _describe_data(train_seeds, validation_seeds, args: argparse.Namespace) -> str:
    parts = []
    if train_seeds:
        parts.append(f"phantom seeds {_seed_text(train_seeds)}")
    if args.data is not None:
        parts.append(f"annotated series under {args.data}")
    if validation_seeds:
        parts.append(f"validation phantom seeds {_seed_text(validation_seeds)}")
    if args.validation_data is not None:
        parts.append(f"validation series under {args.validation_data}")
    if args.phantom_slices is not None:
        parts.append(f"{args.phantom_slices} slices per phantom series")
    return "; ".join(parts)


def _seed_text(seeds: list[int]) -> str:
    if seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ",".join(str(seed) for seed in seeds)
