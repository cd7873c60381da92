"""Secrets out of the TOML: ``*_file`` keys and systemd credentials, and secrets kept out of output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest

from signald._config import ConfigError, resolve, structure

from ._clients import TIMEOUT, connect
from ._process import ROOT, SYSTEMD_VARIABLES, run_signald

AUTH_SECRET = "auth-secret-that-is-long-enough-for-hs256"
API_KEY = "api-key-0123456789abcdef"
TURN_SECRET = "turn-secret-0123456789"
TURN_URLS = ["turn:turn.example.com:3478"]


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_secrets_come_from_files(tmp_path: Path) -> None:
    config = structure(
        {
            "auth": {
                "secret_file": write(tmp_path / "secret", f"{AUTH_SECRET}\n"),
                "api_keys_file": write(
                    tmp_path / "keys", f"# one key per line\n{API_KEY}\n\n  second-key-0123456789  \n"
                ),
            },
            "ice": {"turn_urls": TURN_URLS, "turn_secret_file": write(tmp_path / "turn", TURN_SECRET)},
        }
    )
    assert config.auth.secret == AUTH_SECRET
    assert config.auth.api_keys == (API_KEY, "second-key-0123456789")
    assert config.ice.turn_secret == TURN_SECRET


def test_secrets_come_from_systemd_credentials(tmp_path: Path) -> None:
    write(tmp_path / "auth.secret", AUTH_SECRET)
    write(tmp_path / "auth.api_keys", API_KEY)
    write(tmp_path / "ice.turn_secret", TURN_SECRET)
    with pytest.raises(ConfigError, match=r"^ice\.turn_urls: required when ice\.turn_secret is set"):
        resolve(None, {"CREDENTIALS_DIRECTORY": str(tmp_path)})  # the credential is read, and checked
    toml = tmp_path / "signald.toml"
    toml.write_text(f"[ice]\nturn_urls = {TURN_URLS!r}\n".replace("'", '"'))
    config = resolve(toml, {"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert (config.auth.secret, config.auth.api_keys, config.ice.turn_secret) == (AUTH_SECRET, (API_KEY,), TURN_SECRET)
    with pytest.raises(ConfigError, match=r"^ice\.turn_secret: required"):
        resolve(toml, {})  # without $CREDENTIALS_DIRECTORY, credentials are not looked for


@pytest.mark.parametrize(
    ("auth", "credential", "key", "words"),
    [
        ({"secret": AUTH_SECRET, "secret_file": "FILE"}, None, "auth.secret", "both auth.secret and auth.secret_file"),
        ({"secret_file": "FILE"}, "auth.secret", "auth.secret", "auth.secret_file and systemd credential auth.secret"),
        ({"api_keys": [API_KEY]}, "auth.api_keys", "auth.api_keys", "both auth.api_keys and systemd credential"),
    ],
)
def test_a_secret_set_in_two_places_is_refused(
    tmp_path: Path, auth: dict[str, Any], credential: str | None, key: str, words: str
) -> None:
    secret_file = write(tmp_path / "secret", AUTH_SECRET)
    auth = {name: secret_file if value == "FILE" else value for name, value in auth.items()}
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    if credential:
        write(credentials / credential, AUTH_SECRET)
    with pytest.raises(ConfigError) as info:
        structure({"auth": auth}, str(credentials))
    assert info.value.key == key and words in str(info.value)
    assert AUTH_SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (None, "cannot read: No such file or directory"),
        ("\n  \n", "is empty"),
        ("short", "must be at least 32 characters"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_bad_secret_files_name_the_key_and_the_file(tmp_path: Path, content: str | bytes | None, words: str) -> None:
    path = tmp_path / "secret"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as info:
        structure({"auth": {"secret_file": str(path)}})
    assert str(info.value).startswith(f"auth.secret_file: {path}: ") and words in str(info.value)
    assert "short" not in str(info.value)


def test_bad_credentials_name_the_key_and_the_file(tmp_path: Path) -> None:
    write(tmp_path / "auth.api_keys", "# nothing but a comment\n")
    with pytest.raises(ConfigError) as info:
        structure({}, str(tmp_path))
    assert str(info.value) == f"auth.api_keys: {tmp_path / 'auth.api_keys'}: holds no key (one per line)"
    write(tmp_path / "auth.api_keys", "too-short\n")
    with pytest.raises(ConfigError) as info:
        structure({}, str(tmp_path))
    assert str(info.value).startswith(f"auth.api_keys: {tmp_path / 'auth.api_keys'}: key 0 must be at least 16")
    assert "too-short" not in str(info.value)


@pytest.mark.parametrize(
    "tree",
    [
        {"auth": {"api_keys": API_KEY}},
        {"auth": {"secret": [AUTH_SECRET]}},
        {"ice": {"turn_secret": [TURN_SECRET]}},
        {"auth": {"api_keys": [API_KEY, 5]}},
    ],
)
def test_a_secret_of_the_wrong_type_is_not_echoed(tree: dict[str, Any]) -> None:
    with pytest.raises(ConfigError) as info:
        structure(tree)
    for secret in (API_KEY, AUTH_SECRET, TURN_SECRET):
        assert secret not in str(info.value)


def signald_env(**extra: str) -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k not in SYSTEMD_VARIABLES}, **extra}


def test_check_config_never_prints_a_secret(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    write(credentials / "auth.secret", AUTH_SECRET)
    toml = tmp_path / "signald.toml"
    turn_file = write(tmp_path / "turn", TURN_SECRET)
    ice = f'turn_urls = ["turn:t.example.com"]\nturn_secret_file = "{turn_file}"'
    toml.write_text(f'[auth]\napi_keys = ["{API_KEY}"]\n[ice]\n{ice}\n')
    env = signald_env(CREDENTIALS_DIRECTORY=str(credentials))
    check = [sys.executable, "-m", "signald", "--check-config", "--config", str(toml)]
    ok = subprocess.run(check, capture_output=True, text=True, env=env, cwd=ROOT, timeout=TIMEOUT)
    assert ok.returncode == 0, ok.stderr
    write(credentials / "auth.secret", "x" * 31)  # one short: refused, and still not shown
    bad = subprocess.run(check, capture_output=True, text=True, env=env, cwd=ROOT, timeout=TIMEOUT)
    assert bad.returncode == 2
    assert bad.stderr.strip() == (
        f"signald: configuration error: auth.secret: {credentials / 'auth.secret'}: "
        "must be at least 32 characters (or empty to turn tokens off)"
    )
    for output in (ok.stdout, ok.stderr, bad.stdout, bad.stderr):
        for secret in (API_KEY, TURN_SECRET, AUTH_SECRET, "x" * 31):
            assert secret not in output


async def test_a_daemon_using_credentials_never_logs_them(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    write(credentials / "auth.secret", AUTH_SECRET)
    write(credentials / "ice.turn_secret", TURN_SECRET)
    toml = tmp_path / "signald.toml"
    toml.write_text('[server]\nport = 0\n[ice]\nturn_urls = ["turn:t.example.com"]\n')
    env = {"CREDENTIALS_DIRECTORY": str(credentials)}
    async with run_signald("--config", str(toml), "--log-level", "debug", env=env) as daemon:
        port = await daemon.port()
        token = jwt.encode({"room": "r"}, AUTH_SECRET, algorithm="HS256")
        async with connect(port) as client:
            await client.send(type="join-room", roomId="r", username="ada")
            await client.expect("error", code="unauthorized")  # the credential is in force
            joined = await client.join("r", "ada", token=token)
            assert joined["iceServers"][0]["urls"] == ["turn:t.example.com"]
        assert await daemon.stop() == 0
    log = daemon.log.decode()
    assert "joined" in log
    for secret in (AUTH_SECRET, TURN_SECRET, token, joined["iceServers"][0]["credential"]):
        assert secret not in log
