"""The node's Verification and Storage SCP: association checks and the C-STORE handler.

Association requests are checked in this order, each rejection logged with
the peer address and both AE titles (A-ASSOCIATE-RJ result, source, reason as
in PS3.8 section 9.3.4):

1. called AE title differs from `[node] ae_title` (case-sensitive; pynetdicom
   strips the padding spaces) → (1, 1, 7) called AE title not recognised;
2. calling AE title and peer address not in `[[peers]]`, unless
   `accept_unknown_peers` → (1, 1, 3) calling AE title not recognised;
3. `max_associations` associations already accepted → (2, 3, 2) transient,
   local limit exceeded.

Only accepted associations count towards `max_associations`, so connections
that are still negotiating, being rejected or have sent nothing yet cannot lock
an allowed peer out. A connection must send its A-ASSOCIATE-RQ within
`IDENTIFY_TIMEOUT_S` (or `acse_timeout_s` when shorter). pynetdicom's own cap
on connections is `max_associations + unidentified_margin(max_associations)`,
which bounds the threads a flood of connections can start.

C-STORE statuses (PS3.4 Annex B.2.3):

- 0x0000 the instance is on disk (or an identical copy already was);
- 0xA700 free space below `[storage] min_free_space_mb`, or the write failed;
- 0xA900 the dataset's SOP Class UID differs from the request's Affected SOP
  Class UID, or a UID needed to file it (Study, Series, SOP Instance) is missing;
- 0xC210 the dataset cannot be parsed, or its Pixel Data is shorter or longer
  than the image it describes (see `_check_pixel_data`);
- 0xC211 the dataset's SOP Instance UID differs from the request's Affected
  SOP Instance UID, or a UID is not a valid UID.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    UID,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.association import Association

from node.config import NodeSettings
from node.jobs import InstanceRecord, JobStore, JobStoreError
from node.storage import InstanceStore, StorageError, is_valid_uid

logger = logging.getLogger(__name__)

#: SOP classes stored by the SCP.
STORAGE_SOP_CLASSES: tuple[str, ...] = (CTImageStorage, EnhancedCTImageStorage)

#: Transfer syntaxes accepted for storage: the uncompressed little endian ones
#: and the lossless compressed ones that pydicom with pylibjpeg decodes.
STORAGE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,  # 1.2.840.10008.1.2.4.70
    JPEGLossless,  # 1.2.840.10008.1.2.4.57
    JPEGLSLossless,  # 1.2.840.10008.1.2.4.80
    JPEG2000Lossless,  # 1.2.840.10008.1.2.4.90
    RLELossless,  # 1.2.840.10008.1.2.5
)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_SOP_CLASS_MISMATCH = 0xA900
STATUS_CANNOT_PARSE = 0xC210
STATUS_INVALID_UID = 0xC211

#: A-ASSOCIATE-RJ (result, source, reason) triples.
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)

#: Error Comment (0000,0902) is LO, at most 64 characters.
_ERROR_COMMENT_LENGTH = 64
_LOCK_STRIPES = 64

#: Seconds a new connection has to send its A-ASSOCIATE-RQ; a scanner sends it
#: right after connecting, so an idle socket is closed long before acse_timeout_s.
IDENTIFY_TIMEOUT_S = 5.0


def unidentified_margin(max_associations: int) -> int:
    """Return the connections allowed beyond `max_associations` for requests not yet checked."""
    return max(10, max_associations)


@dataclass(frozen=True)
class Caller:
    """The peer of an association, as logged on every line."""

    calling_ae_title: str
    called_ae_title: str
    address: str
    port: int

    def __str__(self) -> str:
        return f"{self.calling_ae_title}@{self.address}:{self.port} -> {self.called_ae_title}"


def caller_of(assoc: Association) -> Caller:
    """Read the AE titles and peer address of an association being requested or established."""
    primitive = assoc.requestor.primitive
    calling = getattr(primitive, "calling_ae_title", "") or assoc.requestor.ae_title
    called = getattr(primitive, "called_ae_title", "") or assoc.acceptor.ae_title
    address = assoc.requestor.address if assoc.requestor.address_info else "unknown"
    port = assoc.requestor.port if assoc.requestor.address_info else 0
    return Caller(str(calling).strip(), str(called).strip(), str(address), int(port))


def _normalised_address(address: str) -> str:
    """Return the address as `ipaddress` formats it, with IPv4-mapped IPv6 turned into IPv4."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


