"""Two Chromium tabs hold a video call through signald's demo page; run by test_browser.py.

Run as ``unshare --net --map-root-user python _browser_call.py OUTDIR``: in a network
namespace of its own, where the loopback interface is the only one, so every byte of
signaling *and* media provably stays on 127.0.0.1 (Chromium would otherwise offer, and
connect over, the machine's other addresses). Chromium needs ``--allow-loopback-in-peer-connection``
to gather loopback candidates at all. Playwright talks to Chromium over a pipe, not a socket.

This process starts signald (trio, in the main thread) and drives the browser with
Playwright's sync API in a worker thread. Alice's tab reaches signald through a small TCP proxy
(:class:`CuttableProxy`), so that mid-call the test can cut her WebSocket the way a network blip
does: both TCP connections reset, no close frame, and the demo must resume by itself.

It measures and does not judge: it prints one JSON report on stdout and saves a screenshot in
OUTDIR; test_browser.py asserts on them. Every wait is a Playwright wait with a timeout, so a
broken call fails within seconds.
"""

from __future__ import annotations

import fcntl
import json
import socket
import struct
import sys
from functools import partial
from pathlib import Path
from typing import Any

import trio
from playwright.sync_api import Page, sync_playwright

from signald import Server
from signald._config import structure

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--use-fake-device-for-media-stream",  # a generated test pattern instead of a camera
    "--use-fake-ui-for-media-stream",  # grant the camera without a prompt
    "--allow-loopback-in-peer-connection",
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: Milliseconds for any one browser wait (page load, ICE, first frames).
WAIT_MS = 10_000
#: Waits poll on a timer: the default, animation frames, never comes in a tab in the background.
POLL_MS = 50
ROOM = "browser-test"

#: The remote <video> of the first tile, the one the other tab's camera plays in. (Waits are
#: functions, not expression strings: Playwright would eval() a string, which the page's CSP forbids.)
REMOTE_VIDEO = "document.querySelector('#grid video.remote')"
HAS_FRAMES = f"() => {REMOTE_VIDEO}?.videoWidth > 0"
PLAYED_PAST = f"t => {REMOTE_VIDEO}.currentTime > t"
VIDEO_STATE = f"""() => {{
    const v = {REMOTE_VIDEO};
    return {{width: v.videoWidth, height: v.videoHeight, time: v.currentTime, paused: v.paused,
             frames: v.getVideoPlaybackQuality().totalVideoFrames}};
}}"""


class CuttableProxy:
    """Forwards every TCP connection to 127.0.0.1:``port``; ``cut()`` resets all open ones."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._open: set[tuple[trio.SocketStream, trio.SocketStream]] = set()
        self.connections = 0

    async def handle(self, client: trio.SocketStream) -> None:
        self.connections += 1
        server = await trio.open_tcp_stream("127.0.0.1", self._port)
        pair = (client, server)
        self._open.add(pair)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                nursery.start_soon(self._pump, server, client, nursery.cancel_scope)
        finally:
            self._open.discard(pair)
            for stream in pair:
                with trio.move_on_after(0):
                    await stream.aclose()

    @staticmethod
    async def _pump(source: trio.SocketStream, sink: trio.SocketStream, done: trio.CancelScope) -> None:
        try:
            while data := await source.receive_some(65536):
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        done.cancel()

    def cut(self) -> int:
        """Reset both sides of every open connection (SO_LINGER 0: an RST, not a FIN or a close frame)."""
        for pair in self._open:
            for stream in pair:
                stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                stream.socket.close()
        return len(self._open)


def bring_up_loopback() -> list[str]:
    """A new network namespace starts with ``lo`` down; return the interfaces there are."""
    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, siocgifflags, request))[1]
        fcntl.ioctl(sock, siocsifflags, struct.pack("16sH", b"lo", flags | iff_up))
    return [name for _, name in socket.if_nameindex()]


def join(page: Page, base_url: str, username: str) -> None:
    page.bring_to_front()  # Playwright's click checks wait on animation frames, which hidden tabs skip
    page.goto(base_url, wait_until="domcontentloaded")  # module scripts have run by then
    page.fill("#room", ROOM)
    page.fill("#username", username)
    page.click("#lobby button[type=submit]")


def video_report(page: Page) -> dict[str, Any]:
    """The remote video's state once it shows frames, and again half a second of playback later."""
    page.wait_for_function(HAS_FRAMES, polling=POLL_MS, timeout=WAIT_MS)
    first = page.evaluate(VIDEO_STATE)
    page.wait_for_function(PLAYED_PAST, arg=first["time"] + 0.5, polling=POLL_MS, timeout=WAIT_MS)
    tile = page.locator("#grid .tile[data-peer-id]")
    return {
        "first": first,
        "later": page.evaluate(VIDEO_STATE),
        "ice_state": tile.get_attribute("data-ice-state"),
        "state_text": tile.locator(".state").text_content(),
        "peer_name": tile.locator(".name").text_content(),
    }


