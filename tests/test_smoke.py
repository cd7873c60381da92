from signald import Server

from ._clients import connect, http_request


async def test_two_peers_relay(server: Server) -> None:
    assert server.port
    async with connect(server.port) as a, connect(server.port) as b:
        await a.join("r1", "alice")
        joined = await b.join("r1", "bob")
        assert joined["participants"] == [{"peerId": a.peer_id, "username": "alice"}]
        await a.expect("user-joined", peerId=b.peer_id, username="bob")
        await a.send(type="webrtc-offer", to=b.peer_id, sdp="v=0")
        msg = await b.recv()
        assert msg == {"type": "webrtc-offer", "from": a.peer_id, "sdp": "v=0"}
    status, _, body = await http_request(server.port, "GET", "/health")
    assert status == 200 and body["status"] == "healthy"
