/**
 * wshub.js: a dependency-free client for a wshub hub, for browsers and Node.
 *
 * It connects, keeps the connection alive with JSON pings, notices a dead connection,
 * reconnects with exponential backoff and jitter, resubscribes atomically on every
 * (re)connect (the topics travel in the URL), asks for the hub's current state on its first
 * connect (`?snapshot=1`: the latest of every key and the recent events), resumes after the
 * last message it received (`?since=<lastId>`, so the hub replays what was missed, or shows
 * its state again when it cannot), and dispatches each message by type.
 * The wire protocol is docs/protocol.md; this module is documented in docs/client.md.
 *
 *     import { WshubClient } from "./wshub.js";
 *     const client = new WshubClient("ws://localhost:8080/api/ws", { topics: ["run:42"] });
 *     client.on("run_progress", (data) => console.log(data.progress));
 *     client.onStatus((status, detail) => console.log(status, detail));
 *     client.connect();
 *
 * In Node, pass the `ws` package's class: `new WshubClient(url, { WebSocket })`.
 *
 * With `sseFallback: true`, a client whose WebSocket cannot connect (a proxy that blocks it)
 * reads the hub's Server-Sent Events stream instead (`GET /api/events`, with fetch), and
 * subscribes by reconnecting it with the new topics (and `?since=`, so nothing is missed).
 *
 * @module wshub
 */

/** `WebSocket.OPEN`, the same in browsers and in the `ws` package. */
const OPEN = 1;

/** A topic is a string of 1 to 256 characters (Unicode code points, as the hub counts). */
const MAX_TOPIC_LENGTH = 256;

/**
 * Topics that cannot travel in `?topics=a,b`: the hub splits the value at commas and strips
 * whitespace around each name. They are subscribed with a message right after the greeting.
 */
const NOT_IN_URL = /,|^[\s\x1c-\x1f\x85]|[\s\x1c-\x1f\x85]$/;

/** The close code the client uses for a connection it considers dead. */
const DEAD_CODE = 4000;

/**
 * @typedef {"connecting" | "open" | "reconnecting" | "closed"} WshubStatus
 */

/**
 * @typedef {object} WshubOptions
 * @property {Iterable<string>} [topics=["*"]] The subscriptions, sent as `?topics=a,b` on
 *   every (re)connect, so that a reconnect resubscribes atomically (with `?since=<lastId>`
 *   once a published message has arrived, so that it also resumes).
 * @property {any} [WebSocket] The WebSocket constructor; defaults to `globalThis.WebSocket`.
 *   In Node 20, pass the `ws` package's `WebSocket`.
 * @property {number} [minDelay=500] First reconnect delay in ms (before jitter).
 * @property {number} [maxDelay=30000] Largest reconnect delay in ms (before jitter).
 * @property {number} [factor=2] Growth of the delay per failed attempt.
 * @property {number} [jitter=0.5] Fraction of the delay taken off at random, from 0 to 1:
 *   `delay = min(maxDelay, minDelay * factor ** (attempt - 1)) * (1 - jitter * Math.random())`.
 * @property {number} [stableAfter=5000] A connection that stayed open (greeted) this many ms
 *   resets the attempt count, so the next reconnect waits `minDelay` again. 0 resets after
 *   every greeted connection.
 * @property {number} [pingInterval=25000] ms between JSON `{"type": "ping"}` messages sent
 *   while open; 0 disables them.
 * @property {number} [deadAfter=60000] ms without any message from the server (pongs
 *   included) after which the connection is considered dead: it is dropped and reconnected.
 *   Counted from the start of each connection attempt, so a hanging handshake is caught too.
 *   0 disables the check. Keep it above `pingInterval` plus a round trip.
 * @property {boolean} [reconnect=true] Reconnect after a connection ends for any reason other
 *   than `close()`. With false, the first end of a connection sets the status to "closed".
 * @property {boolean} [snapshot=true] Ask the hub for its current state: on every (re)connect
 *   (`?snapshot=1`: the first connect gets the state; a reconnect resumes with `since`, and
 *   gets the state only when the hub cannot replay what it missed) and with every subscribe
 *   (the state of the topics it adds). The messages of a snapshot arrive right after the
 *   answer, before live ones, like any other message; see {@link WshubSnapshot}.
 * @property {string | (() => string | Promise<string>)} [token] A subscriber token for a hub
 *   that requires one, sent as `?token=` (browsers cannot set headers on a WebSocket). A
 *   function (sync or async) is called for every connect and reconnect, and again when the
 *   hub says the token expired (`token_expired`), whose answer is sent as a `refresh`; so a
 *   long-lived page stays connected. If it throws, rejects, returns something other than a
 *   non-empty string, or takes longer than `deadAfter`, the attempt fails like a connection
 *   that could not be made (code 1006) and is retried with backoff.
 * @property {boolean} [sseFallback=false] When a connection fails before the hub greets it,
 *   make the next attempt over the other transport: the hub's event stream after a failed
 *   WebSocket, the WebSocket again after a failed stream; a client stays on the one that
 *   last worked. On the stream, subscribe() and unsubscribe() reconnect it with the new
 *   topics (their promises settle with the next greeting), no pings are sent (the hub's
 *   heartbeat comments count as received for `deadAfter`), and a `token_expired` reconnects
 *   with a fresh token at once.
 * @property {string | URL} [eventsUrl] The hub's event stream; by default the endpoint's
 *   address over http(s), its last path segment `events` (`/api/ws` becomes `/api/events`).
 * @property {typeof fetch} [fetch] What reads the event stream; defaults to
 *   `globalThis.fetch` (browsers, Node 18+).
 */

