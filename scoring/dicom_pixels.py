"""Decode CT pixel data into HU: transfer-syntax checks, pixel padding and the rescale transform.

Only lossless pixel data is accepted for scoring, because lossy compression
changes the HU of small calcifications around the 130 HU threshold. The
decoders are pydicom's pixel data handlers with the pylibjpeg plugins
(pylibjpeg-libjpeg for JPEG Lossless and JPEG-LS, pylibjpeg-openjpeg for
JPEG 2000, pylibjpeg-rle for RLE).
"""

from __future__ import annotations

import copy
import logging

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID

from scoring.errors import PixelDataError, UndecodablePixelDataError
from scoring.volume import PADDING_HU

logger = logging.getLogger(__name__)

#: Transfer syntaxes whose pixel data is uncompressed.
NATIVE_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {
        "1.2.840.10008.1.2",  # Implicit VR Little Endian
        "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
        "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired)
    }
)

#: Compressed transfer syntaxes that can only hold lossless pixel data.
#: TODO(#2): the HTJ2K entries rely on pydicom's pylibjpeg decoder and no test covers them.
LOSSLESS_COMPRESSED_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {
        "1.2.840.10008.1.2.5",  # RLE Lossless
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Process 14, Selection Value 1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 (Lossless Only)
        "1.2.840.10008.1.2.4.201",  # High-Throughput JPEG 2000 (Lossless Only)
        "1.2.840.10008.1.2.4.202",  # High-Throughput JPEG 2000 with RPCL Options (Lossless Only)
    }
)

#: Transfer syntaxes that allow lossy compression. JPEG 2000 (.91) and HTJ2K
#: (.203) may carry reversible data, but the syntax alone does not prove it.
LOSSY_TRANSFER_SYNTAXES: frozenset[str] = frozenset(
    {
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
        "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 and 4)
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Lossy (Near-Lossless)
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.4.93",  # JPEG 2000 Part 2 Multi-component
        "1.2.840.10008.1.2.4.203",  # High-Throughput JPEG 2000
    }
)

#: HU at or below this value are masked as padding, in addition to the
#: declared PixelPaddingValue range. Some scanners fill the area outside the
#: reconstruction circle with −2000, −2048 or −3024 HU without declaring it,
#: or declare a value that differs from the fill. No tissue or air is below
#: −1024 HU apart from noise. NOTE: the margin to noise is an estimate from
#: one 120 kVp scanner, whose darkest pixel inside the circle is −1312 HU.
PADDING_MAX_HU = -2000.0

#: (7FE0,0010) Pixel Data, (7FE0,0008) Float Pixel Data, (7FE0,0009) Double Float Pixel Data.
_PIXEL_DATA_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


def transfer_syntax_of(dataset: Dataset) -> str | None:
    """Return the TransferSyntaxUID from the dataset's file meta, or None when it has none."""
    file_meta = getattr(dataset, "file_meta", None)
    if file_meta is None:
        return None
    value = file_meta.get("TransferSyntaxUID")
    return str(value) if value else None


def check_lossless(header: Dataset, transfer_syntax: str | None, name: str) -> None:
    """Raise PixelDataError unless the instance's pixel data is known to be lossless.

    header: the instance (pixel data not needed).
    transfer_syntax: its TransferSyntaxUID, None for an in-memory dataset
        without file meta (read as native little endian).
    name: how error messages name the instance, such as "instance 1.2.3" or "file /path".
    """
    if str(header.get("LossyImageCompression", "")).strip() == "01":
        method = header.get("LossyImageCompressionMethod", "not recorded")
        raise PixelDataError(
            f"{name} has LossyImageCompression 01 (method {method}): its pixels were "
            "compressed with loss, which shifts HU around the 130 HU calcium threshold; "
            "send the original uncompressed or lossless series"
        )
    if transfer_syntax is None or transfer_syntax in NATIVE_TRANSFER_SYNTAXES:
        return
    if transfer_syntax in LOSSLESS_COMPRESSED_TRANSFER_SYNTAXES:
        return
    syntax_name = UID(transfer_syntax).name
    if transfer_syntax in LOSSY_TRANSFER_SYNTAXES:
        raise PixelDataError(
            f"{name} uses transfer syntax {syntax_name} ({transfer_syntax}), which allows "
            "lossy compression that shifts HU around the 130 HU calcium threshold; send the series "
            "uncompressed or with a lossless syntax (RLE, JPEG Lossless, JPEG-LS Lossless, "
            "JPEG 2000 Lossless Only)"
        )
    raise PixelDataError(
        f"{name} uses transfer syntax {syntax_name} ({transfer_syntax}), which the "
        "loader does not decode; send the series uncompressed or with a lossless syntax "
        "(RLE, JPEG Lossless, JPEG-LS Lossless, JPEG 2000 Lossless Only)"
    )


