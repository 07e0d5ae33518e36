"""Summary image: an RGB Secondary Capture of the scores for PACS and viewers without SR or SEG.

matplotlib's Agg backend draws the page. It shows the patient and study, a
table of Agatston score, volume and mass per artery and in total, the risk
category, CAC-DRS grade, protocol flags and scoring parameters. Below them are
the axial slices with the most scored calcium, with a coloured overlay per
artery in the SEG's colours. The page states that it is automatically generated and not
verified, and the image carries BurnedInAnnotation YES because it shows the
patient's name and ID.

`build_notice_image` draws the page for a series the node refused instead:
the same header, the statement that no score was computed, and the reason.
"""

from __future__ import annotations

import functools
import logging
import textwrap
import unicodedata

import highdicom as hd
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties, findfont
from matplotlib.ft2font import FT2Font
from pydicom.dataset import Dataset
from pydicom.valuerep import PersonName

from scoring.config import ScoringParameters
from scoring.result import ARTERIES, OTHER_CALCIUM, ScoringResult
from scoring.volume import CTVolume
from sr_writer.identity import (
    AlgorithmIdentification,
    copy_patient_and_study,
    highdicom_source,
    new_uid,
    series_description,
    series_number,
)
from sr_writer.seg import ARTERY_COLORS, check_label_volume, scored_labels
from sr_writer.sr import protocol_flag_codes

logger = logging.getLogger(__name__)

#: Size of the rendered page in pixels (width, height).
PAGE_SIZE = (1280, 960)

#: Number of axial slices shown.
SHOWN_SLICES = 3

#: Display window of the CT slices in HU (centre, width): a mediastinal
#: window, so calcium shows white under its overlay.
WINDOW = (40.0, 400.0)

#: Smallest width of the field shown around the calcium, in mm, and the
#: margin added around the calcium's bounding box.
MIN_FIELD_MM = 120.0
MARGIN_MM = 20.0

#: Vertical extent of the slice panels as fractions of the page height.
PANEL_BOTTOM = 0.05
PANEL_HEIGHT = 0.43

#: Lowest top edge, as a fraction of the page height, of a findings line:
#: below it the slice panels and their titles begin.
FINDINGS_BOTTOM = 0.53
#: Top of the findings column when no model caution pushes it down.
FINDINGS_TOP = 0.84

#: Height of a 12-point findings line as a fraction of the page height.
_LINE_STEP = (12 + 8) / 960

#: Overlay colour of non-coronary calcium (label 4), which scoring ignores.
OTHER_CALCIUM_COLOR = (255, 200, 0)

_RISK_TEXT = {
    "I": "I (Agatston 0)",
    "II": "II (Agatston above 0, below 100)",
    "III": "III (Agatston 100 to below 300)",
    "IV": "IV (Agatston 300 or above)",
}

#: Most lines of the reason drawn on the not-scored notice, and the characters
#: per line: about 100 characters of 16-point text fill the page width.
_NOTICE_REASON_LINES = 16
_NOTICE_LINE_WIDTH = 95

#: Largest length of an LT value such as ImageComments (PS3.5 table 6.2-1).
_LONG_TEXT_LENGTH = 10240

#: ASCII spellings of the symbols in the node's messages, for `_ascii_text`.
_ASCII_SPELLINGS = {"–": "-", "—": "-", "×": "x", "≥": ">=", "≤": "<=", "→": "->", "…": "...", "°": " deg", "³": "3",
                    "²": "2", "“": '"', "”": '"', "‘": "'", "’": "'"}

_MANUFACTURER = "cacs-node"
_BACKGROUND = "#101014"
_TEXT = "#f0f0f0"
_WARNING = "#ffd23f"
_DPI = 100


