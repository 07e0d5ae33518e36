"""`cacs-node phantom OUT_DIR --seed N`: write a digital calcium phantom series with its ground truth."""

from __future__ import annotations

import argparse
import json
import sys

HELP = (
    "write a synthetic non-contrast cardiac CT series (OUT_DIR/dicom) with its true CAC "
    "labels, coronary region scribbles and expected scores (truth.json)"
)

#: Exit status for an option out of range or an output folder that already contains a series.
EXIT_INPUT_ERROR = 2

BURDENS = ("zero", "minimal", "mild", "moderate", "severe")


def _toggle(value: str) -> bool | None:
    return {"auto": None, "on": True, "off": False}[value]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR",
                        help="folder to create; receives dicom/, labels.nrrd, regions.nrrd and truth.json")
    parser.add_argument("--seed", type=int, required=True,
                        help="random seed; the same seed and options give identical files and UIDs")
    parser.add_argument("--mode", choices=("patient", "qrm"), default="patient",
                        help="patient: chest with coronary calcium (default); qrm: calibration phantom with "
                             "1, 3 and 5 mm hydroxyapatite cylinders at 200, 400 and 800 mg HA/cm3")
    parser.add_argument("--zero-calcium", action="store_true",
                        help="no coronary calcium (non-coronary calcium may still occur)")
    parser.add_argument("--burden", choices=BURDENS, default=None,
                        help="coronary calcium burden class (default: drawn from the seed)")
    parser.add_argument("--slices", type=int, default=None,
                        help="number of contiguous 3 mm slices, 2-200 (default 48 for patient, 40 for qrm)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns per slice (default 512)")
    parser.add_argument("--pixel-spacing", type=float, default=None, metavar="MM",
                        help="in-plane pixel spacing in mm (default: drawn, 0.35-0.8 mm at 512 pixels)")
    parser.add_argument("--noise", type=float, default=None, metavar="HU", dest="noise_hu",
                        help="noise standard deviation in HU (default: drawn per case)")
    parser.add_argument("--metal", choices=("auto", "on", "off"), default="auto",
                        help="metal streaks from sternal wires or a pacemaker lead (default auto: 15%% of seeds)")
    parser.add_argument("--motion", choices=("auto", "on", "off"), default="auto",
                        help="cardiac motion blur on a few slices (default auto: 25%% of seeds)")
    parser.add_argument("--uid-prefix", default=None, metavar="ROOT",
                        help="UID root of the series (default: pydicom's root 1.2.826.0.1.3680043.8.498.)")


def run(args: argparse.Namespace) -> int:
    from scoring.phantom import generate_phantom

    options: dict[str, object] = {"size": args.size, "pixel_spacing": args.pixel_spacing, "noise_hu": args.noise_hu}
    if args.slices is not None:
        options["slices"] = args.slices
    if args.uid_prefix is not None:
        options["uid_prefix"] = args.uid_prefix
    if args.mode == "patient":
        options.update(burden=args.burden, zero_calcium=args.zero_calcium,
                       metal=_toggle(args.metal), motion=_toggle(args.motion))
    elif args.zero_calcium or args.burden or args.metal != "auto" or args.motion != "auto":
        print("cacs-node phantom: --zero-calcium, --burden, --metal and --motion apply to --mode patient only; "
              "remove them for --mode qrm", file=sys.stderr)
        return EXIT_INPUT_ERROR

    try:
        case = generate_phantom(args.out_dir, args.seed, mode=args.mode, **options)
    except (ValueError, FileExistsError) as error:
        print(f"cacs-node phantom: {error}", file=sys.stderr)
        return EXIT_INPUT_ERROR

    with open(f"{args.out_dir}/truth.json", encoding="utf-8") as stream:
        truth = json.load(stream)
    print(f"wrote {case.shape[0]} slices of series {case.series_instance_uid} to {args.out_dir}/dicom")
    print(f"total Agatston {truth['agatston']['total']:.1f}, risk category {truth['risk_category']}, "
          f"burden {truth['phantom'].get('burden', 'calibration inserts')}")
    return 0
