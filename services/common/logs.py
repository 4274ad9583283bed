"""structlog set-up: JSON lines when not on a terminal, readable console output
on one. Context (tenant_id, request_id, ...) is bound through contextvars by the
interceptors and consumer loops, never pasted into messages.

Everything else a process writes about itself goes the same way, one JSON line
each: the standard library's logging (asyncio, grpc, nats, opentelemetry),
warnings (the warnings module), uncaught exceptions (main thread, other
threads, "exception ignored" at garbage collection and shutdown) and
asyncio's unhandled task errors (asyncio_exception_handler)."""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from types import TracebackType
from typing import Any

import structlog

# Added to every line, whether from structlog or from the standard library.
_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.StackInfoRenderer(),
]


def configure(level: str = "info", fmt: str = "auto") -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    )
    number = logging.getLevelNamesMapping()[level.upper()]
    structlog.configure(
        processors=[*_SHARED, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(number),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _route_standard_logging(number, renderer, use_json)
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    sys.unraisablehook = _unraisablehook


def _route_standard_logging(level: int, renderer: Any, use_json: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*_SHARED, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                *([structlog.processors.format_exc_info] if use_json else []),
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Libraries' own chatter (access logs, connection notices) only from warning up.
    root.setLevel(max(level, logging.WARNING))
    logging.captureWarnings(True)  # warnings.warn -> logger "py.warnings"


def _traceback(kind: type[BaseException] | None, value: Any, tb: TracebackType | None) -> str:
    return "".join(traceback.format_exception(kind, value, tb)).rstrip()


def _excepthook(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    get_logger("uncaught").error(
        "uncaught_exception", error=repr(value), exception=_traceback(kind, value, tb)
    )


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    get_logger("uncaught").error(
        "thread_exception",
        thread=args.thread.name if args.thread else None,
        error=repr(args.exc_value),
        exception=_traceback(args.exc_type, args.exc_value, args.exc_traceback),
    )


def _unraisablehook(unraisable: Any) -> None:
    get_logger("uncaught").warning(
        "exception_ignored",
        where=unraisable.err_msg or "Exception ignored in",
        object=repr(unraisable.object)[:200],
        error=repr(unraisable.exc_value),
        exception=_traceback(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback),
    )


def asyncio_exception_handler(loop: Any, context: dict[str, Any]) -> None:
    """The event loop's handler of errors nobody awaited (a task's exception
    never retrieved, a failing callback): one JSON line, not asyncio's text."""
    exc = context.get("exception")
    fields: dict[str, Any] = {"message": context.get("message", "")}
    if "task" in context or "future" in context:
        fields["task"] = repr(context.get("task") or context.get("future"))[:300]
    if isinstance(exc, BaseException):
        fields["error"] = repr(exc)
        fields["exception"] = _traceback(type(exc), exc, exc.__traceback__)
    get_logger("asyncio").error("asyncio_error", **fields)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