def build_summary_image(
    volume: CTVolume,
    labels: np.ndarray,
    result: ScoringResult,
    *,
    algorithm: AlgorithmIdentification,
    uid_root: str,
    device_serial_number: str,
    parameters: ScoringParameters | None = None,
) -> hd.sc.SCImage:
    """Build the summary Secondary Capture (RGB, 8 bit) of a scoring result.

    Args:
        volume: the scored CT series.
        labels: uint8 CAC label volume of `volume.shape` (0–4).
        result: the scoring result of `volume` and `labels`.
        algorithm: name and versions printed on the page.
        uid_root: UID root for the new series and instance UIDs.
        device_serial_number: Device Serial Number of the node.
        parameters: the scoring parameters of `result` (default
            ScoringParameters()); the overlay shows the voxels they scored.

    Returns:
        The Secondary Capture dataset.

    Raises:
        LabelError: `labels` does not match the volume.
        ValueError: `uid_root` is invalid, or `parameters` has another
            threshold than `result`.
    """
    check_label_volume(labels, volume, name="CAC label volume", max_label=OTHER_CALCIUM)
    scored = scored_labels(volume, labels, result, parameters)
    shown_slices = slices_with_most_calcium(scored)
    pixels = render_summary(volume, scored, result, algorithm=algorithm, shown_slices=shown_slices)

    image = _secondary_capture(
        volume.headers[0], volume.sop_class_uid, pixels, "summary",
        algorithm=algorithm, uid_root=uid_root, device_serial_number=device_serial_number,
        comments="Automatically generated calcium score summary; not verified by a physician" + (
            f"; model: {algorithm.model_caution}" if algorithm.model_caution else ""
        ),
        derivation="Calcium score table and axial CT slices with calcium overlay",
    )
    if shown_slices:
        # Type 3 sequence that must not be empty when present.
        image.SourceImageSequence = [_source_reference(volume, index) for index in shown_slices]
    logger.info(
        "built summary image %s for series %s showing slice(s) %s",
        image.SOPInstanceUID,
        volume.series_instance_uid,
        shown_slices,
    )
    return image


def build_notice_image(
    header: Dataset,
    reason: str,
    *,
    received_instances: int,
    algorithm: AlgorithmIdentification,
    uid_root: str,
    device_serial_number: str,
) -> hd.sc.SCImage:
    """Build the not-scored notice (RGB Secondary Capture) of a series that the node refused.

    Args:
        header: a received instance of the refused series, read without pixel
            data; the notice copies its Patient and Study modules.
        reason: why the series was not scored, as the node recorded it.
        received_instances: number of instances of the series the node keeps.
        algorithm, uid_root, device_serial_number: as for `build_summary_image`.

    Raises:
        ValueError: `uid_root` is invalid, or `header` lacks SOPClassUID or
            StudyInstanceUID, so the notice cannot join the study.
    """
    missing = [keyword for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID") if not header.get(keyword)]
    if missing:
        raise ValueError(f"the received instance lacks {', '.join(missing)}, so a notice cannot join its study")
    pixels = render_notice(header, reason, received_instances=received_instances, algorithm=algorithm)
    image = _secondary_capture(
        header, str(header.SOPClassUID), pixels, "notice",
        algorithm=algorithm, uid_root=uid_root, device_serial_number=device_serial_number,
        comments=_ascii_text(f"Calcium score not computed: {reason}")[:_LONG_TEXT_LENGTH],
        derivation="Notice that no calcium score was computed for the series, with the reason",
    )
    reference = Dataset()
    reference.ReferencedSOPClassUID = header.SOPClassUID
    reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
    image.SourceImageSequence = [reference]
    logger.info("built not-scored notice %s for series %s", image.SOPInstanceUID, header.get("SeriesInstanceUID", ""))
    return image


def render_notice(
    header: Dataset, reason: str, *, received_instances: int, algorithm: AlgorithmIdentification
) -> np.ndarray:
    """Render the not-scored notice as a uint8 RGB array of shape (height, width, 3)."""
    width, height = PAGE_SIZE
    figure = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor=_BACKGROUND)
    canvas = FigureCanvasAgg(figure)

    top = _draw_header(figure, header, algorithm, title="Calcium score NOT COMPUTED")
    figure.text(0.02, top, "No calcium score was computed for this series.", color=_WARNING, fontsize=20,
                weight="bold", va="top")
    figure.text(0.02, top - 0.06, "Reason:", color=_TEXT, fontsize=16, weight="bold", va="top")
    lines = textwrap.wrap(_drawable(reason), width=_NOTICE_LINE_WIDTH) or ["(none recorded)"]
    if len(lines) > _NOTICE_REASON_LINES:
        lines = lines[: _NOTICE_REASON_LINES - 1] + ["… (the full reason is in the image comments and the node's job list)"]
    closing = (
        f"The node keeps the {received_instances} received instance(s). No SEG, SR or summary follows for this "
        "series unless the cause is fixed and the series is scored again, for example after it is re-sent."
    )
    y = top - 0.10
    for line in [*lines, "", *textwrap.wrap(closing, width=_NOTICE_LINE_WIDTH)]:
        figure.text(0.02, y, line, color=_TEXT, fontsize=16, va="top")
        y -= (16 + 8) / height

    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3], dtype=np.uint8)