def blip(alice: Page, bob: Page, proxy: CuttableProxy) -> dict[str, Any]:
    """Cut alice's WebSocket mid-call; report what each tab shows and whether the video plays on."""
    tiles = {page: page.query_selector("#grid .tile[data-peer-id]") for page in (alice, bob)}
    seen_as = {page: tiles[page].get_attribute("data-peer-id") for page in (alice, bob)}  # type: ignore[union-attr]
    before = {page: page.evaluate(VIDEO_STATE) for page in (alice, bob)}
    connections = proxy.connections
    cut = trio.from_thread.run_sync(proxy.cut)
    alice.wait_for_function(
        "() => document.getElementById('status').textContent === 'Reconnected.'", polling=POLL_MS, timeout=WAIT_MS
    )
    report: dict[str, Any] = {
        "cut": cut,
        "reconnections": trio.from_thread.run_sync(lambda: proxy.connections) - connections,
    }
    for name, page in (("alice", alice), ("bob", bob)):
        page.wait_for_function(PLAYED_PAST, arg=before[page]["time"] + 1.0, polling=POLL_MS, timeout=WAIT_MS)
        tile = tiles[page]
        assert tile is not None
        report[name] = {
            "before": before[page],
            "after": page.evaluate(VIDEO_STATE),
            "same_tile": tile.evaluate("t => t.isConnected"),  # never removed: no user-left, no hang-up
            "same_peer": tile.get_attribute("data-peer-id") == seen_as[page],
            "state_text": tile.query_selector(".state").text_content(),  # type: ignore[union-attr]
            "status": page.text_content("#status"),
        }
    return report


def drive(base_url: str, proxied_url: str, proxy: CuttableProxy, outdir: Path) -> dict[str, Any]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(outdir / "chromium-profile"),
            executable_path=CHROMIUM,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 900, "height": 520},
        )
        try:
            alice, bob, carol = (browser.new_page() for _ in range(3))
            errors: list[str] = []  # anything the pages report as an error, CSP violations included
            for page in (alice, bob, carol):
                page.on("console", lambda message: message.type == "error" and errors.append(message.text))
                page.on("pageerror", lambda error: errors.append(str(error)))
            join(alice, proxied_url, "alice")
            alice.wait_for_selector("#call:not([hidden])", timeout=WAIT_MS)
            join(bob, base_url, "bob")
            connected = ".tile[data-ice-state=connected], .tile[data-ice-state=completed]"
            for page in (alice, bob):
                page.wait_for_selector(connected, timeout=WAIT_MS)
            report: dict[str, Any] = {"alice": video_report(alice), "bob": video_report(bob)}
            alice.bring_to_front()
            alice.screenshot(path=outdir / "call.png")

            # A network blip on alice's side: the call goes on, and bob never sees her leave.
            report["blip"] = blip(alice, bob, proxy)

            # The room holds two (rooms.max_participants): a third person is told so, in words.
            join(carol, base_url, "carol")
            carol.wait_for_selector("#status.error", timeout=WAIT_MS)
            report["carol_status"] = carol.text_content("#status")
            report["carol_lobby_visible"] = carol.is_visible("#lobby")

            # Leaving removes bob's tile from alice's grid.
            bob.bring_to_front()
            bob.click("#leave")
            alice.wait_for_selector("#grid .tile[data-peer-id]", state="detached", timeout=WAIT_MS)
            report["alice_status_after_leave"] = alice.text_content("#status")
            report["bob_lobby_visible"] = bob.is_visible("#lobby")

            # Now there is room: carol tries again from the same page, and alice calls her.
            carol.bring_to_front()
            carol.click("#lobby button[type=submit]")
            for page in (alice, carol):
                page.wait_for_selector(connected, timeout=WAIT_MS)
            report["carol_retry_peer"] = carol.text_content("#grid .tile[data-peer-id] .name")
            report["alice_new_peer"] = alice.text_content("#grid .tile[data-peer-id] .name")
            report["console_errors"] = errors
            return report
        finally:
            browser.close()


async def main(outdir: Path) -> None:
    interfaces = bring_up_loopback()
    config = structure(
        {"server": {"host": "127.0.0.1", "port": 0}, "demo": {"enabled": True}, "rooms": {"max_participants": 2}}
    )
    server = Server(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        assert server.port
        proxy = CuttableProxy(server.port)
        listeners = await nursery.start(partial(trio.serve_tcp, proxy.handle, 0, host="127.0.0.1"))
        proxied_url = f"http://127.0.0.1:{listeners[0].socket.getsockname()[1]}/"
        report = await trio.to_thread.run_sync(drive, f"http://127.0.0.1:{server.port}/", proxied_url, proxy, outdir)
        server.shutdown()
        nursery.cancel_scope.cancel()  # the proxy's listener
    print(json.dumps({"interfaces": interfaces, **report}))


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]))
