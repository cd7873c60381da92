"""The demo page in real Chromium: two tabs hold a video call through signald.

The call runs in ``_browser_call.py``, in a private network namespace where loopback is the
only interface (see its docstring); this test judges its report. Chromium comes from
Debian (``scripts/install-chromium``, run by ``scripts/test``). A missing Chromium fails this
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
#: Chromium starts in about a second and the call connects in about two; this bounds a hang.
TIMEOUT = 60


async def run_call(outdir: Path) -> dict[str, Any]:
    assert await trio.Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: scripts/test installs it (apt-get, as root)"
    unshare = shutil.which("unshare")
    assert unshare is not None, "unshare (util-linux) is needed to give the browser a loopback-only network"
    with trio.fail_after(TIMEOUT):
        done = await trio.run_process(
            [unshare, "--net", "--map-root-user", sys.executable, str(CALL_SCRIPT), str(outdir)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
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