/**
 * @typedef {object} WshubMessage A message from the hub (docs/protocol.md, "The envelope").
 * @property {string} type
 * @property {any} [data]
 * @property {string} [timestamp]
 * @property {string} [id] On published messages: `"<milliseconds>-<sequence>"`.
 * @property {string} [key] On published messages that are the state of something (a run's
 *   events: `"run:<id>"`): a client that fell behind gets only the newest of each key.
 * @property {string} [client_id]
 * @property {{code: number, message: string, details?: any}} [error] On `error` messages.
 */

/**
 * @callback MessageHandler
 * @param {any} data The message's `data` (for `error` messages: its `error` object,
 *   `{code, message, details?}`, since those carry no `data`).
 * @param {WshubMessage} message The whole decoded message.
 * @returns {void}
 */

/**
 * @callback StatusHandler
 * @param {WshubStatus} status
 * @param {object} [detail] "reconnecting": `{attempt, delay, code, reason}` (the attempt
 *   number from 1, the delay in ms before it starts, and why the last connection ended);
 *   "closed": `{code, reason}`; "open": `{recovered, reason}` when the connection resumed
 *   after `lastId` (see {@link WshubResume}), and `{snapshot}` (a {@link WshubSnapshot}) when
 *   the hub sent its state; none for "connecting".
 * @returns {void}
 */

/**
 * @typedef {object} WshubSnapshot The hub's state, sent in place of (or before) live messages.
 * @property {number} messages How many of the messages after the answer are the state: the
 *   latest message of every key still current and the recent events, oldest first.
 * @property {number} omitted Older ones the hub left out to fit the client's buffer.
 * @property {string | null} since The `lastId` of a resume that could not be recovered: the
 *   state replaces what was missed after it, so events in between may be lost. null for a
 *   first connect or a subscribe.
 * @property {string | null} reason Why the resume was not recovered; null when none failed.
 */

/**
 * @typedef {object} WshubResume The outcome of a resume, from the hub's greeting.
 * @property {string} since The `lastId` the connection asked to resume after.
 * @property {boolean} recovered True: every missed message matching the topics was replayed
 *   (they arrive right after the greeting, before live ones). False: some may be lost; refetch.
 * @property {string | null} reason Why not (e.g. "history does not reach back to <id>",
 *   "unknown message id" after a hub restart, "history is disabled"); null when recovered.
 */

/** The error a subscribe() or unsubscribe() promise rejects with when the hub refuses. */
export class WshubError extends Error {
  /**
   * @param {string} message
   * @param {number} [code] The hub's error code (400, 500, ...).
   * @param {any} [details] The hub's `details`, when it sent some.
   */
  constructor(message, code, details) {
    super(message);
    this.name = "WshubError";
    /** @type {number | undefined} */
    this.code = code;
    /** @type {any} */
    this.details = details;
  }
}

/**
 * A connection to a hub that reconnects by itself. Nothing happens until connect().
 */
