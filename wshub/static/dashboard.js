// The wshub dashboard: a live view of the benchmark runner's events.
//
// No framework and no build step: the hub serves this file as it is. Every value from the
// wire goes into the page through textContent or attributes, never as HTML, so an event
// cannot inject markup.

import { WshubClient } from "./wshub.js";

// How many finished runs and feed items stay on the page; older ones are dropped so that a
// dashboard left open for days stays light.
const MAX_FINISHED_RUNS = 30;
const MAX_FEED_ITEMS = 50;
// The message rate is an average over this many milliseconds.
const RATE_WINDOW_MS = 5000;
// A run's error rate above this shows in red, while it runs and once it is finished.
const ERROR_WARN = 0.01;
// A running run with no event for this long is marked stale (the runner may have died
// without a run_failed) and no longer counted as running; its next event revives it.
const STALE_AFTER_MS = 60_000;
const STALE_CHECK_MS = 5000;
// Whether this browser should raise a notification for each alert (set by the Alerts button).
const ALERTS_KEY = "wshub.alerts";
const SEVERITIES = new Set(["critical", "high", "medium", "low"]);
// A hub with event_format "json-bench" grades regressions in json-bench's three words.
const SEVERITY_COLOURS = { major: "high", minor: "low" };

const $ = (testid) => document.querySelector(`[data-testid="${testid}"]`);

/** Build an element: h("span", {class: "x", "data-testid": "y"}, "text", child, ...). */
function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value !== null && value !== undefined && value !== false) {
      element.setAttribute(name, value === true ? "" : String(value));
    }
  }
  for (const child of children.flat()) {
    if (child !== null && child !== undefined && child !== false) {
      element.append(child instanceof Node ? child : String(child));
    }
  }
  return element;
}

// Formatting. Missing values (the hub sends null for what the runner did not give) show
// as a dash rather than "NaN" or "null".

const DASH = "–";
// A value the runner left out of an event: said so, never shown as 0.
const NOT_GIVEN = "n/a";
const isNumber = (value) => typeof value === "number" && Number.isFinite(value);
const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const decimal = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });
// Always one decimal, so the rate does not jump in width as it changes.
const rate = new Intl.NumberFormat(undefined, { minimumFractionDigits: 1, maximumFractionDigits: 1 });
const precise = new Intl.NumberFormat(undefined, { maximumFractionDigits: 3 });

const count = (value) => (isNumber(value) ? integer.format(value) : DASH);
const percent = (ratio, digits = 1) =>
  isNumber(ratio) ? `${(ratio * 100).toFixed(digits)}%` : DASH;

function duration(seconds) {
  if (!isNumber(seconds)) return DASH;
  const s = Math.max(0, Math.round(seconds));
  const m = Math.floor(s / 60);
  const hours = Math.floor(m / 60);
  if (hours) return `${hours}h ${String(m % 60).padStart(2, "0")}m`;
  if (m) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  return `${s}s`;
}

function clock(timestamp) {
  const date = timestamp ? new Date(timestamp) : new Date();
  if (Number.isNaN(date.getTime())) return "";
  return date.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}

const shortCommit = (commit) => (typeof commit === "string" && commit ? commit.slice(0, 7) : null);

function time(timestamp) {
  return h("time", { datetime: timestamp || null, class: "muted" }, clock(timestamp));
}

/** Cap a list: drop its oldest children (at the end) past ``limit``. */
function trim(list, limit) {
  while (list.children.length > limit) list.lastElementChild.remove();
}

// ---------------------------------------------------------------------------------------
// Runs in progress

const runsList = $("runs");
const runs = new Map(); // run_id -> {row, state, test, planned, updated}

