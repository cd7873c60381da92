"""Real WebRTC stacks complete calls through signald: aiortc peers in a full mesh.

Each peer is what docs/protocol.md tells a client to be: a plain WebSocket client (the
``websockets`` library) that joins a room and follows the offerer rule (whoever was there
first offers when it hears ``user-joined``; the newcomer answers), handles signaling messages
one at a time, and relays ICE candidates. Every pair then opens a data channel and
round-trips a message over it.

aiortc is asyncio, so it runs in a worker thread with its own event loop while signald runs
on trio in the test's thread. The peers share nothing but signald.

**Trickle ICE with aiortc.** aiortc has no ``icecandidate`` event: ``setLocalDescription``
returns only once gathering is complete, with every candidate written into the SDP as
``a=candidate`` lines (plus ``a=end-of-candidates``). To make these peers signal the way
browsers do, each one takes its candidates *out* of the SDP before sending it and sends them
as ``ice-candidate`` messages after the offer or answer, then ``candidate: null``. The other
side feeds them to ``addIceCandidate``. The SDP that crosses signald carries no candidates,
so a call can only connect if signald relayed them.

**Loopback only.** aioice offers every interface's address except loopback; the tests
make it offer exactly 127.0.0.1 (host candidates, no STUN/TURN), so media stays on this machine.

**Through TURN.** The last tests put a real coturn (``_coturn``) between the peers: signald
mints each member TURN credentials in ``joined-room``, and the peers use only those, with
``iceTransportPolicy`` "relay", so they offer no host candidate and every byte between them
goes through coturn's relays. With a secret coturn does not share, they cannot connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aioice.ice
import attrs
import pytest
import trio
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.sdp import candidate_from_sdp
from websockets.asyncio.client import ClientConnection, connect

from signald import Server

from ._coturn import run_coturn

#: Seconds for a whole scenario, inside the asyncio thread; the trio side allows a little more.
SCENARIO_TIMEOUT = 15
#: How long a call that must not connect is watched: on loopback a good one connects in well under a second.
NO_CONNECTION_SECONDS = 3


@pytest.fixture(autouse=True)
def loopback_candidates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aioice.ice, "get_host_addresses", lambda use_ipv4, use_ipv6: ["127.0.0.1"])


def split_candidates(sdp: str) -> tuple[str, list[dict[str, Any]]]:
    """The SDP without its candidate lines, and those candidates as RTCIceCandidateInit dicts."""
    kept: list[str] = []
    found: list[tuple[str, int]] = []
    mids: dict[int, str] = {}
    mline = -1
    for line in sdp.splitlines():
        if line.startswith("m="):
            mline += 1
        elif line.startswith("a=mid:"):
            mids[mline] = line.removeprefix("a=mid:")
        if line.startswith("a=candidate:"):
            found.append((line.removeprefix("a="), mline))
        elif line != "a=end-of-candidates":
            kept.append(line)
    candidates = [{"candidate": text, "sdpMid": mids[index], "sdpMLineIndex": index} for text, index in found]
    return "\r\n".join(kept) + "\r\n", candidates


@attrs.define
class Peer:
    """One participant: a WebSocket to signald and an RTCPeerConnection per other member."""

    name: str
    ws: ClientConnection
    #: Only TURN relays: iceTransportPolicy "relay", with the iceServers from joined-room.
    relay_only: bool = False
    peer_id: str = ""
    ice_servers: list[dict[str, Any]] = attrs.field(factory=list)
    pcs: dict[str, RTCPeerConnection] = attrs.field(factory=dict)
    #: Everything this peer sent through signald, for the assertions.
    sent: list[dict[str, Any]] = attrs.field(factory=list)
    #: Messages from the other end of each data channel, keyed by the other peer's name.
    heard: dict[str, str] = attrs.field(factory=dict)
    joined: asyncio.Event = attrs.field(factory=asyncio.Event)

    async def send(self, **message: Any) -> None:
        self.sent.append(message)
        await self.ws.send(json.dumps(message))

    async def listen(self, on_progress: Callable[[], None]) -> None:
        """Handle signaling messages strictly one at a time, in arrival order.

        ``on_progress`` is called whenever a reply is heard or a connection changes state.
        """
        async for text in self.ws:
            message = json.loads(text)
            await self.handle(message, on_progress)

    async def handle(self, message: dict[str, Any], on_progress: Callable[[], None]) -> None:
        match message["type"]:
            case "joined-room":  # the newcomer waits for offers
                self.peer_id = message["peerId"]
                self.ice_servers = message.get("iceServers", [])
                self.joined.set()
            case "user-joined":  # we were here first: we offer
                pc = self.connection(message["peerId"], on_progress)
                channel = pc.createDataChannel("chat")
                self.on_reply(channel, message["username"], on_progress)
                await pc.setLocalDescription(await pc.createOffer())
                await self.send_description("webrtc-offer", message["peerId"], pc)
            case "webrtc-offer":
                pc = self.connection(message["from"], on_progress)
                self.on_channel(pc)
                await pc.setRemoteDescription(RTCSessionDescription(message["sdp"], "offer"))
                await pc.setLocalDescription(await pc.createAnswer())
                await self.send_description("webrtc-answer", message["from"], pc)
            case "webrtc-answer":
                await self.pcs[message["from"]].setRemoteDescription(RTCSessionDescription(message["sdp"], "answer"))
            case "ice-candidate":
                init = message["candidate"]
                if init is None:  # end of candidates
                    await self.pcs[message["from"]].addIceCandidate(None)
                    return
                candidate = candidate_from_sdp(init["candidate"].removeprefix("candidate:"))
                candidate.sdpMid, candidate.sdpMLineIndex = init["sdpMid"], init["sdpMLineIndex"]
                await self.pcs[message["from"]].addIceCandidate(candidate)
            case "user-left":
                pc = self.pcs.pop(message["peerId"], None)
                if pc is not None:
                    await pc.close()
            case other:
                raise AssertionError(f"{self.name} got an unexpected {other}: {message}")

    def connection(self, peer_id: str, on_progress: Callable[[], None]) -> RTCPeerConnection:
        assert peer_id not in self.pcs, f"{self.name}: a second connection to {peer_id}"
        if self.relay_only:
            servers = [RTCIceServer(**server) for server in self.ice_servers]
            policy = RTCIceTransportPolicy.RELAY
            pc = RTCPeerConnection(RTCConfiguration(iceServers=servers, iceTransportPolicy=policy))
        else:
            pc = RTCPeerConnection()  # no iceServers: host candidates only
        pc.on("connectionstatechange", on_progress)
        self.pcs[peer_id] = pc
        return pc

    async def send_description(self, kind: str, to: str, pc: RTCPeerConnection) -> None:
        """The offer or answer without candidates, then each candidate, then end-of-candidates."""
        sdp, candidates = split_candidates(pc.localDescription.sdp)
        await self.send(type=kind, to=to, sdp=sdp)
        for candidate in candidates:
            await self.send(type="ice-candidate", to=to, candidate=candidate)
        await self.send(type="ice-candidate", to=to, candidate=None)

    def on_reply(self, channel: RTCDataChannel, other: str, on_heard: Callable[[], None]) -> None:
        """Offerer's side: say hello when the channel opens; the reply completes the round trip."""
        channel.on("open", lambda: channel.send(f"hello {other}, this is {self.name}"))

        @channel.on("message")
        def reply(text: str) -> None:
            self.heard[other] = text
            on_heard()

    def on_channel(self, pc: RTCPeerConnection) -> None:
        """Answerer's side: answer each message on the offerer's channel."""

        @pc.on("datachannel")
        def opened(channel: RTCDataChannel) -> None:
            @channel.on("message")
            def echo(text: str) -> None:
                channel.send(f"{self.name} heard: {text}")