export class WshubClient {
  /**
   * @param {string | URL} url The hub's WebSocket endpoint, e.g. `ws://host:8080/api/ws`. In a
   *   page it may be relative (`/api/ws`) or http(s): it is resolved against the page and
   *   turned into ws(s). Query parameters are kept; `topics` is set by the client.
   * @param {WshubOptions} [options]
   */
  constructor(url, options = {}) {
    const base = globalThis.location?.href;
    const parsed = base === undefined ? new URL(url) : new URL(url, base);
    if (parsed.protocol === "http:") parsed.protocol = "ws:";
    else if (parsed.protocol === "https:") parsed.protocol = "wss:";
    if (parsed.protocol !== "ws:" && parsed.protocol !== "wss:") {
      throw new TypeError(`wshub: not a WebSocket URL: ${parsed.href}`);
    }
    /** The endpoint, as a ws: or wss: URL without the client's `topics` parameter. */
    this.url = parsed.href;

    this._WebSocket = options.WebSocket ?? globalThis.WebSocket;
    if (typeof this._WebSocket !== "function") {
      throw new TypeError(
        "wshub: no WebSocket constructor: pass options.WebSocket (in Node: the ws package's)",
      );
    }
    this._minDelay = number(options, "minDelay", 500, 0);
    this._maxDelay = number(options, "maxDelay", 30000, 0);
    this._factor = number(options, "factor", 2, 1);
    this._jitter = number(options, "jitter", 0.5, 0, 1);
    this._stableAfter = number(options, "stableAfter", 5000, 0);
    this._pingInterval = number(options, "pingInterval", 25000, 0);
    this._deadAfter = number(options, "deadAfter", 60000, 0);
    this._reconnect = options.reconnect ?? true;
    this._snapshot = options.snapshot ?? true;
    if (typeof this._snapshot !== "boolean") {
      throw new TypeError("wshub: snapshot must be true or false");
    }
    this._sseFallback = options.sseFallback ?? false;
    if (typeof this._sseFallback !== "boolean") {
      throw new TypeError("wshub: sseFallback must be true or false");
    }
    this._fetch = options.fetch ?? globalThis.fetch;
    if (this._sseFallback && typeof this._fetch !== "function") {
      throw new TypeError("wshub: sseFallback needs fetch: pass options.fetch");
    }
    const events = new URL(options.eventsUrl ?? "events", this.url);
    if (events.protocol === "ws:") events.protocol = "http:";
    else if (events.protocol === "wss:") events.protocol = "https:";
    if (events.protocol !== "http:" && events.protocol !== "https:") {
      throw new TypeError(`wshub: not an http(s) URL for the event stream: ${events.href}`);
    }
    /** The hub's event stream, as an http: or https: URL (used with `sseFallback`). */
    this.eventsUrl = events.href;
    this._useEvents = false; // the next attempt reads the event stream
    this._stream = null; // the event stream being read: {controller, code, reason}
    this._token = options.token ?? null;
    if (typeof this._token === "string") checkToken(this._token);
    else if (this._token !== null && typeof this._token !== "function") {
      throw new TypeError("wshub: token must be a string or a function that returns one");
    }

    /** @type {Set<string>} what the application asked for */
    this._topics = new Set(checkTopics(options.topics ?? ["*"]));
    /** @type {Set<string>} the hub's set, from its greeting and answers */
    this._serverTopics = new Set();
    /** @type {Map<string, Set<MessageHandler>>} */
    this._handlers = new Map();
    /** @type {Set<StatusHandler>} */
    this._statusHandlers = new Set();
    /** @type {WshubStatus} */
    this._status = "closed";
    this._active = false; // between connect() and close() (or the end with reconnect: false)
    this._ws = null;
    this._attempt = 0; // reconnect attempts since the last stable connection
    this._greetedAt = null; // when the current connection was greeted (performance.now())
    this._lastReceived = 0;
    this._retryTimer = null;
    this._pingTimer = null;
    this._deadTimer = null;
    this._since = null; // the lastId the current attempt asked to resume after
    this._opening = 0; // counts attempts, so a token that arrives late for one is dropped
    this._tokenTimers = new Set(); // bounds on the token function's answers in flight
    /**
     * Requests sent on the current connection, in order; each answer (subscribed,
     * unsubscribed or error) settles the first entry's waiters.
     * @type {Array<Array<{resolve: Function, reject: Function}>>}
     */
    this._pending = [];
    /** @type {Array<{resolve: Function, reject: Function}>} settled after the next greeting */
    this._waiting = [];

    /** The id the hub gave this connection in its greeting; null while not connected. */
    this.clientId = null;
    /**
     * The `id` of the last published message received, kept across reconnects: the next
     * (re)connect asks the hub to resume after it. null until one arrives.
     * @type {string | null}
     */
    this.lastId = null;
    /**
     * The outcome of the last resume; null until a connection has resumed.
     * @type {WshubResume | null}
     */
    this.lastResume = null;
    /**
     * The last `gap` the hub reported: messages that left the hubs' shared stream before
     * this client's hub read them, so neither a resume nor a reconnect brings them back.
     * `{missed, after}`: how many (null when the hub cannot tell) and the id of the last
     * message before them. Listen with `on("gap", ...)` to refetch. null until one arrives.
     * @type {{missed: number | null, after: string} | null}
     */
    this.lastGap = null;
    /**
     * The last snapshot of the hub's state this client was sent; null until one arrives.
     * @type {WshubSnapshot | null}
     */
    this.lastSnapshot = null;
    /**
     * How many of the messages still to come are the state of the last snapshot: more than
     * 0 while a handler runs for one of them (it counts the message being handled).
     */
    this.snapshotRemaining = 0;
    /** How many frames were ignored because they were not a JSON object with a `type`. */
    this.invalidFrames = 0;
  }

