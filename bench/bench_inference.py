"""Benchmark of segment_volume: plain fp32 full slices against the faster settings, same scores.

Run by hand, not in CI:

    python bench/bench_inference.py --seeds 2000-2002 --slices 50 --threads 2

For each phantom seed it segments the same volume with every variant. It
prints milliseconds per slice and the ratio against the plain fp32 baseline
measured in the same run. It also prints the number of voxels whose label
differs from the baseline, and each variant's total Agatston score and risk
category.
The last lines give the largest Agatston difference from the baseline and
whether any risk category changed.

Variants:
- baseline: full 512² slices, one slice per forward pass, contiguous memory format;
- batched: full slices, 4 per pass, channels-last;
- body crop: the body window (multiple of 256), 4 slices per pass, channels-last;
- onnx: the body window through ONNX Runtime (CPU provider), 4 slices per pass.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _seeds(text: str) -> list[int]:
    from node.commands.train import parse_seeds

    return parse_seeds(text)


def _onnx_segment(plain, volume, batch_size: int, threads: int, cache: dict) -> np.ndarray:
    """Segment with ONNX Runtime: the network exported once with dynamic batch and size axes."""
    import onnxruntime

    from scoring.inference import _paste_window, body_window, extract_window
    from scoring.model import combine_tasks, prepare_input

    if "session" not in cache:
        path = Path(cache["folder"]) / "network.onnx"
        network = plain.network
        example = torch.zeros(1, 2, 256, 256)
        torch.onnx.export(
            network, (example,), str(path), input_names=["input"],
            output_names=["region", "lesion"], opset_version=17, dynamo=False,
            dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}, "region": {0: "n", 2: "h", 3: "w"},
                          "lesion": {0: "n", 2: "h", 3: "w"}},
        )
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        cache["session"] = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
    session = cache["session"]
    hu = volume.hu
    window = body_window(hu)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    for first in range(0, hu.shape[0], batch_size):
        inputs = prepare_input(extract_window(hu[first:first + batch_size], window))
        region, lesion = session.run(None, {"input": inputs.numpy()})
        batch_labels = combine_tasks(
            torch.from_numpy(region), torch.from_numpy(lesion), inputs[:, 1] > 0.5
        )
        _paste_window(labels, batch_labels.numpy(), window, first)
    return labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None,
                        help="checkpoint to run (default: the shipped model)")
    parser.add_argument("--seeds", type=_seeds, default=[2000],
                        help="phantom seeds, e.g. 2000-2002 (default 2000)")
    parser.add_argument("--slices", type=int, default=50, help="slices per series (default 50)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime variant")
    args = parser.parse_args()

    from scoring import phantom
    from scoring.agatston import score_volume
    from scoring.inference import load_model, segment_volume

    torch.set_num_threads(args.threads)
    loaded = load_model(args.model, "cpu")
    plain = load_model(args.model, "cpu", channels_last=False)
    print(f"model {loaded.model_version}, torch {torch.__version__}, {args.threads} threads")

    variants = {
        "baseline": dict(batch_size=1, crop_to_body=False, channels_last=False),
        "batched": dict(batch_size=4, crop_to_body=False, channels_last=True),
        "body crop": dict(batch_size=4, crop_to_body=True, channels_last=True),
    }
    largest_difference = 0.0
    risk_changed = []
    with tempfile.TemporaryDirectory() as folder:
        onnx_cache: dict = {"folder": folder}
        for seed in args.seeds:
            volume = phantom.make_case(seed, slices=args.slices).to_volume()
            results = {}
            for name, settings in variants.items():
                # Warm-up on one slice, so that one-off allocation is not timed.
                model = loaded if settings["channels_last"] else plain
                segment_volume(_first_slices(volume, 1), model, **settings)
                started = time.perf_counter()
                segmentation = segment_volume(volume, model, **settings)
                seconds = time.perf_counter() - started
                results[name] = (seconds, segmentation.labels)
            if not args.no_onnx:
                _onnx_segment(plain, _first_slices(volume, 1), 4, args.threads, onnx_cache)
                started = time.perf_counter()
                labels = _onnx_segment(plain, volume, 4, args.threads, onnx_cache)
                results["onnx"] = (time.perf_counter() - started, labels)

            baseline_seconds, baseline_labels = results["baseline"]
            baseline_score = score_volume(volume, baseline_labels)
            print(f"\nseed {seed}: {volume.shape[0]} slices of {volume.shape[1]}², "
                  f"pixel spacing {volume.pixel_spacing[0]:.3f} mm")
            print(f"{'variant':<10} {'ms/slice':>9} {'speed-up':>9} {'study s':>8} "
                  f"{'voxels≠':>8} {'Agatston':>9} {'risk':>5}")
            for name, (seconds, labels) in results.items():
                score = score_volume(volume, labels)
                differing = int(np.count_nonzero(labels != baseline_labels))
                difference = abs(score.agatston["total"] - baseline_score.agatston["total"])
                largest_difference = max(largest_difference, difference)
                if score.risk_category != baseline_score.risk_category:
                    risk_changed.append((seed, name))
                print(f"{name:<10} {1000 * seconds / volume.shape[0]:>9.0f} "
                      f"{baseline_seconds / seconds:>8.2f}x {seconds:>8.1f} {differing:>8d} "
                      f"{score.agatston['total']:>9.1f} {score.risk_category:>5}")
    print(f"\nlargest total Agatston difference from the baseline: {largest_difference:.2f}")
    print(f"risk category changes: {risk_changed or 'none'}")
    return 0


def _first_slices(volume, count: int):
    import dataclasses

    return dataclasses.replace(
        volume,
        hu=volume.hu[:count],
        padding_mask=volume.padding_mask[:count],
        positions=volume.positions[:count],
        sop_instance_uids=volume.sop_instance_uids[:count],
    )


if __name__ == "__main__":
    raise SystemExit(main())
