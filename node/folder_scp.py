"""A minimal Storage SCP that writes what it receives into a folder, standing in for a PACS.

`cacs-node demo`, the benchmarks and the tests use it to receive the node's
SEG, SR and summary image on 127.0.0.1. It is not the node's own SCP
(`node.scp`): it accepts every storage SOP class in the uncompressed and
common lossless transfer syntaxes and checks nothing but the file write.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    RLELossless,
)
from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

LOGGER = logging.getLogger(__name__)

#: Transfer syntaxes accepted for every storage SOP class.
ACCEPTED_TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    JPEGLosslessSV1,
    JPEG2000Lossless,
)


@dataclass(frozen=True)
class ReceivedObject:
    """One stored object: its SOP Class UID, SOP Instance UID and file."""

    sop_class_uid: str
    sop_instance_uid: str
    path: Path


class FolderStorageSCP:
    """Storage SCP on `host`:`port` (0 picks a free port) writing `<SOPInstanceUID>.dcm` files.

    rejected_sop_classes: SOP classes whose presentation contexts are
        rejected (abstract syntax not supported), as a PACS without support
        for them does.
    """

    def __init__(
        self,
        folder: Path,
        *,
        ae_title: str = "RESULTS",
        host: str = "127.0.0.1",
        port: int = 0,
        rejected_sop_classes: frozenset[str] = frozenset(),
    ) -> None:
        self.folder = Path(folder)
        self.ae_title = ae_title
        self.host = host
        self._requested_port = port
        self._rejected = rejected_sop_classes
        self._lock = threading.Lock()
        self._received: list[ReceivedObject] = []
        self._server = None

    @property
    def port(self) -> int:
        """The TCP port the SCP listens on; valid after `start`."""
        if self._server is None:
            raise RuntimeError("the storage SCP is not started; call start() first")
        return int(self._server.server_address[1])

    @property
    def received(self) -> list[ReceivedObject]:
        """The objects stored so far, in arrival order."""
        with self._lock:
            return list(self._received)

    def start(self) -> None:
        """Start listening in background threads."""
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        for context in AllStoragePresentationContexts:
            if context.abstract_syntax in self._rejected:
                continue
            ae.add_supported_context(context.abstract_syntax, list(ACCEPTED_TRANSFER_SYNTAXES))
        ae.add_supported_context(Verification)
        self._server = ae.start_server(
            (self.host, self._requested_port),
            block=False,
            evt_handlers=[(evt.EVT_C_STORE, self._handle_store)],
        )
        LOGGER.info("storage SCP %s listening on %s:%d, writing to %s", self.ae_title, self.host, self.port, self.folder)

    def stop(self) -> None:
        """Stop listening and close open associations."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> FolderStorageSCP:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _handle_store(self, event: evt.Event) -> int:
        # The dataset is written as received, without decoding it, so a
        # malformed object is still kept for inspection.
        sop_class = str(event.request.AffectedSOPClassUID)
        sop_instance = str(event.request.AffectedSOPInstanceUID)
        if not sop_instance or any(character not in "0123456789." for character in sop_instance):
            LOGGER.error("storage SCP %s: invalid Affected SOP Instance UID %r", self.ae_title, sop_instance)
            return 0xC000

        path = self.folder / f"{sop_instance}.dcm"
        temporary = path.with_suffix(".dcm.part")
        try:
            with open(temporary, "wb") as handle:
                handle.write(event.encoded_dataset())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        except OSError as error:
            LOGGER.error("storage SCP %s: writing %s failed: %s", self.ae_title, path, error)
            return 0xA700

        with self._lock:
            self._received.append(ReceivedObject(sop_class, sop_instance, path))
        LOGGER.info(
            "storage SCP %s stored SOP Instance %s (%s) from %s",
            self.ae_title,
            sop_instance,
            UID(sop_class).name,
            event.assoc.requestor.ae_title,
        )
        return 0x0000
