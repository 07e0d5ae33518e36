"""Time score_volume on a 60-slice 512 × 512 volume against a per-lesion loop baseline.

Run by hand: `python bench/bench_scoring.py [--lesions N] [--repeats N]`.
Both scorers run in the same process on the same labels, and the script
checks that their Agatston scores agree before it prints the timings.
The target is under 0.5 s for score_volume on one core.
"""

from __future__ import annotations

import argparse
import os
import time

# One core, as in the target. These must be set before numpy loads its thread pools.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from scoring.agatston import density_weight, score_volume  # noqa: E402
from scoring.result import ARTERY_LABELS  # noqa: E402
from scoring.volume import CTVolume  # noqa: E402


def build_case(lesion_count: int, seed: int = 7) -> tuple[CTVolume, np.ndarray]:
    """Return a 60 × 512 × 512 volume with `lesion_count` random calcified blobs and their labels."""
    rng = np.random.default_rng(seed)
    shape = (60, 512, 512)
    hu = rng.normal(40.0, 15.0, size=shape).astype(np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    for _ in range(lesion_count):
        z = int(rng.integers(0, shape[0] - 3))
        y, x = (int(v) for v in rng.integers(150, 360, size=2))
        depth = int(rng.integers(1, 4))
        radius = int(rng.integers(1, 5))
        hu[z : z + depth, y - radius : y + radius, x - radius : x + radius] = rng.uniform(130, 1200)
        labels[z : z + depth, y - radius : y + radius, x - radius : x + radius] = rng.integers(1, 5)
    positions = np.array([[0.0, 0.0, 3.0 * i] for i in range(shape[0])])
    volume = CTVolume(
        hu=hu,
        padding_mask=np.zeros(shape, dtype=bool),
        origin=positions[0],
        row_direction=np.array([1.0, 0.0, 0.0]),
        column_direction=np.array([0.0, 1.0, 0.0]),
        slice_direction=np.array([0.0, 0.0, 1.0]),
        pixel_spacing=(0.4, 0.4),
        slice_increment=3.0,
        slice_thickness=3.0,
        kvp=120.0,
        positions=positions,
        series_instance_uid="1.2.3",
        study_instance_uid="1.2.4",
        frame_of_reference_uid="1.2.5",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uids=tuple(f"1.2.6.{i}" for i in range(shape[0])),
        headers=(),
    )
    return volume, labels


def naive_scores(volume: CTVolume, labels: np.ndarray, threshold: float = 130.0) -> tuple[float, int]:
    """Baseline: loop over the 2D lesions of each slice, then over each 3D lesion of the volume.

    Returns the total Agatston score and the number of listed lesions. It does
    the work of score_volume (Agatston, volume, mass, lesion list with peak HU
    and centroid) the straightforward way, one boolean mask per lesion.
    """
    pixel_area = volume.pixel_area_mm2
    voxel_volume = volume.voxel_volume_mm3
    total = 0.0
    listed = 0
    for artery_label in ARTERY_LABELS.values():
        scored = np.zeros(volume.shape, dtype=bool)
        for index in range(volume.shape[0]):
            mask = (labels[index] == artery_label) & (volume.hu[index] >= threshold)
            components, count = ndimage.label(mask, structure=np.ones((3, 3)))
            for component in range(1, count + 1):
                lesion = components == component
                area = np.count_nonzero(lesion) * pixel_area
                if area < 1.0 - 1e-9:
                    continue
                total += area * int(density_weight(volume.hu[index][lesion].max()))
                scored[index] |= lesion

        lesion_map, lesion_count = ndimage.label(scored)
        for lesion_id in range(1, lesion_count + 1):
            lesion = lesion_map == lesion_id
            lesion_volume = np.count_nonzero(lesion) * voxel_volume
            if lesion_volume < 1.5 - 1e-9:
                continue
            lesion_hu = volume.hu[lesion].astype(np.float64)
            _mass = lesion_hu.mean() * lesion_volume / 1000.0 * 0.743
            _peak = lesion_hu.max()
            _centroid = volume.index_to_patient(np.argwhere(lesion).mean(axis=0))
            listed += 1
    return total * volume.slice_increment / 3.0, listed


def best_time_ms(function, repeats: int) -> tuple[float, object]:
    """Return the fastest of `repeats` runs in ms and the last return value."""
    best = float("inf")
    value = None
    for _ in range(repeats):
        started = time.perf_counter()
        value = function()
        best = min(best, time.perf_counter() - started)
    return best * 1000.0, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lesions", type=int, default=400, help="random blobs to place (default 400)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per scorer; the fastest counts (default 3)")
    args = parser.parse_args()

    volume, labels = build_case(args.lesions)
    vectorised_ms, result = best_time_ms(lambda: score_volume(volume, labels), args.repeats)
    naive_ms, (naive_total, naive_listed) = best_time_ms(lambda: naive_scores(volume, labels), args.repeats)

    if not np.isclose(result.agatston["total"], naive_total, rtol=1e-9):
        raise SystemExit(
            f"scores differ: score_volume {result.agatston['total']} vs baseline {naive_total}"
        )
    if len(result.lesions) != naive_listed:
        raise SystemExit(f"lesion lists differ: score_volume {len(result.lesions)} vs baseline {naive_listed}")
    print(f"volume 60 x 512 x 512, {args.lesions} blobs, {len(result.lesions)} listed lesions, "
          f"Agatston {result.agatston['total']:.1f}")
    print(f"score_volume      {vectorised_ms:8.1f} ms")
    print(f"per-lesion loop   {naive_ms:8.1f} ms")
    print(f"speed-up          {naive_ms / vectorised_ms:8.1f} x")


if __name__ == "__main__":
    main()