  /** The current status: "connecting", "open", "reconnecting" or "closed". */
  get status() {
    return this._status;
  }

  /** What the current (or next) connection uses: "websocket" or "sse". */
  get transport() {
    return this._useEvents ? "sse" : "websocket";
  }

  /** The current subscriptions, sorted. */
  get topics() {
    return [...this._topics].sort();
  }

  /**
   * Call `handler(data, message)` for every message of `type`; `"*"` for every message.
   * A handler that throws does not stop the others; its error is rethrown asynchronously.
   * @param {string} type
   * @param {MessageHandler} handler
   * @returns {() => void} A function that removes the handler.
   */
  on(type, handler) {
    if (typeof handler !== "function") throw new TypeError("wshub: handler must be a function");
    let handlers = this._handlers.get(type);
    if (handlers === undefined) {
      handlers = new Set();
      this._handlers.set(type, handlers);
    }
    handlers.add(handler);
    return () => {
      handlers.delete(handler);
    };
  }

  /**
   * Call `handler(status, detail)` on every status change (and on every "reconnecting").
   * It is not called with the status at the time of the call: read `client.status` for that.
   * @param {StatusHandler} handler
   * @returns {() => void} A function that removes the handler.
   */
  onStatus(handler) {
    if (typeof handler !== "function") throw new TypeError("wshub: handler must be a function");
    this._statusHandlers.add(handler);
    return () => {
      this._statusHandlers.delete(handler);
    };
  }

  /**
   * Start connecting (and reconnecting). Does nothing while already started; after close(),
   * starts again.
   * @returns {this}
   */
  connect() {
    if (this._active) return this;
    this._active = true;
    this._attempt = 0;
    this._open();
    return this;
  }

  /**
   * While waiting to reconnect, make the next attempt now instead of when its delay ends (a
   * person pressing "reconnect now"). The backoff goes on counting: should this attempt fail
   * too, the next delay is the one after it. Does nothing unless a reconnection is scheduled.
   * @returns {this}
   */
  reconnectNow() {
    if (!this._active || this._retryTimer === null) return this;
    this._clearRetry();
    this._open();
    return this;
  }

  /**
   * Add topics. The local set changes at once (and is what the next reconnect asks for);
   * while open, a `subscribe` message is sent.
   * @param {string | Iterable<string>} topics
   * @returns {Promise<string[]>} The hub's whole sorted subscription list from its answer (or
   *   from the next greeting when not open; the local list when not started). Rejects with a
   *   TypeError for an invalid topic (nothing changes), or a WshubError when the hub refuses
   *   (e.g. `max_subscriptions`; the local set then returns to the hub's).
   */
  subscribe(topics) {
    let list;
    try {
      list = checkTopics(typeof topics === "string" ? [topics] : topics);
    } catch (error) {
      return Promise.reject(error);
    }
    for (const topic of list) this._topics.add(topic);
    return this._request("subscribe", list);
  }

  /**
   * Remove topics; like subscribe(), with an `unsubscribe` message. Removing a topic the
   * client does not hold is not an error.
   * @param {string | Iterable<string>} topics
   * @returns {Promise<string[]>} The hub's whole sorted subscription list from its answer.
   */
  unsubscribe(topics) {
    let list;
    try {
      list = checkTopics(typeof topics === "string" ? [topics] : topics);
    } catch (error) {
      return Promise.reject(error);
    }
    for (const topic of list) this._topics.delete(topic);
    return this._request("unsubscribe", list);
  }

  /**
   * Stop for good: cancel every timer, close the connection with 1000 and do not reconnect
   * (until connect() is called again). Pending subscribe()/unsubscribe() promises resolve with
   * the local list. Sets the status to "closed" with `{code: 1000, reason: ""}`.
   */
  close() {
    const wasActive = this._active;
    this._active = false;
    this._clearRetry();
    this._clearTokenTimers();
    const ws = this._ws;
    this._detach();
    if (ws !== null) {
      try {
        ws.close(1000);
      } catch {
        // already closing or closed
      }
    }
    this._settleAll(this.topics);
    if (wasActive || this._status !== "closed") this._setStatus("closed", { code: 1000, reason: "" });
  }

