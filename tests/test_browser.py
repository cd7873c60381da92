"""The demo page, and docs/protocol.md's browser snippet, in real Chromium through signald.

Each call runs in a script (``_browser_call.py``, ``_snippet_call.py``), in a private network
namespace where loopback is the only interface (see their docstrings); these tests judge its report. Chromium comes from
Debian (``scripts/install-test-packages``, run by ``scripts/test``). A missing Chromium fails this
test rather than skipping it: the browser is the product's proof.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import trio

from ._browser_call import CHROMIUM

CALL_SCRIPT = Path(__file__).with_name("_browser_call.py")
ROOT = Path(__file__).parent.parent
#: Chromium starts in about a second and the call connects in about two; this bounds a hang.
TIMEOUT = 60


async def run_call(outdir: Path, *script: str) -> dict[str, Any]:
    """Run ``script`` (``python`` arguments; the demo page call by default) with OUTDIR; its report."""
    assert await trio.Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: scripts/test installs it (apt-get, as root)"
    unshare = shutil.which("unshare")
    assert unshare is not None, "unshare (util-linux) is needed to give the browser a loopback-only network"
    with trio.fail_after(TIMEOUT):
        done = await trio.run_process(
            [unshare, "--net", "--map-root-user", sys.executable, *(script or [str(CALL_SCRIPT)]), str(outdir)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            cwd=ROOT,
        )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-4000:]
    return json.loads(done.stdout)


async def test_two_tabs_call_each_other_through_the_demo_page(tmp_path: Path) -> None:
    report = await run_call(tmp_path)
    assert report["interfaces"] == ["lo"]  # so all media went over 127.0.0.1

    for me, other in (("alice", "bob"), ("bob", "alice")):
        page = report[me]
        assert page["ice_state"] in ("connected", "completed"), (me, page)
        assert page["state_text"] == "connected"
        assert page["peer_name"] == other
        first, later = page["first"], page["later"]
        assert first["width"] > 0 and first["height"] > 0, (me, first)
        assert not later["paused"]
        assert later["time"] >= first["time"] + 0.5, (me, first, later)  # the remote video plays
        assert later["frames"] > first["frames"], (me, first, later)

    # Alice's WebSocket was cut mid-call: her tab resumed by itself, nobody hung up, video plays on.
    blip = report["blip"]
    assert blip["cut"] >= 1 and blip["reconnections"] >= 1, blip
    for me in ("alice", "bob"):
        page = blip[me]
        assert page["same_tile"] and page["same_peer"], (me, page)
        assert page["state_text"] == "connected", (me, page)
        assert page["after"]["time"] >= page["before"]["time"] + 1.0, (me, page)
        assert page["after"]["frames"] > page["before"]["frames"], (me, page)
    assert blip["alice"]["status"] == "Reconnected."
    assert blip["bob"]["status"] == ""  # bob was told nothing

    # Errors from the server reach the person in plain words; leaving updates the others.
    assert report["carol_status"] == 'The room "browser-test" is full. Try another room name.'
    assert report["carol_lobby_visible"]
    assert report["alice_status_after_leave"].startswith("Everyone else has left")
    assert report["bob_lobby_visible"]
    # Turned away while full, carol retries from the same page once bob has left.
    assert (report["carol_retry_peer"], report["alice_new_peer"]) == ("alice", "carol")
    assert report["console_errors"] == []

    assert (tmp_path / "call.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")  # alice's tab, mid-call


async def test_protocol_snippet_calls_leaves_rejoins_and_calls_again(tmp_path: Path) -> None:
    report = await run_call(tmp_path, "-m", "tests._snippet_call")
    assert report["interfaces"] == ["lo"]
    assert report["left"]  # bob's leave() closed his socket, stopped his camera, and alice was told
    assert report["still_in_call_after_old_socket_closed"]
    first, second, third = report["bob_peer_ids_seen_by_alice"]
    assert len(first) == len(second) == len(third) == 1 and len({*first, *second, *third}) == 3  # a new peer each time
    assert report["page_errors"] == []  # no uncaught exception, no unhandled rejection
    # bob's /api/ice-servers answered 503 on each of his four joins: Chromium reports the failed
    # load, and the snippet carries on with host candidates.
    failed = "Failed to load resource: the server responded with a status of 503 (Service Unavailable)"
    expected = {"alice": [], "bob": [failed] * 4}
    for name, messages in report["console"].items():
        assert [text for kind, text in messages if kind == "error"] == expected[name], name
    warnings = [text for kind, text in report["console"]["bob"] if kind == "warning"]
    assert warnings == ["no STUN/TURN servers from signald: HTTP 503"] * 4
