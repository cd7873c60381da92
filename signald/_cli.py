"""``signald``: parse flags, resolve configuration, run the server until a signal."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import trio

from . import __version__, _logging, _startup, _systemd
from ._config import FLAGS, LOG_LEVELS, Config, ConfigError, resolve
from ._server import Server

EXIT_CONFIG = 2
EXIT_STARTUP = 1
#: Allocations between young-generation collections (CPython's default is 700). The daemon's
#: long-lived objects are its connections and rooms, and what each message allocates is freed
#: by reference counting; at 700, collections took about a sixth of the CPU of a relay at
#: 1,000 connections and of a join storm (bench/). At most this many objects wait longer.
GC_THRESHOLD = 20_000

log = logging.getLogger("signald")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="signald", description="WebRTC signaling daemon: rooms, presence and relay over WebSocket."
    )
    parser.add_argument("--config", metavar="PATH", help="TOML configuration file (default: built-in defaults)")
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="validate the configuration, load the TLS files, resolve the listen address, and exit: 0 valid, 2 invalid",
    )
    parser.add_argument("--host", help="listen address (overrides server.host and $HOST)")
    parser.add_argument("--port", type=int, help="listen port, 0 for any free port (overrides server.port and $PORT)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="overrides log.level and $LOG_LEVEL")
    parser.add_argument("--storage-path", metavar="PATH", help="SQLite file for rooms (overrides storage.path)")
    parser.add_argument("--version", action="version", version=f"signald {__version__}")
    return parser


def _reload(server: Server, load_config: Callable[[], Config], environ: Mapping[str, str]) -> None:
    """SIGHUP: apply what a fresh configuration changes that is safe to change under live connections."""
    try:
        config = load_config()
    except ConfigError as exc:
        log.error("reload refused, keeping the running configuration: %s", exc)
        return
    for key in server.reload(config):
        log.warning("reload: %s changed, which takes a restart; keeping the running value", key)
    _logging.setup(server.config.log, environ)
    log.info("configuration reloaded")


async def _run(
    config: Config,
    environ: Mapping[str, str],
    load_config: Callable[[], Config],
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM/SIGINT and drain, reloading on SIGHUP, keeping systemd (if any) informed."""
    pid = os.getpid()
    server = Server(config, _systemd.inherited_listeners(_systemd.listen_fds(environ, pid)))
    notifier = _systemd.Notifier.from_environ(environ)
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as nursery:

                async def serve(task_status: trio.TaskStatus[None]) -> None:
                    await server.serve(task_status=task_status)
                    nursery.cancel_scope.cancel()  # drained: stop the watchdog and status tasks too

                await nursery.start(serve)
                status = server.status()
                notifier.send("READY=1", f"STATUS={status}")
                nursery.start_soon(_systemd.watchdog, notifier, _systemd.watchdog_interval(environ, pid))
                nursery.start_soon(_systemd.follow_status, notifier, server.status, status)
                task_status.started(server)
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        notifier.send("RELOADING=1")
                        _reload(server, load_config, environ)
                        notifier.send("READY=1", f"STATUS={server.status()}")
                        continue
                    log.info("%s received, draining", signal.Signals(signum).name)
                    notifier.send("STOPPING=1", f"STATUS={server.status()}")
                    server.shutdown()
                    break
    finally:
        notifier.close()


def _fatal(message: str) -> None:
    """The one line saying why signald will not run; an error-priority entry in the journal."""
    priority = "<3>" if _logging.writes_to_journal(os.environ, sys.stderr) else ""
    print(f"{priority}signald: {message}", file=sys.stderr)


def _startup_error(exc: BaseException) -> ConfigError | None:
    """The ConfigError that stopped start-up, unwrapped from trio's exception groups."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, ConfigError) else None


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    for key, flag in FLAGS.items():
        value = getattr(args, flag.removeprefix("--").replace("-", "_"))
        if value is not None:
            overrides[key] = value
    try:
        # With the TLS files and the listen address: --check-config and a start fail alike.
        config = resolve(args.config, os.environ, overrides, _startup.check)
    except ConfigError as exc:
        _fatal(f"configuration error: {exc}")
        return EXIT_CONFIG
    if args.check_config:
        print(f"signald: configuration OK ({args.config or 'built-in defaults'})", file=sys.stderr)
        return 0
    _logging.setup(config.log, os.environ)
    gc.set_threshold(GC_THRESHOLD)
    try:
        trio.run(_run, config, os.environ, lambda: resolve(args.config, os.environ, overrides))
    except (ConfigError, BaseExceptionGroup) as exc:
        # What only shows when starting: the port is taken, the room store is unreadable...
        error = _startup_error(exc)
        if error is None:
            raise
        _fatal(f"cannot start: {error}")
        return EXIT_STARTUP
    return 0