function runRow(runId, testName) {
  const bar = h("div", { class: "bar__fill" });
  const progress = h(
    "div",
    {
      class: "bar",
      role: "progressbar",
      "aria-label": `Progress of run ${runId}`,
      "aria-valuemin": 0,
      "aria-valuemax": 100,
      "aria-valuenow": 0,
      "data-testid": "run-progress",
    },
    bar,
  );
  const stat = (label, testid) =>
    h("div", { class: "stat" }, h("dt", {}, label), h("dd", { "data-testid": testid }, DASH));
  const row = h(
    "li",
    { class: "run", "data-testid": "run", "data-run-id": runId, "data-test": testName, "data-state": "running" },
    h(
      "div",
      { class: "run__head" },
      h(
        "div",
        { class: "run__name" },
        h("strong", { "data-testid": "run-test" }, testName || "(unnamed test)"),
        h("span", { class: "muted run__id" }, runId),
      ),
      h("span", { class: "badge", "data-testid": "run-state" }, "running"),
    ),
    h("p", { class: "run__meta muted", "data-testid": "run-meta" }),
    h(
      "div",
      { class: "run__progress" },
      progress,
      h("span", { class: "run__percent", "data-testid": "run-percent" }, "0%"),
    ),
    h(
      "dl",
      { class: "run__stats" },
      stat("Requests", "run-requests"),
      stat("Rate", "run-rps"),
      stat("Errors", "run-errors"),
      stat("Elapsed", "run-elapsed"),
    ),
    h("p", { class: "run__error", "data-testid": "run-error", hidden: true }),
  );
  return row;
}

function getRun(data) {
  const runId = String(data.run_id ?? "");
  let run = runs.get(runId);
  if (!run) {
    // A run may be first seen mid-way (the page opened during it): make its row then.
    run = {
      row: runRow(runId, data.test_name),
      state: "running",
      test: data.test_name,
      planned: null,
      updated: Date.now(),
    };
    runs.set(runId, run);
    runsList.prepend(run.row);
    applyFilterTo(run.row);
    updateRunCount();
  }
  return run;
}

const field = (run, testid) => run.row.querySelector(`[data-testid="${testid}"]`);

function setProgress(run, ratio) {
  if (!isNumber(ratio)) return;
  const value = Math.round(Math.min(1, Math.max(0, ratio)) * 1000) / 10;
  const bar = field(run, "run-progress");
  bar.setAttribute("aria-valuenow", String(value));
  bar.firstElementChild.style.width = `${value}%`;
  field(run, "run-percent").textContent = `${decimal.format(value)}%`;
}

const isFinished = (run) => run.state === "complete" || run.state === "failed";

function setState(run, state, label) {
  run.state = state;
  run.row.dataset.state = state;
  field(run, "run-state").textContent = label;
  updateRunCount();
  if (isFinished(run)) dropOldFinishedRuns();
}

/** The run's error rate, red above ERROR_WARN: recomputed on every figure, the final one too. */
function showErrors(run, ratio) {
  const errors = field(run, "run-errors");
  errors.textContent = percent(ratio, 2);
  errors.classList.toggle("warn", isNumber(ratio) && ratio > ERROR_WARN);
}

/** An event of the run arrived: it is alive, and not stale if it was. */
function touch(run) {
  run.updated = Date.now();
  if (run.state === "stale") {
    setState(run, "running", "running");
    field(run, "run-state").removeAttribute("title");
  }
}

function markStaleRuns() {
  const now = Date.now();
  for (const run of runs.values()) {
    if (run.state === "running" && now - run.updated > STALE_AFTER_MS) {
      setState(run, "stale", "no updates");
      field(run, "run-state").title = `No event for over ${duration(STALE_AFTER_MS / 1000)}`;
    }
  }
}