async def mesh_call(port: int, names: list[str], relay_only: bool = False, connects: bool = True) -> dict[str, Peer]:
    """Join ``names`` in order, wait until every pair has round-tripped a message, hang up.

    With ``connects`` False, wait ``NO_CONNECTION_SECONDS`` instead and require that no
    connection got through meanwhile: aiortc reports nothing when ICE has no pair to try.
    """
    pairs = len(names) * (len(names) - 1) // 2
    peers: dict[str, Peer] = {}
    all_heard, any_connected = asyncio.Event(), asyncio.Event()

    def on_progress() -> None:
        if sum(len(peer.heard) for peer in peers.values()) == pairs:
            all_heard.set()
        if any(pc.connectionState == "connected" for peer in peers.values() for pc in peer.pcs.values()):
            any_connected.set()

    async with asyncio.timeout(SCENARIO_TIMEOUT), asyncio.TaskGroup() as tasks:
        for name in names:
            ws = await connect(f"ws://127.0.0.1:{port}/ws")
            peer = peers[name] = Peer(name, ws, relay_only)
            tasks.create_task(peer.listen(on_progress))  # if it fails, the TaskGroup cancels us
            await peer.send(type="join-room", roomId="mesh", username=name)
            # The next person arrives only after this one is in: the order decides who offers.
            await peer.joined.wait()
        if connects:
            await all_heard.wait()
        else:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(NO_CONNECTION_SECONDS):
                    await any_connected.wait()
            assert not any_connected.is_set()
        for peer in peers.values():
            assert len(peer.pcs) == len(names) - 1, peer.name  # a full mesh
            if connects:
                assert {pc.connectionState for pc in peer.pcs.values()} == {"connected"}, peer.name
        for peer in peers.values():  # hang up: the others see user-left and close their side
            await peer.ws.close()
            for pc in peer.pcs.values():
                await pc.close()
    return peers


