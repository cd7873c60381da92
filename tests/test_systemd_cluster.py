"""The systemd template units for N processes per machine: they load cleanly and stay hardened."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).parent.parent
UNITS = ("signald@.service", "signald-cluster.target")
#: The same bar scripts/check-systemd sets for signald.service.
MAX_EXPOSURE = 2.0


def _systemd_units() -> Path:
    for candidate in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")):
        if candidate.is_dir():
            return candidate
    raise AssertionError("systemd's units are missing: scripts/check-systemd installs systemd")


def test_template_and_target_verify_without_a_warning(tmp_path: Path) -> None:
    # verify loads units as systemd would, commands included: a scratch root with systemd's
    # own units, ours, and a stand-in for each command ours run (as scripts/check-systemd does).
    shutil.copytree(_systemd_units(), tmp_path / "usr/lib/systemd/system", symlinks=True)
    (tmp_path / "etc/systemd/system").mkdir(parents=True)
    for unit in UNITS:
        shutil.copy(ROOT / "systemd" / unit, tmp_path / "etc/systemd/system" / unit)
    service = (ROOT / "systemd/signald@.service").read_text()
    for command in re.findall(r"^Exec\w+=[-@:+!]*(/\S+)", service, re.MULTILINE):
        stand_in = tmp_path / command.lstrip("/")
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={tmp_path}", "signald@1.service", "signald@2.service", UNITS[1]],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


def test_each_process_is_as_locked_down_as_the_single_service(tmp_path: Path) -> None:
    instance = tmp_path / "signald@1.service"
    shutil.copy(ROOT / "systemd/signald@.service", instance)
    report = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(instance)],
        capture_output=True,
        text=True,
    ).stdout
    match = re.search(r"Overall exposure level for signald@1\.service: ([0-9.]+) (\w+)", report)
    assert match, report
    assert float(match.group(1)) <= MAX_EXPOSURE and match.group(2) in ("PERFECT", "SAFE", "OK"), report