function onRunStarted(data) {
  const run = getRun(data);
  touch(run);
  run.planned = isNumber(data.planned_requests) ? data.planned_requests : null;
  const meta = [];
  if (data.git_branch) meta.push(data.git_branch);
  if (shortCommit(data.git_commit)) meta.push(shortCommit(data.git_commit));
  if (Array.isArray(data.clients) && data.clients.length) meta.push(data.clients.join(", "));
  if (Array.isArray(data.methods) && data.methods.length) meta.push(data.methods.join(", "));
  meta.push(`started ${clock(data.started_at)}`);
  field(run, "run-meta").textContent = meta.join(" · ");
  if (run.planned !== null) field(run, "run-requests").textContent = `0 / ${count(run.planned)}`;
  setState(run, "running", "running");
}

function onRunProgress(data) {
  const run = getRun(data);
  if (isFinished(run)) return; // a late progress must not reopen a finished run
  touch(run);
  setProgress(run, data.progress);
  field(run, "run-requests").textContent =
    run.planned !== null ? `${count(data.requests_done)} / ${count(run.planned)}` : count(data.requests_done);
  field(run, "run-rps").textContent = isNumber(data.current_rps) ? `${decimal.format(data.current_rps)}/s` : DASH;
  showErrors(run, data.error_rate);
  field(run, "run-elapsed").textContent = duration(data.elapsed_s);
}

function onRunComplete(data) {
  const run = getRun(data);
  setProgress(run, 1);
  if (isNumber(data.total_requests)) field(run, "run-requests").textContent = count(data.total_requests);
  if (isNumber(data.error_rate)) showErrors(run, data.error_rate);
  if (isNumber(data.duration_s)) field(run, "run-elapsed").textContent = duration(data.duration_s);
  field(run, "run-rps").textContent =
    isNumber(data.total_requests) && isNumber(data.duration_s) && data.duration_s > 0
      ? `${decimal.format(data.total_requests / data.duration_s)}/s avg`
      : field(run, "run-rps").textContent;
  setState(run, "complete", "complete");
}

function onRunFailed(data) {
  const run = getRun(data);
  if (isNumber(data.elapsed_s)) field(run, "run-elapsed").textContent = duration(data.elapsed_s);
  const error = field(run, "run-error");
  error.textContent = data.error ? String(data.error) : "failed";
  error.hidden = false;
  setState(run, "failed", "failed");
  raiseAlert(
    `Run failed: ${run.test || "(unnamed test)"}`,
    [`run ${data.run_id}`, data.error ? String(data.error) : null].filter(Boolean).join(" · "),
    `run-failed:${data.run_id}`,
  );
}

function updateRunCount() {
  let running = 0;
  let stale = 0;
  for (const run of runs.values()) {
    if (run.state === "running") running += 1;
    else if (run.state === "stale") stale += 1;
  }
  $("runs-count").textContent = stale ? `${running} running · ${stale} stale` : `${running} running`;
  $("runs-empty").hidden = runs.size > 0;
}

function dropOldFinishedRuns() {
  const finished = [...runs].filter(([, run]) => isFinished(run));
  // The Map keeps insertion order, oldest first.
  for (const [runId, run] of finished.slice(0, Math.max(0, finished.length - MAX_FINISHED_RUNS))) {
    run.row.remove();
    runs.delete(runId);
  }
}

// ---------------------------------------------------------------------------------------
// Regressions, and the results feed (stored runs, baselines, analyses)

const regressionsList = $("regressions");
const activityList = $("activity");
let regressionCount = 0;

function signedPercent(value) {
  if (!isNumber(value)) return NOT_GIVEN;
  return `${value > 0 ? "+" : ""}${decimal.format(value)}%`;
}

