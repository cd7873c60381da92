"""Configuration: defaults, strict types, ranges, key paths in errors, and precedence."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from signald._config import Config, ConfigError, resolve, structure, unstructure

EXAMPLE = Path(__file__).parent.parent / "signald.toml"


def test_defaults_match_the_documented_ones() -> None:
    config = structure({})
    assert config == Config()
    assert (config.server.host, config.server.port, config.server.shutdown_grace) == ("127.0.0.1", 3000, 10.0)
    assert config.cors.allowed_origins == ("*",)
    assert (config.rooms.max_participants, config.rooms.auto_create, config.rooms.idle_ttl) == (16, True, 86400.0)
    limits = config.limits
    assert (limits.max_message_bytes, limits.send_queue_bytes) == (65536, 1048576)
    assert (limits.ping_interval, limits.ping_timeout) == (20.0, 20.0)
    assert config.log.level == "info"
    assert config.server.trusted_proxies == () and config.rooms.max_rooms == 100_000
    assert (limits.message_rate, limits.message_burst, limits.rate_limit_close_after) == (1000.0, 2000, 1000)
    assert (limits.max_connections, limits.max_connections_per_ip) == (100_000, 10_000)
    assert (limits.room_create_rate, limits.room_create_burst, limits.idle_timeout) == (10.0, 200, 600.0)
    assert (limits.max_sdp_length, limits.max_candidate_length) == (65536, 1024)  # sdp: max_message_bytes
    assert (limits.max_username_length, limits.max_json_depth) == (64, 32)
    assert (config.auth.secret, config.auth.api_keys) == ("", ())  # access control is off by default
    # One process on its own: no Redis, no shared port.
    assert (config.cluster.redis_url, config.cluster.node_timeout, config.server.reuse_port) == ("", 10.0, False)
    assert config.cluster.send_queue_bytes == 8 * 1024 * 1024


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1", "redis://redis.internal:6380/2", "rediss://redis.internal:6380/1", "unix:///run/redis/r.sock"]
)
def test_redis_urls_accepted(url: str) -> None:
    assert structure({"cluster": {"redis_url": url}}).cluster.redis_url == url


def test_secrets_never_appear_in_repr_or_errors() -> None:
    secret = "s3cr3t-" * 6
    config = structure({"auth": {"secret": secret, "api_keys": ["key-0123456789abcdef"]}})
    assert secret not in repr(config) and "key-0123456789abcdef" not in repr(config)
    with pytest.raises(ConfigError) as info:
        structure({"auth": {"secret": "too-short-secret"}})
    assert "too-short-secret" not in str(info.value)


def test_example_file_is_valid_and_complete() -> None:
    with open(EXAMPLE, "rb") as f:
        tree = tomllib.load(f)
    structure(tree)
    # Every key the daemon knows appears in the example, so it doubles as a reference.
    for section, values in unstructure(Config()).items():
        assert set(values) <= set(tree.get(section, {})), section


@pytest.mark.parametrize(
    ("tree", "key", "words"),
    [
        ({"limits": {"max_message_bytes": 10}}, "limits.max_message_bytes", "at least 1024"),
        ({"limits": {"max_message_bytes": "65536"}}, "limits.max_message_bytes", "integer"),
        ({"limits": {"max_message_bytes": 2.5}}, "limits.max_message_bytes", "integer"),
        ({"server": {"port": 70000}}, "server.port", "at most 65535"),
        ({"server": {"port": True}}, "server.port", "integer"),
        ({"server": {"port": -1}}, "server.port", "at least 0"),
        ({"server": {"hostname": "x"}}, "server.hostname", "unknown key"),
        ({"servre": {}}, "servre", "unknown key"),
        ({"server": 1}, "server", "table"),
        ({"rooms": {"auto_create": "false"}}, "rooms.auto_create", "true or false"),
        ({"rooms": {"auto_create": 0}}, "rooms.auto_create", "true or false"),
        ({"rooms": {"max_participants": 1}}, "rooms.max_participants", "at least 2"),
        ({"rooms": {"idle_ttl": 0}}, "rooms.idle_ttl", "at least"),
        ({"rooms": {"resume_grace": -1}}, "rooms.resume_grace", "at least 0"),
        ({"rooms": {"resume_grace": "30"}}, "rooms.resume_grace", "number"),
        ({"rooms": {"resume_buffer": 0}}, "rooms.resume_buffer", "at least 1"),
        ({"rooms": {"resume_buffer": 2.5}}, "rooms.resume_buffer", "integer"),
        ({"cors": {"allowed_origins": "*"}}, "cors.allowed_origins", "list"),
        ({"cors": {"allowed_origins": [1]}}, "cors.allowed_origins", "string"),
        ({"cors": {"allowed_origins": ["example.com"]}}, "cors.allowed_origins", "not an origin"),
        ({"log": {"level": "loud"}}, "log.level", "one of"),
        ({"server": {"shutdown_grace": "10"}}, "server.shutdown_grace", "number"),
        ({"limits": {"ping_interval": float("inf")}}, "limits.ping_interval", "finite"),
        ({"limits": {"send_queue_bytes": 2048, "max_message_bytes": 4096}}, "limits.send_queue_bytes", "at least"),
        ({"limits": {"message_rate": 0}}, "limits.message_rate", "at least"),
        ({"limits": {"max_json_depth": 1}}, "limits.max_json_depth", "at least 2"),
        ({"limits": {"rate_limit_close_after": -1}}, "limits.rate_limit_close_after", "at least 0"),
        ({"rooms": {"max_rooms": 0}}, "rooms.max_rooms", "at least 1"),
        ({"server": {"trusted_proxies": ["10.0.0.0/8", "proxy.local"]}}, "server.trusted_proxies", "not an IP"),
        ({"server": {"trusted_proxies": "10.0.0.1"}}, "server.trusted_proxies", "list"),
        ({"auth": {"secret": "short"}}, "auth.secret", "at least 32"),
        ({"auth": {"api_keys": ["k" * 16, "short"]}}, "auth.api_keys", "key 1 must be at least 16"),
        ({"auth": {"token": "x"}}, "auth.token", "unknown key"),
        ({"cluster": {"redis_url": "localhost:6379"}}, "cluster.redis_url", "is not redis://HOST"),
        ({"cluster": {"redis_url": "redis://:6379"}}, "cluster.redis_url", "is not redis://HOST"),
        ({"cluster": {"redis_url": "redis://h:port"}}, "cluster.redis_url", "port must be a number"),
        ({"cluster": {"redis_url": "redis://h:6379/zero"}}, "cluster.redis_url", "database"),
        ({"cluster": {"redis_url": "unix://relative.sock"}}, "cluster.redis_url", "unix:///absolute/path"),
        ({"cluster": {"node_timeout": 0.5}}, "cluster.node_timeout", "at least 1"),
        ({"cluster": {"send_queue_bytes": 100}}, "cluster.send_queue_bytes", "at least 1024"),
        ({"cluster": {"send_queue_bytes": "8M"}}, "cluster.send_queue_bytes", "expected an integer"),
        (
            {"cluster": {"redis_url": "redis://h", "send_queue_bytes": 4096}, "limits": {"max_message_bytes": 8192}},
            "cluster.send_queue_bytes",
            "at least limits.max_message_bytes (8192)",
        ),
        ({"cluster": {"redis_url": "redis://h", "x": 1}}, "cluster.x", "unknown key"),
        (
            {"cluster": {"redis_url": "unix:///run/redis.sock"}, "storage": {"path": "rooms.db"}},
            "storage.path",
            "not used with cluster.redis_url",
        ),
        ({"server": {"reuse_port": 1}}, "server.reuse_port", "true or false"),
    ],
)
def test_bad_values_name_their_key(tree: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        structure(tree)
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")
    assert words in str(info.value)
    assert "\n" not in str(info.value)


def test_numbers_accept_integers_for_floats() -> None:
    assert structure({"server": {"shutdown_grace": 3}}).server.shutdown_grace == 3.0


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "signald.toml"
    path.write_text(text)
    return path


def test_precedence_defaults_toml_env_flags(tmp_path: Path) -> None:
    path = write(tmp_path, '[server]\nport = 4000\nhost = "0.0.0.0"\n[log]\nlevel = "warning"\n')
    assert resolve(path).server.port == 4000
    env = {"PORT": "5000", "LOG_LEVEL": "DEBUG", "ALLOWED_ORIGINS": "https://a.example, https://b.example"}
    config = resolve(path, env)
    assert (config.server.port, config.server.host, config.log.level) == (5000, "0.0.0.0", "debug")
    assert config.cors.allowed_origins == ("https://a.example", "https://b.example")
    flagged = resolve(path, env, {"server.port": 6000, "server.host": "127.0.0.2"})
    assert (flagged.server.port, flagged.server.host) == (6000, "127.0.0.2")
    assert resolve(None, {"HOST": "::1"}).server.host == "::1"


def test_empty_environment_values_are_ignored() -> None:
    assert resolve(None, {"PORT": "", "HOST": " "}).server.port == 3000


def test_bad_environment_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        resolve(None, {"PORT": "http"})
    assert info.value.key == "PORT"
    with pytest.raises(ConfigError) as info:
        resolve(None, {"PORT": "99999"})
    assert info.value.key == "PORT"
    with pytest.raises(ConfigError) as info:
        resolve(None, {"LOG_LEVEL": "chatty"})
    assert info.value.key == "LOG_LEVEL"


def test_bad_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError) as info:
        resolve(None, {}, {"server.port": 123456})
    assert info.value.key == "--port"
    with pytest.raises(ConfigError) as info:
        resolve(None, {}, {"log.level": "loud"})
    assert info.value.key == "--log-level"


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        resolve(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        resolve(write(tmp_path, "[server\n"))


def test_ice_servers_and_demo() -> None:
    assert (Config().ice.servers, Config().demo.enabled) == ((), False)
    config = structure(
        {
            "ice": {
                "servers": [
                    {"urls": ["stun:stun.example.com:3478"]},
                    {
                        "urls": ["turn:turn.example.com:3478", "turns:turn.example.com:5349"],
                        "username": "u",
                        "credential": "c",
                    },
                ]
            },
            "demo": {"enabled": True},
        }
    )
    assert config.demo.enabled
    assert [server.urls for server in config.ice.servers] == [
        ("stun:stun.example.com:3478",),
        ("turn:turn.example.com:3478", "turns:turn.example.com:5349"),
    ]
    assert (config.ice.servers[1].username, config.ice.servers[1].credential) == ("u", "c")
    assert config.ice.servers[0].username is None


@pytest.mark.parametrize(
    ("servers", "key", "words"),
    [
        ("stun:a", "ice.servers", "list of tables"),
        (["stun:a"], "ice.servers", "item 0: expected a table like { urls"),
        ([{"urls": "stun:a"}], "ice.servers[0].urls", "list of strings"),
        ([{"urls": ["stun:a"]}, {"urls": ["stun:b"], "user": "x"}], "ice.servers[1].user", "unknown key"),
        ([{"urls": ["stun:a"], "username": 5}], "ice.servers[0].username", "string"),
        ([{}], "ice.servers[0].urls", "required"),
        ([{"urls": []}], "ice.servers[0].urls", "at least one URL"),
        ([{"urls": ["https://turn.example.com"]}], "ice.servers[0].urls", "not a STUN/TURN URL"),
        ([{"urls": ["stun:"]}], "ice.servers[0].urls", "not a STUN/TURN URL"),
        ([{"urls": ["turn:t.example.com"], "username": "u"}], "ice.servers[0]", "set both username and credential"),
        ([{"urls": ["stun:a", "turns:t"], "credential": "c"}], "ice.servers[0]", "TURN server"),
    ],
)
def test_bad_ice_servers_name_their_entry(servers: Any, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        structure({"ice": {"servers": servers}})
    assert info.value.key == key
    assert words in str(info.value)
