// wshub/static/wshub.js against a real hub, under Node's test runner.
//
// tests/test_js_client.py starts `python -m wshub serve`, then runs
//     WSHUB_WS_URL=ws://127.0.0.1:PORT/api/ws WSHUB_API_URL=http://127.0.0.1:PORT \
//         node --test tests/js/client_test.mjs
// For the restart test this script prints a line `RESTART` and creates the file named by
// WSHUB_RESTART_FILE; the Python side, which watches for that file, then stops the hub with
// SIGTERM and starts a new one on the same ports. (A file, not stdout and stdin: node --test
// gives the script no stdin, and may hold its stdout back until the test ends.) The
// client's reconnection is how this script learns that the new hub is up.
// The dead-connection, backoff and close() tests need no hub: they use a tiny in-test
// `ws` server, or a port where nothing listens.

import assert from "node:assert/strict";
import { createHmac } from "node:crypto";
import { readFile, writeFile } from "node:fs/promises";
import net from "node:net";
import test from "node:test";
import { WebSocket, WebSocketServer } from "ws";

const { WshubClient, WshubError } = await loadClient();

const WS_URL = process.env.WSHUB_WS_URL;
const API_URL = process.env.WSHUB_API_URL;
const HUB = { skip: WS_URL && API_URL ? false : "WSHUB_WS_URL and WSHUB_API_URL are not set" };
// A second hub that requires subscriber tokens signed (HS256) with WSHUB_AUTH_SECRET.
const AUTH_WS_URL = process.env.WSHUB_AUTH_WS_URL;
const AUTH_API_URL = process.env.WSHUB_AUTH_API_URL;
const AUTH_SECRET = process.env.WSHUB_AUTH_SECRET;
const AUTH_HUB = {
  skip:
    AUTH_WS_URL && AUTH_API_URL && AUTH_SECRET
      ? false
      : "WSHUB_AUTH_WS_URL, WSHUB_AUTH_API_URL and WSHUB_AUTH_SECRET are not set",
};
const TIMEOUT = 5000;

/** The module under test; Node before 20.19 reads a .js file outside a module package as CJS. */
async function loadClient() {
  const url = new URL("../../wshub/static/wshub.js", import.meta.url);
  try {
    return await import(url.href);
  } catch (error) {
    if (!(error instanceof SyntaxError)) throw error;
    const source = await readFile(url, "utf8");
    return import(`data:text/javascript;base64,${Buffer.from(source).toString("base64")}`);
  }
}

// Helpers

/** A client with `ws` and the options given; closed when the test ends. */
function makeClient(t, url, options = {}) {
  const client = new WshubClient(url, { WebSocket, ...options });
  t.after(() => client.close());
  return client;
}

/** Resolve with `promise`, or fail after `ms` with `what` in the message. */
function within(promise, what, ms = TIMEOUT) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** The next status change matching `predicate` (or equal to it, when a string). */
function nextStatus(client, predicate, ms = TIMEOUT) {
  const match = typeof predicate === "string" ? (status) => status === predicate : predicate;
  let off;
  const promise = new Promise((resolve) => {
    off = client.onStatus((status, detail) => {
      if (match(status, detail)) resolve({ status, detail });
    });
  });
  return within(promise, `status ${predicate}`, ms).finally(() => off());
}

/** Every message the client receives from now on, and a way to wait for the next ones. */
function inbox(client, type = "*") {
  const messages = [];
  const waiters = [];
  client.on(type, (data, message) => {
    messages.push(message);
    while (waiters.length > 0 && waiters[0].count <= messages.length) waiters.shift().resolve();
  });
  return {
    messages,
    /** Wait until `count` messages have arrived in all. */
    async until(count, ms = TIMEOUT) {
      if (messages.length >= count) return;
      await within(
        new Promise((resolve) => waiters.push({ count, resolve })),
        `${count} messages of type ${type}`,
        ms,
      );
    },
  };
}

async function connected(client, ms = TIMEOUT) {
  const opened = nextStatus(client, "open", ms);
  client.connect();
  await opened;
}