function onRegression(event, message) {
  // Both event formats: the hub's own, or json-bench's camelCase Regression.
  const data = {
    ...event,
    run_id: event.run_id ?? event.runId,
    metric: event.metric ?? event.metricName,
    percent_change: event.percent_change ?? event.percentChange,
    baseline_value: event.baseline_value ?? event.baselineValue,
    current_value: event.current_value ?? event.currentValue,
  };
  const raw = String(data.severity || "").toLowerCase();
  const graded = SEVERITY_COLOURS[raw] ?? raw;
  const severity = SEVERITIES.has(graded) ? graded : "unknown";
  const info = data.run_info || {};
  const test = data.test_name ?? info.test_name;
  const what = data.metric || "regression";
  const change = [
    signedPercent(data.percent_change),
    `${isNumber(data.baseline_value) ? precise.format(data.baseline_value) : NOT_GIVEN} → ${
      isNumber(data.current_value) ? precise.format(data.current_value) : NOT_GIVEN
    }`,
  ].filter(Boolean);
  // Labelled, because a method and a test are often both called eth_call.
  const where = [
    data.client && `client ${data.client}`,
    data.method && `method ${data.method}`,
    test && `test ${test}`,
    data.run_id && `run ${data.run_id}`,
    shortCommit(info.git_commit),
  ]
    .filter(Boolean)
    .join(" · ");
  const item = h(
    "li",
    {
      class: `item regression severity-${severity}`,
      "data-testid": "regression",
      "data-severity": severity,
      "data-run-id": data.run_id ?? null,
      "data-test": test ?? null,
    },
    h(
      "div",
      { class: "item__head" },
      h("span", { class: "badge severity", "data-testid": "regression-severity" }, raw || "unknown"),
      h("strong", { class: "item__title" }, what),
      time(data.detected_at || message.timestamp),
    ),
    h("p", { class: "item__change", "data-testid": "regression-change" }, change.join("  ·  ")),
    h(
      "p",
      { class: "muted item__detail" },
      where,
      data.is_significant === true && isNumber(data.p_value) ? ` · p = ${precise.format(data.p_value)}` : "",
    ),
  );
  regressionsList.prepend(item);
  applyFilterTo(item);
  trim(regressionsList, MAX_FEED_ITEMS);
  regressionCount += 1;
  $("regressions-count").textContent = String(regressionCount);
  $("regressions-empty").hidden = true;
  if (severity === "critical") {
    raiseAlert(`Critical regression: ${what} ${signedPercent(data.percent_change)}`, where, `regression:${data.id ?? ""}`);
  }
}

// ---------------------------------------------------------------------------------------
// Alerts: critical regressions and failed runs. The title counts those that arrived since
// the person last came back to or touched the page; a browser notification is opt-in.

const alertsButton = $("alerts");
const pageTitle = document.title;
let unseenAlerts = 0;

function storedAlerts() {
  try {
    return localStorage.getItem(ALERTS_KEY) === "on";
  } catch {
    return false; // storage refused (private mode, file: pages): alerts stay off
  }
}

function storeAlerts(on) {
  try {
    localStorage.setItem(ALERTS_KEY, on ? "on" : "off");
  } catch {
    // kept for this page only
  }
}

let alertsWanted = storedAlerts();
// The browser's answer for this page: "granted", "denied" or "default" (not asked yet).
let permission = "Notification" in window ? Notification.permission : "denied";
const canNotify = () => permission === "granted";

/** Read the permission through the Permissions API where there is one: it follows changes
 * made in the site settings while the page is open (and, unlike Notification.permission,
 * tells the truth in headless Chromium). */
async function watchPermission() {
  try {
    const status = await navigator.permissions.query({ name: "notifications" });
    const update = () => {
      permission = status.state === "prompt" ? "default" : status.state;
      showAlertsButton();
    };
    status.addEventListener("change", update);
    update();
  } catch {
    // no Permissions API for notifications: Notification.permission it is
  }
}

function showAlertsButton() {
  if (!("Notification" in window)) {
    alertsButton.textContent = "Alerts unsupported";
    alertsButton.disabled = true;
    alertsButton.title = "This browser cannot show notifications";
    return;
  }
  const on = alertsWanted && canNotify();
  alertsButton.setAttribute("aria-pressed", String(on));
  if (permission === "denied") {
    alertsButton.textContent = "Alerts blocked";
    alertsButton.title = "The browser refuses notifications for this page: allow them in its site settings";
  } else {
    alertsButton.textContent = on ? "Alerts on" : "Alerts off";
    alertsButton.title = "Notify me of critical regressions and failed runs";
  }
}

