"""Comprehensive 3D SR holding a TID 1500 Measurement Report of the calcium scores.

Content tree (PS3.16 TID 1500), built with highdicom:

- Procedure reported: SCT 426005005 "Cardiac CT for calcium scoring".
- Device observer (TID 1004): the node, with algorithm name and version.
- One TID 1411 Volumetric ROI group per artery with calcium. It references
  the artery's segment in the calcium SEG, has the finding site LAD, LCX or
  RCA and finding SCT 18115005 "Pathologic calcification", and contains three
  measurements: SCT 450360000 "Coronary artery calcium score" with method
  DCM 112055 "Agatston scoring method" (UCUM "1"), DCM 122660 "Calcium
  Volume" (mm3) and DCM 122661 "Calcium Mass" (mg).
- One TID 1501 group per artery without calcium, with the same three
  measurements at zero and no Finding item.
- One TID 1501 group for the whole study, with finding site "Coronary
  artery". It contains the total scores, the Agatston score threshold
  DCM 122657 (HU), the thickness normalisation factor, the mass calibration
  factor, and the qualitative evaluations: risk category, CAC-DRS grade and
  one item per protocol flag, in the private scheme 99CACS.

Each measurement carries the algorithm identification (TID 4019): name,
version and the model version as an algorithm parameter. The document is
written unverified, incomplete and preliminary: a radiologist verifies it.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
)

from scoring.result import ARTERIES, ScoringResult
from scoring.volume import CTVolume
from sr_writer import codes
from sr_writer.identity import (
    AlgorithmIdentification,
    copy_patient_and_study,
    highdicom_source,
    new_uid,
    series_description,
    series_number,
    stable_uid,
)
from sr_writer.seg import segment_numbers

logger = logging.getLogger(__name__)

_MANUFACTURER = "cacs-node"

#: SR SOP classes accepted as a predecessor of a re-score.
_SR_SOP_CLASSES = (Comprehensive3DSRStorage, ComprehensiveSRStorage, EnhancedSRStorage)


def build_sr(
    volume: CTVolume,
    result: ScoringResult,
    seg: Dataset | None,
    *,
    algorithm: AlgorithmIdentification,
    uid_root: str,
    device_serial_number: str,
    predecessor: Dataset | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Comprehensive 3D SR of a scoring result.

    Args:
        volume: the scored CT series.
        result: its scoring result.
        seg: the calcium SEG from `build_seg`, or None when no artery has
            calcium.
        algorithm: name and versions written on every measurement.
        uid_root: UID root for the new series and instance UIDs.
        device_serial_number: Device Serial Number of the node, also in the
            device observer context.
        predecessor: the SR of an earlier scoring of the same study; the new
            SR names it in Predecessor Documents Sequence.

    Returns:
        The SR dataset.

    Raises:
        ValueError: the result lists calcium but `seg` is None or lacks the
            artery's segment. Also when `predecessor` is not an SR of this
            study, or when a risk category, CAC-DRS grade or flag has no code.
    """
    if result.series_instance_uid != volume.series_instance_uid:
        raise ValueError(
            f"scoring result is for series {result.series_instance_uid} but the volume is "
            f"series {volume.series_instance_uid}; pass the result of this volume"
        )
    if predecessor is not None:
        _check_predecessor(predecessor, volume)
    algorithm_id = hd.sr.AlgorithmIdentification(
        name=algorithm.name,
        version=algorithm.version,
        parameters=[
            f"model version {algorithm.model_version}",
            *([f"model caution: {algorithm.model_caution}"] if algorithm.model_caution else []),
        ],
        manufacturer=_MANUFACTURER,
    )

    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    numbers = segment_numbers(seg) if seg is not None else {}
    for artery in ARTERIES:
        measurements = _artery_measurements(result, artery, algorithm_id)
        tracking = hd.sr.TrackingIdentifier(uid=new_uid(uid_root), identifier=f"{artery} calcium")
        site = hd.sr.FindingSite(codes.ARTERY_REGIONS[artery][0])
        if artery in result.arteries_with_calcium:
            if artery not in numbers:
                raise ValueError(
                    f"scoring result gives {artery} calcium but the SEG has no {artery} "
                    "segment; build the SEG from the same labels and result"
                )
            groups.append(
                hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    referenced_segment=referenced_segment(seg, numbers[artery]),
                    finding_type=codes.PATHOLOGIC_CALCIFICATION,
                    finding_sites=[site],
                    algorithm_id=algorithm_id,
                    measurements=measurements,
                )
            )
        else:
            # No Finding item: a zero score reports the absence of calcification.
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=tracking,
                    finding_sites=[site],
                    algorithm_id=algorithm_id,
                    measurements=measurements,
                )
            )
    groups.append(_study_group(result, algorithm_id, uid_root))

    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=stable_uid(uid_root, algorithm.name, device_serial_number),
        name=algorithm.name,
        manufacturer_name=_MANUFACTURER,
        model_name=f"{algorithm.name} {algorithm.version}",
        serial_number=device_serial_number,
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
                observer_identifying_attributes=device,
            )
        ),
        procedure_reported=codes.CARDIAC_CT_CALCIUM_SCORING,
        imaging_measurements=groups,
    )

    first_header = volume.headers[0]
    evidence: list[Dataset] = [highdicom_source(header, volume.sop_class_uid) for header in _unique_headers(volume)]
    if seg is not None:
        evidence.append(seg)
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report[0],
        series_instance_uid=new_uid(uid_root),
        series_number=series_number(first_header, "sr"),
        sop_instance_uid=new_uid(uid_root),
        instance_number=1,
        manufacturer=_MANUFACTURER,
        is_complete=False,
        is_final=False,
        is_verified=False,
        previous_versions=[predecessor] if predecessor is not None else None,
        performed_procedure_codes=[codes.CARDIAC_CT_CALCIUM_SCORING],
    )

    # Patient and Study modules verbatim from the source, and deterministic naming.
    copy_patient_and_study(first_header, sr)
    sr.SeriesDescription = series_description("sr", algorithm)
    sr.ManufacturerModelName = algorithm.name
    sr.SoftwareVersions = [algorithm.version, f"model {algorithm.model_version}"]
    sr.DeviceSerialNumber = device_serial_number
    sr.CodingSchemeIdentificationSequence = [codes.private_scheme_identification()]
    logger.info(
        "built SR %s for series %s: %d measurement group(s)%s",
        sr.SOPInstanceUID,
        volume.series_instance_uid,
        len(groups),
        f", predecessor {predecessor.SOPInstanceUID}" if predecessor is not None else "",
    )
    return sr


