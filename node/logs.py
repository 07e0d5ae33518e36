"""Logging set-up of the `serve` process: one line per network or parsing event."""

from __future__ import annotations

import logging
import warnings


class TracebackFilter(logging.Filter):
    """Drop the records with a traceback that pynetdicom logs after its own one-line error.

    pynetdicom 3.0 logs an undecodable or unexpected PDU as an ERROR line
    followed by `LOGGER.exception(...)` with the full traceback (dul.py,
    fsm.py, utils.py). The ERROR line stays; the traceback is kept only
    while the pynetdicom logger is at DEBUG.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info is None:
            return True
        return logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG)


def reduce_library_log_noise() -> None:
    """Quiet pydicom's value warnings, pynetdicom's tracebacks and highdicom's INFO lines for the whole process.

    The Storage SCP checks the UIDs it needs and logs one line with the
    C-STORE status, so pydicom's "Invalid value for VR UI" warnings (logged
    and raised as UserWarning, several per instance) only repeat it.
    """
    from pydicom import config

    config.settings.reading_validation_mode = config.IGNORE
    # pydicom also emits its value warnings through the warnings module.
    warnings.filterwarnings("ignore", message="Invalid value for VR", category=UserWarning)
    import pynetdicom  # noqa: F401 - importing it creates the module loggers listed below

    network_filter = TracebackFilter()
    # A logger filter sees only records logged on that logger itself, so each module logger gets one.
    names = [name for name in logging.root.manager.loggerDict if name.split(".")[0] == "pynetdicom"]
    for name in names:
        logging.getLogger(name).addFilter(network_filter)
    # highdicom logs 7 or 8 INFO lines per written object ("copy attributes of
    # module ..."); its warnings and errors stay, and --log-level DEBUG shows all.
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("highdicom").setLevel(logging.WARNING)