  // Connections

  _open() {
    this._retryTimer = null;
    this._setStatus("connecting");
    if (!this._active) return; // a status handler called close()
    const attempt = ++this._opening;
    if (typeof this._token !== "function") {
      this._dial(this._token);
      return;
    }
    this._freshToken().then(
      (token) => {
        if (this._active && this._opening === attempt) this._dial(token);
      },
      (error) => {
        if (this._active && this._opening === attempt) {
          this._ended(1006, `token: ${String(error?.message ?? error)}`);
        }
      },
    );
  }

  /**
   * The token function's answer, checked; rejects when it throws, rejects, returns no
   * string, or takes longer than `deadAfter` (a hanging token service must not stall the
   * reconnections for good).
   * @returns {Promise<string>}
   */
  _freshToken() {
    const answer = new Promise((resolve) => resolve(this._token())).then(checkToken);
    if (this._deadAfter <= 0) return answer;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this._tokenTimers.delete(timer);
        reject(new Error(`the token function did not answer in ${this._deadAfter} ms`));
      }, this._deadAfter);
      this._tokenTimers.add(timer);
      answer.then(resolve, reject).finally(() => {
        clearTimeout(timer);
        this._tokenTimers.delete(timer);
      });
    });
  }

  /** Make the WebSocket (or open the event stream) of one attempt. */
  _dial(token) {
    if (this._useEvents) {
      this._dialEvents(token);
      return;
    }
    let ws;
    try {
      ws = new this._WebSocket(this._connectUrl(token));
    } catch (error) {
      // e.g. a browser refusing ws: from an https: page; try again later like any failure
      this._ended(1006, String(error?.message ?? error));
      return;
    }
    this._ws = ws;
    try {
      ws.binaryType = "arraybuffer";
    } catch {
      // not supported: binary frames then arrive in another form and are decoded if possible
    }
    ws.onopen = () => {
      if (this._ws === ws) this._socketOpened();
    };
    ws.onmessage = (event) => {
      if (this._ws === ws) this._received(event.data);
    };
    ws.onclose = (event) => {
      if (this._ws === ws) {
        this._detach();
        this._ended(event.code, event.reason ?? "");
      }
    };
    ws.onerror = noop; // a close event follows
    this._lastReceived = now();
    this._armDeadTimer();
  }

  /**
   * Read the hub's event stream for one attempt: each record's `data` is a message, handled
   * as a WebSocket message is; the `close` record carries the code and reason the
   * connection ends with.
   */
  _dialEvents(token) {
    const controller = new AbortController();
    const stream = { controller, code: null, reason: "" };
    this._stream = stream;
    this._lastReceived = now();
    this._armDeadTimer();
    const ended = (code, reason) => {
      if (this._stream !== stream) return;
      this._detach();
      this._ended(code, reason);
    };
    const read = async (response) => {
      if (!response.ok || response.body === null) {
        controller.abort();
        ended(1006, `HTTP ${response.status}`);
        return;
      }
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (this._stream !== stream) return;
        if (done) break;
        this._lastReceived = now();
        buffer = this._records(stream, buffer + decoder.decode(value, { stream: true }));
      }
      ended(stream.code ?? 1006, stream.reason);
    };
    let request;
    try {
      request = this._fetch(this._connectUrl(token, this.eventsUrl), {
        signal: controller.signal,
        headers: { Accept: "text/event-stream" },
        cache: "no-store",
      });
    } catch (error) {
      ended(1006, String(error?.message ?? error));
      return;
    }
    Promise.resolve(request)
      .then(read)
      .catch((error) => ended(1006, String(error?.message ?? error)));
  }

  /**
   * Handle the whole records at the start of `text` (the hub ends lines with `\n`); returns
   * what is left, the start of the next record.
   */
  _records(stream, text) {
    const records = text.split("\n\n");
    const rest = records.pop();
    for (const record of records) {
      let event = "message";
      const data = [];
      for (const line of record.split("\n")) {
        if (line === "" || line.startsWith(":")) continue; // a comment: the heartbeat
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const value = colon < 0 ? "" : line.slice(line[colon + 1] === " " ? colon + 2 : colon + 1);
        if (field === "event") event = value;
        else if (field === "data") data.push(value);
      }
      if (data.length === 0) continue;
      if (event === "close") {
        try {
          const close = JSON.parse(data.join("\n"));
          stream.code = Number.isInteger(close.code) ? close.code : null;
          stream.reason = String(close.reason ?? "");
        } catch {
          this.invalidFrames += 1;
        }
        continue;
      }
      this._received(data.join("\n"));
      if (this._stream !== stream) return ""; // a handler closed or restarted it
    }
    return rest;
  }

  /** Reconnect the event stream at once (new topics, a fresh token): not a failure. */
  _restartStream() {
    this._detach();
    this._greetedAt = null;
    this._open();
  }

  /**
   * The URL of the next attempt: the endpoint with `?topics=` set to the local set and, once
   * a published message has arrived, `?since=` set to its id. Both travel in the handshake,
   * so the hub subscribes and replays in one step: no gap, no duplicate. The token, if any,
   * travels as `?token=`.
   */
  _connectUrl(token, endpoint = this.url) {
    const url = new URL(endpoint);
    if (token !== null) url.searchParams.set("token", token);
    const topics = this.topics.filter((topic) => !NOT_IN_URL.test(topic));
    url.searchParams.set("topics", topics.join(","));
    this._since = this.lastId;
    if (this._since !== null) url.searchParams.set("since", this._since);
    else url.searchParams.delete("since");
    if (this._snapshot) url.searchParams.set("snapshot", "1");
    else url.searchParams.delete("snapshot");
    return url.href;
  }

  _socketOpened() {
    if (this._pingInterval > 0) {
      this._pingTimer = setInterval(() => this._send({ type: "ping" }), this._pingInterval);
    }
  }

  /** Forget the current socket: timers, handlers; answers in flight wait for the next one. */
  _detach() {
    const ws = this._ws;
    this._ws = null;
    if (this._stream !== null) {
      this._stream.controller.abort();
      this._stream = null;
    }
    clearInterval(this._pingTimer);
    clearTimeout(this._deadTimer);
    this._pingTimer = null;
    this._deadTimer = null;
    this.clientId = null;
    if (ws !== null) {
      ws.onopen = null;
      ws.onmessage = null;
      ws.onclose = null;
      ws.onerror = noop; // the ws package throws on an "error" event nobody listens to
    }
    for (const waiters of this._pending) this._waiting.push(...waiters);
    this._pending = [];
  }

  /** The connection ended (closed, failed or dropped as dead): reconnect or stop. */
  _ended(code, reason) {
    const greetedAt = this._greetedAt;
    this._greetedAt = null;
    if (!this._active) return;
    if (!this._reconnect) {
      this._active = false;
      this._clearTokenTimers();
      this._settleAll(this.topics);
      this._setStatus("closed", { code, reason });
      return;
    }
    // Failed before the greeting: the other transport may get through.
    if (greetedAt === null && this._sseFallback) this._useEvents = !this._useEvents;
    if (greetedAt !== null && now() - greetedAt >= this._stableAfter) this._attempt = 0;
    this._attempt += 1;
    const base = Math.min(this._maxDelay, this._minDelay * this._factor ** (this._attempt - 1));
    const delay = Math.round(base * (1 - this._jitter * Math.random()));
    this._retryTimer = setTimeout(() => this._open(), delay);
    this._setStatus("reconnecting", { attempt: this._attempt, delay, code, reason });
  }

  _clearTokenTimers() {
    for (const timer of this._tokenTimers) clearTimeout(timer);
    this._tokenTimers.clear();
  }

  _clearRetry() {
    clearTimeout(this._retryTimer);
    this._retryTimer = null;
  }

  _armDeadTimer() {
    clearTimeout(this._deadTimer);
    this._deadTimer = null;
    if (this._deadAfter <= 0) return;
    const due = this._lastReceived + this._deadAfter - now();
    this._deadTimer = setTimeout(() => this._checkDead(), Math.max(0, due));
  }

  _checkDead() {
    this._deadTimer = null;
    const ws = this._ws;
    if (ws === null && this._stream === null) return;
    if (now() - this._lastReceived < this._deadAfter) {
      this._armDeadTimer();
      return;
    }
    this._detach();
    if (ws === null) {
      this._ended(DEAD_CODE, `no message from the server in ${this._deadAfter} ms`);
      return;
    }
    try {
      // No close handshake on a dead link: the ws package can drop the socket at once.
      if (typeof ws.terminate === "function") ws.terminate();
      else ws.close(DEAD_CODE, "dead connection");
    } catch {
      // closing anyway
    }
    this._ended(DEAD_CODE, `no message from the server in ${this._deadAfter} ms`);
  }

  // Messages

  _send(message) {
    const ws = this._ws;
    if (ws === null || ws.readyState !== OPEN) return false;
    ws.send(JSON.stringify(message));
    return true;
  }

  _received(raw) {
    this._lastReceived = now();
    let text = raw;
    if (typeof text !== "string") {
      try {
        text = new TextDecoder().decode(raw); // ArrayBuffer, Buffer, typed array
      } catch {
        this.invalidFrames += 1; // a Blob, or not UTF-8
        return;
      }
    }
    let message;
    try {
      message = JSON.parse(text);
    } catch {
      this.invalidFrames += 1;
      return;
    }
    if (message === null || typeof message !== "object" || typeof message.type !== "string") {
      this.invalidFrames += 1;
      return;
    }
    if (typeof message.id === "string") {
      this.lastId = message.id;
      // Counted down after the handlers ran, so they can tell a snapshot's message.
      if (this.snapshotRemaining > 0) {
        this._dispatch(message);
        this.snapshotRemaining -= 1;
        return;
      }
    }
    switch (message.type) {
      case "ping":
        this._send({ type: "pong" });
        break;
      case "connection":
        this._greeted(message);
        break;
      case "subscribed":
      case "unsubscribed":
        this._answered(message);
        break;
      case "error":
        this._refused(message);
        break;
      case "token_expired":
        this._refresh();
        break;
      case "refreshed":
        this._refreshed(message);
        break;
      case "gap":
        this.lastGap = {
          missed: typeof message.data?.missed === "number" ? message.data.missed : null,
          after: String(message.data?.after ?? ""),
        };
        break;
      default:
        break;
    }
    this._dispatch(message);
  }

  _greeted(message) {
    const data = message.data ?? {};
    this.clientId = data.client_id ?? message.client_id ?? null;
    this._serverTopics = new Set(Array.isArray(data.topics) ? data.topics : []);
    this._greetedAt = now();
    this.snapshotRemaining = 0; // what a dropped connection still owed is not coming
    let detail;
    if (this._since !== null && typeof data.recovered === "boolean") {
      this.lastResume = {
        since: this._since,
        recovered: data.recovered,
        reason: data.recovered ? null : String(data.reason ?? "not recovered"),
      };
      detail = { recovered: this.lastResume.recovered, reason: this.lastResume.reason };
    }
    const reason = this._since !== null ? (this.lastResume?.reason ?? null) : null;
    const snapshot = this._snapshotOf(data, this._since, reason);
    if (snapshot !== null) detail = { ...detail, snapshot };
    // Topics the URL could not carry, or changed since it was built: one message each way.
    const remove = [...this._serverTopics].filter((topic) => !this._topics.has(topic));
    const add = [...this._topics].filter((topic) => !this._serverTopics.has(topic));
    const waiting = this._waiting;
    this._waiting = [];
    // A stream sends nothing: what its URL could not carry stays unsubscribed.
    if ((remove.length === 0 && add.length === 0) || this._stream !== null) {
      this._settleAll([...this._serverTopics].sort(), waiting);
    } else {
      if (remove.length > 0) {
        this._send({ type: "unsubscribe", data: { topics: remove } });
        this._pending.push(add.length > 0 ? [] : waiting);
      }
      if (add.length > 0) {
        this._send({ type: "subscribe", data: this._subscription(add) });
        this._pending.push(waiting);
      }
    }
    this._setStatus("open", detail);
  }

  /**
   * The snapshot an answer announces (its messages follow it), or null when it has none.
   * @returns {WshubSnapshot | null}
   */
  _snapshotOf(data, since, reason) {
    if (data.snapshot !== true) return null;
    const count = (value) => (Number.isInteger(value) && value > 0 ? value : 0);
    this.lastSnapshot = {
      messages: count(data.snapshot_messages),
      omitted: count(data.snapshot_omitted),
      since,
      reason,
    };
    this.snapshotRemaining = this.lastSnapshot.messages;
    return this.lastSnapshot;
  }

  /** The `data` of a subscribe for `topics`, asking for their state when configured to. */
  _subscription(topics) {
    return this._snapshot ? { topics, snapshot: true } : { topics };
  }

  _answered(message) {
    if (message.type === "subscribed") this._snapshotOf(message.data ?? {}, null, null);
    const topics = Array.isArray(message.data?.topics) ? message.data.topics : [];
    this._serverTopics = new Set(topics);
    const waiters = this._pending.shift() ?? [];
    // With nothing else in flight the hub's set is the truth (the same as the local one,
    // unless something was refused).
    if (this._pending.length === 0) this._topics = new Set(topics);
    const sorted = [...topics].sort();
    for (const waiter of waiters) waiter.resolve([...sorted]);
  }

  _refused(message) {
    const error = message.error ?? {};
    const details = error.details;
    if (Array.isArray(details?.forbidden)) {
      // Topics the token does not grant: the hub applied the rest of the request, and its
      // answer follows. Asking again on every reconnect would only be refused again.
      for (const topic of details.forbidden) this._topics.delete(topic);
      return;
    }
    // The hub's complaints about ?topics= and ?since= follow the greeting, and a refused
    // refresh (details.reason) answers no subscribe either.
    const text = String(error.message);
    if (
      this._pending.length === 0 ||
      text.startsWith("?topics=") ||
      text.startsWith("?since=") ||
      typeof details?.reason === "string"
    ) {
      return;
    }
    const waiters = this._pending.shift();
    if (this._pending.length === 0) this._topics = new Set(this._serverTopics);
    for (const waiter of waiters) {
      waiter.reject(new WshubError(String(error.message ?? "refused"), error.code, error.details));
    }
  }

  // Tokens

  /** The token expired: send a fresh one, if there is a function to get it from. */
  _refresh() {
    if (typeof this._token !== "function") return; // the hub closes with 4001; reconnecting fails
    if (this._stream !== null) {
      this._restartStream(); // it cannot send a refresh: it reconnects with a fresh token
      return;
    }
    const ws = this._ws;
    this._freshToken().then(
      (token) => {
        if (this._ws === ws) this._send({ type: "refresh", data: { token } });
      },
      // Without a fresh token the hub closes the connection (4001) when the grace period
      // ends; the reconnection asks the function again and reports its failure.
      noop,
    );
  }

  _refreshed(message) {
    const data = message.data ?? {};
    if (Array.isArray(data.topics)) this._serverTopics = new Set(data.topics);
    // The new token no longer grants these: the hub has left them.
    if (Array.isArray(data.dropped)) for (const topic of data.dropped) this._topics.delete(topic);
  }

  _dispatch(message) {
    const data = message.type === "error" && !("data" in message) ? message.error : message.data;
    for (const type of [message.type, "*"]) {
      const handlers = this._handlers.get(type);
      if (handlers === undefined) continue;
      for (const handler of [...handlers]) {
        try {
          handler(data, message);
        } catch (error) {
          rethrow(error);
        }
      }
    }
  }

  // Subscriptions

  _request(type, topics) {
    if (!this._active) return Promise.resolve(this.topics);
    return new Promise((resolve, reject) => {
      const waiter = { resolve, reject };
      const data = type === "subscribe" ? this._subscription(topics) : { topics };
      if (this._status === "open" && this._stream !== null) {
        this._waiting.push(waiter);
        this._restartStream();
      } else if (this._status === "open" && this._send({ type, data })) {
        this._pending.push([waiter]);
      } else {
        this._waiting.push(waiter); // the next greeting answers it
      }
    });
  }

  /** Resolve every waiter (or the given ones) with `topics`. */
  _settleAll(topics, waiters = null) {
    if (waiters === null) {
      waiters = [...this._pending.flat(), ...this._waiting];
      this._pending = [];
      this._waiting = [];
    }
    for (const waiter of waiters) waiter.resolve([...topics]);
  }

  _setStatus(status, detail) {
    this._status = status;
    for (const handler of [...this._statusHandlers]) {
      try {
        handler(status, detail);
      } catch (error) {
        rethrow(error);
      }
    }
  }
}

