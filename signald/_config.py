"""Configuration: attrs classes, strict cattrs structuring, and the precedence rules.

Precedence is built-in defaults < TOML file < environment < explicit CLI flags. Every way a
value can be wrong (unknown key, wrong type, out of range) raises :class:`ConfigError` whose
message starts with the key path, because an operator reading a one-line journal entry must
be able to find the line of TOML to fix without reading our source.

Secrets (:data:`SECRETS`) may instead be read from files and systemd credentials; their values
never appear in an error, only the key and the file.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


class ConfigError(ValueError):
    """A configuration value that signald refuses to start with.

    ``key`` is the dotted path (``limits.max_message_bytes``) or the environment variable
    name the bad value came from; ``str(err)`` is the one line shown to the operator.
    """

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def _bounded(default: Any, *, low: float | None = None, high: float | None = None) -> Any:
    """An attrs field whose numeric range is checked after structuring (see ``_check_ranges``).

    attrs validators would run inside ``__init__``, where cattrs reports their failures
    without the key path; keeping the bounds as metadata lets us name the key ourselves.
    """
    return attrs.field(default=default, metadata={"low": low, "high": high})


@attrs.frozen
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = _bounded(3000, low=0, high=65535)
    #: Seconds between SIGTERM and a forced exit; WebSockets get 1001 and this long to close.
    shutdown_grace: float = _bounded(10.0, low=0.1, high=3600)
    #: Seconds a client may take to send one whole HTTP request (and to idle on keep-alive).
    request_timeout: float = _bounded(10.0, low=0.1, high=3600)
    #: Addresses (or CIDR networks) of reverse proxies whose X-Forwarded-For header is believed
    #: for per-address limits; from anyone else the header is ignored, since anyone can send it.
    trusted_proxies: tuple[str, ...] = ()
    #: PEM certificate chain and private key: when both are set, the port speaks only HTTPS/WSS.
    tls_cert: str = ""
    tls_key: str = ""
    #: Bind with SO_REUSEPORT, so several signald processes on one machine share the port
    #: (the kernel spreads new connections over them); they form one server with [cluster].
    reuse_port: bool = False


@attrs.frozen
class CorsConfig:
    #: Origins allowed for REST (CORS) and for the WebSocket handshake; "*" allows any.
    allowed_origins: tuple[str, ...] = ("*",)


@attrs.frozen
class RoomsConfig:
    max_participants: int = _bounded(16, low=2, high=10_000)
    auto_create: bool = True
    #: Seconds a POSTed room may stay empty before it is removed.
    idle_ttl: float = _bounded(86400.0, low=1, high=10 * 365 * 86400)
    #: Live rooms at most (each is a task and some memory); further creation is refused.
    max_rooms: int = _bounded(100_000, low=1, high=10_000_000)
    #: Seconds a member whose connection was lost keeps its seat, waiting to resume; 0 = off.
    resume_grace: float = _bounded(30.0, low=0, high=86400)
    #: Messages kept for a member while it is away; one more ends its session.
    resume_buffer: int = _bounded(256, low=1, high=1_000_000)


@attrs.frozen
class LimitsConfig:
    max_message_bytes: int = _bounded(65536, low=1024, high=16 * 1024 * 1024)
    #: A connection whose unsent outbound bytes exceed this is evicted (close code 1008).
    send_queue_bytes: int = _bounded(1048576, low=1024, high=1024 * 1024 * 1024)
    ping_interval: float = _bounded(20.0, low=0.01, high=3600)
    ping_timeout: float = _bounded(20.0, low=0.01, high=3600)
    #: Seconds a WebSocket close handshake may take before the TCP stream is cut.
    close_timeout: float = _bounded(5.0, low=0.01, high=600)
    #: Per-connection token bucket: messages per second, and the burst allowed on top.
    message_rate: float = _bounded(1000.0, low=0.01, high=1_000_000)
    message_burst: int = _bounded(2000, low=1, high=10_000_000)
    #: Messages dropped for the rate since the bucket was last full before closing (1008); 0 = never.
    rate_limit_close_after: int = _bounded(1000, low=0, high=10_000_000)
    #: Open WebSockets: in total, and from one client address (an IPv6 /64 counts as one).
    max_connections: int = _bounded(100_000, low=1, high=10_000_000)
    max_connections_per_ip: int = _bounded(10_000, low=1, high=10_000_000)
    #: Rooms one client address may create over REST: per second, and the burst on top.
    room_create_rate: float = _bounded(10.0, low=0.001, high=1_000_000)
    room_create_burst: int = _bounded(200, low=1, high=10_000_000)
    #: Seconds a WebSocket may stay open without being in a room (after connecting or leaving).
    idle_timeout: float = _bounded(600.0, low=0.01, high=30 * 86400)
    #: Message shape bounds, in characters, beyond the frame size: an SDP, each string of an ICE
    #: candidate, a username; and how deeply a message's JSON may nest. An SDP may by default be
    #: as long as ``max_message_bytes`` lets it (large SDPs are real: many transceivers, simulcast).
    max_sdp_length: int = attrs.field(
        default=attrs.Factory(lambda self: self.max_message_bytes, takes_self=True),
        metadata={"low": 1, "high": 16 * 1024 * 1024},
    )
    max_candidate_length: int = _bounded(1024, low=1, high=16 * 1024 * 1024)
    max_username_length: int = _bounded(64, low=1, high=4096)
    max_json_depth: int = _bounded(32, low=2, high=1000)


#: Shortest ``auth.secret``: HS256 wants a key at least as long as its 256-bit hash (RFC 7518).
MIN_SECRET = 32
#: Shortest ``auth.api_keys`` entry (and ``ice.turn_secret``): long enough that guessing one is hopeless.
MIN_API_KEY = 16


@attrs.frozen
class AuthConfig:
    #: HS256 secret for join tokens; empty = anyone may join any room.
    secret: str = attrs.field(default="", repr=False)
    #: Bearer keys for mutating REST calls; empty = no key needed.
    api_keys: tuple[str, ...] = attrs.field(default=(), repr=False)
    #: Files holding them instead (see ``SECRETS``): the secret, and one key per line.
    secret_file: str = ""
    api_keys_file: str = ""


@attrs.frozen
class StorageConfig:
    #: SQLite file keeping rooms made by POST /api/rooms across restarts; "" keeps them in memory only.
    path: str = ""


@attrs.frozen
class ClusterConfig:
    #: ``redis://HOST[:PORT][/DB]``, ``rediss://HOST[:PORT][/DB]`` (TLS) or ``unix:///path/to/redis.sock``:
    #: the Redis 7 that makes several signald processes one server. Empty = one process on its own, no Redis.
    redis_url: str = ""
    #: Seconds after which a node that stopped renewing its lease in Redis counts as dead and its
    #: members leave their rooms.
    node_timeout: float = _bounded(10.0, low=1, high=3600)
    #: Bytes of relays and membership commands this node may have queued for Redis and not yet
    #: had answered. Past it (a slow or stalled Redis), relays to other nodes and joins are
    #: refused with ``cluster-unavailable``, as in an outage, instead of memory growing.
    send_queue_bytes: int = _bounded(8 * 1024 * 1024, low=1024, high=1024 * 1024 * 1024)
    #: With ``rediss://``: the PEM file of the CAs that signed Redis's certificate ("" = the system's
    #: CAs). Redis's certificate must name the URL's host, as a browser would ask of a website.
    tls_ca: str = ""
    #: With ``rediss://``: this node's certificate and key (PEM files) for a Redis that asks clients
    #: for one (``tls-auth-clients``, on by default in Redis); both or neither.
    tls_cert: str = ""
    tls_key: str = ""


@attrs.frozen
class LogConfig:
    level: str = "info"
    #: "text" (one human-readable line per event) or "json" (one JSON object per line, for shippers).
    format: str = "text"


@attrs.frozen
class IceServer:
    """One entry of ``[ice] servers``, shaped like the browser's ``RTCIceServer``."""

    urls: tuple[str, ...]
    #: TURN needs both; STUN needs neither. Browsers reject a TURN entry without them.
    username: str | None = None
    credential: str | None = None