async function api(path, body, base = API_URL) {
  const response = await fetch(`${base}${path}`, {
    method: body === undefined ? "GET" : "POST",
    headers: body === undefined ? {} : { "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const answer = await response.json();
  assert.equal(response.status, 200, JSON.stringify(answer));
  return answer;
}

function publish(type, data, topics, base = API_URL) {
  return api("/api/publish", { type, data, topics }, base);
}

/** A subscriber token for the auth hub, as a backend would mint it (HS256). */
function mint({ sub = "alice", topics = ["*"], ttl = 3600 } = {}) {
  const part = (value) => Buffer.from(JSON.stringify(value)).toString("base64url");
  const exp = Math.floor(Date.now() / 1000) + ttl;
  const unsigned = `${part({ alg: "HS256", typ: "JWT" })}.${part({ sub, topics, exp })}`;
  const signature = createHmac("sha256", AUTH_SECRET).update(unsigned).digest("base64url");
  return `${unsigned}.${signature}`;
}

/** A port on 127.0.0.1 where nothing listens (it was free a moment ago). */
async function deadPort() {
  const server = net.createServer();
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  await new Promise((resolve) => server.close(resolve));
  return port;
}

/** A `ws` server on a free port; `onConnection(socket, request)`; closed when the test ends. */
async function fakeHub(t, onConnection) {
  const server = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((resolve) => server.once("listening", resolve));
  const connections = [];
  server.on("connection", (socket, request) => {
    connections.push(request.url);
    onConnection(socket, request);
  });
  t.after(async () => {
    for (const socket of server.clients) socket.terminate();
    await new Promise((resolve) => server.close(resolve));
  });
  return { url: `ws://127.0.0.1:${server.address().port}/api/ws`, connections };
}

function greet(socket, clientId, topics = ["*"]) {
  socket.send(
    JSON.stringify({
      type: "connection",
      data: { client_id: clientId, status: "connected", topics },
      client_id: clientId,
    }),
  );
}

function compareIds(a, b) {
  const [ma, sa] = a.split("-").map(BigInt);
  const [mb, sb] = b.split("-").map(BigInt);
  return ma === mb ? Number(sa - sb) : Number(ma - mb);
}

// Against the real hub

test("connects, is greeted, reports its status", HUB, async (t) => {
  const client = makeClient(t, WS_URL);
  const statuses = [];
  client.onStatus((status) => statuses.push(status));
  assert.equal(client.status, "closed");
  assert.equal(client.clientId, null);
  await connected(client);
  assert.deepEqual(statuses, ["connecting", "open"]);
  assert.equal(client.status, "open");
  assert.match(client.clientId, /^[0-9a-f]{16}$/);
  assert.deepEqual(client.topics, ["*"]);
  client.connect(); // idempotent
  assert.deepEqual(statuses, ["connecting", "open"]);
  const clients = await api("/api/clients");
  const mine = clients.find((info) => info.id === client.clientId);
  assert.ok(mine, "the hub lists the client");
  assert.deepEqual(mine.subscriptions, ["*"]);
});

test("ws negotiates the hub's permessage-deflate and decodes its shared compressed frames", HUB, async (t) => {
  const offering = makeClient(t, WS_URL, { topics: ["runs"] });
  const plain = makeClient(t, WS_URL, {
    topics: ["runs"],
    WebSocket: class extends WebSocket {
      constructor(url, protocols) {
        super(url, protocols, { perMessageDeflate: false });
      }
    },
  });
  await connected(offering);
  await connected(plain);
  const clients = await api("/api/clients");
  const shown = (client) => clients.find((info) => info.id === client.clientId).compression;
  assert.equal(shown(offering), "deflate");
  assert.equal(shown(plain), null);
  const before = (await api("/api/stats")).messages_compressed;
  const inboxes = [inbox(offering), inbox(plain)];
  const events = [1, 2, 3].map((n) => ({
    run_id: `run-${n}`,
    test_name: "eth_getLogs",
    progress: n / 10,
    note: "the same long words, again and again ".repeat(20),
  }));
  for (const data of events) await publish("run_progress", data, ["runs"]);
  for (const received of inboxes) {
    await received.until(3);
    assert.deepEqual(
      received.messages.map((message) => message.data),
      events,
    );
  }
  // One compression per message, whatever the number of clients that take it.
  assert.equal((await api("/api/stats")).messages_compressed - before, 3);
});

test("falls back to the hub's event stream when WebSocket fails, and subscribes by reconnecting it", HUB, async (t) => {
  // A network that lets no WebSocket through: every attempt ends before it opens.
  class Blocked {
    constructor() {
      setTimeout(() => this.onclose?.({ code: 1006, reason: "blocked" }), 0);
    }
    close() {}
  }
  const client = makeClient(t, WS_URL, {
    topics: ["deploys"],
    sseFallback: true,
    WebSocket: Blocked,
    minDelay: 10,
    maxDelay: 20,
  });
  assert.equal(client.eventsUrl, WS_URL.replace("ws://", "http://").replace(/ws$/, "events"));
  await connected(client);
  assert.equal(client.transport, "sse");
  const mine = (await api("/api/clients")).find((info) => info.id === client.clientId);
  assert.deepEqual(mine.subscriptions, ["deploys"]);
  const received = inbox(client);
  await publish("deploy", { version: "2.0.0" }, ["deploys"]);
  await received.until(1);
  assert.deepEqual(received.messages[0].data, { version: "2.0.0" });
  const lastId = client.lastId;
  assert.equal(lastId, received.messages[0].id);
  // Published while it reconnects with the new topic: the resume brings it.
  const subscribing = client.subscribe("runs");
  await publish("deploy", { version: "2.0.1" }, ["deploys"]);
  assert.deepEqual(await subscribing, ["deploys", "runs"]);
  await publish("run", { n: 1 }, ["runs"]);
  await received.until(4); // and the greeting of the stream's reconnection
  assert.deepEqual(
    received.messages.map((message) => message.type),
    ["deploy", "connection", "deploy", "run"],
  );
  assert.equal(received.messages[1].data.recovered, true);
  assert.deepEqual(
    received.messages.filter((message) => message.id !== undefined).map((m) => m.data),
    [{ version: "2.0.0" }, { version: "2.0.1" }, { n: 1 }],
  );
  assert.equal(client.transport, "sse");
  const again = (await api("/api/clients")).find((info) => info.id === client.clientId);
  assert.deepEqual(again.subscriptions, ["deploys", "runs"]);
});

test("on(type) handlers receive published messages; on() returns an unsubscribe", HUB, async (t) => {
  const client = makeClient(t, WS_URL, { topics: ["deploys"] });
  await connected(client);
  const deploys = [];
  const everything = inbox(client);
  const off = client.on("deploy", (data, message) => deploys.push({ data, message }));
  await publish("deploy", { version: "1.2.3" }, ["deploys"]);
  await everything.until(1);
  assert.equal(deploys.length, 1);
  assert.deepEqual(deploys[0].data, { version: "1.2.3" });
  assert.equal(deploys[0].message.type, "deploy");
  assert.equal(typeof deploys[0].message.id, "string");
  assert.equal(everything.messages[0], deploys[0].message);
  off();
  await publish("deploy", { version: "1.2.4" }, ["deploys"]);
  await publish("marker", null); // to every client
  await everything.until(3);
  assert.equal(deploys.length, 1, "the removed handler was not called");
  assert.deepEqual(
    everything.messages.map((message) => message.type),
    ["deploy", "deploy", "marker"],
  );
  assert.equal(everything.messages[2].data, undefined);
});

test("subscribe()/unsubscribe() resolve with the hub's sorted list; topics filter", HUB, async (t) => {
  const client = makeClient(t, WS_URL, { topics: ["run:1"] });
  await connected(client);
  const received = inbox(client, "event");
  assert.deepEqual(await client.subscribe(["test:b", "test:a"]), ["run:1", "test:a", "test:b"]);
  assert.deepEqual(client.topics, ["run:1", "test:a", "test:b"]);
  // A message to a topic the client does not hold never arrives: the next one does first.
  await publish("event", { n: 1 }, ["run:2"]);
  await publish("event", { n: 2 }, ["test:a"]);
  await received.until(1);
  assert.deepEqual(received.messages[0].data, { n: 2 });

  assert.deepEqual(await client.unsubscribe(["run:1", "never:held"]), ["test:a", "test:b"]);
  assert.deepEqual(client.topics, ["test:a", "test:b"]);
  await publish("event", { n: 3 }, ["run:1"]);
  await publish("event", { n: 4 }, ["test:b", "test:a"]); // once, however many topics match
  await publish("event", { n: 5 }, ["test:b"]);
  await received.until(3);
  assert.deepEqual(
    received.messages.map((message) => message.data.n),
    [2, 4, 5],
  );
  assert.deepEqual(await client.subscribe("single"), ["single", "test:a", "test:b"]);

  await assert.rejects(client.subscribe([""]), TypeError);
  await assert.rejects(client.subscribe(["x".repeat(257)]), TypeError);
  await assert.rejects(client.unsubscribe([42]), TypeError);
  assert.deepEqual(client.topics, ["single", "test:a", "test:b"], "invalid calls change nothing");
});

test("topics the URL cannot carry are subscribed right after the greeting", HUB, async (t) => {
  const client = makeClient(t, WS_URL, { topics: ["plain", "with,comma", " padded "] });
  await connected(client);
  // Answers come in order, so this one comes after those of the client's own requests.
  assert.deepEqual(await client.subscribe([]), [" padded ", "plain", "with,comma"]);
  const clients = await api("/api/clients");
  const mine = clients.find((info) => info.id === client.clientId);
  assert.deepEqual(mine.subscriptions, [" padded ", "plain", "with,comma"]);
});

test("the hub's refusal rejects subscribe() and restores the hub's set", HUB, async (t) => {
  const client = makeClient(t, WS_URL, { topics: [] });
  await connected(client);
  const errors = inbox(client, "error");
  const many = Array.from({ length: 1001 }, (_, i) => `t${i}`); // max_subscriptions: 100
  const refused = await client.subscribe(many).then(
    () => null,
    (error) => error,
  );
  if (refused === null) {
    t.skip("the hub allows more than 1001 subscriptions");
    return;
  }
  assert.ok(refused instanceof WshubError, String(refused));
  assert.equal(refused.code, 400);
  assert.match(refused.message, /too many subscriptions/);
  assert.deepEqual(client.topics, []);
  await errors.until(1);
  assert.deepEqual(errors.messages[0].error.code, 400);
});

test("lastId follows the ids of published messages", HUB, async (t) => {
  // Without a snapshot: the hub's state holds messages earlier tests sent to every client.
  const client = makeClient(t, WS_URL, { topics: ["ids"], snapshot: false });
  assert.equal(client.lastId, null);
  await connected(client);
  assert.equal(client.lastId, null, "the greeting carries no id");
  const received = inbox(client);
  for (let n = 0; n < 3; n += 1) await publish("tick", { n }, ["ids"]);
  await received.until(3);
  const ids = received.messages.map((message) => message.id);
  assert.ok(ids.every((id) => /^\d+-\d+$/.test(id)), ids.join());
  assert.ok(compareIds(ids[0], ids[1]) < 0 && compareIds(ids[1], ids[2]) < 0, ids.join());
  assert.equal(client.lastId, ids[2]);
  await client.subscribe(["other"]); // answers carry no id
  assert.equal(client.lastId, ids[2]);
});

test("resumes after its connection drops: the missed messages in order, then live ones", HUB, async (t) => {
  const client = makeClient(t, WS_URL, { topics: ["resume:a"], minDelay: 300, jitter: 0 });
  await connected(client);
  const events = inbox(client, "event");
  await publish("event", { n: 1 }, ["resume:a"]);
  await events.until(1);
  const seen = client.lastId;
  assert.equal(client.lastResume, null, "nothing to resume on the first connection");
  const reconnecting = nextStatus(client, "reconnecting");
  const opened = nextStatus(client, "open");
  client._ws.terminate(); // the socket drops without a closing handshake; the hub stays up
  await reconnecting;
  // Published while the client waits 300 ms to reconnect.
  await publish("event", { n: 2 }, ["resume:a"]);
  await publish("event", { n: 3 }, ["resume:elsewhere"]);
  await publish("event", { n: 4 }); // to every client
  const { detail } = await opened;
  assert.deepEqual(detail, { recovered: true, reason: null });
  assert.deepEqual(client.lastResume, { since: seen, recovered: true, reason: null });
  await events.until(3);
  await publish("event", { n: 5 }, ["resume:a"]);
  await events.until(4);
  assert.deepEqual(
    events.messages.map((message) => message.data.n),
    [1, 2, 4, 5],
  );
  const ids = events.messages.map((message) => message.id);
  assert.ok(ids.every((id, i) => i === 0 || compareIds(ids[i - 1], id) < 0), ids.join());
  assert.equal(client.lastId, ids[3]);
});

test("a resume the hub cannot serve is reported with its reason", HUB, async (t) => {
  const client = makeClient(t, WS_URL, { topics: ["resume:b"], snapshot: false });
  client.lastId = "1-0"; // an id this hub never issued, as after a hub restart
  const { detail } = await (async () => {
    const opened = nextStatus(client, "open");
    client.connect();
    return opened;
  })();
  assert.deepEqual(detail, { recovered: false, reason: "unknown message id" });
  assert.deepEqual(client.lastResume, { since: "1-0", recovered: false, reason: "unknown message id" });
});

// Snapshots: the hub's state (the latest message of every key, the recent events)

function publishKeyed(type, data, topics, key) {
  return api("/api/publish", { type, data, topics, key });
}

/** Every published message the client receives, with `snapshotRemaining` as its handler saw it. */
function published(client) {
  const seen = [];
  client.on("*", (data, message) => {
    if (message.id) seen.push({ type: message.type, data, remaining: client.snapshotRemaining });
  });
  return {
    seen,
    async until(type) {
      await within(
        (async () => {
          while (!seen.some((entry) => entry.type === type)) {
            await new Promise((resolve) => setTimeout(resolve, 5));
          }
        })(),
        `a ${type} message`,
      );
    },
  };
}

test("the first connect shows the hub's state, then live messages", HUB, async (t) => {
  for (let n = 1; n <= 3; n += 1) await publishKeyed("run_progress", { n }, ["snap:a"], "run:js-1");
  await publish("regression_detected", { id: "g-js" }, ["snap:a"]);
  await publishKeyed("run_progress", { n: 9 }, ["snap:elsewhere"], "run:js-2");
  const client = makeClient(t, WS_URL, { topics: ["snap:a"] });
  const received = published(client);
  await connected(client);
  const snapshot = client.lastSnapshot;
  assert.equal(snapshot.since, null);
  assert.equal(snapshot.omitted, 0);
  await publish("snap_live", { n: 4 }, ["snap:a"]);
  await received.until("snap_live");
  const shown = received.seen.filter((entry) => entry.remaining > 0);
  // Handlers of a snapshot's messages see how many are left, theirs included.
  assert.equal(shown.length, snapshot.messages);
  assert.deepEqual(
    shown.map((entry) => entry.remaining),
    Array.from({ length: snapshot.messages }, (_, i) => snapshot.messages - i),
  );
  // The state of snap:a (earlier tests' messages to every client are in it too).
  assert.deepEqual(
    shown.filter((entry) => entry.type !== "marker" && entry.type !== "event").map((entry) => entry.data),
    [{ n: 3 }, { id: "g-js" }],
  );
  assert.deepEqual(received.seen.at(-1), { type: "snap_live", data: { n: 4 }, remaining: 0 });
  assert.equal(client.lastResume, null);
});

test("the open status carries the snapshot, and a reconnect that cannot resume gets one", HUB, async (t) => {
  await publishKeyed("run_progress", { n: 5 }, ["snap:b"], "run:js-3");
  const client = makeClient(t, WS_URL, { topics: ["snap:b"] });
  const received = published(client);
  client.lastId = "1-0"; // an id this hub never issued, as after a hub restart
  const opened = nextStatus(client, "open");
  client.connect();
  const { detail } = await opened;
  assert.deepEqual(detail, {
    recovered: false,
    reason: "unknown message id",
    snapshot: client.lastSnapshot,
  });
  assert.equal(client.lastSnapshot.since, "1-0");
  assert.equal(client.lastSnapshot.reason, "unknown message id");
  await received.until("run_progress");
  assert.deepEqual(received.seen.find((entry) => entry.type === "run_progress").data, { n: 5 });
});

test("a reconnect that resumes gets what it missed, not a snapshot", HUB, async (t) => {
  const client = makeClient(t, WS_URL, { topics: ["snap:c"], minDelay: 300, jitter: 0 });
  const progress = inbox(client, "run_progress");
  await connected(client);
  assert.equal(client.lastSnapshot.since, null);
  await publishKeyed("run_progress", { n: 1 }, ["snap:c"], "run:js-4");
  await progress.until(1);
  const reconnecting = nextStatus(client, "reconnecting");
  const opened = nextStatus(client, "open");
  client._ws.terminate();
  await reconnecting;
  await publishKeyed("run_progress", { n: 2 }, ["snap:c"], "run:js-4");
  await publishKeyed("run_progress", { n: 3 }, ["snap:c"], "run:js-4");
  const { detail } = await opened;
  assert.deepEqual(detail, { recovered: true, reason: null });
  await progress.until(3);
  assert.deepEqual(
    progress.messages.map((message) => message.data.n),
    [1, 2, 3],
  );
});

test("subscribe() asks for the state of the topics it adds; snapshot: false asks for none", HUB, async (t) => {
  await publishKeyed("run_progress", { n: 7 }, ["snap:d"], "run:js-5");
  const client = makeClient(t, WS_URL, { topics: ["snap:none"] });
  await connected(client);
  const progress = inbox(client, "run_progress");
  assert.deepEqual(await client.subscribe("snap:d"), ["snap:d", "snap:none"]);
  assert.deepEqual(client.lastSnapshot, { messages: 1, omitted: 0, since: null, reason: null });
  await progress.until(1);
  assert.deepEqual(progress.messages[0].data, { n: 7 });

  const plain = makeClient(t, WS_URL, { topics: ["snap:d"], snapshot: false });
  const plainProgress = inbox(plain, "run_progress");
  await connected(plain);
  await client.unsubscribe("snap:none");
  await plain.subscribe("snap:none");
  await publishKeyed("run_progress", { n: 8 }, ["snap:d"], "run:js-5");
  await plainProgress.until(1);
  assert.deepEqual(
    plainProgress.messages.map((message) => message.data.n),
    [8],
  );
  assert.equal(plain.lastSnapshot, null);
});

test("JSON pings keep a quiet connection alive", HUB, async (t) => {
  const client = makeClient(t, WS_URL, { pingInterval: 100, deadAfter: 400 });
  await connected(client);
  const clientId = client.clientId;
  const pongs = inbox(client, "pong");
  const statuses = [];
  client.onStatus((status) => statuses.push(status));
  // Nothing is published: only the pongs to the client's pings arrive, well within deadAfter.
  await pongs.until(10, 3000);
  assert.deepEqual(statuses, [], "no reconnection");
  assert.equal(client.clientId, clientId);
  assert.equal(client.status, "open");
});

test("without pings a quiet hub looks dead after deadAfter", HUB, async (t) => {
  const client = makeClient(t, WS_URL, { pingInterval: 0, deadAfter: 300, minDelay: 50 });
  await connected(client);
  const started = performance.now();
  const { detail } = await nextStatus(client, "reconnecting");
  assert.ok(performance.now() - started >= 290, "not before deadAfter");
  assert.equal(detail.code, 4000);
  assert.match(detail.reason, /no message from the server in 300 ms/);
  await nextStatus(client, "open");
});

test("reconnectNow() makes the scheduled attempt at once", HUB, async (t) => {
  // A ten-minute backoff: only reconnectNow() can bring the client back within the test.
  const client = makeClient(t, WS_URL, {
    pingInterval: 0,
    deadAfter: 300,
    minDelay: 600_000,
    maxDelay: 600_000,
    jitter: 0,
  });
  await connected(client);
  assert.equal(client.reconnectNow(), client, "nothing scheduled while open: a no-op");
  assert.equal(client.status, "open");
  const { detail } = await nextStatus(client, "reconnecting");
  assert.equal(detail.delay, 600_000);
  const reopened = nextStatus(client, "open");
  client.reconnectNow();
  await reopened;
});

test("close() closes with 1000 and stops", HUB, async (t) => {
  const client = makeClient(t, WS_URL);
  await connected(client);
  const clientId = client.clientId;
  const statuses = [];
  client.onStatus((status, detail) => statuses.push([status, detail]));
  client.close();
  assert.deepEqual(statuses, [["closed", { code: 1000, reason: "" }]]);
  assert.equal(client.status, "closed");
  assert.equal(client.clientId, null);
  // The hub forgets the client once the closing handshake is over.
  const deadline = performance.now() + TIMEOUT;
  while ((await api("/api/clients")).some((info) => info.id === clientId)) {
    assert.ok(performance.now() < deadline, "the hub still lists the client");
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  assert.deepEqual(await client.subscribe(["later"]), ["*", "later"], "closed: the local list");
  client.close(); // again: nothing happens
  assert.equal(statuses.length, 1);
});

// Without a hub

test("a JSON ping from the server is answered; other frames are ignored", async (t) => {
  const fromClient = [];
  let notify;
  const got = new Promise((resolve) => {
    notify = resolve;
  });
  const hub = await fakeHub(t, (socket) => {
    greet(socket, "0000000000000001", ["a", "b"]);
    socket.send("not json");
    socket.send("[1, 2]");
    socket.send(JSON.stringify({ no: "type" }));
    socket.send(JSON.stringify({ type: "ping" }));
    socket.send(Buffer.from(JSON.stringify({ type: "binary", data: 1 })), { binary: true });
    socket.on("message", (data) => {
      fromClient.push(JSON.parse(data.toString()));
      notify();
    });
  });
  const client = makeClient(t, hub.url, { pingInterval: 0, topics: ["a", "b"] });
  const received = inbox(client);
  await connected(client);
  await received.until(3);
  assert.deepEqual(
    received.messages.map((message) => message.type),
    ["connection", "ping", "binary"],
  );
  assert.equal(client.invalidFrames, 3);
  await within(got, "the pong");
  assert.deepEqual(fromClient, [{ type: "pong" }]);
  assert.equal(hub.connections[0], "/api/ws?topics=a%2Cb&snapshot=1");
});

test("a connection that goes silent is dropped and reconnected", async (t) => {
  // Greets, then never says anything again (not even pongs).
  const hub = await fakeHub(t, (socket) => greet(socket, `client${hub.connections.length}`, ["x"]));
  const client = makeClient(t, hub.url, {
    pingInterval: 50,
    deadAfter: 300,
    minDelay: 50,
    maxDelay: 100,
    topics: ["x"],
  });
  await connected(client);
  const firstId = client.clientId;
  const started = performance.now();
  const { detail } = await nextStatus(client, "reconnecting");
  assert.ok(performance.now() - started >= 290, "not before deadAfter");
  assert.equal(detail.code, 4000);
  assert.equal(detail.attempt, 1);
  assert.equal(client.clientId, null);
  await nextStatus(client, "open");
  assert.notEqual(client.clientId, firstId);
  assert.equal(hub.connections.length, 2);
  assert.deepEqual(hub.connections, ["/api/ws?topics=x&snapshot=1", "/api/ws?topics=x&snapshot=1"]);
  // The second silent connection counts as a failure too: no "stayed open" reset (5 s).
  const again = await nextStatus(client, "reconnecting");
  assert.equal(again.detail.attempt, 2);
});

test("a hanging handshake counts as dead too", async (t) => {
  const sockets = [];
  const server = net.createServer((socket) => sockets.push(socket)); // accepts, never answers
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  t.after(() => {
    for (const socket of sockets) socket.destroy();
    server.close();
  });
  const client = makeClient(t, `ws://127.0.0.1:${server.address().port}/api/ws`, {
    deadAfter: 200,
    minDelay: 50,
  });
  client.connect();
  const { detail } = await nextStatus(client, "reconnecting");
  assert.equal(detail.code, 4000);
});

test("backoff delays grow, are capped, and are jittered within bounds", async (t) => {
  const url = `ws://127.0.0.1:${await deadPort()}/api/ws`;
  const options = { minDelay: 20, maxDelay: 200, factor: 2 };
  const expected = [20, 40, 80, 160, 200, 200, 200];

  async function delays(jitter) {
    const client = makeClient(t, url, { ...options, jitter });
    const seen = [];
    const done = new Promise((resolve) => {
      let scheduledAt = 0;
      client.onStatus((status, detail) => {
        if (status === "reconnecting") {
          seen.push(detail);
          scheduledAt = performance.now();
        } else if (status === "connecting" && seen.length > 0) {
          const waited = performance.now() - scheduledAt;
          assert.ok(waited >= seen.at(-1).delay - 2, `waited ${waited} < ${seen.at(-1).delay}`);
        }
        if (seen.length === expected.length) resolve();
      });
    });
    client.connect();
    await within(done, "7 reconnections");
    client.close();
    return seen;
  }

  const exact = await delays(0);
  assert.deepEqual(
    exact.map((detail) => detail.delay),
    expected,
  );
  assert.deepEqual(
    exact.map((detail) => detail.attempt),
    [1, 2, 3, 4, 5, 6, 7],
  );
  assert.equal(exact[0].code, 1006);

  const jittered = (await delays(0.5)).map((detail) => detail.delay);
  jittered.forEach((delay, i) => {
    assert.ok(delay >= expected[i] * 0.5 - 1 && delay <= expected[i] + 1, `${delay} ${i}`);
  });
  assert.ok(
    jittered.some((delay, i) => delay !== expected[i]),
    `jitter took nothing off: ${jittered}`,
  );
  // With factor 2 and jitter 0.5 each delay is at least the previous one's base.
  for (let i = 1; i < 4; i += 1) assert.ok(jittered[i] >= jittered[i - 1] - 1, `${jittered}`);
});

test("close() while reconnecting cancels the retry", async (t) => {
  const url = `ws://127.0.0.1:${await deadPort()}/api/ws`;
  const client = makeClient(t, url, { minDelay: 100, jitter: 0 });
  const statuses = [];
  client.onStatus((status, detail) => statuses.push([status, detail]));
  const reconnecting = nextStatus(client, "reconnecting");
  client.connect();
  await reconnecting;
  const pending = client.subscribe(["y"]);
  client.close();
  assert.deepEqual(await pending, ["*", "y"]);
  await new Promise((resolve) => setTimeout(resolve, 300)); // three times the retry delay
  assert.deepEqual(
    statuses.map(([status]) => status),
    ["connecting", "reconnecting", "closed"],
  );
  assert.deepEqual(statuses[2][1], { code: 1000, reason: "" });
});

test("reconnect: false ends with the status closed", async (t) => {
  const url = `ws://127.0.0.1:${await deadPort()}/api/ws`;
  const client = makeClient(t, url, { reconnect: false });
  client.connect();
  const { detail } = await nextStatus(client, "closed");
  assert.equal(detail.code, 1006);
  assert.equal(client.status, "closed");
});

test("options are checked", () => {
  assert.throws(() => new WshubClient("ws://x/api/ws"), /no WebSocket constructor/);
  assert.throws(() => new WshubClient("/api/ws", { WebSocket }), TypeError);
  assert.throws(() => new WshubClient("ftp://x/", { WebSocket }), /not a WebSocket URL/);
  assert.throws(() => new WshubClient("ws://x/", { WebSocket, jitter: 2 }), RangeError);
  assert.throws(() => new WshubClient("ws://x/", { WebSocket, topics: [""] }), TypeError);
  assert.throws(() => new WshubClient("ws://x/", { WebSocket, token: "" }), /non-empty string/);
  assert.throws(() => new WshubClient("ws://x/", { WebSocket, token: 7 }), /token must be/);
  assert.throws(() => new WshubClient("ws://x/", { WebSocket, snapshot: 1 }), /snapshot must be/);
  const client = new WshubClient("http://x:1/api/ws?token=t", { WebSocket });
  assert.equal(client.url, "ws://x:1/api/ws?token=t");
  assert.equal(client.status, "closed");
});

// Against a hub that requires tokens

test("a token function is asked on every connect, and its grants filter the topics", AUTH_HUB, async (t) => {
  const asked = [];
  const client = makeClient(t, AUTH_WS_URL, {
    topics: ["run:1", "secret"],
    token: async () => {
      asked.push(client.status);
      return mint({ topics: ["run:*"] });
    },
    minDelay: 50,
    jitter: 0,
  });
  const errors = inbox(client, "error");
  await connected(client);
  assert.deepEqual(asked, ["connecting"]);
  await errors.until(1);
  assert.equal(errors.messages[0].error.code, 403);
  assert.deepEqual(errors.messages[0].error.details.forbidden, ["secret"]);
  assert.deepEqual(client.topics, ["run:1"], "a forbidden topic is not asked for again");
  // Two requests in flight, the first partly forbidden: each resolves with its own answer.
  const first = client.subscribe(["run:2", "other"]);
  const second = client.subscribe(["run:3"]);
  assert.deepEqual(await first, ["run:1", "run:2"]);
  assert.deepEqual(await second, ["run:1", "run:2", "run:3"]);
  assert.deepEqual(client.topics, ["run:1", "run:2", "run:3"]);
  const [mine] = (await api("/api/clients", undefined, AUTH_API_URL)).filter(
    (info) => info.id === client.clientId,
  );
  assert.equal(mine.identity, "alice");
  // A reconnect asks the function again and carries only the granted topics.
  const opened = nextStatus(client, "open");
  client._ws.terminate();
  await opened;
  assert.deepEqual(asked, ["connecting", "connecting"]);
  const events = inbox(client, "event");
  await publish("event", { n: 1 }, ["other"], AUTH_API_URL);
  await publish("event", { n: 2 }, ["run:2"], AUTH_API_URL);
  await events.until(1);
  assert.deepEqual(
    events.messages.map((message) => message.data.n),
    [2],
  );
  // The first greeting's repair asked for "secret" once more (an answer for every topic
  // the greeting lacks); the reconnect asked for none: an error would have come before the
  // event.
  assert.deepEqual(
    errors.messages.map((message) => message.error.details.forbidden),
    [["secret"], ["secret"], ["other"]],
  );
});

test("without a valid token the hub refuses the handshake; a static token connects", AUTH_HUB, async (t) => {
  const anonymous = makeClient(t, AUTH_WS_URL, { reconnect: false });
  anonymous.connect();
  const { detail } = await nextStatus(anonymous, "closed");
  assert.equal(detail.code, 1006);
  const expired = makeClient(t, AUTH_WS_URL, { token: mint({ ttl: -60 }), reconnect: false });
  expired.connect();
  assert.equal((await nextStatus(expired, "closed")).detail.code, 1006);
  const client = makeClient(t, AUTH_WS_URL, { token: mint({ sub: "bob" }), topics: ["a"] });
  await connected(client);
  assert.deepEqual(client.topics, ["a"]);
  const { refused_handshakes: refused } = await api("/api/stats", undefined, AUTH_API_URL);
  assert.ok(refused.missing >= 1 && refused.expired >= 1, JSON.stringify(refused));
});

test("an expiring token is refreshed from the function and the connection stays", AUTH_HUB, async (t) => {
  let calls = 0;
  const client = makeClient(t, AUTH_WS_URL, {
    topics: ["run:1", "run:2"],
    // The first token expires in two seconds; the refresh grants one topic fewer.
    token: () => {
      calls += 1;
      return calls === 1
        ? mint({ topics: ["run:*"], ttl: 2 })
        : mint({ topics: ["run:1"], ttl: 3600 });
    },
  });
  const statuses = [];
  client.onStatus((status) => statuses.push(status));
  const expired = inbox(client, "token_expired");
  const refreshed = inbox(client, "refreshed");
  await connected(client);
  await refreshed.until(1, 10000);
  assert.equal(expired.messages.length, 1);
  assert.equal(calls, 2);
  const { data } = refreshed.messages[0];
  assert.equal(data.identity, "alice");
  assert.deepEqual(data.dropped, ["run:2"]);
  assert.deepEqual(client.topics, ["run:1"], "a reconnect does not ask for a dropped topic");
  assert.deepEqual(statuses, ["connecting", "open"], "no reconnection");
  const events = inbox(client, "event");
  await publish("event", { n: 1 }, ["run:1"], AUTH_API_URL);
  await events.until(1);
});

test("a refused refresh answers no subscribe()", AUTH_HUB, async (t) => {
  let calls = 0;
  let subscribing = null;
  // A subscribe sent on the heels of the refresh, in the same turn of the loop: the hub
  // answers the refresh first, before any answer can reach the client.
  class SubscribeAfterRefresh extends WebSocket {
    send(data, ...rest) {
      super.send(data, ...rest);
      if (JSON.parse(data).type === "refresh") subscribing = client.subscribe("run:9");
    }
  }
  const client = makeClient(t, AUTH_WS_URL, {
    topics: ["run:1"],
    WebSocket: SubscribeAfterRefresh,
    token: () => {
      calls += 1;
      return calls === 1 ? mint({ ttl: 2 }) : mint({ sub: "mallory" });
    },
  });
  const errors = inbox(client, "error");
  await connected(client);
  await errors.until(1, 10000);
  assert.equal(errors.messages[0].error.code, 403);
  assert.equal(errors.messages[0].error.details.reason, "identity");
  assert.ok(subscribing !== null, "the subscribe was made");
  assert.deepEqual(await within(subscribing, "the subscribe's answer"), ["run:1", "run:9"]);
});

test("a token function that fails, or hangs, fails the attempt; the next one asks again", AUTH_HUB, async (t) => {
  let calls = 0;
  const client = makeClient(t, AUTH_WS_URL, {
    token: () => {
      calls += 1;
      if (calls === 1) throw new Error("token service down");
      if (calls === 2) return new Promise(() => {}); // never answers
      if (calls === 3) return 42;
      return mint();
    },
    deadAfter: 300,
    minDelay: 20,
    factor: 1,
    jitter: 0,
  });
  const reasons = [];
  client.onStatus((status, detail) => {
    if (status === "reconnecting") reasons.push([detail.code, detail.reason]);
  });
  await connected(client);
  assert.equal(calls, 4);
  assert.deepEqual(reasons, [
    [1006, "token: token service down"],
    [1006, "token: the token function did not answer in 300 ms"],
    [1006, "token: wshub: a token must be a non-empty string, not number"],
  ]);
});

// Last: the hub restarts under the client.

test("reconnects after the hub restarts, with the same topics", HUB, async (t) => {
  const client = makeClient(t, WS_URL, {
    topics: ["restart:a"],
    minDelay: 100,
    maxDelay: 500,
    stableAfter: 0,
  });
  await connected(client);
  const firstId = client.clientId;
  const goodbyes = inbox(client, "disconnection");
  const events = inbox(client, "event");
  const reconnecting = nextStatus(client, "reconnecting", 20000);
  process.stdout.write("RESTART\n");
  if (process.env.WSHUB_RESTART_FILE) await writeFile(process.env.WSHUB_RESTART_FILE, "RESTART\n");
  const { detail } = await reconnecting;
  assert.deepEqual([detail.code, detail.reason, detail.attempt], [1001, "server shutdown", 1]);
  assert.equal(goodbyes.messages.length, 1);
  assert.deepEqual(goodbyes.messages[0].data, { reason: "server shutdown" });
  // Asked for while reconnecting: answered by the next greeting.
  const subscribed = client.subscribe(["restart:b"]);
  await nextStatus(client, "open", 30000);
  assert.deepEqual(await subscribed, ["restart:a", "restart:b"]);
  assert.notEqual(client.clientId, firstId);
  await publish("event", { n: 1 }, ["elsewhere"]);
  await publish("event", { n: 2 }, ["restart:a"]);
  await publish("event", { n: 3 }, ["restart:b"]);
  await events.until(2);
  assert.deepEqual(
    events.messages.map((message) => message.data.n),
    [2, 3],
  );
});
