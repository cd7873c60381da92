// signald demo client, and the reference browser client for docs/protocol.md.
//
// It uses nothing but the browser: one WebSocket to signald for signaling, one
// RTCPeerConnection per other participant (a full mesh), and the call flow the protocol
// documents:
//
//   * the offerer rule: whoever was already in the room sends the offer when it hears
//     `user-joined`; the newcomer only answers. Exactly one side of each pair offers, so
//     offers never collide and no "perfect negotiation" is needed;
//   * trickle ICE: every candidate is sent as its own `ice-candidate` message as soon as the
//     browser finds it, and `candidate: null` says there are no more;
//   * STUN/TURN servers come from the server's configuration (GET /api/ice-servers, then the
//     member's own TURN credentials in joined-room when ice.turn_secret is set), so an operator
//     adds TURN in signald.toml without touching this page.
//
// Incoming messages are handled strictly one at a time (see `inbox`): an ICE candidate must
// never be applied while the offer or answer before it is still being set.
//
// A network blip does not end the call. The media flows between the browsers, so it usually
// survives; only the WebSocket to signald breaks. Then this page reconnects and sends `resume`
// with the `resumeToken` signald gave it: it keeps its peer id, receives what it missed, and
// the others never see it leave (see `lost`). Messages it sends meanwhile wait in `outbox`.

const $ = (id) => document.getElementById(id);

// --- The current call. `leave()` resets all of it. ------------------------------------------

let ws = null;              // the WebSocket to signald
let localStream = null;     // our camera and microphone
let iceServers = [];        // RTCIceServer dictionaries from GET /api/ice-servers
let roomId = null;
let myPeerId = null;        // set by joined-room: we are in the room
const peers = new Map();    // peerId -> { username, tile, pc (null until a call starts) }
let inbox = Promise.resolve();  // the tail of the queue of incoming messages
let resumeToken = null;     // our secret for taking the session back after a blip; never shown
let resumeGrace = 0;        // seconds signald keeps our place after the connection is lost
let reconnecting = null;    // while the connection is lost: { until, attempt, timer }
let outbox = [];            // messages sent while reconnecting, sent once we have resumed

// Seconds between application-level pings. A connection that dies silently (Wi-Fi gone, a
// laptop lid closed) fires no event for minutes; a ping left unanswered this long reveals it.
const HEARTBEAT_SECONDS = 10;
// Close codes after which the session is over and resuming is pointless (docs/protocol.md).
const SESSION_ENDED = [1000, 1008, 1009, 4001];

// --- Plain words for what can go wrong. -----------------------------------------------------

// Error codes from docs/protocol.md, section 4. The connection stays open after each.
function describeError(msg) {
  switch (msg.code) {
    case 'room-full': return `The room "${roomId}" is full. Try another room name.`;
    case 'room-not-found': return `There is no room called "${roomId}". This server only lets you join rooms created in advance.`;
    case 'invalid-message': return `The server did not accept that: ${msg.message}.`;
    case 'resume-failed': return `The connection to the server was lost and the call could not be resumed (${msg.message}). Join again.`;
    default: return `The server said: ${msg.message} (${msg.code}).`;
  }
}

// WebSocket close codes (docs/protocol.md, section 1). 1000 is our own leave().
function describeClose(event, wasOpen) {
  if (!wasOpen) return 'Could not reach the signaling server. Is signald running, and does its cors.allowed_origins allow this page?';
  switch (event.code) {
    case 1001: return 'The server is restarting or dropped the connection. Join again in a moment.';
    case 1008: return 'The server disconnected this page because it fell too far behind. Join again.';
    case 1009: return 'A message was too large for the server.';
    case 4001: return 'This call continues in another tab or on another device.';
    default: return `Lost the connection to the server (code ${event.code}${event.reason ? `: ${event.reason}` : ''}).`;
  }
}

// getUserMedia failures, by DOMException name.
function describeMediaError(err) {
  switch (err.name) {
    case 'NotAllowedError': return 'Camera access was blocked. Allow the camera for this page (the icon in the address bar) and try again.';
    case 'NotFoundError': return 'No camera or microphone was found.';
    case 'NotReadableError': return 'The camera is in use by another program, or could not be started.';
    default: return `Could not start the camera: ${err.message}`;
  }
}

// Per-peer connection state, shown on each tile (RTCPeerConnection.connectionState).
const STATE_TEXT = {
  waiting: 'waiting for their call…',
  new: 'starting…',
  connecting: 'connecting…',
  connected: 'connected',
  disconnected: 'interrupted, reconnecting…',
  failed: 'could not connect (a TURN server may be needed)',
  closed: 'closed',
};

function showStatus(text, isError = false) {
  $('status').textContent = text;
  $('status').classList.toggle('error', isError);
}

// --- Joining and leaving. -------------------------------------------------------------------

