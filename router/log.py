"""Logging for the router and its workers: request ids, text or JSON lines, access log.

Every module logs through ``logging.getLogger(__name__)`` (so under ``router``
or ``workers``) with lazy ``%s`` arguments; ``setup`` is called once by the
process entry point and installs one handler on those two loggers.  The
current request's id lives in the ``request_id`` contextvar; a filter on the
handler copies it onto every record, so any line logged while serving a
request carries the id without being passed it.

The frontends bind the id for the duration of a request and must reset it,
because aiohttp serves consecutive keep-alive requests in the same task::

    token = bind_request_id(incoming_id or new_request_id())
    try:
        ...
    finally:
        request_id.reset(token)

Per-request access lines go to a separate logger, ``router.access``, which is
off unless ``setup(access_log=True)``; ``access`` then costs one level check.

This module must never import TensorFlow.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import time
from contextvars import ContextVar, Token
from typing import IO, Any

import orjson

__all__ = [
    "ACCESS_LOGGER",
    "TEXT_FORMAT",
    "JsonFormatter",
    "RequestIdFilter",
    "access",
    "bind_request_id",
    "new_request_id",
    "request_id",
    "setup",
]

ACCESS_LOGGER = "router.access"
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"
_PACKAGES = ("router", "workers")
_OFF = logging.CRITICAL + 1

request_id: ContextVar[str] = ContextVar("request_id", default="-")

_access_logger = logging.getLogger(ACCESS_LOGGER)
# Off until setup(access_log=True), whatever the levels of its parents are.
_access_logger.setLevel(_OFF)
_access_logger.propagate = False


# A random prefix per process and a counter: unique, and no system call per request.
_id_prefix = os.urandom(4).hex()
_id_counter = itertools.count(1)


def new_request_id() -> str:
    """16 hex characters: this process's random 8, then a counter's."""
    return f"{_id_prefix}{next(_id_counter) & 0xFFFFFFFF:08x}"


def bind_request_id(value: str) -> Token[str]:
    """Makes ``value`` the current request id; ``request_id.reset(token)`` undoes it."""
    return request_id.set(value)


class RequestIdFilter(logging.Filter):
    """Copies the current request id onto each record that has none."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            # setattr: LogRecord declares no such field for the type checker.
            setattr(record, "request_id", request_id.get())  # noqa: B010
        return True


# Attributes every LogRecord has; anything else on a record came from `extra`.
_RECORD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "request_id",
    "taskName",
}
_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, request_id, exc, extras."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        out: dict[str, Any] = {
            "ts": f"{ts}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", request_id.get()),
        }
        if record.exc_info:
            # Cached on the record like logging.Formatter does, for other handlers.
            if not record.exc_text:
                record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            out["exc"] = record.exc_text
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        extras = {
            k: v for k, v in vars(record).items() if k not in _RECORD_ATTRS and k not in out
        }
        out.update(extras)
        try:
            return orjson.dumps(out, default=str, option=_JSON_OPTIONS).decode()
        except TypeError:
            # e.g. an int beyond 64 bits, which orjson refuses without asking default.
            out.update((k, repr(v)) for k, v in extras.items())
            return orjson.dumps(out, default=str, option=_JSON_OPTIONS).decode()


class _Handler(logging.StreamHandler[IO[str]]):
    """The handler ``setup`` installs; its type marks it for replacement."""


def setup(
    level: str = "info",
    fmt: str = "text",
    access_log: bool = False,
    stream: IO[str] | None = None,
) -> None:
    """Configures the ``router`` and ``workers`` loggers (and ``router.access``).

    ``stream`` defaults to the ``sys.stderr`` of the time of the call.  Calling
    again replaces the handler installed before, so it is idempotent and can
    switch format or level.  The two loggers stop propagating to the root, so
    a root handler configured by a library does not print every line twice.
    """
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    formatter: logging.Formatter
    if fmt == "text":
        formatter = logging.Formatter(TEXT_FORMAT)
    elif fmt == "json":
        formatter = JsonFormatter()
    else:
        raise ValueError(f"unknown log format {fmt!r} (use text or json)")

    handler = _Handler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter)
    # On the handler, not the loggers: logger filters skip records of child loggers.
    handler.addFilter(RequestIdFilter())
    for name in _PACKAGES:
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if isinstance(h, _Handler)]:
            logger.removeHandler(old)
            old.close()
        logger.addHandler(handler)
        logger.setLevel(numeric)
        logger.propagate = False

    if access_log:
        _access_logger.setLevel(logging.INFO)
        _access_logger.propagate = True
    else:
        _access_logger.setLevel(_OFF)
        _access_logger.propagate = False


def access(api: str, model: str, code: str, seconds: float, protocol: str) -> None:
    """One access line for an answered request (a no-op unless the access log is on)."""
    if not _access_logger.isEnabledFor(logging.INFO):
        return
    ms = seconds * 1000.0
    _access_logger.info(
        "%s %s model=%s code=%s duration_ms=%.3f",
        protocol,
        api,
        model,
        code,
        ms,
        extra={
            "protocol": protocol,
            "api": api,
            "model": model,
            "code": code,
            "duration_ms": round(ms, 3),
        },
    )
