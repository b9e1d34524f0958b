"""Where queuebert's log events go: the application's ``logging`` when used as a library, and
queuebert's own format when its CLI or worker process runs.

As a library (:func:`route_to_stdlib`, applied when ``producer`` is imported), events go to the
standard library's ``logging`` under each module's name, so the application's configuration
decides; without one, Python's default shows warnings and errors on stderr and nothing else.
structlog's own default would print every level on stdout, which corrupts programs that write
their data there.

As a process (:func:`configure`, called by every entry point): JSON lines off a terminal, a
readable console on one. RQ logs through the standard library; its records are routed through the
same processors so a worker's output is one format.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

#: Keyword arguments of ``logging.Logger`` methods that an event may carry (``log.exception``
#: sets ``exc_info``); they are passed on to ``logging`` rather than rendered into the message.
_LOGGING_KWARGS = ("exc_info", "stack_info", "stacklevel")


def route_to_stdlib() -> None:
    """Send structlog events to ``logging`` unless structlog is configured already.

    An application that configured structlog itself, or queuebert's CLI (which configures it at
    start), keeps its configuration. Loggers are not cached, so an application that configures
    structlog after importing queuebert still gets queuebert's events its own way.
    """
    if structlog.is_configured():
        return
    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,  # a disabled level costs one isEnabledFor() call
            structlog.stdlib.PositionalArgumentsFormatter(),
            _as_logging_call,
        ],
        wrapper_class=structlog.stdlib.BoundLogger,
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=False,
    )


def _as_logging_call(_: Any, __: str, event_dict: structlog.typing.EventDict) -> dict[str, Any]:
    """The keyword arguments of one ``logging.Logger`` call: the event and its fields as the
    message (``run enqueued run='r1' jobs=3``), so any handler and formatter shows them."""
    call = {name: event_dict.pop(name) for name in _LOGGING_KWARGS if name in event_dict}
    event = event_dict.pop("event", "")
    call["msg"] = " ".join([str(event), *(f"{key}={value!r}" for key, value in event_dict.items())])
    return call


def configure(fmt: str = "auto", level: str = "info") -> None:
    """Set up logging for a queuebert process: structlog and the standard library (RQ) alike."""
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    numeric = logging.getLevelName(level.upper())
    structlog.configure(
        processors=shared + [structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(processors=[
        structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer], foreign_pre_chain=shared))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # RQ logs a line per job at INFO; the batching worker logs per batch instead.
    logging.getLogger("rq").setLevel(max(numeric, logging.WARNING))
