"""`cacs-node score DICOM_DIR`: score one CT series from a label map or with the model, print the result."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from node.commands.train import thread_count

HELP = (
    "score a calcium-scoring CT series: Agatston, volume and mass per artery, risk "
    "category and CAC-DRS, from a label map or the segmentation model"
)

EPILOG = (
    "exit status: 0 scored; 2 the series, the label map, node.toml or an option cannot be "
    "used; 3 the segmentation model cannot be loaded or run; 130 interrupted"
)

#: Exit status for an input that cannot be scored: the series, the label map or node.toml.
EXIT_INPUT_ERROR = 2

#: Exit status when the segmentation model cannot be loaded or run.
EXIT_MODEL_ERROR = 3

#: Name of each output kind in the "wrote" lines.
OUTPUT_NAMES = {
    "seg": "calcium SEG", "region_seg": "region SEG", "sr": "SR", "summary": "summary image",
}

#: UID root of written objects without --uid-root or --config: pydicom's root,
#: the same default as node.toml's uid_root.
DEFAULT_UID_ROOT = "1.2.826.0.1.3680043.8.498."

logger = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dicom_dir", metavar="DICOM_DIR", help="folder with the CT series, searched recursively")
    parser.add_argument(
        "--labels",
        metavar="LABELS",
        default=None,
        help=(
            "CAC label map to score instead of running the model: an NRRD or NIfTI file in the "
            "series geometry (0 background, 1 LAD, 2 LCX, 3 RCA, 4 non-coronary calcium) or a "
            "DICOM SEG that references the series"
        ),
    )
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object instead of a table")
    parser.add_argument(
        "--out",
        metavar="OUT_DIR",
        default=None,
        help="also write the calcium SEG, TID 1500 SR and summary image into this folder, and "
        "the coronary artery region SEG when the model segments and --config sets "
        "[scoring] write_region_seg = true",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="device for the model: auto, cpu, cuda or cuda:N (default: from --config, else auto)",
    )
    parser.add_argument(
        "--runtime",
        choices=["auto", "torch", "onnx"],
        default=None,
        help="how the model runs: auto (ONNX Runtime on the CPU, torch on a GPU), torch, or onnx "
        "(default: from --config, else auto)",
    )
    parser.add_argument(
        "--threads",
        type=thread_count,
        default=None,
        help="CPU threads for the model (default: from --config, else one per core)",
    )
    parser.add_argument(
        "--model",
        metavar="PATH",
        default=None,
        help="model checkpoint, or default for the model shipped in scoring/models/ "
        "(default: from --config, else the shipped model)",
    )
    parser.add_argument(
        "--uid-root",
        metavar="ROOT",
        default=None,
        help=f"UID root of the written objects (default: from --config, else {DEFAULT_UID_ROOT})",
    )
    parser.add_argument(
        "--series-uid",
        metavar="UID",
        default=None,
        help="SeriesInstanceUID to score when DICOM_DIR contains several CT series",
    )
    parser.add_argument(
        "--config",
        metavar="NODE_TOML",
        default=None,
        help="node.toml whose [scoring] protocol policies, mass calibration factor, model, device and runtime to use",
    )


def run(args: argparse.Namespace) -> int:
    from node.config import ConfigError, load_settings, names_shipped_model, uid_root_problem
    from scoring.agatston import score_volume
    from scoring.config import ProtocolPolicy, ScoringParameters
    from scoring.errors import AmbiguousSeriesError, LabelError, SeriesError
    from scoring.labels import read_label_map
    from scoring.series import load_series

    policy, parameters = ProtocolPolicy(), ScoringParameters()
    # --model "" or default names the shipped model, also over a model_path in --config.
    model_path = None if names_shipped_model(args.model) else args.model
    device, uid_root = args.device or "auto", args.uid_root or DEFAULT_UID_ROOT
    runtime = args.runtime or "auto"
    threads = args.threads
    write_region_seg = False
    if args.config:
        try:
            settings = load_settings(args.config)
        except ConfigError as error:
            print(f"cacs-node score: {error}", file=sys.stderr)
            return EXIT_INPUT_ERROR
        policy = settings.scoring.protocol_policy()
        parameters = settings.scoring.scoring_parameters()
        if args.model is None:
            model_path = settings.scoring.model_path
        device = args.device or settings.scoring.device
        runtime = args.runtime or settings.scoring.runtime
        uid_root = args.uid_root or settings.node.uid_root
        write_region_seg = settings.scoring.write_region_seg
        threads = args.threads or settings.scoring.threads or None

    dicom_dir = Path(args.dicom_dir)
    if not dicom_dir.is_dir():
        print(f"cacs-node score: {dicom_dir} is not a folder. Give the folder of the CT series.", file=sys.stderr)
        return EXIT_INPUT_ERROR

    # Check the output options before scoring, which takes minutes with the model.
    problem = uid_root_problem(uid_root)
    if problem:
        print(f"cacs-node score: invalid --uid-root {problem}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    if args.out:
        out_problem = _output_folder_problem(Path(args.out))
        if out_problem:
            print(f"cacs-node score: --out {args.out}: {out_problem}", file=sys.stderr)
            return EXIT_INPUT_ERROR

    if args.labels:
        unused = [option for option, value in (("--model", args.model), ("--device", args.device),
                                               ("--runtime", args.runtime), ("--threads", args.threads))
                  if value is not None]
        if unused:
            print(f"cacs-node score: {', '.join(unused)} not used: --labels scores the given label map "
                  "without the model", file=sys.stderr)
    else:
        device, device_problem = _model_device(device, runtime, threads)
        if device_problem:
            print(f"cacs-node score: {device_problem}", file=sys.stderr)
            return EXIT_INPUT_ERROR

    regions = None
    model_version, model_caution = "none (external label map)", None
    try:
        volume = load_series(dicom_dir, policy, series_instance_uid=args.series_uid)
        if args.labels:
            labels = read_label_map(args.labels, volume, calcium=True)
            source = {"source": "label map", "path": str(args.labels)}
        else:
            segmentation, source = _segment(volume, model_path, device, runtime)
            labels, regions = segmentation.labels, segmentation.regions
            model_version, model_caution = source["model_version"], source["model_caution"]
        result = score_volume(volume, labels, parameters)
    except AmbiguousSeriesError as error:
        print(f"cacs-node score: {error}; pass --series-uid UID to choose one", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except (SeriesError, LabelError) as error:
        print(f"cacs-node score: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR
    except _ModelFailure as error:
        print(f"cacs-node score: {error}", file=sys.stderr)
        return EXIT_MODEL_ERROR

    document = result.to_json()
    document["segmentation"] = source
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(format_table(document, volume.shape))

    if args.out:
        from sr_writer import AlgorithmIdentification, write_outputs

        import scoring

        algorithm = AlgorithmIdentification(
            name="cacs-node", version=scoring.__version__, model_version=model_version,
            model_caution=model_caution,
        )
        try:
            derived = write_outputs(
                volume,
                labels,
                result,
                args.out,
                algorithm=algorithm,
                uid_root=uid_root,
                regions=regions if write_region_seg else None,
                parameters=parameters,
            )
        except (LabelError, ValueError, OSError) as error:
            print(f"cacs-node score: writing the DICOM outputs to {args.out} failed: {error}", file=sys.stderr)
            return EXIT_INPUT_ERROR
        from node.pipeline import outputs_of

        # With --json, standard output carries the JSON object only.
        stream = sys.stderr if args.json else sys.stdout
        for output in outputs_of(derived, Path(args.out)):
            print(f"wrote {OUTPUT_NAMES.get(output.kind, output.kind)} {output.path}", file=stream)
    return 0


def _output_folder_problem(out_dir: Path) -> str:
    """Create `out_dir` if needed; return why it cannot hold the outputs, "" when it can."""
    if out_dir.exists() and not out_dir.is_dir():
        return "exists and is not a folder; give a new or existing folder for the SEG, SR and summary image"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        return f"cannot create the folder ({error.strerror}); give a folder you can write to"
    if not os.access(out_dir, os.W_OK | os.X_OK):
        return "the folder is not writable; give a folder you can write to"
    return ""


class _ModelFailure(RuntimeError):
    """The model could not be loaded or run.

    It wraps scoring.inference.ModelError, so `run` can catch it without
    importing torch when --labels is given.
    """


def _model_device(device: str, runtime: str, threads: int | None) -> tuple[str, str]:
    """Resolve the model's device and set the thread count; return the device and a problem ("" for none).

    An unusable device is an option error, so it is found before the series is read.
    """
    from node.config import onnx_off_cpu
    from scoring.inference import ModelError, device_for_runtime, resolve_device

    if onnx_off_cpu(runtime, device):
        return device, (f"runtime onnx runs on the CPU only, but the device is {device}; give --device cpu, "
                        "or --runtime auto or torch for the GPU")
    device = device_for_runtime(device, runtime)
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        resolve_device(device)
    except ModelError as error:
        return device, str(error)
    return device, ""


def _segment(volume: Any, model_path: str | None, device: str, runtime: str) -> tuple[Any, dict[str, Any]]:
    """Run the segmentation model; return its Segmentation and what produced it.

    The second value is the "segmentation" object of the JSON output: model
    version, runtime and device used, and the model's caution (None if it has none).
    """
    from scoring.inference import ModelError, load_model, prepare_runtime, segment_volume

    try:
        model = load_model(model_path, device)
        used_runtime = prepare_runtime(model, runtime)
        segmentation = segment_volume(volume, model=model, runtime=used_runtime)
    except ModelError as error:
        raise _ModelFailure(f"the segmentation model failed: {error}") from error
    source = {
        "source": "model",
        "model_version": str(segmentation.model_version),
        "runtime": used_runtime,
        "device": str(model.device),
        "model_caution": segmentation.model_caution,
    }
    return segmentation, source


def format_table(document: dict[str, Any], shape: tuple[int, int, int]) -> str:
    """Format a `ScoringResult.to_json()` object as a plain-text table per artery."""
    lesion_counts = {artery: 0 for artery in ("LAD", "LCX", "RCA")}
    for lesion in document["lesions"]:
        lesion_counts[lesion["artery"]] += 1
    lesion_counts["total"] = len(document["lesions"])

    source = document.get("segmentation") or {}
    if source.get("source") == "model":
        runtime = "ONNX Runtime" if source["runtime"] == "onnx" else "torch"
        produced_by = f"model {source['model_version']} ({runtime} on {source['device']})"
    elif source.get("source") == "label map":
        produced_by = f"label map {source['path']}"
    else:
        produced_by = "not stated"
    lines = [
        f"Series {document['series_instance_uid']} ({shape[0]} slices of {shape[1]} x {shape[2]})",
        f"Segmentation: {produced_by}",
    ]
    if source.get("model_caution"):
        lines.append(f"CAUTION, model: {source['model_caution']}")
    lines += [
        "",
        f"{'Artery':<7}{'Agatston':>10}{'Volume mm3':>12}{'Mass mg':>10}{'Lesions':>9}",
    ]
    for key in ("LAD", "LCX", "RCA", "total"):
        name = "Total" if key == "total" else key
        lines.append(
            f"{name:<7}{document['agatston'][key]:>10.1f}{document['volume_mm3'][key]:>12.1f}"
            f"{document['mass_mg'][key]:>10.2f}{lesion_counts[key]:>9d}"
        )
    calibration = "series" if document["mass_calibrated"] else "default, uncalibrated"
    lines += [
        "",
        f"Risk category:        {document['risk_category']}",
        f"CAC-DRS:              {document['cac_drs']}",
        f"Normalisation factor: {document['normalization_factor']:.4f} (slice increment / 3 mm)",
        f"Threshold:            {document['threshold_hu']:g} HU",
        f"Mass factor:          {document['mass_calibration_factor']:g} mg HA/cm3 per HU ({calibration})",
    ]
    if document["flags"]:
        lines.append("Flags:")
        lines += [f"  {flag['code']}: {flag['message']}" for flag in document["flags"]]
    else:
        lines.append("Flags:                none")
    return "\n".join(lines)
