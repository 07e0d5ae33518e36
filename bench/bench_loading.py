"""Time load_series on a 60-slice 512 × 512 uncompressed CT series against a plain pydicom baseline.

Run by hand: `python bench/bench_loading.py [--slices N] [--repeats N] [--transfer-syntax UID]`.
The script writes the series into a temporary folder with scoring.ct_builder,
then times, in the same process and on the same files:

- baseline: `pydicom.dcmread` of every file plus `pixel_array` and the
  rescale, stacked in file-name order with no checks;
- load_series: headers, grouping, geometry checks, sorting, decoding, HU,
  padding and protocol checks.

It prints the best and median wall time of each and their ratio. The target
is under 2 s for load_series on 60 uncompressed slices. The first repeat also
warms the operating system's file cache, so all timings are warm-cache.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from scoring.ct_builder import build_ct_datasets, write_ct_series
from scoring.series import load_series


def write_series(folder: Path, slices: int, transfer_syntax: str) -> None:
    """Write a `slices` × 512 × 512 series of noisy soft tissue with padding outside the circle."""
    rng = np.random.default_rng(3)
    hu = rng.normal(40.0, 20.0, size=(slices, 512, 512)).round()
    rows, columns = np.mgrid[0:512, 0:512]
    outside = (rows - 255.5) ** 2 + (columns - 255.5) ** 2 > 256.0**2
    mask = np.broadcast_to(outside, hu.shape)
    datasets = build_ct_datasets(
        hu,
        pixel_spacing=(0.5, 0.5),
        padding_mask=mask,
        padding_value=-2000,
        transfer_syntax=transfer_syntax,
    )
    write_ct_series(datasets, folder)


def load_baseline(folder: Path) -> np.ndarray:
    """Read every file with pydicom, decode and rescale it, and stack in file-name order."""
    slices = []
    for path in sorted(folder.iterdir()):
        dataset = pydicom.dcmread(path)
        slices.append(dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept))
    return np.stack(slices).astype(np.float32)


def time_calls(function, argument, repeats: int) -> list[float]:  # type: ignore[no-untyped-def]
    """Return the wall time in seconds of each of `repeats` calls of function(argument)."""
    timings = []
    for _ in range(repeats):
        start = time.perf_counter()
        function(argument)
        timings.append(time.perf_counter() - start)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=60, help="number of slices (default 60)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each loader (default 5)")
    parser.add_argument(
        "--transfer-syntax",
        default=ExplicitVRLittleEndian,
        help="TransferSyntaxUID of the written files (default Explicit VR Little Endian)",
    )
    arguments = parser.parse_args()

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary) / "series"
        write_series(folder, arguments.slices, arguments.transfer_syntax)
        size_mb = sum(path.stat().st_size for path in folder.iterdir()) / 1e6
        print(f"series: {arguments.slices} slices of 512 x 512, {size_mb:.1f} MB, syntax {arguments.transfer_syntax}")

        baseline = time_calls(load_baseline, folder, arguments.repeats)
        loader = time_calls(load_series, folder, arguments.repeats)

    for name, timings in (("baseline dcmread+pixel_array", baseline), ("load_series", loader)):
        print(f"{name:30s} best {min(timings) * 1000:8.1f} ms   median {statistics.median(timings) * 1000:8.1f} ms")
    print(f"ratio load_series / baseline (best): {min(loader) / min(baseline):.2f}")


if __name__ == "__main__":
    main()