def referenced_segment(seg: Dataset, segment_number: int) -> hd.sr.ReferencedSegment:
    """Return the TID 1411 reference to one segment and the CT images under its frames.

    highdicom 0.28.2's ReferencedSegment.from_segmentation reads the
    segment number from the per-frame functional groups only, and fails on a
    single-segment SEG, which highdicom itself writes with the number in the
    shared functional groups. This reads either place.

    Raises:
        ValueError: the SEG has no frame of the segment.
    """
    shared = seg.SharedFunctionalGroupsSequence[0]
    sources: dict[tuple[str, int | None], hd.sr.SourceImageForSegmentation] = {}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        identification = frame.get("SegmentIdentificationSequence") or shared.get("SegmentIdentificationSequence")
        if int(identification[0].ReferencedSegmentNumber) != segment_number:
            continue
        for derivation in frame.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                frame_number = source.get("ReferencedFrameNumber")
                key = (str(source.ReferencedSOPInstanceUID), int(frame_number) if frame_number else None)
                if key not in sources:
                    sources[key] = hd.sr.SourceImageForSegmentation(
                        referenced_sop_class_uid=source.ReferencedSOPClassUID,
                        referenced_sop_instance_uid=source.ReferencedSOPInstanceUID,
                        referenced_frame_numbers=[key[1]] if key[1] is not None else None,
                    )
    if not sources:
        raise ValueError(
            f"SEG {seg.SOPInstanceUID} has no frame of segment {segment_number}; "
            "build the SR from the SEG that build_seg returned"
        )
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=segment_number,
        source_images=list(sources.values()),
    )


def _artery_measurements(
    result: ScoringResult, key: str, algorithm_id: hd.sr.AlgorithmIdentification
) -> list[hd.sr.Measurement]:
    """Agatston, volume and mass of one artery or of "total", as TID 300 measurements."""
    return [
        hd.sr.Measurement(
            name=codes.CORONARY_ARTERY_CALCIUM_SCORE,
            value=float(result.agatston[key]),
            unit=codes.UNIT_NONE,
            method=codes.AGATSTON_SCORING_METHOD,
            algorithm_id=algorithm_id,
        ),
        hd.sr.Measurement(
            name=codes.CALCIUM_VOLUME,
            value=float(result.volume_mm3[key]),
            unit=codes.UNIT_CUBIC_MILLIMETER,
            algorithm_id=algorithm_id,
        ),
        hd.sr.Measurement(
            name=codes.CALCIUM_MASS,
            value=float(result.mass_mg[key]),
            unit=codes.UNIT_MILLIGRAM,
            algorithm_id=algorithm_id,
        ),
    ]


