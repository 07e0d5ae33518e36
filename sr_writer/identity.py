"""Identity of the node's derived objects: algorithm, UIDs, series numbers, patient and study.

Every derived object (SEG, SR, summary image) carries the Patient and Study
modules of the scored CT verbatim and new UIDs under the node's UID root. The
SEG also keeps the CT's Frame of Reference UID. Series numbers and
descriptions depend only on the source series and the object kind.
"""

from __future__ import annotations

import re
from copy import deepcopy
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import scoring
from scoring.config import model_identity_problem

#: Attributes of the Patient, Clinical Trial Subject, General Study and
#: Patient Study modules (PS3.3 C.7.1.1, C.7.1.3, C.7.2.1, C.7.2.2) copied
#: verbatim from the source CT when it has them.
PATIENT_AND_STUDY_KEYWORDS: tuple[str, ...] = (
    "SpecificCharacterSet",
    # Patient
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientComments",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    # Clinical Trial Subject
    "ClinicalTrialSponsorName",
    "ClinicalTrialProtocolID",
    "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID",
    "ClinicalTrialSiteName",
    "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    # General Study
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "ProcedureCodeSequence",
    # Patient Study
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "AdmittingDiagnosesDescription",
)

#: Patient and study attributes that are Type 2 in every output IOD: present,
#: possibly empty, even when the source lacks them.
_TYPE2_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)

#: Offset added to source SeriesNumber × 100 for each output kind.
SERIES_NUMBER_OFFSETS: dict[str, int] = {"seg": 1, "region_seg": 2, "sr": 3, "summary": 4, "notice": 5}

#: Series numbers used when the source has no usable SeriesNumber.
FALLBACK_SERIES_BASE = 9900

#: Largest value of an IS element (PS3.5 table 6.2-1).
_MAX_INTEGER_STRING = 2**31 - 1

_SERIES_DESCRIPTION_LABELS: dict[str, str] = {
    "seg": "CAC SEG",
    "region_seg": "CAC regions SEG",
    "sr": "CAC SR",
    "summary": "CAC summary",
    "notice": "CAC not scored",
}

_UID_ROOT_PATTERN = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

#: Longest UID root accepted, counting its trailing dot. generate_uid fills
#: the rest of the 64 characters of a UID with random digits, so 40 leaves at
#: least 24 of them (about 80 bits).
MAX_UID_ROOT_LENGTH = 40


@dataclass(frozen=True)
class AlgorithmIdentification:
    """Name and versions of the software that produced a result.

    name: software name written as Algorithm Name and Manufacturer's Model Name.
    version: software version (Algorithm Version, Software Versions).
    model_version: version of the segmentation model weights, for example
        the shipped model's version string; written as an algorithm parameter.
    model_caution: the model's restriction of use, for example that it was
        trained on synthetic data only. It is written as an algorithm parameter
        and on the summary image. None when the model states none.
    """

    name: str = "cacs-node"
    version: str = scoring.__version__
    model_version: str = "unknown"
    model_caution: str | None = None

    def __post_init__(self) -> None:
        # Name and version go into LO elements (64 characters, no backslash).
        for field_name in ("name", "version"):
            value = getattr(self, field_name)
            if not isinstance(value, str) or not value.strip() or len(value) > 64 or "\\" in value:
                raise ValueError(
                    f"algorithm {field_name} {value!r} is invalid; expected a non-empty text of at "
                    "most 64 characters without a backslash"
                )
        problem = model_identity_problem(self.model_version, self.model_caution)
        if problem:
            raise ValueError(problem)

    @property
    def short_version(self) -> str:
        """Major and minor part of `version`, for example "1.0" of "1.0.3"."""
        return ".".join(self.version.split(".")[:2])


