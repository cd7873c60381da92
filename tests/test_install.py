"""README's "Install on a VM", followed as written, up to where systemd takes over.

The wheel is built with the README's own command, and the VM commands are taken from the README
and run with two changes only: ``/opt/signald`` and ``/etc`` move under a scratch directory (the
test is not root on a VM), and the lines that need a running systemd or root on a real machine
(``apt-get``, ``systemctl``, ``journalctl``, ``curl``) are left out. What they would install
must then be there: the release runs, its example configuration passes ``--check-config``, and
the units, the configuration and the socket drop-in are where systemd will look, with the
content of this source tree. (That the units themselves verify and are hardened is
scripts/check-systemd's job.)
"""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from signald import __version__
from signald._config import structure

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
#: Building the wheel and installing it with its dependencies into a fresh virtualenv.
INSTALL_TIMEOUT = 300
SKIPPED = ("apt-get ", "systemctl ", "journalctl ", "curl ")


def shell_block_after(marker: str) -> str:
    text = README.read_text()
    start = text.index(marker)
    return re.search(r"```sh\n(.*?)```", text[start:], flags=re.DOTALL).group(1)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch root where README's VM steps have run; returns it."""
    root = tmp_path_factory.mktemp("vm")
    build = shell_block_after("On a machine with the source, build the package")
    wheel_command = next(line for line in build.splitlines() if "pip wheel" in line).split("#")[0]
    subprocess.run(
        wheel_command.replace("python3", sys.executable, 1).replace("-w dist", f"-w {root}"),
        shell=True,
        check=True,
        cwd=ROOT,
        capture_output=True,
        timeout=INSTALL_TIMEOUT,
    )
    steps = [
        line.replace("/opt/signald", f"{root}/opt/signald").replace("/etc/", f"{root}/etc/")
        for line in shell_block_after("On the VM (Debian 12").splitlines()
        if line.strip() and not line.startswith(SKIPPED)
    ]
    (root / "etc/systemd/system").mkdir(parents=True)
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", "\n".join(steps)],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=INSTALL_TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "configuration OK" in done.stderr  # the --check-config step, by the installed release
    return root


def test_readme_installs_the_version_this_tree_builds() -> None:
    for marker in ("On a machine with the source", "On the VM (Debian 12"):
        assert f"{__version__}" in shell_block_after(marker)
    assert f"VERSION={__version__}\n" in shell_block_after("On the VM (Debian 12")


def test_the_release_runs_from_its_own_virtualenv(installed: Path) -> None:
    signald = installed / "opt/signald/current/bin/signald"
    result = subprocess.run([signald, "--version"], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == f"signald {__version__}"


def test_units_and_configuration_land_where_systemd_looks(installed: Path) -> None:
    etc = installed / "etc"
    for unit in ("signald.service", "signald.socket"):
        assert (etc / "systemd/system" / unit).read_text() == (ROOT / "systemd" / unit).read_text()
    assert (etc / "signald/signald.toml").read_text() == (ROOT / "signald.production.toml").read_text()
    dropin = configparser.ConfigParser(strict=False, empty_lines_in_values=False)
    dropin.read_string((etc / "systemd/system/signald.socket.d/listen.conf").read_text())
    assert dropin["Socket"]["ListenStream"] == "127.0.0.1:3000"


def test_the_service_runs_the_installed_release_on_the_installed_config() -> None:
    service = (ROOT / "systemd/signald.service").read_text()
    assert "ExecStart=/opt/signald/current/bin/signald --config /etc/signald/signald.toml " in service


def test_production_example_is_safe_for_the_internet() -> None:
    with open(ROOT / "signald.production.toml", "rb") as f:
        config = structure(tomllib.load(f))
    assert not config.demo.enabled
    assert "*" not in config.cors.allowed_origins and config.cors.allowed_origins
    assert config.server.host == "127.0.0.1" and "127.0.0.1" in config.server.trusted_proxies
    assert not config.server.tls_cert  # TLS is the proxy's, unless the comments' alternative is chosen
    assert config.limits.max_connections_per_ip < structure({}).limits.max_connections_per_ip