async function join(event) {
  event.preventDefault();
  const button = $('lobby').querySelector('button');
  if (button.disabled) return;
  button.disabled = true;  // until joined-room, or leave() after a failure
  const username = $('username').value;
  roomId = $('room').value;
  try {
    // Browsers only offer the camera to secure pages: https://, or http://localhost.
    if (!navigator.mediaDevices) {
      throw new Error('Camera access needs a secure page: open this page over https://, or at http://localhost.');
    }
    showStatus('Asking for your camera and microphone…');
    try {
      localStream = await navigator.mediaDevices.getUserMedia({ video: true, audio: true });
    } catch (err) {
      throw new Error(describeMediaError(err));
    }
    $('local-video').srcObject = localStream;

    const response = await fetch('/api/ice-servers');
    if (!response.ok) throw new Error(`Could not load the STUN/TURN settings (HTTP ${response.status}).`);
    ({ iceServers } = await response.json());

    showStatus('Connecting to the server…');
    connect({ type: 'join-room', roomId, username, requestId: 'join' });
    history.replaceState(null, '', `?room=${encodeURIComponent(roomId)}`);  // a link to share
  } catch (err) {
    leave();
    showStatus(err.message, true);
  }
}

// Opens the WebSocket and sends `first` on it: join-room, or resume after a blip.
function connect(first) {
  // Same host and port as this page; wss:// when the page came over https:// (TLS proxy).
  const url = new URL('/ws', location.href);
  url.protocol = location.protocol === 'https:' ? 'wss:' : 'ws:';
  const socket = new WebSocket(url);
  let wasOpen = false;
  let pingUnanswered = false;
  let heartbeat = null;
  ws = socket;

  socket.onopen = () => {
    wasOpen = true;
    socket.send(JSON.stringify(first));
    heartbeat = setInterval(() => {
      if (ws !== socket) {
        clearInterval(heartbeat);
      } else if (pingUnanswered) {
        socketGone(socket, { code: 4000, reason: 'no pong' });
        socket.close(4000, 'no pong');  // signald keeps our place for any code but 1000/1001
      } else {
        pingUnanswered = true;
        socket.send(JSON.stringify({ type: 'ping', requestId: 'heartbeat' }));
      }
    }, HEARTBEAT_SECONDS * 1000);
  };
  socket.onmessage = (event) => {
    pingUnanswered = false;  // anything at all shows the connection is alive
    const msg = JSON.parse(event.data);
    // Chain onto the queue: each message is handled after the previous one has finished.
    // Messages still queued from a socket we have since left are dropped.
    inbox = inbox
      .then(() => (ws === socket ? handle(msg) : undefined))
      .catch((err) => console.error('signaling:', msg.type, err));
  };
  socket.onclose = (event) => {
    clearInterval(heartbeat);
    socketGone(socket, event, wasOpen);
  };
}

// The WebSocket has closed or gone silent. In a call, that is a blip: take the session back.
function socketGone(socket, event, wasOpen = true) {
  if (ws !== socket) return;  // we closed it ourselves, in leave() or for a missed heartbeat
  if (reconnecting) {
    retry();  // this attempt failed as well
  } else if (myPeerId && resumeToken && !SESSION_ENDED.includes(event.code)) {
    lost();
  } else {
    leave();
    showStatus(describeClose(event, wasOpen), true);
  }
}

// Reconnect at once, then with backoff, for as long as signald keeps our place.
function lost() {
  ws = null;
  reconnecting = { until: Date.now() + resumeGrace * 1000, attempt: 0, timer: null };
  showStatus('The connection to the server was lost. Reconnecting…');
  retry();
}

function retry() {
  ws = null;
  if (Date.now() >= reconnecting.until) {
    leave();
    showStatus('The connection to the server was lost, and did not come back in time. Join again.', true);
    return;
  }
  const delay = reconnecting.attempt === 0 ? 0 : Math.min(250 * 2 ** reconnecting.attempt, 4000);
  reconnecting.attempt += 1;
  reconnecting.timer = setTimeout(() => connect({ type: 'resume', token: resumeToken, requestId: 'resume' }), delay);
}

function send(msg) {
  if (reconnecting) {
    outbox.push(msg);  // e.g. ICE candidates found during the blip: sent once resumed
  } else {
    ws.send(JSON.stringify(msg));
  }
}

function leave() {
  if (myPeerId && !reconnecting && ws?.readyState === WebSocket.OPEN) {
    send({ type: 'leave-room' });  // no reply; the others get user-left
  }
  ws?.close(1000);  // closing with 1000 alone would also leave the room at once
  ws = null;
  myPeerId = null;
  clearTimeout(reconnecting?.timer);
  reconnecting = null;
  resumeToken = null;
  outbox = [];
  for (const peerId of [...peers.keys()]) removePeer(peerId);
  localStream?.getTracks().forEach((track) => track.stop());
  localStream = null;
  $('call').hidden = true;
  $('lobby').hidden = false;
  $('lobby').querySelector('button').disabled = false;
  showStatus('');
}

// --- Signaling messages, one at a time. -----------------------------------------------------