alertsButton.addEventListener("click", async () => {
  if (alertsWanted && canNotify()) {
    alertsWanted = false;
  } else {
    permission = await Notification.requestPermission();
    alertsWanted = permission === "granted";
  }
  storeAlerts(alertsWanted);
  showAlertsButton();
});

function raiseAlert(title, body, tag) {
  // The hub's state, shown as the page opens (or after a gap), is not news: no alert.
  if (client.snapshotRemaining > 0) return;
  unseenAlerts += 1;
  document.title = `(${unseenAlerts}) ${pageTitle}`;
  if (alertsWanted && canNotify()) {
    try {
      const notification = new Notification(title, { body, tag });
      notification.addEventListener("click", () => window.focus());
    } catch (error) {
      // Some browsers (Chrome on Android) allow notifications only from a service worker;
      // the title count still tells.
      console.warn("wshub: cannot show a notification", error);
    }
  }
}

function alertsSeen() {
  if (unseenAlerts === 0) return;
  unseenAlerts = 0;
  document.title = pageTitle;
}

window.addEventListener("focus", alertsSeen);
document.addEventListener("pointerdown", alertsSeen);
document.addEventListener("keydown", alertsSeen);
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") alertsSeen();
});

function addActivity(kind, testid, title, detail, data, timestamp, extra = null) {
  const item = h(
    "li",
    { class: `item activity kind-${kind}`, "data-testid": testid, "data-run-id": data.run_id ?? null, "data-test": data.test_name ?? null },
    h(
      "div",
      { class: "item__head" },
      h("span", { class: "badge" }, kind),
      h("strong", { class: "item__title" }, title),
      time(timestamp),
    ),
    detail ? h("p", { class: "muted item__detail" }, detail) : null,
    extra,
  );
  activityList.prepend(item);
  applyFilterTo(item);
  trim(activityList, MAX_FEED_ITEMS);
  $("activity-empty").hidden = true;
}

function onNewRun(event, message) {
  // json-bench's format sends the whole run, its figures at the top and its id as id.
  const data = { ...event, run_id: event.run_id ?? event.id };
  const summary = event.summary || event;
  const detail = [
    data.test_name,
    `run ${data.run_id}`,
    shortCommit(data.git_commit),
    isNumber(summary.total_requests) && `${count(summary.total_requests)} requests`,
    isNumber(summary.overall_error_rate) && `${percent(summary.overall_error_rate, 2)} errors`,
    isNumber(summary.p95_latency_ms) && `p95 ${decimal.format(summary.p95_latency_ms)} ms`,
    summary.best_client && `best: ${summary.best_client}`,
  ]
    .filter(Boolean)
    .join(" · ");
  addActivity("stored", "new-run", "Run stored", detail, data, data.timestamp || message.timestamp);
}

function onBaselineUpdated(event, message) {
  const data = {
    ...event,
    baseline_name: event.baseline_name ?? event.baselineName,
    run_id: event.run_id ?? event.runId,
  };
  addActivity(
    "baseline",
    "baseline",
    `Baseline “${data.baseline_name}” updated`,
    [data.test_name, `now run ${data.run_id}`].filter(Boolean).join(" · "),
    data,
    data.updated_at || message.timestamp,
  );
}