def _host_addresses(host: str) -> set[str]:
    """Return the IP addresses of a peer's host entry, resolving a host name on each call."""
    try:
        return {_normalised_address(str(ipaddress.ip_address(host)))}
    except ValueError:
        pass
    # NOTE: resolving runs on the association's thread, so a slow resolver
    # delays the association by its timeout. IP addresses in [[peers]] avoid it.
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as error:
        logger.warning("cannot resolve peer host %r (%s); associations from it are rejected", host, error)
        return set()
    return {_normalised_address(str(info[4][0])) for info in infos}


def _check_structure(dataset: Dataset, total_length: int) -> None:
    """Raise ValueError when the parsed dataset shows it is not a readable DICOM dataset.

    pydicom reads leniently: a value whose declared length runs past the end
    is cut short and arbitrary bytes become private elements. So each
    top-level element's declared extent is checked against the received
    length, every value is converted once, and a dataset without SOP Class
    UID and SOP Instance UID is treated as not understood.
    """
    undefined_length = 0xFFFFFFFF
    for element in dataset.elements():
        length = getattr(element, "length", undefined_length)
        value_tell = getattr(element, "value_tell", None)
        if value_tell is not None and length != undefined_length and value_tell + length > total_length:
            raise ValueError(
                f"element {element.tag} declares {length} bytes at offset {value_tell} "
                f"but the dataset ends at {total_length}"
            )
    for element in dataset:
        element.value  # noqa: B018 - converting every value makes a corrupt one raise here
    if "SOPClassUID" not in dataset and "SOPInstanceUID" not in dataset:
        raise ValueError("no SOP Class UID and no SOP Instance UID found; the bytes are not a DICOM dataset")


_NATIVE_TRANSFER_SYNTAXES = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian})
_ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000) in little endian
_SEQUENCE_DELIMITER_TAG = b"\xfe\xff\xdd\xe0"  # (FFFE,E0DD)


def _check_pixel_data(dataset: Dataset, transfer_syntax: str) -> None:
    """Raise ValueError when Pixel Data cannot hold the image that the Image Pixel module describes.

    Native (uncompressed) Pixel Data must have Rows × Columns × Samples per
    Pixel × Bits Allocated / 8 × Number of Frames bytes, padded to an even
    length (PS3.5 section 8.1.1). Encapsulated Pixel Data must be a Basic
    Offset Table item followed by at least one fragment per frame, each item
    inside the received bytes (PS3.5 section A.4). A dataset without Pixel
    Data passes; the series loader reports it.
    """
    if "PixelData" not in dataset:
        return
    pixel_data = dataset.PixelData
    if not isinstance(pixel_data, (bytes, bytearray)):
        raise ValueError("Pixel Data has no byte value")
    missing = [name for name in ("Rows", "Columns", "BitsAllocated") if dataset.get(name) is None]
    if missing:
        raise ValueError(f"Pixel Data present but {', '.join(missing)} missing")
    frames = int(dataset.get("NumberOfFrames") or 1)
    if transfer_syntax in _NATIVE_TRANSFER_SYNTAXES:
        samples = int(dataset.get("SamplesPerPixel") or 1)
        bits = int(dataset.Rows) * int(dataset.Columns) * samples * int(dataset.BitsAllocated) * frames
        expected = (bits + 7) // 8
        expected += expected % 2
        if len(pixel_data) != expected:
            raise ValueError(
                f"Pixel Data has {len(pixel_data)} bytes, expected {expected} for {frames} frame(s) of "
                f"{dataset.Rows} x {dataset.Columns} x {samples} samples of {dataset.BitsAllocated} bits"
            )
        return

    # Encapsulated: item tag and 32-bit length pairs until the end or the sequence delimiter.
    offset = 0
    items = 0
    while offset < len(pixel_data):
        tag = bytes(pixel_data[offset : offset + 4])
        if tag == _SEQUENCE_DELIMITER_TAG:
            break
        if tag != _ITEM_TAG or offset + 8 > len(pixel_data):
            raise ValueError(f"encapsulated Pixel Data has no item tag at byte {offset}")
        length = int.from_bytes(pixel_data[offset + 4 : offset + 8], "little")
        if offset + 8 + length > len(pixel_data):
            raise ValueError(
                f"encapsulated Pixel Data item at byte {offset} declares {length} bytes, "
                f"{len(pixel_data) - offset - 8} remain"
            )
        items += 1
        offset += 8 + length
    # The first item is the Basic Offset Table; each frame needs at least one fragment after it.
    if items - 1 < frames:
        raise ValueError(f"encapsulated Pixel Data has {max(items - 1, 0)} fragment(s) for {frames} frame(s)")