@attrs.frozen
class IceConfig:
    #: STUN/TURN servers clients should use, served at GET /api/ice-servers. Empty = host
    #: candidates only, which is enough on one machine or one LAN.
    servers: tuple[IceServer, ...] = ()
    #: TURN servers for which signald mints each room member its own short-lived credentials
    #: (coturn's use-auth-secret scheme, see ``_turn``), shared with the TURN server as
    #: ``turn_secret``; credentials are valid for ``turn_ttl`` seconds from the join.
    turn_urls: tuple[str, ...] = ()
    turn_secret: str = attrs.field(default="", repr=False)
    turn_secret_file: str = ""
    turn_ttl: int = _bounded(3600, low=60, high=7 * 86400)


@attrs.frozen
class DemoConfig:
    #: Serve the demo client at GET /. Off by default: a production signaling server usually
    #: sits behind an application that serves its own pages.
    enabled: bool = False


@attrs.frozen
class MetricsConfig:
    #: Serve GET /metrics in the Prometheus text format. Off by default: what it shows (load,
    #: error rates) is for the operator, not for every visitor of the public port.
    enabled: bool = False
    #: "HOST:PORT" of a listener of its own for /metrics (e.g. "127.0.0.1:9464"; port 0: any free
    #: port), so it can stay off the public interface; "" serves it on the main port beside the REST API.
    bind: str = ""