function noop() {}

function now() {
  return globalThis.performance?.now() ?? Date.now();
}

/** Report a handler's error the way event listeners' errors are, without stopping. */
function rethrow(error) {
  setTimeout(() => {
    throw error;
  }, 0);
}

function number(options, name, fallback, min, max = Infinity) {
  const value = options[name] ?? fallback;
  if (typeof value !== "number" || !(value >= min && value <= max)) {
    throw new RangeError(`wshub: ${name} must be a number from ${min} to ${max}, not ${value}`);
  }
  return value;
}

/** The token itself, or a TypeError. */
function checkToken(token) {
  if (typeof token !== "string" || token.length === 0) {
    const what = token === "" ? "an empty string" : typeof token;
    throw new TypeError(`wshub: a token must be a non-empty string, not ${what}`);
  }
  return token;
}

/** The topics as an array, each checked as the hub does; throws a TypeError otherwise. */
function checkTopics(topics) {
  if (topics === null || typeof topics !== "object" || !(Symbol.iterator in topics)) {
    throw new TypeError("wshub: topics must be a string or an iterable of strings");
  }
  const list = [...topics];
  for (const topic of list) {
    if (typeof topic !== "string") {
      throw new TypeError(`wshub: a topic must be a string, not ${typeof topic}`);
    }
    const length = [...topic].length;
    if (length < 1 || length > MAX_TOPIC_LENGTH) {
      throw new TypeError(`wshub: a topic must have 1 to ${MAX_TOPIC_LENGTH} characters`);
    }
  }
  return [...new Set(list)];
}
