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

from ._config import Config, ConfigError, ServerConfig


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
    cert, key = config.tls_cert, config.tls_key
    if not cert:
        return None
    cert_text, key_text = _read("server.tls_cert", cert), _read("server.tls_key", key)
    try:
        ssl.create_default_context().load_verify_locations(cadata=cert_text)
    except (ssl.SSLError, ValueError):
        raise ConfigError(
            "server.tls_cert", f"{cert}: holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
        ) from None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError("server.tls_key", f"{key}: is not the private key of the certificate in {cert}") from None
        if "ENCRYPTED" in key_text:
            raise ConfigError(
                "server.tls_key", f"{key}: is encrypted with a passphrase; signald needs it without"
            ) from None
        raise ConfigError("server.tls_key", f"{key}: holds no PEM private key (-----BEGIN PRIVATE KEY-----)") from None
    except OSError as exc:  # the file changed between the two reads
        raise ConfigError("server.tls_key", f"{key}: cannot read: {exc.strerror or exc}") from None
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


def check(config: Config) -> None:
    """Load the TLS certificate and key and resolve the listen address, as starting would."""
    tls_context(config.server)
    resolve_listen_address(config.server)
