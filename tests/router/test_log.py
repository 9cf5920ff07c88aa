"""router.log: request ids on every line, text and JSON lines, the access log."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from pathlib import Path
import sys
import subprocess
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from router.log import access, bind_request_id, new_request_id, request_id, setup

_NAMES = ("router", "workers", "router.access")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Puts the three loggers back as they were, closing handlers a test added."""
    saved: dict[str, tuple[list[logging.Handler], int, bool, bool]] = {}
    for name in _NAMES:
        logger = logging.getLogger(name)
        saved[name] = (list(logger.handlers), logger.level, logger.propagate, logger.disabled)
    yield
    for name, (handlers, level, propagate, disabled) in saved.items():
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if handler not in handlers:
                handler.close()
        logger.handlers = handlers
        logger.setLevel(level)
        logger.propagate = propagate
        logger.disabled = disabled


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


def json_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in lines(stream)]


def test_new_request_id_is_16_hex_and_unique_across_processes() -> None:
    ids = {new_request_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"[0-9a-f]{16}", i) for i in ids)
    # Another process (another router replica) starts from another random prefix.
    other = subprocess.run([sys.executable, "-c", "from router.log import new_request_id; print(new_request_id())"],
                           capture_output=True, text=True, check=True, cwd=Path(__file__).resolve().parents[2])
    assert other.stdout.strip()[:8] not in {i[:8] for i in ids}


def test_text_line_carries_request_id() -> None:
    stream = io.StringIO()
    setup(stream=stream)
    logger = logging.getLogger("router.pool")
    logger.info("no request yet")
    token = bind_request_id("0123456789abcdef")
    try:
        logger.info("picked %s", "w0")
    finally:
        request_id.reset(token)
    logger.debug("below the level")
    out = lines(stream)
    assert len(out) == 2
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(stamp + r" INFO router\.pool \[-\] no request yet", out[0])
    assert re.fullmatch(stamp + r" INFO router\.pool \[0123456789abcdef\] picked w0", out[1])


def test_workers_logger_is_configured_too() -> None:
    stream = io.StringIO()
    setup(level="debug", stream=stream)
    logging.getLogger("workers.server").debug("loaded %s", "ctr")
    assert lines(stream)[0].endswith(" DEBUG workers.server [-] loaded ctr")


def test_json_lines_parse_and_carry_fields() -> None:
    stream = io.StringIO()
    setup(fmt="json", stream=stream)
    token = bind_request_id("feedfacecafebeef")
    try:
        logging.getLogger("router.pool").warning(
            "worker %s restarted", "w1", extra={"worker": "w1", "attempt": 3}
        )
    finally:
        request_id.reset(token)
    (record,) = json_lines(stream)
    assert record["level"] == "WARNING"
    assert record["logger"] == "router.pool"
    assert record["msg"] == "worker w1 restarted"
    assert record["request_id"] == "feedfacecafebeef"
    assert record["worker"] == "w1" and record["attempt"] == 3
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["ts"])
    assert "exc" not in record
    assert not {"args", "levelno", "pathname", "msecs"} & record.keys()


def test_json_survives_values_orjson_cannot_encode() -> None:
    stream = io.StringIO()
    setup(fmt="json", stream=stream)
    logging.getLogger("router").info("odd", extra={"obj": object(), "big": 2**80})
    (record,) = json_lines(stream)
    assert record["msg"] == "odd"
    assert record["big"] == str(2**80)
    assert record["obj"].startswith("<object object")


def test_exceptions_are_included() -> None:
    text_stream, json_stream = io.StringIO(), io.StringIO()
    for fmt, stream in (("text", text_stream), ("json", json_stream)):
        setup(fmt=fmt, stream=stream)
        try:
            1 / 0  # noqa: B018
        except ZeroDivisionError:
            logging.getLogger("router.app").exception("request failed")
    text = text_stream.getvalue()
    assert "request failed\nTraceback (most recent call last):" in text
    assert "ZeroDivisionError: division by zero" in text
    (record,) = json_lines(json_stream)
    assert record["msg"] == "request failed"
    assert record["exc"].startswith("Traceback (most recent call last):")
    assert record["exc"].endswith("ZeroDivisionError: division by zero")


def test_setup_is_idempotent() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup(stream=first)
    setup(stream=first)
    logging.getLogger("router").info("once")
    (line,) = lines(first)
    assert line.endswith("once")
    # Calling again replaces the handler: new stream, new format.
    setup(fmt="json", stream=second)
    logging.getLogger("router").info("json now")
    assert len(lines(first)) == 1
    assert [r["msg"] for r in json_lines(second)] == ["json now"]
    for name in ("router", "workers"):
        logger = logging.getLogger(name)
        assert len(logger.handlers) == 1
        assert logger.propagate is False


def test_bad_level_or_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        setup(level="loud", stream=io.StringIO())
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        setup(fmt="xml", stream=io.StringIO())


def test_access_log_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    setup(level="debug", stream=stream)
    logger = logging.getLogger("router.access")
    assert not logger.isEnabledFor(logging.CRITICAL)

    def must_not_log(*args: object, **kwargs: object) -> None:
        raise AssertionError("a disabled access log built a record")

    monkeypatch.setattr(logger, "_log", must_not_log)
    access("Predict", "ctr", "OK", 0.0015, "grpc")
    assert stream.getvalue() == ""


def test_access_log_on(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = io.StringIO()
    # The access log is independent of the level of the other lines.
    setup(level="warning", access_log=True, stream=stream)
    token = bind_request_id("00000000000000aa")
    try:
        access("Predict", "ctr", "OK", 0.0015, "grpc")
    finally:
        request_id.reset(token)
    (line,) = lines(stream)
    assert line.endswith(
        " INFO router.access [00000000000000aa] grpc Predict model=ctr code=OK duration_ms=1.500"
    )

    stream = io.StringIO()
    setup(fmt="json", access_log=True, stream=stream)
    access("Classify", "ctr", "INVALID_ARGUMENT", 0.25, "rest")
    (record,) = json_lines(stream)
    assert record["logger"] == "router.access"
    assert record["request_id"] == "-"
    fields = {k: record[k] for k in ("api", "model", "code", "protocol", "duration_ms")}
    assert fields == {
        "api": "Classify",
        "model": "ctr",
        "code": "INVALID_ARGUMENT",
        "protocol": "rest",
        "duration_ms": 250.0,
    }

    # And off again.
    stream = io.StringIO()
    setup(access_log=False, stream=stream)
    access("Predict", "ctr", "OK", 0.001, "grpc")
    assert stream.getvalue() == ""


def test_request_ids_are_per_task() -> None:
    stream = io.StringIO()
    setup(stream=stream)
    logger = logging.getLogger("router.frontend")

    async def handle(rid: str) -> None:
        token = bind_request_id(rid)
        try:
            for step in range(3):
                logger.info("step %d", step)
                await asyncio.sleep(0)
        finally:
            request_id.reset(token)

    async def main() -> None:
        await asyncio.gather(handle("a" * 16), handle("b" * 16))

    asyncio.run(main())
    out = lines(stream)
    assert len(out) == 6
    for line in out:
        assert ("[" + "a" * 16 + "]" in line) != ("[" + "b" * 16 + "]" in line)
    assert request_id.get() == "-"