function onAnalysisComplete(data, message) {
  const results = data.analysis_results;
  // A one-line digest of the plain values; the whole result is one click away.
  let digest = "";
  if (results && typeof results === "object" && !Array.isArray(results)) {
    digest = Object.entries(results)
      .filter(([, value]) => value === null || typeof value !== "object")
      .slice(0, 4)
      .map(([key, value]) => `${key}: ${isNumber(value) ? precise.format(value) : value}`)
      .join(" · ");
  }
  const full = h(
    "details",
    { class: "item__more" },
    h("summary", {}, "Results"),
    h("pre", {}, JSON.stringify(results, null, 2)),
  );
  addActivity(
    "analysis",
    "analysis",
    "Analysis complete",
    [data.test_name, `run ${data.run_id}`, digest].filter(Boolean).join(" · "),
    data,
    data.completed_at || message.timestamp,
    full,
  );
}

// ---------------------------------------------------------------------------------------
// Connection status and message rate

const statusBox = $("status");
const reconnectButton = $("reconnect-now");
const statusText = $("status-text");
let countdown = null;
let retrying = null; // the attempt number while reconnecting, until the connection opens

function showStatus(status, detail) {
  clearInterval(countdown);
  countdown = null;
  // The client reports "connecting" for each retry's handshake too; to a person watching,
  // that is still reconnecting, and the countdown must not flicker back to "Connecting".
  const shown = status === "connecting" && retrying !== null ? "reconnecting" : status;
  statusBox.dataset.status = shown;
  // While away from the hub, what the page shows may be out of date: it dims (CSS), and a
  // person need not wait out the backoff to try again.
  document.body.dataset.connection = shown;
  reconnectButton.hidden = status !== "reconnecting";
  if (status === "open") {
    retrying = null;
    statusText.textContent = "Live";
  } else if (status === "connecting") {
    statusText.textContent = retrying !== null ? `Reconnecting… (attempt ${retrying})` : "Connecting…";
  } else if (status === "reconnecting") {
    const attempt = detail && isNumber(detail.attempt) ? detail.attempt : null;
    const delay = detail && isNumber(detail.delay) ? detail.delay : null;
    retrying = attempt ?? retrying ?? 1;
    const suffix = attempt ? ` (attempt ${attempt})` : "";
    if (delay === null) {
      statusText.textContent = `Reconnecting…${suffix}`;
      return;
    }
    const due = Date.now() + delay; // delay is in milliseconds
    const tick = () => {
      const left = Math.ceil((due - Date.now()) / 1000);
      statusText.textContent = left > 0 ? `Reconnecting in ${left}s${suffix}` : `Reconnecting…${suffix}`;
      if (left <= 0) {
        clearInterval(countdown);
        countdown = null;
      }
    };
    tick();
    countdown = setInterval(tick, 250);
  } else if (status === "closed") {
    retrying = null;
    const code = detail && detail.code ? ` (${detail.code}${detail.reason ? `, ${detail.reason}` : ""})` : "";
    statusText.textContent = `Disconnected${code}`;
  } else {
    statusText.textContent = String(status);
  }
}

// A reconnect resumes after the last event received (wshub.js sends ?since=). When the hub
// could not replay what was published meanwhile (its history did not reach back that far,
// or it restarted), say so quietly: the view is live again, but may lack a few events.
const resumeNotice = $("resume-notice");

const resumeText = $("resume-notice-text").textContent;

function showResume(detail) {
  const snapshot = detail?.snapshot;
  if (snapshot && snapshot.since !== null) {
    // The hub could not replay what was missed, and sent its current state instead.
    $("resume-notice-text").textContent =
      `Reconnected, but the hub could not replay the events missed while disconnected ` +
      `(${snapshot.reason}): the runs and recent events shown are its current state, and ` +
      `events in between may be missing.`;
    resumeNotice.hidden = false;
  } else if (detail && detail.recovered === false) {
    $("resume-notice-text").textContent = resumeText;
    resumeNotice.hidden = false;
  }
}

// Messages can also be lost between hubs (the shared stream was trimmed before this page's
// hub read them): the hub says so with a gap, and only a reload refetches what is current.
function showGap(data) {
  const count = typeof data?.missed === "number" ? `${data.missed} events` : "Some events";
  $("resume-notice-text").textContent =
    `${count} were lost on the way to this page; reload it to see everything current.`;
  resumeNotice.hidden = false;
}

