"""Time the digital phantom's make_case against a noise-only baseline of the same volume size.

Run by hand: `python bench/bench_phantom.py [--slices N] [--size N] [--seeds N] [--write]`.
For each seed the script times, in the same process:

- baseline: `numpy.random.Generator.standard_normal` filling one float32
  volume of the same shape, the least work any generator of this size does;
- make_case: anatomy, calcium, artifacts, noise, quantisation, labels and
  region scribbles, in memory;
- with --write, generate_phantom: make_case plus the DICOM series, the NRRD
  label maps and truth.json in a temporary folder.

It prints the median and maximum of wall time and of process CPU time, per
case and per slice, and the ratio to the baseline. Training generates cases
on the fly, so the target is well under 1 s per 48-slice 512 × 512 case.
Wall time on a shared machine includes waiting for the CPU; the CPU time
does not.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from scoring.phantom import generate_phantom, make_case


def measure(function, *args, **kwargs) -> tuple[float, float]:
    """Run `function` once; return (wall seconds, process CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    function(*args, **kwargs)
    return time.perf_counter() - wall, time.process_time() - cpu


def report(name: str, samples: list[tuple[float, float]], slices: int, baseline: float | None) -> None:
    walls = [s[0] for s in samples]
    cpus = [s[1] for s in samples]
    line = (f"{name:18s} wall median {statistics.median(walls) * 1000:8.1f} ms (max {max(walls) * 1000:7.1f}), "
            f"CPU median {statistics.median(cpus) * 1000:8.1f} ms, "
            f"{statistics.median(cpus) * 1000 / slices:6.2f} ms CPU per slice")
    if baseline:
        line += f", {statistics.median(cpus) / baseline:5.1f}x baseline CPU"
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=48, help="slices per case (default 48)")
    parser.add_argument("--size", type=int, default=512, help="rows and columns (default 512)")
    parser.add_argument("--seeds", type=int, default=10, help="number of seeds to time (default 10)")
    parser.add_argument("--write", action="store_true", help="also time generate_phantom writing to disk")
    args = parser.parse_args()

    # Warm up imports and caches once.
    make_case(0, size=args.size, slices=2)

    shape = (args.slices, args.size, args.size)
    baseline = [measure(np.random.default_rng(seed).standard_normal, shape, dtype=np.float32)
                for seed in range(args.seeds)]
    cases = [measure(make_case, seed, size=args.size, slices=args.slices) for seed in range(args.seeds)]
    baseline_cpu = statistics.median(s[1] for s in baseline)

    print(f"{args.seeds} seeds, {args.slices} slices of {args.size} x {args.size}")
    report("baseline (noise)", baseline, args.slices, None)
    report("make_case", cases, args.slices, baseline_cpu)
    if args.write:
        written = []
        for seed in range(args.seeds):
            with tempfile.TemporaryDirectory() as folder:
                written.append(measure(generate_phantom, Path(folder) / "case", seed,
                                       size=args.size, slices=args.slices))
        report("generate_phantom", written, args.slices, baseline_cpu)


if __name__ == "__main__":
    main()