def _study_group(
    result: ScoringResult, algorithm_id: hd.sr.AlgorithmIdentification, uid_root: str
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group with totals, scoring parameters and qualitative evaluations."""
    measurements = _artery_measurements(result, "total", algorithm_id)
    measurements += [
        hd.sr.Measurement(
            name=codes.AGATSTON_SCORE_THRESHOLD,
            value=float(result.threshold_hu),
            unit=codes.UNIT_HOUNSFIELD,
            algorithm_id=algorithm_id,
        ),
        hd.sr.Measurement(
            name=codes.NORMALIZATION_FACTOR,
            value=float(result.normalization_factor),
            unit=codes.UNIT_NONE,
            algorithm_id=algorithm_id,
        ),
        hd.sr.Measurement(
            name=codes.MASS_CALIBRATION_FACTOR,
            value=float(result.mass_calibration_factor),
            unit=codes.UNIT_MASS_CALIBRATION,
            algorithm_id=algorithm_id,
        ),
    ]
    evaluations = [
        hd.sr.QualitativeEvaluation(codes.RISK_CATEGORY, codes.risk_category_code(result.risk_category)),
        hd.sr.QualitativeEvaluation(codes.CAC_DRS, codes.cac_drs_code(result.cac_drs)),
    ]
    evaluations += [
        hd.sr.QualitativeEvaluation(codes.PROTOCOL_DEVIATION, codes.protocol_flag_code(code))
        for code in protocol_flag_codes(result)
    ]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=new_uid(uid_root), identifier="Total calcium"),
        finding_type=codes.PATHOLOGIC_CALCIFICATION if result.arteries_with_calcium else None,
        finding_sites=[hd.sr.FindingSite(codes.CORONARY_ARTERY)],
        algorithm_id=algorithm_id,
        measurements=measurements,
        qualitative_evaluations=evaluations,
    )


def protocol_flag_codes(result: ScoringResult) -> list[str]:
    """Return the result's protocol flag codes, adding MASS_UNCALIBRATED when the mass used the default factor."""
    flag_codes = [flag.code for flag in result.flags]
    if not result.mass_calibrated and "MASS_UNCALIBRATED" not in flag_codes:
        flag_codes.append("MASS_UNCALIBRATED")
    return list(dict.fromkeys(flag_codes))


def _unique_headers(volume: CTVolume) -> Sequence[Dataset]:
    """Source headers with each SOP Instance once (an Enhanced CT instance has one header)."""
    seen: set[str] = set()
    headers: list[Dataset] = []
    for header in volume.headers:
        if header.SOPInstanceUID not in seen:
            seen.add(header.SOPInstanceUID)
            headers.append(header)
    return headers


def _check_predecessor(predecessor: Dataset, volume: CTVolume) -> None:
    """Reject a predecessor that is not an SR document of the scored study."""
    sop_class = predecessor.get("SOPClassUID")
    if sop_class not in _SR_SOP_CLASSES:
        raise ValueError(
            f"predecessor {predecessor.get('SOPInstanceUID')} has SOP Class {sop_class}; "
            "expected the Comprehensive 3D SR of an earlier scoring of this series"
        )
    if predecessor.get("StudyInstanceUID") != volume.study_instance_uid:
        raise ValueError(
            f"predecessor SR {predecessor.SOPInstanceUID} belongs to study "
            f"{predecessor.get('StudyInstanceUID')} but the scored series is in study "
            f"{volume.study_instance_uid}; pass the SR of an earlier scoring of this series"
        )


def find_measurement(sr: Dataset, finding_site: CodedConcept, name: CodedConcept) -> float:
    """Return the value of the measurement `name` in the group whose finding site is `finding_site`.

    Reads an SR written by `build_sr` back through highdicom's TID 1500
    parser, so it also checks that highdicom can read the document.

    Raises:
        KeyError: no group has the finding site, or the group lacks the measurement.
    """
    report = hd.sr.Comprehensive3DSR.from_dataset(sr).content
    groups = list(report.get_volumetric_roi_measurement_groups()) + list(
        report.get_image_measurement_groups()
    )
    for group in groups:
        if finding_site not in [site.value for site in group.finding_sites]:
            continue
        for measurement in group.get_measurements(name=name):
            return float(measurement.value)
    raise KeyError(f"no measurement {name.meaning!r} at finding site {finding_site.meaning!r}")