def _secondary_capture(
    header: Dataset,
    sop_class_uid: str,
    pixels: np.ndarray,
    kind: str,
    *,
    algorithm: AlgorithmIdentification,
    uid_root: str,
    device_serial_number: str,
    comments: str,
    derivation: str,
) -> hd.sc.SCImage:
    """Wrap a rendered page as an RGB Secondary Capture in the study of `header`, as output `kind`."""
    # The page has no patient orientation. highdicom requires one for the
    # PATIENT coordinate system; the Type 2 attribute is emptied below.
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=highdicom_source(header, sop_class_uid),
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        patient_orientation=("L", "P"),
        series_instance_uid=new_uid(uid_root),
        series_number=series_number(header, kind),
        sop_instance_uid=new_uid(uid_root),
        instance_number=1,
        manufacturer=_MANUFACTURER,
    )
    image.PatientOrientation = None
    # With an unpaired body part dciodvfy does not require the Type 2C
    # Laterality, which it reports as missing when BodyPartExamined is absent.
    image.BodyPartExamined = "HEART"

    # Patient and Study modules verbatim from the source, and deterministic naming.
    copy_patient_and_study(header, image)
    image.SeriesDescription = series_description(kind, algorithm)
    image.BurnedInAnnotation = "YES"
    # Workstation: the page is rendered by software, not digitised.
    image.ConversionType = "WSD"
    image.ImageComments = comments
    image.ManufacturerModelName = algorithm.name
    image.SoftwareVersions = [algorithm.version, f"model {algorithm.model_version}"]
    image.DeviceSerialNumber = device_serial_number
    image.DerivationDescription = derivation
    return image


def slices_with_most_calcium(scored: np.ndarray) -> list[int]:
    """Return up to SHOWN_SLICES slice indices with the most scored coronary voxels, in volume order.

    `scored` is the output of `scored_labels`; only its LAD, LCX and RCA
    voxels count. Slices without such voxels are never returned, so a zero
    score shows no slice.
    """
    coronary = (scored >= 1) & (scored <= 3)
    counts = coronary.reshape(coronary.shape[0], -1).sum(axis=1)
    # Stable sort: among equal counts the lower slice index comes first.
    ranked = np.argsort(-counts, kind="stable")
    chosen = [int(index) for index in ranked[:SHOWN_SLICES] if counts[index] > 0]
    return sorted(chosen)


def render_summary(
    volume: CTVolume,
    scored: np.ndarray,
    result: ScoringResult,
    *,
    algorithm: AlgorithmIdentification,
    shown_slices: list[int],
) -> np.ndarray:
    """Render the summary page as a uint8 RGB array of shape (height, width, 3).

    `scored` is the output of `scored_labels`; every non-zero voxel is drawn
    in the colour of its label.
    """
    width, height = PAGE_SIZE
    figure = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor=_BACKGROUND)
    canvas = FigureCanvasAgg(figure)

    findings_top = _draw_header(figure, volume.headers[0], algorithm)
    _draw_score_table(figure, result)
    _draw_findings(figure, result, findings_top)
    _draw_slices(figure, volume, scored, shown_slices)

    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return np.ascontiguousarray(rgba[..., :3], dtype=np.uint8)


