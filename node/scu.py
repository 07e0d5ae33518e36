"""Storage and Verification SCU: send the node's output objects to a destination.

The node acts as a C-STORE service class user (PS3.4 Annex B) towards each
`[[destinations]]` entry of `node.toml`. For every send it proposes exactly the
SOP classes of the files it sends, each with the file's own transfer syntax and
an uncompressed fallback, checks the accepted presentation contexts before the
first C-STORE request, and checks every response status. An object counts as
sent only on 0x0000 (Success) or a 0xB000-0xBFFF warning (PS3.4 B.2.3).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context

if TYPE_CHECKING:
    from node.config import Destination, NodeSection

LOGGER = logging.getLogger(__name__)

#: Verification SOP Class (PS3.4 Annex A).
VERIFICATION_SOP_CLASS = UID("1.2.840.10008.1.1")

#: Uncompressed transfer syntaxes proposed as a fallback for every SOP class.
#: Implicit VR Little Endian is the default transfer syntax every SCP supports
#: (PS3.5 section 10.1).
FALLBACK_TRANSFER_SYNTAXES: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

#: Maximum number of presentation contexts in one A-ASSOCIATE-RQ (PS3.8 9.3.2.2:
#: odd context IDs 1-255).
MAX_PRESENTATION_CONTEXTS = 128

#: Storage statuses whose failure is usually temporary, so a later attempt may
#: succeed: 0xA7xx Out of Resources (PS3.4 B.2.3). Any other failure status is
#: a refusal of this object that another attempt would repeat.
_RETRYABLE_STATUS_RANGES: tuple[tuple[int, int], ...] = ((0xA700, 0xA7FF),)

_STATUS_MEANINGS: tuple[tuple[int, int, str], ...] = (
    (0x0000, 0x0000, "Success"),
    (0x0117, 0x0117, "Invalid SOP Instance"),
    (0x0122, 0x0122, "SOP Class not supported"),
    (0x0124, 0x0124, "Not authorized"),
    (0x0210, 0x0210, "Duplicate invocation"),
    (0x0211, 0x0211, "Unrecognized operation"),
    (0x0212, 0x0212, "Mistyped argument"),
    (0xA700, 0xA7FF, "Refused: Out of Resources"),
    (0xA900, 0xA9FF, "Error: Data Set does not match SOP Class"),
    (0xB000, 0xB000, "Warning: Coercion of Data Elements"),
    (0xB006, 0xB006, "Warning: Elements Discarded"),
    (0xB007, 0xB007, "Warning: Data Set does not match SOP Class"),
    (0xB001, 0xBFFF, "Warning"),
    (0xC000, 0xCFFF, "Error: Cannot understand"),
)


def describe_status(status: int) -> str:
    """Return the PS3.4 Annex B / PS3.7 Annex C meaning of a C-STORE status, e.g. "0xA700 (Refused: Out of Resources)"."""
    for low, high, meaning in _STATUS_MEANINGS:
        if low <= status <= high:
            return f"0x{status:04X} ({meaning})"
    return f"0x{status:04X} (not a C-STORE status defined in PS3.4)"


def is_sent_status(status: int) -> bool:
    """Return True when a C-STORE response status means the SCP stored the object.

    That is 0x0000 Success or a warning in 0xB000-0xBFFF (PS3.4 B.2.3): the
    object was stored, possibly with coerced or discarded elements.
    """
    return status == 0x0000 or 0xB000 <= status <= 0xBFFF


@dataclass(frozen=True)
class InstanceSendResult:
    """Outcome of sending one file.

    path: the file sent.
    sop_class_uid, sop_instance_uid: from the file ("" when it could not be read).
    sent: True when the destination stored the object (status 0x0000 or 0xBxxx).
    status: the C-STORE response status, None when no response arrived (the
        file was not sent, the association failed or the response timed out).
    error_comment: Error Comment (0000,0902) of the response, "" when absent.
    reason: why the object was not sent, in words a person can act on; ""
        when sent.
    retryable: whether another attempt may succeed (association problems and
        0xA7xx Out of Resources); False once sent.
    """

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    sent: bool
    status: int | None = None
    error_comment: str = ""
    reason: str = ""
    retryable: bool = False


@dataclass(frozen=True)
class SendReport:
    """Outcome of sending a set of files to one destination.

    destination: the destination's name in `node.toml`.
    peer: "AE_TITLE@HOST:PORT" of the destination.
    instances: one result per file, in the order the files were given.
    association_error: why no association was established on the last attempt
        ("" when one was established).
    attempts: associations requested (1 for `send_files`).
    """

    destination: str
    peer: str
    instances: tuple[InstanceSendResult, ...] = ()
    association_error: str = ""
    attempts: int = 1

    @property
    def all_sent(self) -> bool:
        """True when every file was stored by the destination."""
        return all(result.sent for result in self.instances)

    @property
    def failed(self) -> tuple[InstanceSendResult, ...]:
        """The results of the files the destination did not store."""
        return tuple(result for result in self.instances if not result.sent)

    def failure_reason(self) -> str:
        """Describe in one paragraph why files were not sent, or return "" when all were.

        The text names the destination, each refused object with its SOP class,
        the peer's status and error comment, so it can be stored on a job as is.
        """
        failed = self.failed
        if not failed:
            return ""
        parts = []
        for result in failed:
            sop_class = _sop_class_name(result.sop_class_uid) if result.sop_class_uid else "object"
            parts.append(f"{sop_class} {result.sop_instance_uid or result.path.name}: {result.reason}")
        attempts = f" after {self.attempts} attempt(s)" if self.attempts > 1 else ""
        return (
            f"destination {self.destination!r} ({self.peer}) did not store "
            f"{len(failed)} of {len(self.instances)} object(s){attempts}: " + "; ".join(parts)
        )


@dataclass(frozen=True)
class EchoResult:
    """Outcome of a C-ECHO request.

    success: True when the peer returned status 0x0000.
    status: the C-ECHO response status, None when none arrived.
    message: what happened, in words (rejection reason, timeout, status).
    round_trip_s: seconds from the association request to the release.
    """

    success: bool
    status: int | None
    message: str
    round_trip_s: float


@dataclass
class _PreparedFile:
    path: Path
    sop_class_uid: UID
    sop_instance_uid: str
    transfer_syntax_uid: UID
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    problem: str = ""


@dataclass
class _AssociationOutcome:
    """Result of association negotiation, captured by event handlers."""

    rejection: str = ""
    rejection_permanent: bool = False
    #: (source, reason) of an A-ASSOCIATE-RJ, None when there was none.
    rejection_code: tuple[int, int] | None = None
    connected: bool = False
    no_accepted_context: bool = False

    @property
    def permanent(self) -> bool:
        """True when another attempt would fail the same way."""
        return self.rejection_permanent or self.no_accepted_context


def send_files(
    files: Iterable[str | Path],
    destination: Destination,
    *,
    calling_ae_title: str,
    node_section: NodeSection,
) -> SendReport:
    """Send DICOM files to a destination over one association.

    Parameters
    ----------
    files
        DICOM Part 10 files (with file meta information) to send.
    destination
        The `[[destinations]]` entry: AE title, host and port.
    calling_ae_title
        The node's own AE title, sent as calling AE title.
    node_section
        The `[node]` settings: ACSE/DIMSE/network timeouts and maximum PDU size.

    Returns
    -------
    SendReport
        One result per file. Network problems, rejected associations and
        presentation contexts, unreadable files and failure statuses are
        reported in the results, not raised, so the caller can show them on
        the job.

    Raises
    ------
    ValueError
        If the files need more than 128 presentation contexts.
    """
    peer = f"{destination.ae_title}@{destination.host}:{destination.port}"
    prepared = [_prepare_file(Path(path)) for path in files]
    results: dict[int, InstanceSendResult] = {}
    for index, item in enumerate(prepared):
        if item.problem:
            results[index] = _not_sent(item, item.problem, retryable=False)
    sendable = [index for index, item in enumerate(prepared) if not item.problem]
    if not sendable:
        return SendReport(destination.name, peer, tuple(results[i] for i in range(len(prepared))))

    contexts = _build_contexts(prepared[index] for index in sendable)
    ae = _make_ae(calling_ae_title, node_section)
    outcome = _AssociationOutcome()
    connect_error = ""
    try:
        assoc: Association | None = _associate(ae, destination, contexts, node_section, outcome)
    except OSError as error:
        # pynetdicom lets socket.gaierror through for a host name that does not resolve.
        assoc = None
        connect_error = _connection_error(destination.host, peer, error)
    if assoc is None or not assoc.is_established:
        failure = connect_error if assoc is None else _association_failure(assoc, outcome, calling_ae_title, peer)
        LOGGER.error(failure)
        for index in sendable:
            results[index] = _not_sent(prepared[index], failure, retryable=not outcome.permanent)
        ae.shutdown()
        return SendReport(
            destination.name,
            peer,
            tuple(results[i] for i in range(len(prepared))),
            association_error=failure,
        )

    try:
        _send_on_association(assoc, prepared, sendable, results, calling_ae_title, peer)
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    return SendReport(destination.name, peer, tuple(results[i] for i in range(len(prepared))))


def send_with_retries(
    files: Sequence[str | Path],
    destination: Destination,
    *,
    calling_ae_title: str,
    node_section: NodeSection,
    stop_event: threading.Event | None = None,
    send: Callable[..., SendReport] = send_files,
) -> SendReport:
    """Send files to a destination, retrying with exponential backoff.

    Up to `destination.max_attempts` associations are requested. After a failed
    attempt only the files whose failure is retryable (no association, aborted
    association, timeout, 0xA7xx Out of Resources) are sent again, after
    `destination.retry_backoff_s` seconds, doubled after each further failure.
    A refusal that another attempt would repeat (0xA9xx, 0xCxxx, 0x0122, no
    accepted presentation context, permanent association rejection) is not
    retried.

    Parameters
    ----------
    files, destination, calling_ae_title, node_section
        As for `send_files`.
    stop_event
        When set during a backoff wait, retrying stops and the report so far
        is returned (used when the node shuts down).
    send
        The single-attempt function, `send_files` unless a test replaces it.

    Returns
    -------
    SendReport
        The last result of every file, with `attempts` set to the number of
        associations requested.

    Raises
    ------
    ValueError
        If `destination.max_attempts` is below 1.
    """
    if destination.max_attempts < 1:
        raise ValueError(
            f"destination {destination.name!r} has max_attempts = {destination.max_attempts}; "
            "expected 1 or more, so that the files are sent at least once"
        )
    paths = [Path(path) for path in files]
    latest: dict[Path, InstanceSendResult] = {}
    pending = list(paths)
    attempts = 0
    association_error = ""
    delay = destination.retry_backoff_s
    peer = f"{destination.ae_title}@{destination.host}:{destination.port}"

    while pending and attempts < destination.max_attempts:
        if attempts > 0:
            LOGGER.warning(
                "retrying %d object(s) to destination %s (%s) in %.1f s, attempt %d of %d",
                len(pending),
                destination.name,
                peer,
                delay,
                attempts + 1,
                destination.max_attempts,
            )
            if _wait(delay, stop_event):
                LOGGER.warning("sending to %s stopped: the node is shutting down", destination.name)
                break
            delay *= 2
        attempts += 1
        report = send(
            pending, destination, calling_ae_title=calling_ae_title, node_section=node_section
        )
        association_error = report.association_error
        for result in report.instances:
            latest[result.path] = result
        pending = [result.path for result in report.instances if not result.sent and result.retryable]

    instances = tuple(latest[path] for path in paths if path in latest)
    final = SendReport(
        destination.name,
        peer,
        instances,
        association_error=association_error,
        attempts=attempts,
    )
    if final.all_sent:
        LOGGER.info(
            "sent %d object(s) to destination %s (%s) in %d attempt(s)",
            len(instances),
            destination.name,
            peer,
            attempts,
        )
    else:
        LOGGER.error("%s", final.failure_reason())
    return final


def echo(
    ae_title: str,
    host: str,
    port: int,
    *,
    calling_ae_title: str = "CACS_NODE",
    acse_timeout_s: float = 30.0,
    dimse_timeout_s: float = 60.0,
    network_timeout_s: float = 60.0,
    max_pdu_size: int = 16382,
) -> EchoResult:
    """Send a C-ECHO request (Verification, PS3.4 Annex A) to a peer.

    Parameters
    ----------
    ae_title, host, port
        The called AE title and the peer's address.
    calling_ae_title
        AE title this end presents (default "CACS_NODE").
    acse_timeout_s, dimse_timeout_s, network_timeout_s, max_pdu_size
        As in the `[node]` table of `node.toml`.

    Returns
    -------
    EchoResult
        Never raises for network problems; they are described in `message`.
    """
    peer = f"{ae_title}@{host}:{port}"
    started = time.monotonic()
    ae = AE(ae_title=calling_ae_title)
    _apply_timeouts(ae, acse_timeout_s, dimse_timeout_s, network_timeout_s)
    outcome = _AssociationOutcome()
    contexts = [build_context(VERIFICATION_SOP_CLASS, list(FALLBACK_TRANSFER_SYNTAXES))]
    try:
        try:
            assoc = ae.associate(
                host,
                port,
                contexts=contexts,
                ae_title=ae_title,
                max_pdu=max_pdu_size,
                evt_handlers=_negotiation_handlers(outcome),
            )
        except OSError as error:
            return EchoResult(False, None, _connection_error(host, peer, error), time.monotonic() - started)
        if not assoc.is_established:
            message = _association_failure(assoc, outcome, calling_ae_title, peer)
            return EchoResult(False, None, message, time.monotonic() - started)

        response = assoc.send_c_echo()
        assoc.release()
    finally:
        ae.shutdown()

    elapsed = time.monotonic() - started
    if "Status" not in response:
        message = (
            f"no C-ECHO response from {peer} within the DIMSE timeout of "
            f"{dimse_timeout_s:g} s, or the association was aborted"
        )
        return EchoResult(False, None, message, elapsed)
    status = int(response.Status)
    if status == 0x0000:
        return EchoResult(True, status, f"C-ECHO to {peer} succeeded", elapsed)
    return EchoResult(False, status, f"C-ECHO to {peer} returned status 0x{status:04X}", elapsed)


def _prepare_file(path: Path) -> _PreparedFile:
    """Read the UIDs needed to propose and send `path`, without the pixel data."""
    empty = _PreparedFile(path, UID(""), "", UID(""))
    try:
        dataset = dcmread(path, stop_before_pixels=True)
    except FileNotFoundError:
        empty.problem = f"file {path} not found; the output was not written or was removed"
        return empty
    except (InvalidDicomError, OSError, ValueError) as error:
        empty.problem = f"file {path} cannot be read as DICOM ({error}); rewrite the outputs"
        return empty

    meta = getattr(dataset, "file_meta", None)
    transfer_syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    sop_class = dataset.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta else None)
    sop_instance = dataset.get("SOPInstanceUID") or (
        meta.get("MediaStorageSOPInstanceUID") if meta else None
    )
    missing = [
        name
        for name, value in (
            ("Transfer Syntax UID (0002,0010)", transfer_syntax),
            ("SOP Class UID (0008,0016)", sop_class),
            ("SOP Instance UID (0008,0018)", sop_instance),
        )
        if not value
    ]
    prepared = _PreparedFile(
        path,
        UID(str(sop_class or "")),
        str(sop_instance or ""),
        UID(str(transfer_syntax or "")),
        study_instance_uid=str(dataset.get("StudyInstanceUID", "")),
        series_instance_uid=str(dataset.get("SeriesInstanceUID", "")),
    )
    if missing:
        prepared.problem = (
            f"file {path} lacks {', '.join(missing)}; expected a DICOM Part 10 file "
            "with file meta information, as the node's writers produce"
        )
    return prepared


def _build_contexts(files: Iterable[_PreparedFile]) -> list[PresentationContext]:
    """Propose each SOP class with its files' transfer syntaxes, then with the fallback.

    A compressed transfer syntax gets a context of its own, so the SCP can
    accept it without choosing an uncompressed syntax from the same context.
    """
    requested: list[tuple[UID, tuple[UID, ...]]] = []
    for item in files:
        if item.transfer_syntax_uid in FALLBACK_TRANSFER_SYNTAXES:
            entry = (item.sop_class_uid, FALLBACK_TRANSFER_SYNTAXES)
        else:
            entry = (item.sop_class_uid, (item.transfer_syntax_uid,))
        if entry not in requested:
            requested.append(entry)
        fallback = (item.sop_class_uid, FALLBACK_TRANSFER_SYNTAXES)
        if fallback not in requested:
            requested.append(fallback)

    if len(requested) > MAX_PRESENTATION_CONTEXTS:
        raise ValueError(
            f"the files need {len(requested)} presentation contexts but one association "
            f"carries at most {MAX_PRESENTATION_CONTEXTS}; send them in smaller groups"
        )
    return [build_context(sop_class, list(syntaxes)) for sop_class, syntaxes in requested]


def _make_ae(calling_ae_title: str, node_section: NodeSection) -> AE:
    ae = AE(ae_title=calling_ae_title)
    _apply_timeouts(
        ae, node_section.acse_timeout_s, node_section.dimse_timeout_s, node_section.network_timeout_s
    )
    return ae


def _apply_timeouts(ae: AE, acse_s: float, dimse_s: float, network_s: float) -> None:
    ae.acse_timeout = acse_s
    ae.dimse_timeout = dimse_s
    ae.network_timeout = network_s
    # Without a connection timeout an unreachable host blocks for the
    # operating system's TCP timeout (minutes); the ACSE timeout bounds it.
    ae.connection_timeout = acse_s


def _associate(
    ae: AE,
    destination: Destination,
    contexts: list[PresentationContext],
    node_section: NodeSection,
    outcome: _AssociationOutcome,
) -> Association:
    LOGGER.info(
        "requesting association %s -> %s@%s:%d (destination %s) with %d presentation context(s)",
        ae.ae_title,
        destination.ae_title,
        destination.host,
        destination.port,
        destination.name,
        len(contexts),
    )
    return ae.associate(
        destination.host,
        destination.port,
        contexts=contexts,
        ae_title=destination.ae_title,
        max_pdu=node_section.max_pdu_size,
        evt_handlers=_negotiation_handlers(outcome),
    )


def _negotiation_handlers(outcome: _AssociationOutcome) -> list:
    return [
        (evt.EVT_CONN_OPEN, _capture_connection, [outcome]),
        (evt.EVT_ACSE_RECV, _capture_rejection, [outcome]),
    ]


def _capture_connection(event: evt.Event, outcome: _AssociationOutcome) -> None:
    outcome.connected = True


def _capture_rejection(event: evt.Event, outcome: _AssociationOutcome) -> None:
    primitive = getattr(event, "primitive", None)
    result = getattr(primitive, "result", None)
    if result not in (1, 2):
        return
    outcome.rejection = (
        f"{primitive.result_str}, source {primitive.result_source} ({primitive.source_str}), "
        f"reason {primitive.diagnostic} ({primitive.reason_str})"
    )
    outcome.rejection_permanent = result == 1
    outcome.rejection_code = (primitive.result_source, primitive.diagnostic)


#: A-ASSOCIATE-RJ reason 7 of the service user (source 1): called AE title not recognised.
CALLED_AE_NOT_RECOGNISED = 7


def _association_failure(
    assoc: Association, outcome: _AssociationOutcome, calling_ae_title: str, peer: str
) -> str:
    if assoc.is_rejected and outcome.rejection:
        if outcome.rejection_code == (1, CALLED_AE_NOT_RECOGNISED):
            hint = (f"the destination does not answer to called AE title {assoc.acceptor.ae_title!r}; "
                    "check its AE title in node.toml, then restart the node")
        else:
            hint = f"check that the destination lists calling AE title {calling_ae_title!r} and this host"
        return f"association {calling_ae_title} -> {peer} rejected: {outcome.rejection}; {hint}"
    if assoc.is_rejected:
        return f"association {calling_ae_title} -> {peer} rejected"
    if outcome.connected and assoc.rejected_contexts and not assoc.accepted_contexts:
        outcome.no_accepted_context = True
        proposed = sorted({_sop_class_name(context.abstract_syntax) for context in assoc.rejected_contexts})
        return (
            f"destination {peer} accepted none of the proposed presentation contexts "
            f"({', '.join(proposed)}); configure it to accept these SOP classes or remove "
            "these output kinds from its outputs in node.toml, then restart the node"
        )
    if outcome.connected:
        return (
            f"association {calling_ae_title} -> {peer} was aborted or timed out during "
            "negotiation; check the destination's log for the reason"
        )
    return (
        f"no association with {peer}: connection failed or timed out; check that the "
        "destination is running and that host and port in node.toml are right (restart the "
        "node after a change)"
    )


def _connection_error(host: str, peer: str, error: OSError) -> str:
    return (
        f"no association with {peer}: connecting to host {host!r} failed ({error}); check the "
        "host name or address in node.toml (restart the node after a change) and the name service"
    )


def _find_context(assoc: Association, item: _PreparedFile) -> PresentationContext | None:
    """Pick the accepted context for a file: its own syntax first, then any uncompressed one."""
    candidates = [
        context
        for context in assoc.accepted_contexts
        if context.abstract_syntax == item.sop_class_uid and context.transfer_syntax
    ]
    for context in candidates:
        if context.transfer_syntax[0] == item.transfer_syntax_uid:
            return context
    for context in candidates:
        if context.transfer_syntax[0] in FALLBACK_TRANSFER_SYNTAXES:
            return context
    return None


def _send_on_association(
    assoc: Association,
    prepared: list[_PreparedFile],
    sendable: list[int],
    results: dict[int, InstanceSendResult],
    calling_ae_title: str,
    peer: str,
) -> None:
    for position, index in enumerate(sendable):
        item = prepared[index]
        if not assoc.is_established:
            reason = f"association with {peer} was aborted or timed out before this object was sent"
            for remaining in sendable[position:]:
                results[remaining] = _not_sent(prepared[remaining], reason, retryable=True)
            LOGGER.error("%s; %d object(s) not sent", reason, len(sendable) - position)
            return

        context = _find_context(assoc, item)
        if context is None:
            reason = (
                f"destination rejected every presentation context for "
                f"{_sop_class_name(item.sop_class_uid)} with {item.transfer_syntax_uid.name} "
                "or an uncompressed transfer syntax; configure the destination to accept "
                "this SOP class or remove this output kind from its outputs in node.toml, then "
                "restart the node"
            )
            LOGGER.error(
                "not sending SOP Instance %s to %s: %s", item.sop_instance_uid, peer, reason
            )
            results[index] = _not_sent(item, reason, retryable=False)
            continue

        results[index] = _store_one(assoc, item, context, calling_ae_title, peer)


def _store_one(
    assoc: Association,
    item: _PreparedFile,
    context: PresentationContext,
    calling_ae_title: str,
    peer: str,
) -> InstanceSendResult:
    try:
        dataset = dcmread(item.path)
        accepted_syntax = context.transfer_syntax[0]
        if item.transfer_syntax_uid.is_compressed and not accepted_syntax.is_compressed:
            # The destination accepted only the uncompressed fallback.
            dataset.decompress()
    except (OSError, InvalidDicomError, ValueError, RuntimeError, NotImplementedError) as error:
        reason = f"file {item.path} could not be prepared for sending ({error})"
        LOGGER.error("%s", reason)
        return _not_sent(item, reason, retryable=False)

    try:
        response: Dataset = assoc.send_c_store(dataset)
    except (ValueError, AttributeError) as error:
        # pynetdicom raises these when the dataset cannot be encoded in the
        # accepted transfer syntax or lacks its SOP UIDs.
        reason = f"file {item.path} could not be encoded for sending ({error})"
        LOGGER.error("C-STORE %s -> %s SOP Instance %s: %s", calling_ae_title, peer, item.sop_instance_uid, reason)
        return _not_sent(item, reason, retryable=False)

    log_context = (
        f"{calling_ae_title} -> {peer} Study {item.study_instance_uid} "
        f"Series {item.series_instance_uid} SOP Instance {item.sop_instance_uid}"
    )
    if "Status" not in response:
        reason = "no C-STORE response: the DIMSE timeout expired or the association was aborted"
        LOGGER.error("C-STORE %s: %s", log_context, reason)
        return _not_sent(item, reason, retryable=True)

    status = int(response.Status)
    error_comment = str(response.get("ErrorComment", "") or "")
    if is_sent_status(status):
        level = logging.INFO if status == 0x0000 else logging.WARNING
        LOGGER.log(level, "C-STORE %s: status %s", log_context, describe_status(status))
        return InstanceSendResult(
            item.path,
            str(item.sop_class_uid),
            item.sop_instance_uid,
            True,
            status=status,
            error_comment=error_comment,
        )

    comment = f", error comment {error_comment!r}" if error_comment else ""
    reason = f"refused with status {describe_status(status)}{comment}"
    LOGGER.error("C-STORE %s: %s", log_context, reason)
    retryable = any(low <= status <= high for low, high in _RETRYABLE_STATUS_RANGES)
    return InstanceSendResult(
        item.path,
        str(item.sop_class_uid),
        item.sop_instance_uid,
        False,
        status=status,
        error_comment=error_comment,
        reason=reason,
        retryable=retryable,
    )


def _not_sent(item: _PreparedFile, reason: str, *, retryable: bool) -> InstanceSendResult:
    return InstanceSendResult(
        item.path,
        str(item.sop_class_uid),
        item.sop_instance_uid,
        False,
        reason=reason,
        retryable=retryable,
    )


def _sop_class_name(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else f"SOP Class {uid}"


def _wait(seconds: float, stop_event: threading.Event | None) -> bool:
    """Wait for the backoff; return True when `stop_event` was set meanwhile."""
    if stop_event is None:
        time.sleep(seconds)
        return False
    return stop_event.wait(seconds)