def normalize_uid_root(uid_root: str) -> str:
    """Return `uid_root` with a trailing dot, ready for pydicom's generate_uid.

    Raises:
        ValueError: the root is not dot-separated numbers without leading
            zeros, or is longer than MAX_UID_ROOT_LENGTH characters.
    """
    root = uid_root.rstrip(".")
    if not _UID_ROOT_PATTERN.fullmatch(root):
        raise ValueError(
            f"UID root {uid_root!r} is invalid; expected dot-separated numbers "
            "without leading zeros such as '1.2.826.0.1.3680043.10.1234'; "
            "configure the UID root your organisation registered"
        )
    if len(root) + 1 > MAX_UID_ROOT_LENGTH:
        raise ValueError(
            f"UID root {uid_root!r} has {len(root)} characters; expected at most "
            f"{MAX_UID_ROOT_LENGTH - 1} so that generated UIDs fit in 64 characters; "
            "configure a shorter root"
        )
    return root + "."


def new_uid(uid_root: str) -> str:
    """Return a new unique UID under `uid_root` (see normalize_uid_root)."""
    return generate_uid(prefix=normalize_uid_root(uid_root))


def stable_uid(uid_root: str, *parts: str) -> str:
    """Return a UID under `uid_root` that depends only on `parts` (a name-based UID)."""
    return generate_uid(prefix=normalize_uid_root(uid_root), entropy_srcs=list(parts))


def series_number(source: Dataset, kind: str) -> int:
    """Return the deterministic series number of an output `kind` for a source series.

    The number is source SeriesNumber × 100 + the kind's offset (1 SEG,
    2 region SEG, 3 SR, 4 summary image, 5 not-scored notice), so CT series
    29 gets 2901 to 2905.
    Without a usable source SeriesNumber, or when the result would not fit an
    IS value, it is 9900 + the offset.
    """
    offset = SERIES_NUMBER_OFFSETS[kind]
    value = source.get("SeriesNumber")
    if value is None or value == "":
        return FALLBACK_SERIES_BASE + offset
    number = int(value) * 100 + offset
    if not 0 < number <= _MAX_INTEGER_STRING:
        return FALLBACK_SERIES_BASE + offset
    return number


def series_description(kind: str, algorithm: AlgorithmIdentification) -> str:
    """Return the series description of an output kind, e.g. "CAC SEG (cacs-node 1.0)"."""
    text = f"{_SERIES_DESCRIPTION_LABELS[kind]} ({algorithm.name} {algorithm.short_version})"
    return text[:64]


def copy_patient_and_study(source: Dataset, target: Dataset) -> None:
    """Copy the Patient and Study module attributes of `source` onto `target` verbatim.

    Attributes absent in the source are removed from the target, except the
    Type 2 ones, which stay present with an empty value.
    """
    for keyword in PATIENT_AND_STUDY_KEYWORDS:
        if keyword in source:
            element = source[keyword]
            # Deep copy, so later edits of the output leave the source header alone.
            target.add_new(element.tag, element.VR, deepcopy(element.value))
        elif keyword in _TYPE2_KEYWORDS:
            setattr(target, keyword, None)
        elif keyword in target:
            del target[keyword]



def highdicom_source(header: Dataset, sop_class_uid: str) -> Dataset:
    """Return a shallow copy of a source header that highdicom can take as source or evidence.

    highdicom reads the Type 2 patient and study attributes of its first
    source image with attribute access, so a source that omits one fails.
    The copy carries them empty. The person names are emptied as well,
    because highdicom warns about single-component names with the name in the
    message, which would put it into the node's log. Every output gets the
    source's own values afterwards from copy_patient_and_study. A source
    whose SOPClassUID is empty (load_series then takes the one of its file
    meta information) gets `sop_class_uid`, the volume's SOP Class.
    """
    # copy.copy(Dataset) shares the element dictionary with the original, so
    # the copy gets a dictionary of its own holding the same element objects.
    source = Dataset()
    for element in header:
        source.add(element)
    for keyword in _TYPE2_KEYWORDS:
        if keyword not in source:
            setattr(source, keyword, None)
    if not source.get("SOPClassUID"):
        replace_element(source, "SOPClassUID", sop_class_uid)
    replace_element(source, "PatientName", None)
    replace_element(source, "ReferringPhysicianName", None)
    return source


def replace_element(dataset: Dataset, keyword: str, value: object) -> None:
    """Set `keyword` in `dataset` to a new data element, leaving any old element object untouched.

    A copy made by highdicom_source shares its DataElement objects with the
    original, and plain assignment changes the shared element in place.
    """
    if keyword in dataset:
        del dataset[keyword]
    setattr(dataset, keyword, value)
