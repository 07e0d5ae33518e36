"""Coded concepts used in the node's SEG, SR and summary image, standard and private.

Standard codes come from SNOMED CT (SCT), DICOM (DCM) and UCUM as listed in
PS3.16. Codes in the private scheme "99CACS" cover what no standard code
expresses: the risk category, the CAC-DRS grade, the protocol flags, the
slice-thickness normalisation factor and the mass calibration factor.
docs/conformance.md, section "Private codes", lists every private code.
"""

from __future__ import annotations

import re

from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset

#: Coding scheme designator of the node's private codes. DICOM marks a
#: private coding scheme by a designator that starts with "99".
PRIVATE_SCHEME = "99CACS"


def private_scheme_identification() -> Dataset:
    """Return the Coding Scheme Identification Sequence item (0008,0110) declaring PRIVATE_SCHEME."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = "cacs-node private codes for coronary calcium scoring"
    item.CodingSchemeResponsibleOrganization = "cacs-node project"
    item.CodingSchemeVersion = "1"
    return item


def _sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator="SCT", meaning=meaning)


def _dcm(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator="DCM", meaning=meaning)


def _ucum(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator="UCUM", meaning=meaning)


def _private(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator=PRIVATE_SCHEME, meaning=meaning)


# Anatomy (CID 12292 "Coronary artery" and CID 3014/3015). The left main stem
# belongs to the LAD label, so the LAD segment lists both regions.
LAD_ARTERY = _sct("59438005", "Anterior Descending Branch of Left Coronary Artery")
LCX_ARTERY = _sct("57396003", "Circumflex Coronary Artery")
RCA_ARTERY = _sct("13647002", "Right Coronary Artery")
LEFT_MAIN_ARTERY = _sct("3227004", "Left Main Coronary Artery")
CORONARY_ARTERY = _sct("41801008", "Coronary artery")

#: Anatomic regions of each scored artery, in the order they are written.
ARTERY_REGIONS: dict[str, tuple[CodedConcept, ...]] = {
    "LAD": (LAD_ARTERY, LEFT_MAIN_ARTERY),
    "LCX": (LCX_ARTERY,),
    "RCA": (RCA_ARTERY,),
}

# Segmented property category and type of a calcified coronary lesion
# (category from CID 7150). "Pathologic calcification" is the SNOMED CT
# morphologic abnormality that the Agatston threshold detects.
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = _sct("49755003", "Morphologically Abnormal Structure")
PATHOLOGIC_CALCIFICATION = _sct("18115005", "Pathologic calcification")

# Segmented property category of the coronary artery region SEG (CID 7150).
ANATOMICAL_STRUCTURE = _sct("123037004", "Anatomical Structure")

#: Algorithm family of the segmentation (CID 7162).
ARTIFICIAL_INTELLIGENCE = _dcm("123110", "Artificial Intelligence")

# TID 1500 procedure and the calcium measurements.
CARDIAC_CT_CALCIUM_SCORING = _sct("426005005", "Cardiac CT for calcium scoring")
CORONARY_ARTERY_CALCIUM_SCORE = _sct("450360000", "Coronary artery calcium score")
AGATSTON_SCORING_METHOD = _dcm("112055", "Agatston scoring method")
CALCIUM_VOLUME = _dcm("122660", "Calcium Volume")
CALCIUM_MASS = _dcm("122661", "Calcium Mass")
AGATSTON_SCORE_THRESHOLD = _dcm("122657", "Agatston Score Threshold")

# UCUM units.
UNIT_NONE = _ucum("1", "no units")
UNIT_CUBIC_MILLIMETER = _ucum("mm3", "cubic millimeter")
UNIT_MILLIGRAM = _ucum("mg", "milligram")
UNIT_HOUNSFIELD = _ucum("[hnsf'U]", "Hounsfield unit")
UNIT_MASS_CALIBRATION = _ucum("mg/cm3/[hnsf'U]", "milligram per cubic centimeter per Hounsfield unit")

# Private concept names.
RISK_CATEGORY = _private("RISK", "Coronary calcium risk category")
CAC_DRS = _private("CACDRS", "CAC-DRS classification")
PROTOCOL_DEVIATION = _private("PROTDEV", "Protocol deviation")
NORMALIZATION_FACTOR = _private("NORMFACT", "Slice thickness normalization factor")
MASS_CALIBRATION_FACTOR = _private("MASSCAL", "Mass calibration factor")

#: Private values of RISK_CATEGORY, keyed by ScoringResult.risk_category.
RISK_CATEGORIES: dict[str, CodedConcept] = {
    "I": _private("RISK-I", "Risk category I: Agatston score 0"),
    "II": _private("RISK-II", "Risk category II: Agatston score above 0, below 100"),
    "III": _private("RISK-III", "Risk category III: Agatston score 100 to below 300"),
    "IV": _private("RISK-IV", "Risk category IV: Agatston score 300 or above"),
}

#: Private values of PROTOCOL_DEVIATION, keyed by ProtocolFlag.code. Code
#: values stay within the 16 characters of an SH Code Value, so
#: MASS_UNCALIBRATED is written as MASS_UNCALIB.
PROTOCOL_FLAGS: dict[str, CodedConcept] = {
    "KVP": _private("KVP", "Tube voltage other than 120 kVp"),
    "SLICE_THICKNESS": _private("SLICE_THICKNESS", "Slice thickness outside 2.5 to 3.0 mm"),
    "SLICE_INCREMENT": _private("SLICE_INCREMENT", "Slice increment outside 2.5 to 3.0 mm"),
    "CONTRAST": _private("CONTRAST", "Contrast agent recorded"),
    "BODY_PART": _private("BODY_PART", "Body part examined neither chest nor heart"),
    "MASS_UNCALIBRATED": _private("MASS_UNCALIB", "Mass score without scanner calibration"),
}

# CAC-DRS grade "A0", or "A1" to "A3" with "/N" and the number of arteries
# with calcium. The node scores LM as part of the LAD, so N is 1 to 3.
_CAC_DRS_PATTERN = re.compile(r"A0|A[1-3]/N[1-3]")


def cac_drs_code(grade: str) -> CodedConcept:
    """Return the private code of a CAC-DRS grade such as "A0" or "A2/N3".

    Raises:
        ValueError: `grade` is not "A0" or "A1"–"A3" followed by "/N1"–"/N3".
    """
    if not _CAC_DRS_PATTERN.fullmatch(grade):
        raise ValueError(
            f"CAC-DRS grade {grade!r} is invalid; expected 'A0' or 'A1'-'A3' "
            "followed by '/N1'-'/N3', as ScoringResult.cac_drs writes it"
        )
    return _private(f"CACDRS-{grade}", f"CAC-DRS {grade}")


def risk_category_code(category: str) -> CodedConcept:
    """Return the private code of a risk category "I" to "IV".

    Raises:
        ValueError: `category` is not one of "I", "II", "III", "IV".
    """
    try:
        return RISK_CATEGORIES[category]
    except KeyError:
        raise ValueError(
            f"risk category {category!r} is invalid; expected one of "
            f"{', '.join(RISK_CATEGORIES)}"
        ) from None


def protocol_flag_code(flag_code: str) -> CodedConcept:
    """Return the private code of a ProtocolFlag code such as "KVP".

    Raises:
        ValueError: `flag_code` is not a ProtocolFlag code the conformance
            statement lists.
    """
    try:
        return PROTOCOL_FLAGS[flag_code]
    except KeyError:
        raise ValueError(
            f"protocol flag {flag_code!r} has no SR code; expected one of "
            f"{', '.join(PROTOCOL_FLAGS)}; add it to sr_writer.codes.PROTOCOL_FLAGS "
            "and to the private codes of docs/conformance.md"
        ) from None