async def run_mesh(port: int, names: list[str], relay_only: bool = False, connects: bool = True) -> dict[str, Peer]:
    call = mesh_call(port, names, relay_only, connects)
    with trio.fail_after(SCENARIO_TIMEOUT + 5):
        # abandon_on_cancel: if asyncio's own timeout somehow failed, fail the test anyway.
        return await trio.to_thread.run_sync(asyncio.run, call, abandon_on_cancel=True)


def check_signaling(peers: dict[str, Peer], names: list[str], kind: str = "host") -> None:
    """The messages each peer sent follow the documented flow."""
    ids = {name: peers[name].peer_id for name in names}
    for position, name in enumerate(names):
        sent = peers[name].sent
        offered_to = {m["to"] for m in sent if m["type"] == "webrtc-offer"}
        answered = {m["to"] for m in sent if m["type"] == "webrtc-answer"}
        assert offered_to == {ids[later] for later in names[position + 1 :]}, name  # offerer rule
        assert answered == {ids[earlier] for earlier in names[:position]}, name
        for m in sent:
            if "sdp" in m:
                assert "a=candidate" not in m["sdp"] and "a=ice-ufrag" in m["sdp"]
        for to in offered_to | answered:
            trickled = [m["candidate"] for m in sent if m["type"] == "ice-candidate" and m["to"] == to]
            assert trickled[-1] is None and trickled.count(None) == 1, (name, trickled)
            assert trickled[:-1], f"{name} sent no candidate to {to}"
            assert all(" 127.0.0.1 " in c["candidate"] and f" typ {kind}" in c["candidate"] for c in trickled[:-1])
        assert Counter(m["type"] for m in sent)["join-room"] == 1


async def test_two_aiortc_peers_open_a_data_channel(server: Server) -> None:
    assert server.port
    peers = await run_mesh(server.port, ["alice", "bob"])
    check_signaling(peers, ["alice", "bob"])
    assert peers["alice"].heard == {"bob": "bob heard: hello bob, this is alice"}


async def test_three_aiortc_peers_full_mesh(server: Server) -> None:
    assert server.port
    names = ["alice", "bob", "carol"]
    peers = await run_mesh(server.port, names)
    check_signaling(peers, names)
    # Each pair's earlier member offered, opened the channel, and heard the reply.
    assert peers["alice"].heard == {
        "bob": "bob heard: hello bob, this is alice",
        "carol": "carol heard: hello carol, this is alice",
    }
    assert peers["bob"].heard == {"carol": "carol heard: hello carol, this is bob"}
    assert peers["carol"].heard == {}


TURN_SECRET = "shared-with-coturn-0123456789"


async def test_two_aiortc_peers_connect_only_through_turn(server_factory: Any, tmp_path: Path) -> None:
    with run_coturn(TURN_SECRET, tmp_path) as coturn:
        server = await server_factory(ice={"turn_urls": [coturn.url], "turn_secret": TURN_SECRET})
        peers = await run_mesh(server.port, ["alice", "bob"], relay_only=True)
    check_signaling(peers, ["alice", "bob"], kind="relay")  # no host candidate was even offered
    assert peers["alice"].heard == {"bob": "bob heard: hello bob, this is alice"}
    log = coturn.log.read_text()
    for peer in peers.values():
        (turn,) = peer.ice_servers  # joined-room's, with credentials of its own
        assert turn["urls"] == [coturn.url] and turn["username"].endswith(f":{peer.peer_id}")
        assert f"user <{turn['username']}>: incoming packet ALLOCATE processed, success" in log


async def test_with_a_secret_coturn_does_not_share_peers_cannot_connect(server_factory: Any, tmp_path: Path) -> None:
    with run_coturn(TURN_SECRET, tmp_path) as coturn:
        server = await server_factory(ice={"turn_urls": [coturn.url], "turn_secret": "not-the-secret-coturn-has"})
        peers = await run_mesh(server.port, ["alice", "bob"], relay_only=True, connects=False)
    log = coturn.log.read_text()
    for peer in peers.values():
        assert peer.heard == {}
        # Signaling went through (offer, answer, end-of-candidates), but no relay was granted,
        # so there was no candidate to send and no pair to try.
        assert [m["type"] for m in peer.sent][1:] == [peer.sent[1]["type"], "ice-candidate"], peer.sent
        assert peer.sent[-1]["candidate"] is None
        (turn,) = peer.ice_servers
        assert f"user <{turn['username']}>: incoming packet message processed, error 401: Unauthorized" in log
        assert f"user <{turn['username']}>: incoming packet ALLOCATE processed, success" not in log
