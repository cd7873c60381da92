"""docs/protocol.md's browser snippet in two Chromium tabs: call, leave, rejoin, call; run by test_browser.py.

The page and ``call.js`` are section 8's ``html`` and ``js`` blocks, as a reader would copy them,
with ``SIGNALING_URL`` pointed at this run's signald (the only change; it must occur once), saved
next to each other and served by a plain web server of their own on 127.0.0.1, as an application
would serve them; the page then fetches signald's ``/api/ice-servers`` and opens its ``/ws``.
Bob's ``/api/ice-servers`` answers 503 (Playwright's ``route``), so the snippet's fallback for a
failed fetch runs too.

Runs like ``_browser_call.py`` (``unshare --net --map-root-user``: loopback is the only network),
measures, and prints one JSON report; test_browser.py judges it.
"""

from __future__ import annotations

import functools
import http.server
import json
import re
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio
from playwright.sync_api import Page, sync_playwright

from signald import Server
from signald._config import structure

from ._browser_call import CHROMIUM, CHROMIUM_ARGS, POLL_MS, WAIT_MS, bring_up_loopback

PROTOCOL = Path(__file__).parent.parent / "docs" / "protocol.md"
ROOM = "snippet-test"
ORIGINAL_URL = "'ws://localhost:3000/ws'"

#: One remote video playing, over a connected RTCPeerConnection, with the camera on.
IN_CALL = """() => peers.size === 1 && [...peers.values()].every((pc) => pc.connectionState === 'connected')
    && document.querySelectorAll('#remotes video').length === 1
    && document.querySelector('#remotes video').videoWidth > 0
    && localStream?.getTracks().every((track) => track.readyState === 'live')"""
ALONE = "() => peers.size === 0 && document.querySelectorAll('#remotes video').length === 0"
#: After leave(): the socket closed, the camera stopped, nothing left of the call.
LEFT = """() => ws === null && window.before.ws.readyState === WebSocket.CLOSED
    && window.before.tracks.every((track) => track.readyState === 'ended')
    && localStream === null && document.getElementById('local').srcObject === null
    && peers.size === 0 && document.querySelectorAll('#remotes video').length === 0"""
#: Remember the call's socket and camera tracks, to look at them after it has ended.
REMEMBER = "() => { window.before = { ws, tracks: localStream.getTracks() }; }"
PEER_IDS = "() => [...peers.keys()]"
LEAVE_AND_JOIN_TWICE = """() => {
    document.getElementById('leave').click();
    document.getElementById('join').click();
    document.getElementById('join').click();
}"""
#: The old socket's handlers, fired late: a user-left for the member bob is now calling, and the close.
LATE_EVENTS = """async () => {
    const old = window.before.ws;
    const stale = { type: 'user-left', roomId: 'ROOM', peerId: [...peers.keys()][0], username: 'alice' };
    old.onmessage(new MessageEvent('message', { data: JSON.stringify(stale) }));
    old.onclose(new CloseEvent('close', { code: 1006 }));
    await new Promise((resolve) => setTimeout(resolve, 0));   // a task later: the message queue's promises have run
}""".replace("ROOM", ROOM)
#: What the failure message shows when a wait times out.
STATE = """() => ({ ws: ws?.readyState, peers: [...peers.values()].map((pc) => pc.connectionState),
    videos: [...document.querySelectorAll('#remotes video')].map((v) => v.videoWidth),
    camera: localStream?.getTracks().map((track) => track.readyState) })"""