def _failure(status: int, comment: str) -> Dataset:
    response = Dataset()
    response.Status = status
    response.ErrorComment = comment[:_ERROR_COMMENT_LENGTH]
    return response


def describe_rejected_contexts(contexts: Sequence[Any], limit: int = 5) -> str:
    """Describe rejected presentation contexts as "CT Image Storage with JPEG Baseline (...): reason"; "" for none."""
    parts = []
    for context in contexts[:limit]:
        syntaxes = ", ".join(UID(syntax).name for syntax in (context.transfer_syntax or [])) or "no transfer syntax"
        parts.append(f"{UID(context.abstract_syntax).name} with {syntaxes}: {context.status}")
    if len(contexts) > limit:
        parts.append(f"and {len(contexts) - limit} more")
    return "; ".join(parts)


class StorageSCP:
    """Verification and Storage SCP that files received instances and registers them as jobs.

    settings: the node settings (AE title, peers, limits, timeouts).
    store: the folders under the storage root.
    jobs: the job store in which each new instance restarts its series' quiet period.
    """

    def __init__(self, settings: NodeSettings, store: InstanceStore, jobs: JobStore) -> None:
        self.settings = settings
        self.store = store
        self.jobs = jobs
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._counts_lock = threading.Lock()
        self._counts: dict[int, dict[str, int]] = {}
        self.identify_timeout_s = IDENTIFY_TIMEOUT_S
        # Associations that passed the checks, by id; each holds one of the
        # max_associations slots until it is released, aborted or closed.
        self._admitted_lock = threading.Lock()
        self._admitted: dict[int, Association] = {}

    def build_ae(self) -> AE:
        """Create the pynetdicom AE with the supported contexts, limits and timeouts."""
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        # The checks in _handle_requested enforce max_associations on accepted
        # associations; pynetdicom's cap also counts connections not yet checked.
        ae.maximum_associations = node.max_associations + unidentified_margin(node.max_associations)
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.maximum_pdu_size = node.max_pdu_size
        # The checks in _handle_requested replace pynetdicom's own AE title checks.
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.add_supported_context(Verification, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(STORAGE_TRANSFER_SYNTAXES))
        return ae

    def event_handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        """Handlers to pass as `evt_handlers` to `AE.start_server`."""
        return [
            (evt.EVT_CONN_OPEN, self._handle_connection_open),
            (evt.EVT_CONN_CLOSE, self._handle_connection_close),
            (evt.EVT_REQUESTED, self._handle_requested),
            (evt.EVT_REJECTED, self._handle_rejected),
            (evt.EVT_ESTABLISHED, self._handle_established),
            (evt.EVT_RELEASED, self._handle_closed),
            (evt.EVT_ABORTED, self._handle_closed),
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
        ]

    # Association negotiation.

    def _handle_connection_open(self, event: evt.Event) -> None:
        # Runs before the association thread starts waiting for the A-ASSOCIATE-RQ.
        event.assoc.acse_timeout = min(self.settings.node.acse_timeout_s, self.identify_timeout_s)

    def _handle_connection_close(self, event: evt.Event) -> None:
        self._release_slot(event.assoc)

    def _handle_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        caller = caller_of(assoc)
        node = self.settings.node

        rejection: tuple[tuple[int, int, int], str] | None = None
        if caller.called_ae_title != node.ae_title:
            rejection = (
                REJECT_CALLED_AE,
                f"called AE title {caller.called_ae_title!r} is not this node's {node.ae_title!r}",
            )
        elif not node.accept_unknown_peers and not self._is_known_peer(caller):
            rejection = (
                REJECT_CALLING_AE,
                f"calling AE title {caller.calling_ae_title!r} from {caller.address} is not in [[peers]]",
            )
        else:
            accepted = self._take_slot(assoc)
            if accepted is not None:
                rejection = (
                    REJECT_LOCAL_LIMIT,
                    f"{accepted} associations already accepted, the limit is {node.max_associations}",
                )
        if rejection is None:
            # The peer is identified: later ACSE waits (release) use the configured timeout.
            assoc.acse_timeout = node.acse_timeout_s
            return

        (result, source, reason), explanation = rejection
        logger.warning(
            "association rejected (%d, %d, %d) for %s: %s", result, source, reason, caller, explanation
        )
        assoc.acse.send_reject(result, source, reason)
        assoc.kill()

    def _take_slot(self, assoc: Association) -> int | None:
        """Admit an association within max_associations; return the number accepted when full, else None."""
        with self._admitted_lock:
            # An association whose thread ended without a close event frees its slot here.
            for key, other in list(self._admitted.items()):
                if other is not assoc and not other.is_alive():
                    del self._admitted[key]
            if len(self._admitted) >= self.settings.node.max_associations:
                return len(self._admitted)
            self._admitted[id(assoc)] = assoc
            return None

    def _release_slot(self, assoc: Association) -> None:
        with self._admitted_lock:
            if self._admitted.get(id(assoc)) is assoc:
                del self._admitted[id(assoc)]

    def accepted_association_count(self) -> int:
        """Number of associations holding one of the max_associations slots."""
        with self._admitted_lock:
            return sum(1 for other in self._admitted.values() if other.is_alive())

    def _is_known_peer(self, caller: Caller) -> bool:
        address = _normalised_address(caller.address)
        for peer in self.settings.peers:
            if peer.ae_title == caller.calling_ae_title and address in _host_addresses(peer.host):
                return True
        return False

    def _handle_rejected(self, event: evt.Event) -> None:
        self._release_slot(event.assoc)
        # Only pynetdicom's own checks (its cap on connections) trigger
        # EVT_REJECTED; the checks above log their own rejections.
        primitive = event.assoc.acceptor.primitive
        logger.warning(
            "association rejected (%s, %s, %s) by pynetdicom for %s",
            getattr(primitive, "result", "?"),
            getattr(primitive, "result_source", "?"),
            getattr(primitive, "diagnostic", "?"),
            caller_of(event.assoc),
        )

    def _handle_established(self, event: evt.Event) -> None:
        with self._counts_lock:
            self._counts[id(event.assoc)] = {}
        logger.info("association established with %s", caller_of(event.assoc))
        # Senders such as storescu propose every storage SOP class; rejecting the
        # ones the node does not store is routine and logged at DEBUG only.
        contexts = event.assoc.rejected_contexts
        ct_contexts = [context for context in contexts if context.abstract_syntax in STORAGE_SOP_CLASSES]
        if len(contexts) > len(ct_contexts):
            logger.debug("association with %s: rejected %d presentation context(s) of SOP classes the node does "
                         "not store", caller_of(event.assoc), len(contexts) - len(ct_contexts))
        if ct_contexts:
            # A scanner that proposes only lossy syntaxes sends nothing, and this line gives the reason.
            logger.warning(
                "association with %s: rejected presentation context(s) %s; the node accepts the "
                "uncompressed and lossless transfer syntaxes of docs/conformance.md",
                caller_of(event.assoc), describe_rejected_contexts(ct_contexts),
            )

    def _handle_closed(self, event: evt.Event) -> None:
        self._release_slot(event.assoc)
        with self._counts_lock:
            counts = self._counts.pop(id(event.assoc), {})
        summary = ", ".join(f"{name} {number}" for name, number in sorted(counts.items())) or "no C-STORE"
        closed = "released" if event.event is evt.EVT_RELEASED else "aborted"
        logger.info("association %s with %s: %s", closed, caller_of(event.assoc), summary)

    def _count(self, event: evt.Event, outcome: str) -> int:
        """Count one C-STORE outcome on its association; return the count so far."""
        with self._counts_lock:
            counts = self._counts.setdefault(id(event.assoc), {})
            counts[outcome] = counts.get(outcome, 0) + 1
            return counts[outcome]

    # DIMSE services.

    def _handle_echo(self, event: evt.Event) -> int:
        logger.info("C-ECHO from %s", caller_of(event.assoc))
        return STATUS_SUCCESS

    def _handle_store(self, event: evt.Event) -> int | Dataset:
        caller = caller_of(event.assoc)
        try:
            status, outcome = self._store(event, caller)
        except sqlite3.Error as error:
            # A locked or failing job database is a local resource problem: the sender may retry later.
            logger.error("C-STORE from %s: response status 0xA700, job database error: %s", caller, error)
            status, outcome = _failure(STATUS_OUT_OF_RESOURCES, "node job database unavailable"), "failed"
        except Exception:
            # A bug must still produce a response rather than an abort. 0xA700
            # lets the sender retry once the node is fixed; the traceback goes to the log.
            logger.exception("C-STORE from %s: response status 0xA700 after an unexpected error", caller)
            status, outcome = _failure(STATUS_OUT_OF_RESOURCES, "internal error while storing; see node log"), "failed"
        if self._count(event, outcome) == 1 and outcome.startswith("study "):
            logger.info("receiving %s from %s", outcome, caller)
        return status

    def _store(self, event: evt.Event, caller: Caller) -> tuple[int | Dataset, str]:
        request = event.request
        requested_class = str(request.AffectedSOPClassUID)
        requested_instance = str(request.AffectedSOPInstanceUID)

        if not self.store.has_free_space():
            logger.error(
                "C-STORE %s from %s: response status 0xA700: %.0f MiB free, minimum %d MiB",
                requested_instance,
                caller,
                self.store.free_space_bytes() / 2**20,
                self.store.min_free_space_mb,
            )
            return _failure(STATUS_OUT_OF_RESOURCES, "node storage below its free space minimum"), "out-of-space"

        # Parse the dataset as sent, without decoding pixel data.
        transfer_syntax = str(event.context.transfer_syntax)
        file_bytes = event.encoded_dataset(include_meta=True)
        try:
            dataset = dcmread(BytesIO(file_bytes))
            _check_structure(dataset, len(file_bytes))
        except Exception as error:
            logger.error(
                "C-STORE %s from %s: response status 0xC210: dataset cannot be parsed (%s: %s)",
                requested_instance,
                caller,
                type(error).__name__,
                error,
            )
            return _failure(STATUS_CANNOT_PARSE, f"dataset cannot be parsed: {type(error).__name__}"), "unparseable"
        # NOTE: the series is still scored from its other instances, and no output
        # flags a rejected instance. A rejected end slice therefore goes unnoticed.
        try:
            _check_pixel_data(dataset, transfer_syntax)
        except (ValueError, TypeError) as error:
            logger.error(
                "C-STORE %s from %s: response status 0xC210: %s; the instance was cut short or damaged on the way",
                requested_instance,
                caller,
                error,
            )
            return _failure(STATUS_CANNOT_PARSE, "Pixel Data does not match Rows, Columns, bits"), "unparseable"

        checked = self._check_identity(dataset, requested_class, requested_instance, caller)
        if isinstance(checked, Dataset):
            return checked, "rejected"
        study_uid, series_uid, sop_uid = checked

        # The digest covers the dataset as sent, without the file meta that
        # the node adds, so an identical re-send has the same digest.
        digest = hashlib.sha256(event.encoded_dataset(include_meta=False)).hexdigest()
        lock = self._locks[hash(sop_uid) % _LOCK_STRIPES]
        with lock:
            return self._file_instance(
                file_bytes,
                study_uid,
                series_uid,
                sop_uid,
                requested_class,
                transfer_syntax,
                digest,
                caller,
            )

    def _check_identity(
        self, dataset: Dataset, requested_class: str, requested_instance: str, caller: Caller
    ) -> tuple[str, str, str] | Dataset:
        """Return (study, series, SOP instance) UIDs, or the failure response to send."""
        sop_class = str(dataset.get("SOPClassUID", ""))
        if sop_class != requested_class:
            logger.error(
                "C-STORE %s from %s: response status 0xA900: dataset SOP Class UID %r, request %r",
                requested_instance,
                caller,
                sop_class,
                requested_class,
            )
            return _failure(STATUS_SOP_CLASS_MISMATCH, f"dataset SOP Class UID {sop_class or 'missing'}")

        uids = {name: str(dataset.get(name, "") or "").strip() for name in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
        missing = [name for name, value in uids.items() if not value]
        if missing:
            logger.error(
                "C-STORE %s from %s: response status 0xA900: required attribute(s) %s missing",
                requested_instance,
                caller,
                ", ".join(missing),
            )
            return _failure(STATUS_SOP_CLASS_MISMATCH, f"missing {', '.join(missing)}")

        invalid = [name for name, value in uids.items() if not is_valid_uid(value)]
        if invalid:
            logger.error(
                "C-STORE %s from %s: response status 0xC211: %s not a valid UID (%s)",
                requested_instance,
                caller,
                ", ".join(invalid),
                ", ".join(repr(uids[name]) for name in invalid),
            )
            return _failure(STATUS_INVALID_UID, f"invalid UID in {', '.join(invalid)}")

        if uids["SOPInstanceUID"] != requested_instance:
            logger.error(
                "C-STORE from %s: response status 0xC211: dataset SOP Instance UID %s, request %s",
                caller,
                uids["SOPInstanceUID"],
                requested_instance,
            )
            return _failure(STATUS_INVALID_UID, "SOP Instance UID differs from the request")
        return uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"]

    def _file_instance(
        self,
        file_bytes: bytes,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        sop_class: str,
        transfer_syntax: str,
        digest: str,
        caller: Caller,
    ) -> tuple[int | Dataset, str]:
        ids = f"study {study_uid} series {series_uid} instance {sop_uid} from {caller}"
        existing = self.jobs.find_instance(sop_uid)
        if existing is not None:
            if existing.digest == digest or self._same_content(existing, file_bytes):
                logger.info("identical copy of a stored instance ignored: %s", ids)
                return STATUS_SUCCESS, "duplicate"
            return self._file_conflict(file_bytes, study_uid, series_uid, sop_uid, digest, caller, ids, existing)

        try:
            path = self.store.instance_path(study_uid, series_uid, sop_uid)
            self.store.write_atomically(path, file_bytes)
        except (OSError, StorageError) as error:
            logger.error("C-STORE response status 0xA700, cannot write the instance (%s): %s", error, ids)
            return _failure(STATUS_OUT_OF_RESOURCES, "node cannot write the instance; see node log"), "write-failed"

        record = InstanceRecord(
            sop_instance_uid=sop_uid,
            series_instance_uid=series_uid,
            sop_class_uid=sop_class,
            transfer_syntax_uid=transfer_syntax,
            path=self.store.relative(path),
            digest=digest,
            size=len(file_bytes),
            received_at=time.time(),
        )
        try:
            self.jobs.record_instance(
                record, study_uid, calling_ae_title=caller.calling_ae_title, peer_address=caller.address
            )
        except JobStoreError as error:
            # Cannot happen while the per-UID lock is held; logged in case another process wrote it.
            logger.error("instance stored but registering it failed (%s): %s", error, ids)
            return _failure(STATUS_OUT_OF_RESOURCES, "node cannot register the instance"), "write-failed"

        logger.debug("stored %s (%d bytes, %s)", ids, len(file_bytes), transfer_syntax)
        return STATUS_SUCCESS, f"study {study_uid} series {series_uid}"

    def _file_conflict(
        self,
        file_bytes: bytes,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        digest: str,
        caller: Caller,
        ids: str,
        existing: InstanceRecord,
    ) -> tuple[int | Dataset, str]:
        try:
            path = self.store.conflict_path(series_uid, sop_uid, digest)
            if not path.exists():
                self.store.write_atomically(path, file_bytes)
        except (OSError, StorageError) as error:
            logger.error("C-STORE response status 0xA700, cannot write the conflicting copy (%s): %s", error, ids)
            return _failure(STATUS_OUT_OF_RESOURCES, "node cannot write the instance; see node log"), "write-failed"

        self.jobs.record_conflict(
            sop_uid,
            series_uid,
            study_uid,
            self.store.relative(path),
            digest,
            received_at=time.time(),
            calling_ae_title=caller.calling_ae_title,
            peer_address=caller.address,
        )
        if existing.series_instance_uid != series_uid:
            logger.warning(
                "SOP Instance UID already stored in series %s re-sent in another series; "
                "series held as conflicting until an operator acts: %s",
                existing.series_instance_uid,
                ids,
            )
        else:
            logger.warning(
                "instance re-sent with different content; series held as conflicting until an operator acts: %s", ids
            )
        return STATUS_SUCCESS, "conflict"

    def _same_content(self, existing: InstanceRecord, file_bytes: bytes) -> bool:
        """Compare a stored instance with a re-sent one whose bytes differ.

        Elements other than Pixel Data are compared as values, and pixel data
        as decoded pixels unless the encoded bytes match. So a series re-sent
        in another transfer syntax, or with another but equivalent encoding
        (explicit instead of implicit VR, sequence lengths), is recognised as
        identical.
        """
        try:
            stored = dcmread(self.store.absolute(existing.path))
            received = dcmread(BytesIO(file_bytes))
        except (OSError, StorageError, ValueError) as error:
            logger.warning("cannot compare re-sent instance %s with the stored copy: %s", existing.sop_instance_uid, error)
            return False

        pixel_data = 0x7FE00010
        tags = {tag for tag in stored.keys() if tag != pixel_data}
        if tags != {tag for tag in received.keys() if tag != pixel_data}:
            return False
        if any(stored[tag].value != received[tag].value for tag in tags):
            return False
        if (pixel_data in stored) != (pixel_data in received):
            return False
        if pixel_data not in stored:
            return True
        same_syntax = stored.file_meta.TransferSyntaxUID == received.file_meta.TransferSyntaxUID
        if same_syntax and stored.PixelData == received.PixelData:
            return True
        try:
            return bool(np.array_equal(stored.pixel_array, received.pixel_array))
        except Exception as error:
            # pydicom raises many exception types for undecodable pixel data.
            logger.warning(
                "cannot decode pixel data to compare re-sent instance %s: %s", existing.sop_instance_uid, error
            )
            return False
