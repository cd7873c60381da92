"""signald: a WebRTC signaling daemon (rooms, presence, ordered relay) on trio."""

from ._config import Config, ConfigError, resolve
from ._server import Server
from ._version import __version__

__all__ = ["Config", "ConfigError", "Server", "__version__", "resolve"]
