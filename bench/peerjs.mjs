// PeerJS's server (npm "peer", installed into bench/.peerjs by bench/run), for the benchmark:
// its own defaults, except that it listens on 127.0.0.1 only, logs nothing per connection
// (its CLI logs every connect and disconnect), and lifts the 5,000-client cap and the 60 s
// heartbeat timeout that would otherwise cut scenario C short.
// Run: node bench/peerjs.mjs --port 3000
import { createRequire } from "node:module";

const require = createRequire(new URL("./.peerjs/", import.meta.url));
const { PeerServer } = require("peer");

const at = process.argv.indexOf("--port");
const port = Number(at >= 0 ? process.argv[at + 1] : NaN);
if (!Number.isInteger(port)) {
  console.error("usage: node bench/peerjs.mjs --port PORT");
  process.exit(2);
}
const server = PeerServer({ host: "127.0.0.1", port, concurrent_limit: 1_000_000, alive_timeout: 600_000 });
server.on("error", (error) => console.error(`peerjs: ${error}`));
process.on("SIGTERM", () => process.exit(0));