def _draw_header(
    figure: Figure, header: Dataset, algorithm: AlgorithmIdentification, title: str = "Coronary artery calcium score"
) -> float:
    """Draw the title, patient, study and warning lines; return the top of the findings column."""
    figure.text(0.02, 0.965, title, color=_TEXT, fontsize=22, weight="bold", va="top")
    patient = _patient_line(header)
    study = _drawable(
        f"Study {_display_date(header.get('StudyDate'))}   accession {header.get('AccessionNumber') or '-'}   "
        f"series {header.get('SeriesNumber', '-')} {header.get('SeriesDescription', '')}"
    )
    # About 60 characters of 13-point text fill the left half of the page.
    figure.text(0.02, 0.915, textwrap.shorten(patient, width=60, placeholder=" …"), color=_TEXT, fontsize=13, va="top")
    figure.text(0.02, 0.885, textwrap.shorten(study, width=60, placeholder=" …"), color=_TEXT, fontsize=13, va="top")
    figure.text(0.52, 0.965, "AUTOMATICALLY GENERATED, NOT VERIFIED", color=_WARNING, fontsize=16, weight="bold", va="top")
    figure.text(0.52, 0.925, "A physician must review these results before clinical use.", color=_WARNING, fontsize=12, va="top")
    software = textwrap.shorten(f"{algorithm.name} {algorithm.version}, model {algorithm.model_version}", width=70)
    figure.text(0.52, 0.895, _drawable(software), color=_WARNING, fontsize=12, va="top")
    top = FINDINGS_TOP
    if algorithm.model_caution:
        # The whole caution in at most three lines; the SEG and SR carry it in full too.
        wrapped = textwrap.wrap(f"Model: {algorithm.model_caution}", width=62)
        if len(wrapped) > 3:
            wrapped = wrapped[:2] + [textwrap.shorten(" ".join(wrapped[2:]), width=62, placeholder=" …")]
        y = 0.895 - _LINE_STEP
        for line in wrapped:
            y = _draw_line(figure, y, line, 12, "bold", _WARNING)
        top = min(top, y - _LINE_STEP / 2)
    return top


