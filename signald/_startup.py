"""What must hold before signald can serve, beyond the values in the configuration.

``--check-config`` and the start of the daemon run the same :func:`check`, so a configuration
that passes the check does not then fail at start for a file or an address the check could have
tried (only what needs the port itself, such as another process holding it, shows at start).
Each problem is a :class:`ConfigError` naming the key and the file in plain words: OpenSSL's own
messages ("PEM lib (_ssl.c:3905)") say nothing to an operator.
"""

from __future__ import annotations

import socket
import ssl
from urllib.parse import urlsplit

from ._config import ClusterConfig, Config, ConfigError, ServerConfig, split_bind


def _read(key: str, path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(key, f"{path}: cannot read: {exc.strerror or exc}") from None


def _no_passphrase() -> bytes:
    """Without a callback, OpenSSL would prompt on the terminal for an encrypted key's passphrase."""
    return b""


def tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    """HTTPS/WSS on the one port when ``server.tls_cert`` and ``tls_key`` are set (PEM files).

    Browsers allow getUserMedia only on secure origins, so a VM without a TLS-terminating
    proxy in front needs this. Python's defaults (TLS 1.2 or newer, its cipher list) apply.
    """
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["http/1.1"])
    _load_chain(context, "server", config.tls_cert, config.tls_key)
    return context


def _check_certificates(key: str, path: str) -> None:
    text = _read(key, path)
    try:
        ssl.create_default_context().load_verify_locations(cadata=text)
    except (ssl.SSLError, ValueError):
        raise ConfigError(key, f"{path}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)") from None


def _load_chain(context: ssl.SSLContext, section: str, cert: str, key: str) -> None:
    """``section``'s ``tls_cert`` and ``tls_key`` into ``context``, or a ConfigError naming the key."""
    cert_key, key_key = f"{section}.tls_cert", f"{section}.tls_key"
    _check_certificates(cert_key, cert)
    key_text = _read(key_key, key)
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(key_key, f"{key}: is not the private key of the certificate in {cert}") from None
        if "ENCRYPTED" in key_text:
            raise ConfigError(key_key, f"{key}: is encrypted with a passphrase; signald needs it without") from None
        raise ConfigError(key_key, f"{key}: holds no PEM private key (-----BEGIN PRIVATE KEY-----)") from None
    except OSError as exc:  # the file changed between the two reads
        raise ConfigError(key_key, f"{key}: cannot read: {exc.strerror or exc}") from None


def redis_tls_context(config: ClusterConfig) -> ssl.SSLContext | None:
    """TLS to Redis for a ``rediss://`` URL: Redis's certificate verified, host name included.

    coredis, given only the URL, would not check that the certificate names the host; so the
    context is made here, as strict as a browser's, and handed to it.
    """
    if urlsplit(config.redis_url).scheme != "rediss":
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if config.tls_ca:
        _check_certificates("cluster.tls_ca", config.tls_ca)
        context.load_verify_locations(cafile=config.tls_ca)
    if config.tls_cert:
        _load_chain(context, "cluster", config.tls_cert, config.tls_key)
    return context


def resolve_listen_address(config: ServerConfig) -> None:
    """``server.host`` must name an address of this machine's kind (without binding: the port may be in use
    by the signald being replaced)."""
    try:
        socket.getaddrinfo(config.host, config.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(
            "server.host", f"cannot resolve {config.host!r} to an address to listen on: {exc.strerror}"
        ) from None


def resolve_metrics_address(bind: str) -> None:
    """``metrics.bind``'s host must resolve too, or /metrics would fail only at start."""
    host, port = split_bind(bind)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(
            "metrics.bind", f"cannot resolve {host!r} to an address to listen on: {exc.strerror}"
        ) from None


def check(config: Config) -> None:
    """Load the TLS certificates and keys and resolve the listen addresses, as starting would."""
    tls_context(config.server)
    redis_tls_context(config.cluster)
    resolve_listen_address(config.server)
    if config.metrics.enabled and config.metrics.bind:
        resolve_metrics_address(config.metrics.bind)