def _native_without_file_meta(dataset: Dataset, frames: int) -> np.ndarray:
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    bits_allocated = int(dataset.BitsAllocated)
    if bits_allocated != 16:
        raise PixelDataError(
            f"dataset without a transfer syntax has BitsAllocated {bits_allocated}; "
            "only 16-bit native pixels can be read without file meta; set file_meta.TransferSyntaxUID"
        )
    signed = int(dataset.get("PixelRepresentation", 0)) == 1
    expected = frames * rows * columns * 2
    data = dataset.PixelData
    if len(data) < expected:
        raise PixelDataError(
            f"PixelData has {len(data)} bytes; expected {expected} for {frames} frame(s) of "
            f"{rows} x {columns} 16-bit pixels (an encapsulated dataset needs file_meta.TransferSyntaxUID)"
        )
    pixels = np.frombuffer(data, dtype="<i2" if signed else "<u2", count=frames * rows * columns)
    bits_stored = int(dataset.get("BitsStored", 16))
    if bits_stored < 16:
        shift = 16 - bits_stored
        pixels = (pixels << shift) >> shift if signed else pixels & ((1 << bits_stored) - 1)
    return pixels.reshape(frames, rows, columns)


def decode_stored_values(dataset: Dataset, name: str) -> np.ndarray:
    """Decode the stored pixel values of every frame as an array (frames, rows, columns).

    Values are signed or unsigned per PixelRepresentation, before any rescale.
    Raises PixelDataError when the pixel data is missing, not one sample per
    pixel, lossy, or fails to decode.
    """
    if "PixelData" not in dataset:
        raise PixelDataError(f"{name} has no PixelData (7FE0,0010); send the image instances of the series")
    samples = int(dataset.get("SamplesPerPixel", 1))
    if samples != 1:
        raise PixelDataError(
            f"{name} has SamplesPerPixel {samples}; a CT image has 1 (grayscale); "
            "send the original CT series, not a rendered image"
        )
    transfer_syntax = transfer_syntax_of(dataset)
    check_lossless(dataset, transfer_syntax, name)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)

    if transfer_syntax is None:
        return _native_without_file_meta(dataset, frames)
    try:
        pixels = dataset.pixel_array
    except (ValueError, RuntimeError, NotImplementedError, AttributeError, TypeError) as error:
        message = f"{name}: decoding pixel data with transfer syntax {UID(transfer_syntax).name} failed ({error})"
        if transfer_syntax in NATIVE_TRANSFER_SYNTAXES:
            raise UndecodablePixelDataError(f"{message}; check that the file is complete") from error
        raise PixelDataError(
            f"{message}; check that the file is complete and that pylibjpeg and its plugins are installed"
        ) from error
    return np.asarray(pixels).reshape(frames, int(dataset.Rows), int(dataset.Columns))


def _padding_value_as_stored(value: object, signed: bool) -> int:
    # PixelPaddingValue has VR "US or SS" and is read as unsigned when the
    # parser could not resolve it, so reinterpret it per PixelRepresentation.
    if isinstance(value, bytes):
        return int(np.frombuffer(value[:2], dtype="<i2" if signed else "<u2")[0])
    number = int(value)  # type: ignore[call-overload]
    if signed and number > 32767:
        return number - 65536
    if not signed and number < 0:
        return number + 65536
    return number


def padding_range(header: Dataset) -> tuple[int, int] | None:
    """Return the inclusive stored-value range of pixel padding, None when none is declared.

    PixelPaddingValue alone marks one value. With PixelPaddingRangeLimit the
    range runs between the two values in either order (PS3.3 C.7.5.1.1.2).
    """
    if header.get("PixelPaddingValue") is None:
        return None
    signed = int(header.get("PixelRepresentation", 0)) == 1
    value = _padding_value_as_stored(header["PixelPaddingValue"].value, signed)
    if header.get("PixelPaddingRangeLimit") is None:
        return value, value
    limit = _padding_value_as_stored(header["PixelPaddingRangeLimit"].value, signed)
    return min(value, limit), max(value, limit)


def stored_to_hu(
    stored: np.ndarray,
    slope: float,
    intercept: float,
    padding: tuple[int, int] | None,
) -> tuple[np.ndarray, np.ndarray]:
    """Convert one frame of stored values to float32 HU with its padding mask.

    Padding is found on the stored values before the rescale, so no padding
    pixel ever carries a rescaled value. HU = stored × slope + intercept is
    computed in float64 and then rounded to float32. HU ≤ PADDING_MAX_HU are
    masked too, declared or not. Padding pixels get PADDING_HU.
    """
    hu = stored.astype(np.float64) * slope + intercept
    mask = hu <= PADDING_MAX_HU
    if padding is not None:
        mask |= (stored >= padding[0]) & (stored <= padding[1])
    hu[mask] = PADDING_HU
    return hu.astype(np.float32), mask


def strip_pixel_data(dataset: Dataset, *, copy_elements: bool = False) -> Dataset:
    """Return a new dataset with the elements of `dataset` except the pixel data elements.

    copy_elements: deep-copy every element. Without it the new dataset shares
        the element objects (and file_meta) with `dataset`, so changing an
        element's value in place changes both.
    Deferred pixel data is never read, because only the tags of pixel
    elements are touched.
    """
    header = Dataset()
    for tag in dataset.keys():
        if tag in _PIXEL_DATA_TAGS:
            continue
        element = dataset[tag]
        header.add(copy.deepcopy(element) if copy_elements else element)
    if hasattr(dataset, "file_meta"):
        header.file_meta = dataset.file_meta
    return header
