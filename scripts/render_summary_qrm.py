"""Render the summary image of the QRM phantom scan to docs/images/summary-qrm.png.

Run from the repository root: python scripts/render_summary_qrm.py [QRM_DICOM_DIR]
The label map comes from the phantom's calcium inserts (tests/sr_writer/qrm_labels.py),
not from the model, so the page shows what the writer draws for known calcium.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.image

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY_ROOT))

from scoring.agatston import score_volume  # noqa: E402
from scoring.series import load_series  # noqa: E402
from sr_writer import AlgorithmIdentification, build_summary_image  # noqa: E402
from tests.sr_writer.qrm_labels import qrm_insert_labels  # noqa: E402


def main() -> int:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else REPOSITORY_ROOT.parent / "shared/data/qrm-phantom-toshiba/dicom"
    volume = load_series(source)
    labels = qrm_insert_labels(volume)
    result = score_volume(volume, labels)
    image = build_summary_image(
        volume,
        labels,
        result,
        algorithm=AlgorithmIdentification(model_version="QRM insert labels"),
        uid_root="1.2.826.0.1.3680043.8.498.77",
        device_serial_number="docs",
    )
    target = REPOSITORY_ROOT / "docs/images/summary-qrm.png"
    target.parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(target, image.pixel_array)
    print(f"wrote {target} (Agatston total {result.agatston['total']:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