async function handle(msg) {
  switch (msg.type) {
    case 'joined-room':
      // We are the newcomer: everyone listed will call us, so we only prepare their tiles.
      myPeerId = msg.peerId;
      ({ resumeToken, resumeGrace } = msg);
      if (msg.iceServers) iceServers = msg.iceServers;  // with TURN credentials of our own
      $('lobby').hidden = true;
      $('call').hidden = false;
      $('room-name').textContent = msg.roomId;
      showStatus(msg.participants.length ? '' : 'You are the first one here. Waiting for others to join…');
      for (const { peerId, username } of msg.participants) addPeer(peerId, username);
      break;

    case 'resumed':
      // Back after a blip, with the same peer id. The `missed` messages that follow are
      // handled like any others, and bring our picture of the room up to date.
      ({ resumeToken, resumeGrace } = msg);
      if (msg.iceServers) iceServers = msg.iceServers;  // fresh TURN credentials, as in joined-room
      reconnecting = null;
      for (const queued of outbox) send(queued);
      outbox = [];
      showStatus('Reconnected.');
      break;

    case 'user-joined': {
      // We were here first: the offerer rule says we call the newcomer.
      showStatus('');
      addPeer(msg.peerId, msg.username);
      const pc = startConnection(msg.peerId);
      await pc.setLocalDescription();  // creates the offer
      send({ type: 'webrtc-offer', to: msg.peerId, sdp: pc.localDescription.sdp });
      break;
    }

    case 'webrtc-offer': {
      // Someone who was here before us calls: answer. (signald introduces every peer, by
      // joined-room or user-joined, before relaying anything from it.)
      if (!peers.has(msg.from)) break;
      const pc = peers.get(msg.from).pc ?? startConnection(msg.from);
      await pc.setRemoteDescription({ type: 'offer', sdp: msg.sdp });
      await pc.setLocalDescription();  // creates the answer
      send({ type: 'webrtc-answer', to: msg.from, sdp: pc.localDescription.sdp });
      break;
    }

    case 'webrtc-answer':
      await peers.get(msg.from)?.pc?.setRemoteDescription({ type: 'answer', sdp: msg.sdp });
      break;

    case 'ice-candidate': {
      // null is end-of-candidates, which addIceCandidate() with no argument signals.
      const pc = peers.get(msg.from)?.pc;
      if (pc) await (msg.candidate ? pc.addIceCandidate(msg.candidate) : pc.addIceCandidate());
      break;
    }

    case 'user-left':
      removePeer(msg.peerId);
      if (peers.size === 0) showStatus('Everyone else has left. Waiting for others to join…');
      break;

    case 'error':
      if (msg.code === 'peer-not-found') break;  // a message crossed a peer's departure: harmless
      // The join failed, or the resume after a blip did: back to the lobby.
      if (msg.requestId === 'join' || msg.requestId === 'resume') leave();
      showStatus(describeError(msg), true);
      break;
  }
}

// --- One RTCPeerConnection per other participant. -------------------------------------------

function startConnection(peerId) {
  const peer = peers.get(peerId);
  const pc = new RTCPeerConnection({ iceServers });
  peer.pc = pc;
  for (const track of localStream.getTracks()) pc.addTrack(track, localStream);

  // Trickle ICE: each candidate goes out as soon as it is found; null means "no more".
  pc.onicecandidate = ({ candidate }) => send({ type: 'ice-candidate', to: peerId, candidate });

  pc.ontrack = ({ streams }) => {
    peer.tile.querySelector('video').srcObject = streams[0];
  };

  // The tile shows the overall state in words; data-ice-state is the raw ICE state, for
  // anyone inspecting the page (the browser test waits on it).
  pc.onconnectionstatechange = () => setTileState(peer.tile, pc.connectionState);
  pc.oniceconnectionstatechange = () => {
    peer.tile.dataset.iceState = pc.iceConnectionState;
  };
  setTileState(peer.tile, pc.connectionState);
  return pc;
}

// --- The video grid. ------------------------------------------------------------------------

function addPeer(peerId, username) {
  const tile = document.createElement('figure');
  tile.className = 'tile';
  tile.dataset.peerId = peerId;
  const video = document.createElement('video');
  video.className = 'remote';
  video.autoplay = true;
  video.playsInline = true;
  const caption = document.createElement('figcaption');
  const name = document.createElement('span');
  name.className = 'name';
  name.textContent = username;  // textContent, never innerHTML: names are arbitrary text
  const state = document.createElement('span');
  state.className = 'state';
  caption.append(name, state);
  tile.append(video, caption);
  $('grid').append(tile);
  peers.set(peerId, { username, tile, pc: null });
  setTileState(tile, 'waiting');
}

function setTileState(tile, state) {
  tile.dataset.state = state;
  tile.querySelector('.state').textContent = STATE_TEXT[state] ?? state;
}

function removePeer(peerId) {
  const peer = peers.get(peerId);
  if (!peer) return;
  peer.pc?.close();
  peer.tile.remove();
  peers.delete(peerId);
}

// --- Start-up. ------------------------------------------------------------------------------

$('lobby').addEventListener('submit', join);
$('leave').addEventListener('click', leave);
window.addEventListener('pagehide', leave);  // closing the tab leaves the room cleanly
const sharedRoom = new URLSearchParams(location.search).get('room');
if (sharedRoom) $('room').value = sharedRoom;
