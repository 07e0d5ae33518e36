"""Load one CT series from files or datasets into a CTVolume in HU, with its geometry and protocol flags.

Steps of `load_series`:

1. Read every file's header (pixel data deferred, not read). Files that are
   not DICOM are dropped with a logged reason. A file shorter than the
   132-byte preamble and DICM prefix is damaged, not dropped, when its
   suffix is .dcm, .dicom or .ima, or when it has no suffix or a digits-only
   suffix and sits in a folder with DICOM files (`_check_short_files`).
2. Keep instances of CT Image Storage, Enhanced CT Image Storage and Legacy
   Converted Enhanced CT Image Storage that are not localizers (ImageType
   LOCALIZER) and are axial (slice normal within AXIAL_MAX_OBLIQUITY_DEG of
   the patient's z axis). ORIGINAL and DERIVED images are both valid.
   Everything else is dropped with a logged reason, and so is a second copy
   of a SOPInstanceUID. A damaged file is an error, not a drop, because a
   dropped slice at either end of the stack would go unnoticed. Damaged
   means a DICOM file that fails to parse or is empty, a SOPClassUID that
   differs from the MediaStorageSOPClassUID, a CT image without pixel
   data or orientation, or an Enhanced CT image without per-frame functional
   groups. These raise DamagedInstanceError.
3. Group by SeriesInstanceUID. Instances without one form a single group
   named "(no SeriesInstanceUID)". That group is decoded and checked like any
   other, so protocol errors come first. Then `load_series` raises
   MissingUIDError, because SEG and SR must reference real UIDs.
4. Pick the series (`select_series`): the one requested by UID, else the
   only one, else the one whose nominal SliceThickness is closest to 3.0 mm.
   A tie raises AmbiguousSeriesError naming every tied series. Series are
   never mixed.
5. Check that the chosen instances share PatientID, PatientName,
   StudyInstanceUID and FrameOfReferenceUID (`check_identity`), else raise
   InconsistentIdentityError: such a series may mix two patients.
6. Raise for protocol deviations that the headers show and whose policy is
   "refuse" (kVp, contrast, body part), before any geometry error.
7. Check and sort the slice geometry (`scoring.slice_geometry`), decode the
   pixels and convert to HU (`scoring.dicom_pixels`), and check the protocol
   (`scoring.protocol`). A file whose Image Plane or rescale attributes are
   missing or invalid, or whose uncompressed pixel data is cut short, is
   also a damaged instance (DamagedInstanceError, naming every such file).
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from scoring.config import ProtocolPolicy
from scoring.dicom_pixels import (
    check_lossless,
    decode_stored_values,
    padding_range,
    stored_to_hu,
    strip_pixel_data,
    transfer_syntax_of,
)
from scoring.errors import (
    AmbiguousSeriesError,
    DamagedInstanceError,
    InconsistentGeometryError,
    InconsistentIdentityError,
    MissingUIDError,
    NoEligibleSeriesError,
    PixelDataError,
    SeriesError,
    UndecodablePixelDataError,
)
from scoring.protocol import check_header_protocol, check_protocol, kvp_of, validate_policy
from scoring.slice_geometry import (
    SliceRecord,
    check_consistent,
    functional_group_item,
    instance_attribute,
    multi_frame_records,
    optional_float,
    single_frame_record,
    slice_normal,
    sort_and_measure,
)
from scoring.volume import CTVolume

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"

#: SOP classes the loader reads. The last two are multi-frame with functional groups.
CT_SOP_CLASSES = frozenset(
    {CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE}
)

#: Largest angle between the slice normal and the patient's z axis for an axial slice.
AXIAL_MAX_OBLIQUITY_DEG = 10.0

#: Nominal slice thickness preferred when a source contains several eligible series.
PREFERRED_SLICE_THICKNESS_MM = 3.0

#: Pixel data is not read while headers are scanned; values larger than this are deferred.
_HEADER_DEFER_SIZE = "1 KB"

#: Length of the 128-byte preamble plus "DICM"; a shorter file cannot be a DICOM file.
DICOM_PREFIX_END = 132

#: File name suffixes (lower case) that mark a file as DICOM, so a short one is damaged.
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".ima"})

#: Group name of instances that have no SeriesInstanceUID.
NO_SERIES_UID = "(no SeriesInstanceUID)"

DicomSource = str | os.PathLike[str] | Sequence[str | os.PathLike[str] | Dataset]

#: Attributes every instance of a series must share. A disagreement may mean
#: that two patients or two scans were mixed under one SeriesInstanceUID.
IDENTITY_KEYWORDS = ("PatientID", "PatientName", "StudyInstanceUID", "FrameOfReferenceUID")

#: Attributes whose values are kept out of messages and logs.
_PATIENT_KEYWORDS = frozenset({"PatientID", "PatientName"})

#: Largest number of SOPInstanceUIDs named in an identity error.
_MAX_NAMED_INSTANCES = 5


@dataclass
class _Instance:
    dataset: Dataset
    name: str
    sop_class_uid: str
    transfer_syntax: str | None
    sop_class_from_file_meta: bool = False
    #: True for Datasets passed in by the caller, whose elements must not be shared.
    caller_owned: bool = False
    #: The file read, None for a Dataset passed in by the caller.
    path: Path | None = None


@dataclass(frozen=True)
class SeriesSummary:
    """An eligible CT series found in a source, as listed by `list_series`.

    slice_thickness: nominal SliceThickness of the first instance in mm, None when not recorded.
    image_count: number of image planes (frames of multi-frame instances counted one by one).
    """

    series_instance_uid: str
    series_number: str
    series_description: str
    slice_thickness: float | None
    instance_count: int
    image_count: int

    def describe(self) -> str:
        """Return a one-line description for messages and logs."""
        thickness = "not recorded" if self.slice_thickness is None else f"{self.slice_thickness:g} mm"
        return (
            f"{self.series_instance_uid} (number {self.series_number or '-'}, "
            f"'{self.series_description}', thickness {thickness}, {self.image_count} images)"
        )


#: Damaged instances whose own messages a combined DamagedInstanceError repeats; the rest are counted.
_DAMAGED_SHOWN = 5


class _DropLog:
    """Dropped inputs, logged one line each at DEBUG and one line per reason at INFO."""

    def __init__(self) -> None:
        self._examples: dict[str, str] = {}
        self._counts: Counter[str] = Counter()
        #: Damaged instances found so far; `raise_damaged` reports them all at once.
        self.damaged: list[DamagedInstanceError] = []

    def record(self, name: str, reason: str) -> None:
        logger.debug("dropped %s: %s", name, reason)
        self._examples.setdefault(reason, name)
        self._counts[reason] += 1

    def raise_damaged(self) -> None:
        """Raise one DamagedInstanceError naming every damaged instance found, if there is one."""
        if len(self.damaged) == 1:
            raise self.damaged[0]
        if self.damaged:
            listed = "; ".join(str(error) for error in self.damaged[:_DAMAGED_SHOWN])
            more = len(self.damaged) - _DAMAGED_SHOWN
            raise DamagedInstanceError(
                f"{len(self.damaged)} instances are damaged: {listed}" + (f"; and {more} more" if more > 0 else ""),
                paths=tuple(path for error in self.damaged for path in error.paths),
            )

    def flush(self) -> None:
        for reason, count in self._counts.items():
            logger.info("dropped %d input(s): %s (for example %s)", count, reason, self._examples[reason])
        self._examples.clear()
        self._counts.clear()


def _instance_name(dataset: Dataset, fallback: str) -> str:
    uid = str(dataset.get("SOPInstanceUID", "") or "")
    return f"instance {uid}" if uid else fallback


def _read_file(path: Path, drops: _DropLog, short_files: list[Path]) -> _Instance | None:
    """Read one file's header; return None for a file that is not DICOM.

    A file too short for the preamble and "DICM" is appended to `short_files`
    instead of being dropped, so that `_check_short_files` can decide whether
    it is a damaged slice.
    """
    try:
        dataset = pydicom.dcmread(path, defer_size=_HEADER_DEFER_SIZE)
    except InvalidDicomError:
        if path.stat().st_size < DICOM_PREFIX_END:
            short_files.append(path)
        else:
            drops.record(f"file {path}", "not a DICOM file (no DICM prefix)")
        return None
    except (OSError, EOFError, ValueError) as error:
        raise DamagedInstanceError(
            f"file {path} has a DICOM prefix but cannot be read ({error}); "
            "remove the file or re-send the series",
            path,
        ) from error
    if len(dataset) == 0:
        raise DamagedInstanceError(
            f"file {path} has a DICOM prefix but no data elements; remove the file or re-send the series", path
        )
    return _make_instance(dataset, _instance_name(dataset, f"file {path}"), path)


def _is_slice_file_name(path: Path) -> bool:
    """Return True for names that scanners and PACS give to DICOM slice files.

    These are names without a suffix, with a digits-only suffix (a name made
    of a UID such as 1.2.840.113619.2.55.3.1234) or with a DICOM_SUFFIXES
    suffix. DICOMDIR is excluded because it is a directory file, not a slice.
    """
    if path.name.upper() == "DICOMDIR":
        return False
    suffix = path.suffix.lower()
    return suffix == "" or suffix[1:].isdigit() or suffix in DICOM_SUFFIXES


def _check_short_files(short_files: Sequence[Path], instances: Sequence[_Instance], drops: _DropLog) -> None:
    """Record a short file that is likely a damaged slice in `drops.damaged`; drop the others.

    A file shorter than the preamble and "DICM" is damaged when its suffix is
    in DICOM_SUFFIXES, or when it has a slice file name and sits in a folder
    with files read as DICOM. Any other short file (an empty README.txt) is
    dropped with a logged reason.
    """
    dicom_folders = {instance.path.parent for instance in instances if instance.path is not None}
    for path in short_files:
        size = path.stat().st_size
        beside_dicom = path.parent in dicom_folders and _is_slice_file_name(path)
        if path.suffix.lower() in DICOM_SUFFIXES or beside_dicom:
            has_suffix = path.suffix.lower() in DICOM_SUFFIXES
            where = "has a DICOM file name suffix" if has_suffix else "sits beside DICOM files"
            drops.damaged.append(DamagedInstanceError(
                f"file {path} {where} but has only {size} bytes; a DICOM file has at least "
                f"{DICOM_PREFIX_END} (preamble and DICM prefix); the file is empty or truncated, so a "
                "slice may be missing; re-send the series, or remove the file if it is not a slice",
                path,
            ))
            continue
        drops.record(f"file {path}", "not a DICOM file (no DICM prefix)")


def _make_instance(dataset: Dataset, name: str, path: Path | None = None) -> _Instance:
    sop_class = str(dataset.get("SOPClassUID", "") or "")
    file_meta = getattr(dataset, "file_meta", None)
    media_class = str(file_meta.get("MediaStorageSOPClassUID", "") or "") if file_meta is not None else ""
    if sop_class and media_class and sop_class != media_class:
        raise DamagedInstanceError(
            f"{name} has SOPClassUID {sop_class} but MediaStorageSOPClassUID {media_class}; "
            "the file is damaged or was edited inconsistently; remove it or re-send the series",
            path,
        )
    from_file_meta = not sop_class and bool(media_class)
    if from_file_meta:
        sop_class = media_class
        logger.debug("%s has an empty SOPClassUID; using MediaStorageSOPClassUID %s", name, sop_class)
    return _Instance(dataset, name, sop_class, transfer_syntax_of(dataset), from_file_meta, path=path)


def _source_paths(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(candidate for candidate in path.rglob("*") if candidate.is_file())
    if path.is_file():
        return [path]
    raise NoEligibleSeriesError(f"{path} does not exist; pass a folder or files of one CT series")


def _read_source(source: DicomSource, drops: _DropLog) -> list[_Instance]:
    items: Iterable[object]
    if isinstance(source, (str, os.PathLike)):
        items = _source_paths(Path(source))
    elif isinstance(source, Sequence):
        items = source
    else:
        raise TypeError(
            f"source is a {type(source).__name__}; expected a folder path or a sequence of file paths or Datasets"
        )

    instances = []
    short_files: list[Path] = []
    for index, item in enumerate(items):
        try:
            if isinstance(item, Dataset):
                instance = _make_instance(item, _instance_name(item, f"dataset #{index}"))
                instance.caller_owned = True
                instances.append(instance)
            elif isinstance(item, (str, os.PathLike)):
                instances.extend(_read_files(_source_paths(Path(item)), drops, short_files))
            else:
                raise TypeError(f"source item #{index} is a {type(item).__name__}; expected a file path or a Dataset")
        except DamagedInstanceError as error:
            drops.damaged.append(error)
    _check_short_files(short_files, instances, drops)
    return instances


def _read_files(paths: Sequence[Path], drops: _DropLog, short_files: list[Path]) -> list[_Instance]:
    """Read the headers of DICOM files, recording damaged ones in `drops.damaged` and going on."""
    instances = []
    for path in paths:
        try:
            instance = _read_file(path, drops, short_files)
        except DamagedInstanceError as error:
            drops.damaged.append(error)
            continue
        if instance is not None:
            instances.append(instance)
    return instances


def _orientation_of(instance: _Instance) -> object:
    if instance.sop_class_uid == CT_IMAGE_STORAGE:
        return instance.dataset.get("ImageOrientationPatient")
    item = functional_group_item(instance.dataset, 0, "PlaneOrientationSequence")
    return None if item is None else item.get("ImageOrientationPatient")


def _ineligibility_reason(instance: _Instance) -> str | None:
    """Return why an instance cannot be part of a scored series, None when it can.

    Raises DamagedInstanceError for a CT image without pixel data or orientation.
    """
    dataset = instance.dataset
    if instance.sop_class_uid not in CT_SOP_CLASSES:
        class_name = UID(instance.sop_class_uid).name if instance.sop_class_uid else "no SOP Class UID"
        return f"SOP class {class_name} is not a CT image"
    image_type = [str(value).upper() for value in (dataset.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return f"localizer (ImageType {'/'.join(image_type)})"
    if "PixelData" not in dataset:
        raise DamagedInstanceError(
            f"{instance.name} is a CT image without PixelData (7FE0,0010); remove it or re-send the series",
            instance.path,
        )
    if instance.sop_class_uid != CT_IMAGE_STORAGE and not dataset.get("PerFrameFunctionalGroupsSequence"):
        class_name = UID(instance.sop_class_uid).name
        raise DamagedInstanceError(
            f"{instance.name} has SOP class {class_name} but no PerFrameFunctionalGroupsSequence "
            f"(NumberOfFrames {dataset.get('NumberOfFrames', 'missing')}), so its frames have no position "
            "or orientation; it may be a single-frame CT image stored under the wrong SOP class; "
            "re-export it as CT Image Storage or re-send the series",
            instance.path,
        )
    orientation = _orientation_of(instance)
    if orientation is None or len(orientation) != 6:  # type: ignore[arg-type]
        raise DamagedInstanceError(
            f"{instance.name} is a CT image without a valid ImageOrientationPatient ({orientation!r}); "
            "remove it or re-send the series",
            instance.path,
        )
    try:
        normal = slice_normal(np.asarray([float(v) for v in orientation], dtype=np.float64))  # type: ignore[union-attr]
    except (TypeError, ValueError, SeriesError) as error:
        return f"invalid ImageOrientationPatient ({error})"
    obliquity = float(np.degrees(np.arccos(min(1.0, abs(float(normal[2]))))))
    if obliquity > AXIAL_MAX_OBLIQUITY_DEG:
        return (
            f"not axial: slice normal {np.round(normal, 3).tolist()} is {obliquity:.1f}° from the z axis "
            f"(at most {AXIAL_MAX_OBLIQUITY_DEG:g}° accepted)"
        )
    return None


def _group_eligible(instances: Sequence[_Instance], drops: _DropLog) -> dict[str, list[_Instance]]:
    groups: dict[str, list[_Instance]] = {}
    seen_uids: set[str] = set()
    for instance in instances:
        try:
            reason = _ineligibility_reason(instance)
        except DamagedInstanceError as error:
            drops.damaged.append(error)
            continue
        if reason is not None:
            drops.record(instance.name, reason)
            continue
        sop_uid = str(instance.dataset.get("SOPInstanceUID", "") or "")
        if sop_uid and sop_uid in seen_uids:
            drops.record(instance.name, "a second copy of the same SOPInstanceUID")
            continue
        seen_uids.add(sop_uid)
        series_uid = str(instance.dataset.get("SeriesInstanceUID", "") or "") or NO_SERIES_UID
        groups.setdefault(series_uid, []).append(instance)
    drops.raise_damaged()
    return groups


def _nominal_thickness(instance: _Instance) -> float | None:
    value = instance.dataset.get("SliceThickness")
    if instance.sop_class_uid != CT_IMAGE_STORAGE:
        item = functional_group_item(instance.dataset, 0, "PixelMeasuresSequence")
        value = None if item is None else item.get("SliceThickness")
    return optional_float(value)


def _summarize(series_uid: str, instances: Sequence[_Instance]) -> SeriesSummary:
    first = instances[0].dataset
    return SeriesSummary(
        series_instance_uid=series_uid,
        series_number=str(first.get("SeriesNumber", "") or ""),
        series_description=str(first.get("SeriesDescription", "") or ""),
        slice_thickness=_nominal_thickness(instances[0]),
        instance_count=len(instances),
        image_count=sum(int(instance.dataset.get("NumberOfFrames", 1) or 1) for instance in instances),
    )


def list_series(source: DicomSource) -> list[SeriesSummary]:
    """List the eligible CT series of a folder or of files/datasets, in SeriesInstanceUID order.

    Ineligible instances are dropped with a logged reason, as in `load_series`.
    Raises TypeError for a source of the wrong type and NoEligibleSeriesError
    when a path does not exist.
    """
    drops = _DropLog()
    groups = _group_eligible(_read_source(source, drops), drops)
    drops.flush()
    return [_summarize(uid, groups[uid]) for uid in sorted(groups)]


def select_series(summaries: Sequence[SeriesSummary], series_instance_uid: str | None = None) -> SeriesSummary:
    """Pick the series to score: the requested UID, the only one, or the one closest to 3.0 mm thick.

    A series without a recorded thickness ranks after every series with one.
    Raises NoEligibleSeriesError when there is none or the requested UID is
    absent, and AmbiguousSeriesError when several series tie for the best rank.
    """
    if not summaries:
        raise NoEligibleSeriesError(
            "no axial CT image series with pixel data was found; send a non-contrast calcium-scoring "
            "CT series (CT Image Storage or Enhanced CT Image Storage)"
        )
    if series_instance_uid is not None:
        for summary in summaries:
            if summary.series_instance_uid == series_instance_uid:
                return summary
        found = ", ".join(summary.series_instance_uid for summary in summaries)
        raise NoEligibleSeriesError(
            f"series {series_instance_uid} is not among the eligible CT series found ({found})"
        )
    if len(summaries) == 1:
        return summaries[0]

    def rank(summary: SeriesSummary) -> float:
        if summary.slice_thickness is None:
            return float("inf")
        return round(abs(summary.slice_thickness - PREFERRED_SLICE_THICKNESS_MM), 3)

    best = min(rank(summary) for summary in summaries)
    tied = [summary for summary in summaries if rank(summary) == best]
    if len(tied) > 1:
        names = "; ".join(summary.describe() for summary in tied)
        raise AmbiguousSeriesError(
            f"{len(tied)} CT series are equally suited for calcium scoring: {names}; "
            "send only the series to score, or name it by SeriesInstanceUID"
        )
    others = [summary.series_instance_uid for summary in summaries if summary is not tied[0]]
    logger.info(
        "picked series %s (thickness closest to %g mm) over %s",
        tied[0].series_instance_uid,
        PREFERRED_SLICE_THICKNESS_MM,
        ", ".join(others),
    )
    return tied[0]


def check_identity(instances: Sequence[Dataset], series: str) -> None:
    """Raise InconsistentIdentityError when the instances disagree on an IDENTITY_KEYWORDS attribute.

    A missing or empty value counts as a value of its own. The message gives
    how many instances carry each value and names the SOPInstanceUIDs of
    those outside the largest group. It never contains PatientID or
    PatientName values, because error messages reach the node's logs.
    """
    for keyword in IDENTITY_KEYWORDS:
        by_value: dict[str, list[Dataset]] = {}
        for dataset in instances:
            by_value.setdefault(str(dataset.get(keyword, "") or ""), []).append(dataset)
        if len(by_value) < 2:
            continue

        # Largest group first; equal groups keep the order in which they were found.
        groups = sorted(by_value.items(), key=lambda item: -len(item[1]))
        counts = ", ".join(str(len(group)) for _, group in groups)
        if keyword in _PATIENT_KEYWORDS:
            values = f"{len(groups)} different values ({counts} instances)"
        else:
            shown = ", ".join(f"{value or '(missing)'} in {len(group)}" for value, group in groups)
            values = f"{len(groups)} different values ({shown} instances)"
        outliers = [dataset for _, group in groups[1:] for dataset in group]
        named = ", ".join(
            str(dataset.get("SOPInstanceUID", "") or "(no SOPInstanceUID)")
            for dataset in outliers[:_MAX_NAMED_INSTANCES]
        )
        more = f" and {len(outliers) - _MAX_NAMED_INSTANCES} more" if len(outliers) > _MAX_NAMED_INSTANCES else ""
        raise InconsistentIdentityError(
            f"series {series} has {len(instances)} instances with {values} of {keyword}, "
            f"so it may mix two patients or scans; instances outside the largest group: {named}{more}; "
            "check the series at the scanner or PACS, remove the instances that do not belong, "
            "and re-send the series"
        )


def _slice_records(instances: Sequence[_Instance], drops: _DropLog) -> list[SliceRecord]:
    """Return the image planes of every instance.

    An instance read from a file whose Image Plane or rescale attributes are
    missing or invalid is a damaged instance: all of them are reported
    together in one DamagedInstanceError.
    """
    records: list[SliceRecord] = []
    for index, instance in enumerate(instances):
        try:
            if instance.sop_class_uid == CT_IMAGE_STORAGE:
                records.append(single_frame_record(instance.dataset, index, instance.name))
            else:
                records.extend(multi_frame_records(instance.dataset, index, instance.name))
        except (InconsistentGeometryError, PixelDataError) as error:
            if instance.path is None:
                raise
            drops.damaged.append(DamagedInstanceError(str(error), instance.path))
    drops.raise_damaged()
    return records


def _mass_calibration_factor(header: Dataset) -> float | None:
    element = instance_attribute(header, "CalciumScoringMassFactorDevice")
    values = [element] if isinstance(element, (int, float)) else list(element or [])  # type: ignore[call-overload]
    if not values:
        return None
    factor = float(values[0])
    if not np.isfinite(factor) or factor <= 0.0:
        logger.warning("ignored CalciumScoringMassFactorDevice %s: not a positive number", values)
        return None
    return factor


def _decode_volume(
    ordered: Sequence[SliceRecord], instances: Sequence[_Instance], drops: _DropLog
) -> tuple[np.ndarray, np.ndarray]:
    """Decode every plane in volume order and return float32 HU and the padding mask.

    Files whose uncompressed pixel data fails to decode are damaged instances:
    all of them are reported together in one DamagedInstanceError.
    """
    stored_by_instance: dict[int, np.ndarray] = {}
    first = ordered[0]
    hu = np.empty((len(ordered), first.rows, first.columns), dtype=np.float32)
    padding_mask = np.empty(hu.shape, dtype=bool)
    for instance_index in dict.fromkeys(record.instance_index for record in ordered):
        instance = instances[instance_index]
        try:
            stored_by_instance[instance_index] = decode_stored_values(instance.dataset, instance.name)
        except UndecodablePixelDataError as error:
            if instance.path is None:
                raise
            drops.damaged.append(DamagedInstanceError(str(error), instance.path))
    drops.raise_damaged()
    for slice_index, record in enumerate(ordered):
        instance = instances[record.instance_index]
        frame_index = 0 if record.frame_number is None else record.frame_number - 1
        stored = stored_by_instance[record.instance_index][frame_index]
        padding = padding_range(instance.dataset)
        hu[slice_index], padding_mask[slice_index] = stored_to_hu(stored, record.slope, record.intercept, padding)
    return hu, padding_mask


def load_series(
    source: DicomSource,
    policy: ProtocolPolicy = ProtocolPolicy(),
    *,
    series_instance_uid: str | None = None,
) -> CTVolume:
    """Load one CT series into a CTVolume of float32 HU in volume order.

    source: a folder (searched recursively), a file, or a sequence of file
        paths and pydicom Datasets (Datasets are not modified).
    policy: what to do on protocol deviations (flag or refuse).
    series_instance_uid: the series to load when the source contains several.

    Raises (all SeriesError subclasses, messages name the values involved):
    NoEligibleSeriesError (no CT series, or the requested one is absent),
    AmbiguousSeriesError (several equally suited series),
    InconsistentIdentityError (instances disagree on patient, study or frame of reference),
    InconsistentGeometryError (rows, columns, orientation or spacing differ),
    SliceSpacingError (gap, duplicate position, gantry tilt, single slice),
    PixelDataError (missing rescale, lossy or undecodable pixels),
    ProtocolRefusedError (a deviation whose policy is "refuse"),
    MissingUIDError (no SeriesInstanceUID or SOPInstanceUID),
    DamagedInstanceError (a file that cannot be read completely).
    Raises TypeError when `source` is not a path or a sequence.
    """
    validate_policy(policy)
    drops = _DropLog()
    instances = _read_source(source, drops)
    without_class = sum(1 for instance in instances if instance.sop_class_from_file_meta)
    if without_class:
        logger.info("%d instances have an empty SOPClassUID; used their MediaStorageSOPClassUID", without_class)
    groups = _group_eligible(instances, drops)
    drops.flush()
    summaries = [_summarize(uid, groups[uid]) for uid in sorted(groups)]
    chosen = select_series(summaries, series_instance_uid)
    series = chosen.series_instance_uid
    instances = groups[series]
    logger.info("loading series %s: %d instances, %d images", series, chosen.instance_count, chosen.image_count)

    check_identity([instance.dataset for instance in instances], series)

    # Protocol rejections that need no geometry come first, so a contrast scan
    # is not reported for a gap that re-sending would not cure.
    check_header_protocol([instance.dataset for instance in instances], policy=policy, series=series)

    # Reject lossy pixels before any decoding work.
    for instance in instances:
        check_lossless(instance.dataset, instance.transfer_syntax, instance.name)

    records = _slice_records(instances, drops)
    check_consistent(records, series)
    ordered, increment = sort_and_measure(records, series)

    hu, padding_mask = _decode_volume(ordered, instances, drops)
    first = ordered[0]

    # One header per instance, in the order its first plane appears in the volume.
    instance_order = list(dict.fromkeys(record.instance_index for record in ordered))
    headers = tuple(
        strip_pixel_data(instances[index].dataset, copy_elements=instances[index].caller_owned)
        for index in instance_order
    )

    flags = check_protocol(
        headers,
        slice_thickness=first.slice_thickness,
        slice_increment=increment,
        policy=policy,
        series=series,
        hu=hu,
        pixel_spacing=first.pixel_spacing,
    )

    sop_instance_uids = tuple(record.sop_instance_uid for record in ordered)
    if series == NO_SERIES_UID or not all(sop_instance_uids):
        missing = sum(1 for uid in sop_instance_uids if not uid)
        raise MissingUIDError(
            f"the CT series ({len(ordered)} images, first {first.name}) has "
            f"{'no SeriesInstanceUID' if series == NO_SERIES_UID else 'a SeriesInstanceUID'} and "
            f"{missing} images without SOPInstanceUID; derived SEG and SR objects must reference "
            "real UIDs; re-export the series from the scanner or PACS"
        )

    positions = np.array([record.position for record in ordered], dtype=np.float64)
    orientation = first.orientation
    header = headers[0]
    is_multi_frame = first.frame_number is not None
    volume = CTVolume(
        hu=hu,
        padding_mask=padding_mask,
        origin=positions[0].copy(),
        row_direction=orientation[:3] / np.linalg.norm(orientation[:3]),
        column_direction=orientation[3:] / np.linalg.norm(orientation[3:]),
        slice_direction=slice_normal(orientation),
        pixel_spacing=first.pixel_spacing,
        slice_increment=increment,
        slice_thickness=first.slice_thickness,
        kvp=kvp_of(header),
        positions=positions,
        series_instance_uid=series,
        study_instance_uid=str(header.get("StudyInstanceUID", "") or ""),
        frame_of_reference_uid=str(header.get("FrameOfReferenceUID", "") or ""),
        sop_class_uid=instances[first.instance_index].sop_class_uid,
        sop_instance_uids=sop_instance_uids,
        headers=headers,
        frame_numbers=tuple(int(record.frame_number or 0) for record in ordered) if is_multi_frame else None,
        mass_calibration_factor=_mass_calibration_factor(header),
        flags=flags,
    )
    logger.info(
        "loaded series %s: %d slices of %d x %d, increment %.4f mm, %d padding voxels, flags %s",
        series,
        volume.shape[0],
        volume.shape[1],
        volume.shape[2],
        increment,
        int(padding_mask.sum()),
        [flag.code for flag in flags] or "none",
    )
    return volume