@attrs.frozen
class Config:
    server: ServerConfig = ServerConfig()
    cors: CorsConfig = CorsConfig()
    rooms: RoomsConfig = RoomsConfig()
    limits: LimitsConfig = LimitsConfig()
    auth: AuthConfig = AuthConfig()
    storage: StorageConfig = StorageConfig()
    cluster: ClusterConfig = ClusterConfig()
    log: LogConfig = LogConfig()
    ice: IceConfig = IceConfig()
    demo: DemoConfig = DemoConfig()
    metrics: MetricsConfig = MetricsConfig()


def _strict_converter() -> cattrs.Converter:
    """A converter that never coerces: cattrs' defaults call the type, so "12" -> 12."""
    conv = cattrs.Converter(forbid_extra_keys=True)

    def structure_int(value: Any, _: type) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"expected an integer, got {_describe(value)}")
        return value

    def structure_float(value: Any, _: type) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"expected a number, got {_describe(value)}")
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {value}")
        return float(value)

    def structure_str(value: Any, _: type) -> str:
        if not isinstance(value, str):
            raise TypeError(f"expected a string, got {_describe(value)}")
        return value

    def structure_bool(value: Any, _: type) -> bool:
        if not isinstance(value, bool):
            raise TypeError(f"expected true or false, got {_describe(value)}")
        return value

    def structure_str_tuple(value: Any, _: type) -> tuple[str, ...]:
        if not isinstance(value, list | tuple):
            raise TypeError(f"expected a list of strings, got {_describe(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, str):
                raise TypeError(f"item {index}: expected a string, got {_describe(item)}")
        return tuple(value)

    conv.register_structure_hook(int, structure_int)
    conv.register_structure_hook(float, structure_float)
    conv.register_structure_hook(str, structure_str)
    conv.register_structure_hook(bool, structure_bool)
    conv.register_structure_hook_func(lambda t: t == tuple[str, ...], structure_str_tuple)

    # cattrs would iterate a string as if it were the list, and report each character.
    ice_servers = conv.get_structure_hook(tuple[IceServer, ...])

    def structure_ice_servers(value: Any, type_: type) -> tuple[IceServer, ...]:
        if not isinstance(value, list | tuple):
            raise TypeError(f"expected a list of tables, got {_describe(value)}")
        for index, item in enumerate(value):
            if not isinstance(item, Mapping):
                raise TypeError(
                    f'item {index}: expected a table like {{ urls = ["stun:host:3478"] }}, got {_describe(item)}'
                )
        return ice_servers(value, type_)

    conv.register_structure_hook_func(lambda t: t == tuple[IceServer, ...], structure_ice_servers)
    return conv


_CONVERTER = _strict_converter()


def _describe(value: Any) -> str:
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def _first_error(exc: BaseException, path: str) -> ConfigError:
    """Walk cattrs' exception tree down to the first leaf and name its key path."""
    if isinstance(exc, ForbiddenExtraKeysError):
        key = sorted(exc.extra_fields)[0]
        return ConfigError(f"{path}.{key}".lstrip("."), "unknown key")
    if isinstance(exc, ClassValidationError | IterableValidationError):
        for sub in exc.exceptions:
            notes = getattr(sub, "__notes__", [])
            note = next((n for n in notes if hasattr(n, "name") or hasattr(n, "index")), None)
            name, index = getattr(note, "name", None), getattr(note, "index", None)
            sub_path = f"{path}.{name}" if name is not None else f"{path}[{index}]" if index is not None else path
            return _first_error(sub, sub_path)
    if isinstance(exc, KeyError):
        return ConfigError(path.lstrip("."), "required key missing")
    message = str(exc) or type(exc).__name__
    if isinstance(exc, AttributeError):
        message = "expected a table"
    return ConfigError(path.lstrip(".") or "(top level)", message)


def _check_ranges(section_name: str, section: Any) -> None:
    for field in attrs.fields(type(section)):
        low, high = field.metadata.get("low"), field.metadata.get("high")
        value = getattr(section, field.name)
        key = f"{section_name}.{field.name}"
        if low is not None and value < low:
            raise ConfigError(key, f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise ConfigError(key, f"must be at most {high}, got {value}")


#: URL schemes an RTCIceServer accepts (RFC 7064, RFC 7065).
ICE_SCHEMES = ("stun", "stuns", "turn", "turns")


def _check_ice_server(key: str, server: IceServer) -> None:
    """Refuse here what ``new RTCPeerConnection`` would refuse in every visitor's browser."""
    if not server.urls:
        raise ConfigError(f"{key}.urls", "must list at least one URL")
    for url in server.urls:
        scheme, colon, rest = url.partition(":")
        if not colon or scheme not in ICE_SCHEMES or not rest or rest.startswith("/"):
            raise ConfigError(f"{key}.urls", f"{url!r} is not a STUN/TURN URL like stun:host:port or turn:host:port")
        if scheme.startswith("turn") and (server.username is None or server.credential is None):
            raise ConfigError(key, f"{url} is a TURN server: set both username and credential")


def _check_redis_url(url: str) -> None:
    """Refuse at start-up what coredis would only refuse at the first connection attempt."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        if parts.netloc or not parts.path.startswith("/") or parts.path == "/":
            raise ConfigError("cluster.redis_url", f"{url!r}: a unix socket URL is unix:///absolute/path")
        return
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        raise ConfigError(
            "cluster.redis_url",
            f"{url!r} is not redis://HOST[:PORT][/DB], rediss://HOST[:PORT][/DB] or unix:///path/to/redis.sock",
        )
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError:
        raise ConfigError("cluster.redis_url", f"{url!r}: the port must be a number from 0 to 65535") from None
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ConfigError("cluster.redis_url", f"{url!r}: the database after the / must be a number")


def _check_redis_tls(cluster: ClusterConfig) -> None:
    """The TLS keys go with a rediss:// URL; whether the files load is ``_startup``'s to check."""
    tls = urlsplit(cluster.redis_url).scheme == "rediss"
    for key in ("tls_ca", "tls_cert", "tls_key"):
        if getattr(cluster, key) and not tls:
            raise ConfigError(f"cluster.{key}", "only used with a rediss:// redis_url (TLS to Redis)")
    if bool(cluster.tls_cert) != bool(cluster.tls_key):
        missing, given = ("tls_key", "tls_cert") if cluster.tls_cert else ("tls_cert", "tls_key")
        raise ConfigError(f"cluster.{missing}", f"required when cluster.{given} is set")


def _check_turn(ice: IceConfig) -> None:
    for url in ice.turn_urls:
        scheme, colon, rest = url.partition(":")
        if not colon or scheme not in ("turn", "turns") or not rest or rest.startswith("/"):
            raise ConfigError("ice.turn_urls", f"{url!r} is not a TURN URL like turn:host:3478 or turns:host:5349")
    if ice.turn_secret and not ice.turn_urls:
        raise ConfigError("ice.turn_urls", "required when ice.turn_secret is set: the TURN servers to hand out")
    if ice.turn_urls and not ice.turn_secret:
        raise ConfigError("ice.turn_secret", "required when ice.turn_urls is set: the TURN server's static-auth-secret")
    if ice.turn_secret and len(ice.turn_secret) < MIN_API_KEY:
        raise ConfigError("ice.turn_secret", f"must be at least {MIN_API_KEY} characters")


#: A DNS name: dot-separated labels of letters, digits and inner hyphens.
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _check_host(host: str) -> None:
    """An IP address or a host name: "0.0.0.0:3000" would otherwise fail only when binding, as a port problem."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if _HOSTNAME.fullmatch(host):
        return
    name, colon, port = host.rpartition(":")
    if colon and port.isdigit():
        raise ConfigError(
            "server.host",
            f"{host!r} has a port in it: give the address alone ({name.strip('[]')!r}), the port as server.port",
        )
    if host.startswith("[") and host.endswith("]"):
        raise ConfigError("server.host", f"{host!r}: give an IPv6 address without brackets ({host[1:-1]!r})")
    raise ConfigError(
        "server.host", f'{host!r} is not an IP address or a host name ("0.0.0.0" or "::" listen on every interface)'
    )


def split_bind(bind: str) -> tuple[str, int]:
    """``metrics.bind``'s host and port: "127.0.0.1:9464", "[::1]:9464", "localhost:9464"."""
    host, colon, port = bind.rpartition(":")
    if not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError("metrics.bind", f"{bind!r} is not HOST:PORT, e.g. \"127.0.0.1:9464\" or \"[::1]:9464\"")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError("metrics.bind", f"{bind!r}: {host!r} in brackets is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError("metrics.bind", f"{bind!r}: put an IPv6 address in brackets, e.g. \"[::1]:9464\"")
    elif not _HOSTNAME.fullmatch(host):
        raise ConfigError("metrics.bind", f"{bind!r}: {host!r} is not an IP address or a host name")
    return host, int(port)


def _check(config: Config) -> Config:
    for field in attrs.fields(Config):
        _check_ranges(field.name, getattr(config, field.name))
    _check_host(config.server.host)
    if config.log.level not in LOG_LEVELS:
        raise ConfigError("log.level", f"must be one of {', '.join(LOG_LEVELS)}, got {config.log.level!r}")
    if config.log.format not in LOG_FORMATS:
        raise ConfigError("log.format", f"must be one of {', '.join(LOG_FORMATS)}, got {config.log.format!r}")
    for origin in config.cors.allowed_origins:
        if origin != "*" and ("://" not in origin or origin.endswith("/")):
            raise ConfigError(
                "cors.allowed_origins",
                f'{origin!r} is not an origin: use scheme://host[:port] without a path, or "*"',
            )
    for proxy in config.server.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(
                "server.trusted_proxies", f"{proxy!r} is not an IP address or network (e.g. 10.0.0.0/8)"
            ) from None
    auth = config.auth
    if auth.secret and len(auth.secret) < MIN_SECRET:
        raise ConfigError("auth.secret", f"must be at least {MIN_SECRET} characters (or empty to turn tokens off)")
    for index, key in enumerate(auth.api_keys):
        if len(key) < MIN_API_KEY:
            raise ConfigError("auth.api_keys", f"key {index} must be at least {MIN_API_KEY} characters")
    if bool(config.server.tls_cert) != bool(config.server.tls_key):
        missing, given = ("tls_key", "tls_cert") if config.server.tls_cert else ("tls_cert", "tls_key")
        raise ConfigError(f"server.{missing}", f"required when server.{given} is set")
    for index, server in enumerate(config.ice.servers):
        _check_ice_server(f"ice.servers[{index}]", server)
    if config.cluster.redis_url:
        _check_redis_url(config.cluster.redis_url)
        if config.storage.path:
            raise ConfigError("storage.path", "not used with cluster.redis_url (Redis keeps the rooms): remove one")
        if config.cluster.send_queue_bytes < config.limits.max_message_bytes:
            raise ConfigError(
                "cluster.send_queue_bytes",
                f"must be at least limits.max_message_bytes ({config.limits.max_message_bytes}), or no relay"
                " of the largest message could reach another node",
            )
    _check_redis_tls(config.cluster)
    _check_turn(config.ice)
    if config.metrics.bind:
        split_bind(config.metrics.bind)
    if config.limits.send_queue_bytes < config.limits.max_message_bytes:
        raise ConfigError(
            "limits.send_queue_bytes",
            f"must be at least limits.max_message_bytes ({config.limits.max_message_bytes})",
        )
    return config


@attrs.frozen
class Secret:
    """A key whose value should not sit in the world-readable TOML file.

    Its value may come from exactly one of three places: the key itself, the file named by
    ``<key>_file`` (readable by the service only), or the systemd credential named like the key
    (``LoadCredential=auth.secret:/etc/signald/auth.secret`` in the unit puts it in
    ``$CREDENTIALS_DIRECTORY/auth.secret``, readable by the service alone, even under
    ``DynamicUser=``). Two places at once is refused rather than ranked: an operator who moved a
    secret to a file and forgot the old value would otherwise run with the one they did not mean.
    """

    section: str
    name: str
    #: A list of values, one per line of the file (blank lines and ``#`` comments skipped).
    lines: bool = False

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}"


SECRETS = (Secret("auth", "secret"), Secret("auth", "api_keys", lines=True), Secret("ice", "turn_secret"))
_SECRET_KEYS = {secret.key for secret in SECRETS}


def _read_secret(secret: Secret, key: str, path: str) -> str | tuple[str, ...]:
    """The secret in ``path``; ``key`` names where the path came from, for the error."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(key, f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path}: not UTF-8 text") from None
    if secret.lines:
        values = tuple(line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#"))
        if not values:
            raise ConfigError(key, f"{path}: holds no key (one per line)")
        return values
    value = text.strip()
    if not value:
        raise ConfigError(key, f"{path}: is empty")
    return value


def _load_secrets(config: Config, credentials: str | None) -> tuple[Config, dict[str, tuple[str, str]]]:
    """``config`` with each secret read from its file or credential; and where each came from.

    The second value maps a secret's key to (the key to report, the file) for check errors.
    """
    origins: dict[str, tuple[str, str]] = {}
    for secret in SECRETS:
        section = getattr(config, secret.section)
        places: list[tuple[str, str | None]] = []
        if getattr(section, secret.name):
            places.append((secret.key, None))
        path = getattr(section, f"{secret.name}_file")
        if path:
            places.append((f"{secret.key}_file", path))
        if credentials:
            credential = Path(credentials, secret.key)
            if credential.exists():
                places.append((f"systemd credential {secret.key}", str(credential)))
        if len(places) > 1:
            (first, _), (second, _) = places[:2]
            raise ConfigError(secret.key, f"set by both {first} and {second}: keep one")
        if places and places[0][1] is not None:
            where, path = places[0]
            key = where if where.endswith("_file") else secret.key
            value = _read_secret(secret, key, path)
            section = attrs.evolve(section, **{secret.name: value})
            config = attrs.evolve(config, **{secret.section: section})
            origins[secret.key] = (key, path)
    return config, origins


def structure(data: Mapping[str, Any], credentials: str | None = None) -> Config:
    """Build a validated :class:`Config` from a TOML-shaped mapping.

    ``credentials`` is systemd's ``$CREDENTIALS_DIRECTORY``, where secrets may be (``Secret``).
    """
    sections = {field.name for field in attrs.fields(Config)}
    for name, value in data.items():
        if name in sections and not isinstance(value, Mapping):
            raise ConfigError(name, f"expected a table [{name}], got {_describe(value)}")
    try:
        config = _CONVERTER.structure(dict(data), Config)
    except Exception as exc:  # cattrs raises a tree of assorted exceptions
        error = _first_error(exc, "")
        if error.key in _SECRET_KEYS:  # "expected a list of strings, got str 'the secret'": cut the value
            raise ConfigError(error.key, error.problem.split(", got ")[0]) from None
        raise error from None
    config, origins = _load_secrets(config, credentials)
    try:
        return _check(config)
    except ConfigError as exc:
        if exc.key not in origins:
            raise
        key, path = origins[exc.key]
        raise ConfigError(key, f"{path}: {exc.problem}") from None


def unstructure(config: Config) -> dict[str, Any]:
    return _CONVERTER.unstructure(config)


#: Sections a running server takes over on SIGHUP: nothing in them is bound to a socket, a file or a room.
RELOADABLE = ("cors", "limits", "log")


def reloaded(running: Config, new: Config) -> tuple[Config, list[str]]:
    """``running`` with ``new``'s reloadable sections, and the other keys that differ (they need a restart)."""
    merged = attrs.evolve(running, **{name: getattr(new, name) for name in RELOADABLE})
    kept, wanted = unstructure(merged), unstructure(new)
    pending = [
        f"{section}.{key}"
        for section, values in wanted.items()
        for key, value in values.items()
        if kept[section][key] != value
    ]
    return merged, pending


def load_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML file; I/O and syntax problems become ConfigErrors naming the file."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"invalid TOML: {exc}") from None


#: Environment variables the Node service read, and where they land in the TOML tree.
#: The command-line flags that override a key, by key path.
FLAGS = {
    "server.host": "--host",
    "server.port": "--port",
    "log.level": "--log-level",
    "storage.path": "--storage-path",
}

ENVIRONMENT = {
    "HOST": ("server", "host"),
    "PORT": ("server", "port"),
    "ALLOWED_ORIGINS": ("cors", "allowed_origins"),
    "LOG_LEVEL": ("log", "level"),
}


def _env_value(name: str, raw: str) -> Any:
    if name == "PORT":
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfigError(name, f"expected an integer, got {raw!r}") from None
    if name == "ALLOWED_ORIGINS":
        return [part.strip() for part in raw.split(",") if part.strip()]
    if name == "LOG_LEVEL":
        return raw.strip().lower()
    return raw.strip()


def _merge(tree: dict[str, Any], section: str, key: str, value: Any) -> None:
    table = tree.setdefault(section, {})
    if not isinstance(table, dict):
        raise ConfigError(section, f"expected a table, got {_describe(table)}")
    table[key] = value


def resolve(
    path: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    check: Callable[[Config], None] | None = None,
) -> Config:
    """Defaults < TOML file at ``path`` < ``environ`` < ``overrides`` (CLI flags by key path).

    Secrets may also come from files and from systemd credentials (``Secret``). ``check`` runs
    on the result (``_startup.check``: the TLS files, the listen address), and its errors are
    named the same way.

    A bad value that came from the environment or a flag is reported under that name
    (``PORT: expected an integer``), since that is where the operator has to fix it.
    """
    tree = load_file(path) if path is not None else {}
    sources: dict[str, str] = {}
    for name, (section, key) in ENVIRONMENT.items():
        raw = (environ or {}).get(name)
        if raw is not None and raw.strip() != "":
            _merge(tree, section, key, _env_value(name, raw))
            sources[f"{section}.{key}"] = name
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".")
        _merge(tree, section, key, value)
        sources[dotted] = FLAGS[dotted]
    try:
        config = structure(tree, (environ or {}).get("CREDENTIALS_DIRECTORY") or None)
        if check is not None:
            check(config)
        return config
    except ConfigError as exc:
        if exc.key in sources:
            raise ConfigError(sources[exc.key], exc.problem) from None
        raise
