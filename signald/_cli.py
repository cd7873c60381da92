"""``signald``: parse flags, resolve configuration, run the server until a signal."""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

import trio

from . import __version__, _logging
from ._config import LOG_LEVELS, Config, ConfigError, resolve
from ._server import Server

EXIT_CONFIG = 2
EXIT_STARTUP = 1
#: Allocations between young-generation collections (CPython's default is 700). The daemon's
#: long-lived objects are its connections and rooms, and what each message allocates is freed
#: by reference counting; at 700, collections took about a sixth of the CPU of a relay at
#: 1,000 connections and of a join storm (bench/). At most this many objects wait longer.
GC_THRESHOLD = 20_000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="signald", description="WebRTC signaling daemon: rooms, presence and relay over WebSocket."
    )
    parser.add_argument("--config", metavar="PATH", help="TOML configuration file (default: built-in defaults)")
    parser.add_argument(
        "--check-config", action="store_true", help="validate the configuration and exit: 0 valid, 2 invalid"
    )
    parser.add_argument("--host", help="listen address (overrides server.host and $HOST)")
    parser.add_argument("--port", type=int, help="listen port, 0 for any free port (overrides server.port and $PORT)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, help="overrides log.level and $LOG_LEVEL")
    parser.add_argument("--version", action="version", version=f"signald {__version__}")
    return parser


async def _run(config: Config) -> None:
    server = Server(config)
    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            await nursery.start(server.serve)
            async for signum in signals:
                print(f"signald: {signal.Signals(signum).name} received, draining", file=sys.stderr)
                server.shutdown()
                break


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides: dict[str, Any] = {}
    if args.host is not None:
        overrides["server.host"] = args.host
    if args.port is not None:
        overrides["server.port"] = args.port
    if args.log_level is not None:
        overrides["log.level"] = args.log_level
    try:
        config = resolve(args.config, os.environ, overrides)
    except ConfigError as exc:
        print(f"signald: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(f"signald: configuration OK ({args.config or 'built-in defaults'})", file=sys.stderr)
        return 0
    _logging.setup(config.log.level)
    gc.set_threshold(GC_THRESHOLD)
    try:
        trio.run(_run, config)
    except OSError as exc:
        print(f"signald: cannot listen on {config.server.host}:{config.server.port}: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    return 0
