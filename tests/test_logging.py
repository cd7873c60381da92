"""Log lines for a terminal, for the journal (``<N>`` priorities, no own timestamps), and as JSON."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from signald import _logging
from signald._config import ConfigError, LogConfig, structure

from ._clients import TIMEOUT
from ._process import ROOT, SYSTEMD_VARIABLES


@pytest.fixture(autouse=True)
def signald_logger() -> Iterator[logging.Logger]:
    """Give back the ``signald`` logger as it was: other tests capture it with caplog."""
    logger = logging.getLogger("signald")
    saved = (logger.level, logger.propagate, list(logger.handlers))
    yield logger
    logger.setLevel(saved[0])
    logger.propagate = saved[1]
    logger.handlers[:] = saved[2]


@pytest.fixture
def stream(tmp_path: Path) -> Iterator[TextIO]:
    with open(tmp_path / "stderr", "w+") as file:
        yield file


def journal_of(stream: TextIO) -> dict[str, str]:
    stat = os.fstat(stream.fileno())
    return {"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}


def emit(stream: TextIO) -> list[str]:
    log = logging.getLogger("signald.rooms")
    log.debug("not shown at info")
    log.info("room %s: created", "abc")
    log.warning("careful")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("connection failed")
    stream.seek(0)
    return stream.read().splitlines()


def test_terminal_lines_have_time_and_level(stream: TextIO) -> None:
    _logging.setup(LogConfig(level="info"), {}, stream)
    lines = emit(stream)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO signald\.rooms: room abc: created", lines[0])
    assert lines[1].endswith("WARNING signald.rooms: careful")
    assert "Traceback (most recent call last):" in lines


def test_journal_lines_have_priorities_and_no_time(stream: TextIO) -> None:
    _logging.setup(LogConfig(level="info"), journal_of(stream), stream)
    lines = emit(stream)
    assert lines[:3] == [
        "<6>signald.rooms: room abc: created",
        "<4>signald.rooms: careful",
        "<3>signald.rooms: connection failed",
    ]
    # The traceback's lines keep the error's priority.
    assert len(lines) > 4 and all(line.startswith("<3>") for line in lines[2:])
    assert lines[-1] == "<3>RuntimeError: boom"


def test_journal_stream_of_another_file_is_not_the_journal(stream: TextIO, tmp_path: Path) -> None:
    with open(tmp_path / "elsewhere", "w") as other:
        _logging.setup(LogConfig(level="info"), journal_of(other), stream)
    assert re.match(r"\d{4}-", emit(stream)[0])
    stream.seek(0)
    stream.truncate()
    _logging.setup(LogConfig(level="info"), {"JOURNAL_STREAM": "garbage"}, stream)
    assert re.match(r"\d{4}-", emit(stream)[0])


def test_json_lines(stream: TextIO) -> None:
    _logging.setup(LogConfig(level="debug", format="json"), {}, stream)
    entries = [json.loads(line) for line in emit(stream)]
    assert len(entries) == 4  # the traceback stays inside its entry
    assert entries[0]["level"] == "debug" and entries[0]["logger"] == "signald.rooms"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entries[1]["time"])
    assert entries[1]["message"] == "room abc: created"
    assert entries[3]["level"] == "error" and entries[3]["exception"].endswith("RuntimeError: boom")


def test_json_lines_in_the_journal(stream: TextIO) -> None:
    _logging.setup(LogConfig(level="info", format="json"), journal_of(stream), stream)
    first = emit(stream)[0]
    assert first.startswith("<6>{")
    assert json.loads(first[3:]) == {"level": "info", "logger": "signald.rooms", "message": "room abc: created"}


def test_setup_again_applies_a_new_level_and_format(stream: TextIO, signald_logger: logging.Logger) -> None:
    _logging.setup(LogConfig(level="info"), {}, stream)
    _logging.setup(LogConfig(level="warning", format="json"), {}, stream)
    assert len(signald_logger.handlers) == 1
    assert [json.loads(line)["message"] for line in emit(stream)] == ["careful", "connection failed"]


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^log\.format: must be one of text, json, got 'xml'$"):
        structure({"log": {"format": "xml"}})


def test_under_the_journal_even_the_fatal_line_has_a_priority(tmp_path: Path) -> None:
    path = tmp_path / "stderr"
    with open(path, "w") as stderr:
        environ = {k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}
        result = subprocess.run(
            [sys.executable, "-m", "signald", "--port", "99999"],
            stderr=stderr,
            env={**environ, **journal_of(stderr)},
            cwd=ROOT,
            timeout=TIMEOUT,
        )
    assert result.returncode == 2
    assert path.read_text() == "<3>signald: configuration error: --port: must be at most 65535, got 99999\n"


def test_throttled_lines_stop_at_the_burst_and_say_how_many_were_held_back(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("signald.http")
    caplog.set_level(logging.INFO, logger="signald")
    throttled = _logging.Throttled(log, rate=0.5, burst=3)
    for n in range(10):  # a flood, all in one instant
        throttled.log(100.0, logging.INFO, "refused %d", n)
    assert [r.getMessage() for r in caplog.records] == ["refused 0", "refused 1", "refused 2"]
    caplog.clear()
    throttled.log(101.0, logging.INFO, "refused %d", 10)  # half a line refilled: still held back
    throttled.log(102.0, logging.WARNING, "refused %d", 11)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "refused 11 (and 8 more like it not logged)")
    ]
    caplog.clear()
    throttled.log(104.0, logging.INFO, "refused %d", 12)
    assert [r.getMessage() for r in caplog.records] == ["refused 12"]


def test_throttled_lines_below_the_level_take_nothing_from_the_budget(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="signald")
    throttled = _logging.Throttled(logging.getLogger("signald.http"), rate=0.001, burst=1)
    for _ in range(5):
        throttled.log(0.0, logging.INFO, "not shown at warning")
    throttled.log(0.0, logging.WARNING, "shown")
    assert [r.getMessage() for r in caplog.records] == ["shown"]