reconnectButton.addEventListener("click", () => client.reconnectNow());

// ---------------------------------------------------------------------------------------
// Access: a hub that requires subscriber tokens (docs/security.md)

// The token comes in the page's own address (/?token=...), since a page cannot set headers
// on a WebSocket; wshub.js sends it on every connect and reconnect.
const pageToken = new URL(location.href).searchParams.get("token") || null;
const accessNotice = $("access-notice");
let probing = false;

function showAccess(text) {
  $("access-notice-text").textContent = text;
  accessNotice.hidden = false;
}

/**
 * A WebSocket that cannot connect tells the page nothing of why: a 401 looks like a hub
 * that is down. Ask the endpoint with plain HTTP, which answers a refused token with the
 * same status and its reason. Refused (401 or 403), the page stops retrying: the same
 * token would only be refused again.
 */
async function explainFailure() {
  if (probing) return;
  probing = true;
  try {
    const url = new URL(endpoint, location.href);
    if (pageToken) url.searchParams.set("token", pageToken);
    let answer;
    try {
      answer = await fetch(url, { cache: "no-store" });
    } catch {
      return; // the hub is unreachable: the reconnection goes on
    }
    if (answer.status !== 401 && answer.status !== 403) return;
    const reason = (await answer.text()).trim().slice(0, 200);
    if (client.status === "open") return;
    client.close();
    statusBox.dataset.status = "refused";
    document.body.dataset.connection = "refused";
    statusText.textContent = answer.status === 401 ? "Not authorized" : "Refused";
    if (answer.status === 403) {
      showAccess(`The hub refused this page: ${reason}.`);
    } else if (pageToken === null) {
      showAccess(
        "This hub requires a subscriber token. Open this page with ?token=<your token> " +
          "in its address; an operator mints one with the command wshub token.",
      );
    } else {
      showAccess(
        `The hub refused this page's token: ${reason}. ` +
          "Open the page with a fresh ?token= in its address.",
      );
    }
  } finally {
    probing = false;
  }
}

/** The hub refused topics this page's token does not grant (and applied the others). */
function showForbidden(error) {
  const forbidden = error?.details?.forbidden;
  if (error?.code !== 403 || !Array.isArray(forbidden)) return;
  const named = forbidden.map((topic) => (topic === "*" ? "every event (*)" : topic)).join(", ");
  const allowed = Array.isArray(error.details.allowed) ? error.details.allowed.join(", ") : "";
  showAccess(
    `This page's token does not allow ${named}` +
      (allowed ? `; it allows ${allowed}. Follow a test it allows by name.` : "."),
  );
}

function showExpiry(data) {
  const grace = isNumber(data?.grace) ? ` in ${Math.round(data.grace)}s` : "";
  showAccess(
    `This page's token has expired: the hub disconnects it${grace}. ` +
      "Open the page with a fresh ?token= in its address.",
  );
}

$("resume-notice-dismiss").addEventListener("click", () => {
  resumeNotice.hidden = true;
});

const arrivals = []; // receive times (ms) within the rate window

function showRate() {
  const now = performance.now();
  while (arrivals.length && arrivals[0] <= now - RATE_WINDOW_MS) arrivals.shift();
  $("rate").textContent = rate.format(arrivals.length / (RATE_WINDOW_MS / 1000));
}

// ---------------------------------------------------------------------------------------
// The test-name filter: subscribe to test:<name> instead of everything

const filterForm = $("filter-form");
const filterInput = $("filter");
const clearButton = $("filter-clear");
let activeTest = "";

/** Hide a row or item of another test while a filter is active (the server sends no more
 * of them; this hides those that arrived before). */
function applyFilterTo(element) {
  element.hidden = Boolean(activeTest) && element.dataset.test !== activeTest;
}