def _draw_score_table(figure: Figure, result: ScoringResult) -> None:
    axes = figure.add_axes((0.02, 0.55, 0.46, 0.30))
    axes.set_axis_off()
    keys = list(ARTERIES) + ["total"]
    names = {"LAD": "LAD (incl. LM)", "LCX": "LCX", "RCA": "RCA", "total": "Total"}
    cell_text = [
        [
            names[key],
            f"{result.agatston[key]:.1f}",
            f"{result.volume_mm3[key]:.1f}",
            f"{result.mass_mg[key]:.2f}",
        ]
        for key in keys
    ]
    table = axes.table(
        cellText=cell_text,
        colLabels=["Artery", "Agatston", "Volume (mm³)", "Mass (mg)"],
        colWidths=[0.28, 0.21, 0.29, 0.22],
        loc="upper center",
        cellLoc="right",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(14)
    table.scale(1.0, 2.2)
    for (row, column), cell in table.get_celld().items():
        cell.set_edgecolor("#606070")
        cell.set_facecolor(_BACKGROUND)
        cell.get_text().set_color(_TEXT)
        if row == 0 or row == len(keys):
            cell.get_text().set_weight("bold")
        if column == 0:
            cell.get_text().set_horizontalalignment("left")
            cell.PAD = 0.05
        if column == 0 and 1 <= row <= len(ARTERIES):
            cell.set_facecolor(_hex(ARTERY_COLORS[ARTERIES[row - 1]]))
            cell.get_text().set_color("white")
            cell.get_text().set_weight("bold")


def _draw_findings(figure: Figure, result: ScoringResult, top: float) -> None:
    calibration = "scanner calibration" if result.mass_calibrated else "default factor, NOT calibrated"
    lines = [
        (f"Risk category {_RISK_TEXT.get(result.risk_category, result.risk_category)}", 16, "bold", _TEXT),
        (f"CAC-DRS {result.cac_drs}", 16, "bold", _TEXT),
        ("", 8, "normal", _TEXT),
        (f"Threshold {result.threshold_hu:g} HU, thickness normalisation × {result.normalization_factor:.3f}", 12, "normal", _TEXT),
        (f"Mass factor {result.mass_calibration_factor:.3f} mg/cm³/HU ({calibration})", 12, "normal", _TEXT),
        ("", 8, "normal", _TEXT),
    ]
    messages = [flag.message for flag in result.flags]
    if "MASS_UNCALIBRATED" in protocol_flag_codes(result) and not any(f.code == "MASS_UNCALIBRATED" for f in result.flags):
        messages.append("Mass computed with the default calibration factor, not the scanner's own.")
    lines.append(("Protocol flags:" if messages else "Protocol flags: none", 13, "bold", _WARNING if messages else _TEXT))

    y = top
    for text, size, weight, color in lines:
        y = _draw_line(figure, y, text, size, weight, color)

    # Each flag is a bullet of wrapped lines. Flags that would run into the
    # slice panels are counted on one last line instead; the SR lists them all.
    for position, message in enumerate(messages):
        wrapped = textwrap.wrap(message, width=62) or [""]
        remaining = len(messages) - position
        needed = len(wrapped) + (1 if remaining > 1 else 0)
        if y - needed * _LINE_STEP < FINDINGS_BOTTOM:
            _draw_line(figure, y, f"… {remaining} more flag(s), coded in the SR", 12, "bold", _WARNING)
            return
        for number, part in enumerate(wrapped):
            y = _draw_line(figure, y, ("• " if number == 0 else "  ") + part, 12, "normal", _WARNING)


def _draw_line(figure: Figure, y: float, text: str, size: int, weight: str, color: str) -> float:
    """Draw one line of the findings column with its top at `y`; return the top of the next line."""
    figure.text(0.52, y, _drawable(text), color=color, fontsize=size, weight=weight, va="top")
    return y - (size + 8) / PAGE_SIZE[1]


def _draw_slices(
    figure: Figure, volume: CTVolume, scored: np.ndarray, shown_slices: list[int]
) -> None:
    if not shown_slices:
        figure.text(
            0.5,
            0.25,
            "No coronary calcium detected",
            color=_TEXT,
            fontsize=20,
            ha="center",
            va="center",
        )
        return

    centre, width = WINDOW
    low, high = centre - width / 2, centre + width / 2
    overlay_colors = ListedColormap(
        [(0, 0, 0, 0)]
        + [tuple(c / 255 for c in ARTERY_COLORS[artery]) + (0.85,) for artery in ARTERIES]
        + [tuple(c / 255 for c in OTHER_CALCIUM_COLOR) + (0.85,)]
    )
    panel_width = 0.96 / SHOWN_SLICES
    row_range, column_range = crop_window(volume, scored)
    aspect = volume.pixel_spacing[0] / volume.pixel_spacing[1]
    for position, index in enumerate(shown_slices):
        axes = figure.add_axes((0.02 + position * panel_width, PANEL_BOTTOM, panel_width - 0.01, PANEL_HEIGHT))
        axes.set_facecolor("black")
        axes.set_xticks([])
        axes.set_yticks([])
        for spine in axes.spines.values():
            spine.set_color("#606070")
        axes.imshow(volume.hu[index], cmap="gray", vmin=low, vmax=high, interpolation="nearest", aspect=aspect)
        axes.imshow(scored[index], cmap=overlay_colors, vmin=0, vmax=OTHER_CALCIUM, interpolation="nearest", aspect=aspect)
        axes.set_xlim(column_range[0] - 0.5, column_range[1] - 0.5)
        axes.set_ylim(row_range[1] - 0.5, row_range[0] - 0.5)
        if volume.frame_numbers is not None:
            source = f"frame {volume.frame_numbers[index]}"
        else:
            source = f"image {volume.headers[index].get('InstanceNumber', '-')}"
        axes.set_title(
            f"slice {index + 1}/{volume.shape[0]}, z {volume.positions[index][2]:.1f} mm, {source}",
            color=_TEXT,
            fontsize=11,
        )

    figure.text(0.02, 0.012, "Overlay:", color=_TEXT, fontsize=12, va="bottom")
    x = 0.09
    for artery in ARTERIES:
        figure.text(x, 0.012, f"■ {artery}", color=_hex(ARTERY_COLORS[artery]), fontsize=12, weight="bold", va="bottom")
        x += 0.06
    figure.text(x, 0.012, "■ other calcium (not scored)", color=_hex(OTHER_CALCIUM_COLOR), fontsize=12, va="bottom")
    figure.text(
        0.98,
        0.012,
        f"window {WINDOW[0]:g}/{WINDOW[1]:g} HU, field {_field_mm(volume, row_range, column_range)}",
        color=_TEXT,
        fontsize=11,
        ha="right",
        va="bottom",
    )


def crop_window(volume: CTVolume, scored: np.ndarray) -> tuple[tuple[int, int], tuple[int, int]]:
    """Return the (start, stop) row and column ranges of the slice panels, around all coronary calcium.

    The field is centred on the bounding box of the coronary calcium voxels
    of the whole volume, with MARGIN_MM on each side and at least
    MIN_FIELD_MM wide, clipped to the image. Without calcium it is the whole image.
    """
    rows, columns = volume.shape[1:]
    coronary = ((scored >= 1) & (scored <= 3)).any(axis=0)
    if not coronary.any():
        return (0, rows), (0, columns)
    ranges = []
    for axis, size, spacing in ((0, rows, volume.pixel_spacing[0]), (1, columns, volume.pixel_spacing[1])):
        indices = np.flatnonzero(coronary.any(axis=1 - axis))
        centre = (indices[0] + indices[-1] + 1) / 2
        half_mm = max(MIN_FIELD_MM / 2, (indices[-1] + 1 - indices[0]) * spacing / 2 + MARGIN_MM)
        half = half_mm / spacing
        start = int(max(0, np.floor(centre - half)))
        stop = int(min(size, np.ceil(centre + half)))
        ranges.append((start, stop))
    return ranges[0], ranges[1]


def _field_mm(volume: CTVolume, row_range: tuple[int, int], column_range: tuple[int, int]) -> str:
    width = (column_range[1] - column_range[0]) * volume.pixel_spacing[1]
    height = (row_range[1] - row_range[0]) * volume.pixel_spacing[0]
    return f"{width:.0f} × {height:.0f} mm"


def _source_reference(volume: CTVolume, index: int) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = volume.sop_class_uid
    item.ReferencedSOPInstanceUID = volume.sop_instance_uids[index]
    if volume.frame_numbers is not None:
        item.ReferencedFrameNumber = volume.frame_numbers[index]
    return item


def _patient_line(header: Dataset, width: int = 60) -> str:
    """Return "NAME   ID …   born …   sex …" in about `width` characters.

    The name gives way first, so a long name never hides the patient ID.
    """
    details = (f"   ID {header.get('PatientID') or '-'}   born {_display_date(header.get('PatientBirthDate'))}"
               f"   sex {header.get('PatientSex') or '-'}")
    name = _display_name(header.get("PatientName"))
    room = max(12, width - len(details))
    if len(name) > room:
        name = name[: room - 1].rstrip() + "…"
    return _drawable(name + details)


def _display_name(value: object) -> str:
    """Patient name as "FAMILY, Given Middle" from the alphabetic component group."""
    if value is None or str(value) == "":
        return "(no name)"
    name = value if isinstance(value, PersonName) else PersonName(str(value))
    given = " ".join(part for part in (name.given_name, name.middle_name) if part)
    family = name.family_name or ""
    if family and given:
        return f"{family}, {given}"
    return family or given or str(value)


@functools.lru_cache(maxsize=1)
def _font_code_points() -> frozenset[int]:
    """Code points of the font that matplotlib uses for the page's text by default."""
    return frozenset(FT2Font(findfont(FontProperties())).get_charmap())


def _drawable(text: str) -> str:
    """Return `text` with characters missing from the page font replaced by "□".

    matplotlib warns about each missing glyph with the character in the
    message, which would put parts of a patient's name into the node's log.
    """
    # TODO(#4): ship a font with CJK glyphs; such names are drawn as boxes.
    available = _font_code_points()
    return "".join(character if ord(character) in available else "□" for character in text)


def _display_date(value: object) -> str:
    """DICOM DA "YYYYMMDD" as "YYYY-MM-DD"; other values unchanged, empty as "-"."""
    text = str(value or "")
    if len(text) == 8 and text.isdigit():
        return f"{text[:4]}-{text[4:6]}-{text[6:]}"
    return text or "-"


def _ascii_text(text: str) -> str:
    """Return `text` in ASCII, which every Specific Character Set that the notice may copy can encode.

    The node's reasons use a few typographic symbols (en dash, ×, ≥, →); they
    get ASCII spellings, accents are dropped, and anything else becomes "?".
    """
    for symbol, spelling in _ASCII_SPELLINGS.items():
        text = text.replace(symbol, spelling)
    decomposed = unicodedata.normalize("NFKD", text)
    return "".join(c for c in decomposed if not unicodedata.combining(c)).encode("ascii", "replace").decode("ascii")


def _hex(color: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)