def snippet(language: str) -> str:
    """Section 8's one code block in ``language``."""
    text = PROTOCOL.read_text()
    section = text[text.index("## 8. Browser snippet") : text.index("## 9. REST API")]
    blocks = re.findall(rf"^```{language}\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, f"section 8 should have one {language} block, has {len(blocks)}"
    return blocks[0]


def wait(page: Page, condition: str) -> None:
    try:
        page.wait_for_function(condition, polling=POLL_MS, timeout=WAIT_MS)
    except Exception:
        state = page.evaluate(STATE)
        raise AssertionError(f"{page.url}: never true: {condition}; page state: {state}") from None


def open_page(page: Page, base_url: str, name: str) -> None:
    page.bring_to_front()
    page.goto(f"{base_url}call.html", wait_until="load")
    page.fill("#room", ROOM)
    page.fill("#name", name)


def write_site(directory: Path, port: int) -> None:
    """call.html and call.js from section 8, pointed at signald on ``port``."""
    script = snippet("js")
    assert script.count(ORIGINAL_URL) == 1
    directory.mkdir()
    (directory / "call.js").write_text(script.replace(ORIGINAL_URL, f"'ws://127.0.0.1:{port}/ws'"))
    (directory / "call.html").write_text(snippet("html"))
    (directory / "favicon.ico").write_bytes(b"")  # what browsers ask every site for: not a 404 in the console


@contextmanager
def web_server(directory: Path) -> Iterator[str]:
    """A static web server for ``directory`` on 127.0.0.1; its base URL."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    with http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{httpd.server_address[1]}/"
        finally:
            httpd.shutdown()
            thread.join()


def drive(base_url: str, outdir: Path) -> dict[str, Any]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(outdir / "chromium-profile"), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            alice, bob = browser.new_page(), browser.new_page()
            bob.route("**/api/ice-servers", lambda route: route.fulfill(status=503, body="down"))
            console: dict[str, list[tuple[str, str]]] = {"alice": [], "bob": []}
            errors: list[str] = []
            for name, page in (("alice", alice), ("bob", bob)):
                page.on("console", lambda message, name=name: console[name].append((message.type, message.text)))
                page.on("pageerror", lambda error: errors.append(str(error)))
            report: dict[str, Any] = {}

            # Call.
            for name, page in (("alice", alice), ("bob", bob)):
                open_page(page, base_url, name)
                page.click("#join")
            for page in (alice, bob):
                wait(page, IN_CALL)
            first_bob = alice.evaluate(PEER_IDS)

            # Leave: bob's socket closes, his camera stops, and alice is told.
            bob.bring_to_front()
            bob.evaluate(REMEMBER)
            bob.click("#leave")
            wait(bob, LEFT)
            wait(alice, ALONE)
            report["left"] = True

            # Rejoin, and call again.
            bob.click("#join")
            for page in (alice, bob):
                wait(page, IN_CALL)
            second_bob = alice.evaluate(PEER_IDS)

            # Leave and join again at once, and a second Join before the first has its camera: one
            # call, not two. Then the old socket's events arrive late, as after a network drop: a
            # stale user-left for alice, and the close. Neither may end the new call.
            bob.evaluate(REMEMBER)
            bob.evaluate(LEAVE_AND_JOIN_TWICE)
            for page in (alice, bob):
                wait(page, IN_CALL)
            wait(bob, "() => window.before.ws.readyState === WebSocket.CLOSED && ws !== window.before.ws")
            bob.evaluate(LATE_EVENTS)
            report["still_in_call_after_old_socket_closed"] = bob.evaluate(IN_CALL)
            third_bob = alice.evaluate(PEER_IDS)

            report["bob_peer_ids_seen_by_alice"] = [first_bob, second_bob, third_bob]
            report["console"] = console
            report["page_errors"] = errors
            return report
        finally:
            browser.close()


async def main(outdir: Path) -> None:
    interfaces = bring_up_loopback()
    server = Server(structure({"server": {"host": "127.0.0.1", "port": 0}}))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        assert server.port
        write_site(outdir / "site", server.port)
        with web_server(outdir / "site") as base_url:
            report = await trio.to_thread.run_sync(drive, base_url, outdir)
        server.shutdown()
    print(json.dumps({"interfaces": interfaces, **report}))


if __name__ == "__main__":
    trio.run(main, Path(sys.argv[1]))