function showTopics() {
  $("topics").textContent = client.topics.join(", ") || "nothing";
}

async function follow(testName) {
  const next = testName.trim();
  if (next === activeTest) return;
  const previous = activeTest ? [`test:${activeTest}`] : ["*"];
  const wanted = next ? [`test:${next}`] : ["*"];
  const before = activeTest;
  activeTest = next;
  // Subscribe before unsubscribing, so no event falls in between.
  const held = await client.subscribe(wanted);
  if (!wanted.every((topic) => held.includes(topic))) {
    // Not granted (the error handler says so): keep following what the page follows.
    activeTest = before;
    filterInput.value = before;
    return;
  }
  await client.unsubscribe(previous.filter((topic) => !wanted.includes(topic)));
  accessNotice.hidden = true; // a refusal it showed is answered: this one was granted
  for (const element of document.querySelectorAll("[data-test]")) applyFilterTo(element);
  clearButton.hidden = !next;
  filterInput.value = next;
  showTopics();
  // The filter lives in the URL too, so a filtered view can be bookmarked or shared.
  const url = new URL(location.href);
  if (next) url.searchParams.set("test", next);
  else url.searchParams.delete("test");
  history.replaceState(null, "", url);
}

// ---------------------------------------------------------------------------------------
// Wiring

const initialTest = (new URL(location.href).searchParams.get("test") || "").trim();
activeTest = initialTest;
filterInput.value = initialTest;
clearButton.hidden = !initialTest;

const scheme = location.protocol === "https:" ? "wss" : "ws";
const endpoint = document.querySelector('meta[name="wshub-endpoint"]')?.content || "/api/ws";
const client = new WshubClient(`${scheme}://${location.host}${endpoint}`, {
  topics: initialTest ? [`test:${initialTest}`] : ["*"],
  token: pageToken,
});

client.onStatus((status, detail) => {
  showStatus(status, detail);
  if (status === "open") {
    showTopics();
    showResume(detail);
  } else if (status === "reconnecting" && detail?.code === 1006) {
    explainFailure();
  }
});
// A snapshot (when the page opens, follows another test, or comes back after a gap) may hold
// messages the page already shows: each published message is handled once, by its id.
const handledIds = new Set();
const MAX_HANDLED_IDS = 5000;

function once(handler) {
  return (data, message) => {
    if (typeof message.id === "string") {
      if (handledIds.has(message.id)) return;
      handledIds.add(message.id);
      if (handledIds.size > MAX_HANDLED_IDS) handledIds.delete(handledIds.values().next().value);
    }
    handler(data, message);
  };
}

client.on("error", showForbidden);
client.on("token_expired", showExpiry);
client.on("*", () => {
  if (client.snapshotRemaining === 0) arrivals.push(performance.now()); // the rate of live events
});
client.on("gap", showGap);
client.on("run_started", once(onRunStarted));
client.on("run_progress", once(onRunProgress));
client.on("run_complete", once(onRunComplete));
client.on("run_failed", once(onRunFailed));
client.on("regression_detected", once(onRegression));
client.on("new_run", once(onNewRun));
client.on("baseline_updated", once(onBaselineUpdated));
client.on("analysis_complete", once(onAnalysisComplete));

filterForm.addEventListener("submit", (event) => {
  event.preventDefault();
  follow(filterInput.value).catch((error) => console.error("wshub: filter failed", error));
});
filterInput.addEventListener("search", () => {
  // The clear (x) button of a search field: back to everything.
  if (!filterInput.value) follow("").catch((error) => console.error("wshub: filter failed", error));
});
clearButton.addEventListener("click", () => {
  follow("").catch((error) => console.error("wshub: filter failed", error));
});

setInterval(showRate, 500);
setInterval(markStaleRuns, STALE_CHECK_MS);
showAlertsButton();
watchPermission();
showTopics();
updateRunCount();
client.connect();
