"""Time write_outputs and each builder on the QRM phantom scan against a plain pydicom baseline.

Run by hand, not in CI:

    python bench/bench_writers.py [--repeats N] [QRM_DICOM_DIR]

The scan is loaded and scored once with the label map of its calcium inserts
(tests/sr_writer/qrm_labels.py). Then, in the same process, the script times:

- baseline: `pydicom.dcmread` of every CT file of the scan with its pixels,
  the cost of reading the series that the outputs describe;
- build_seg, build_sr, build_summary_image: each builder alone;
- write_outputs: all three objects built and written to a temporary folder.

It prints the best and median wall time of each and the ratio of the medians
against the baseline. The first repeat also warms imports and caches.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT))


def _time(function: Callable[[], object], repeats: int) -> list[float]:
    durations = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        durations.append(time.perf_counter() - started)
    return durations


def main() -> int:
    import pydicom

    from scoring.agatston import score_volume
    from scoring.series import load_series
    from sr_writer import AlgorithmIdentification, build_seg, build_sr, build_summary_image, write_outputs
    from tests.sr_writer.qrm_labels import qrm_insert_labels

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", nargs="?", default=str(REPOSITORY_ROOT.parent / "shared/data/qrm-phantom-toshiba/dicom"))
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per step (default 5)")
    args = parser.parse_args()

    files = sorted(path for path in Path(args.source).rglob("*") if path.is_file())
    volume = load_series(args.source)
    labels = qrm_insert_labels(volume)
    result = score_volume(volume, labels)
    algorithm = AlgorithmIdentification(model_version="QRM insert labels")
    common = {"algorithm": algorithm, "uid_root": "1.2.826.0.1.3680043.8.498.77", "device_serial_number": "bench"}
    seg = build_seg(volume, labels, result, **common)

    with tempfile.TemporaryDirectory() as folder:
        steps: dict[str, Callable[[], object]] = {
            "baseline (dcmread with pixels)": lambda: [pydicom.dcmread(path).pixel_array for path in files],
            "build_seg": lambda: build_seg(volume, labels, result, **common),
            "build_sr": lambda: build_sr(volume, result, seg, **common),
            "build_summary_image": lambda: build_summary_image(volume, labels, result, **common),
            "write_outputs": lambda: write_outputs(
                volume, labels, result, folder, algorithm=algorithm, uid_root=common["uid_root"]
            ),
        }
        timings = {name: _time(step, args.repeats + 1)[1:] for name, step in steps.items()}

    baseline = statistics.median(timings["baseline (dcmread with pixels)"])
    print(f"{volume.shape[0]} slices of {volume.shape[1]} × {volume.shape[2]}, {args.repeats} timed runs each")
    print(f"{'step':32s} {'best s':>8s} {'median s':>9s} {'× baseline':>11s}")
    for name, durations in timings.items():
        median = statistics.median(durations)
        print(f"{name:32s} {min(durations):8.3f} {median:9.3f} {median / baseline:11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
