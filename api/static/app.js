// renderwatch status page: plain JS, no build step, nothing from elsewhere.
// The key lives in sessionStorage and travels only in the Authorization header, so the
// event stream is read with fetch() and a small SSE parser (EventSource cannot send
// headers). When a stream fails, that job is polled at the server's X-Poll-Interval and
// the page says so; the stream is retried with Last-Event-ID.
"use strict";

const KEY = "renderwatch.key";
const STAGES = ["queued", "scripting", "storyboard", "rendering", "encoding", "uploading", "done"];
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
// Browsers open at most 6 HTTP/1.1 connections per host: keep some for requests.
const MAX_STREAMS = 4;
const STREAM_RETRY_MS = 5000;
const LIST_REFRESH_MS = 5000;
const CACHE_REFRESH_MS = 5000;

const state = {
  key: sessionStorage.getItem(KEY) || "",
  jobs: new Map(),       // job_id -> job object (newest version seen)
  followers: new Map(),  // job_id -> Follower
  timelines: new Map(),  // job_id -> [{stage, at}]
  detailId: null,
  pollSeconds: 2,
};

const $ = (id) => document.getElementById(id);

function headers(extra = {}) {
  return { Authorization: `Bearer ${state.key}`, ...extra };
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  // The server's pace for polling clients (on the 202 and on jobs still moving).
  const hint = parseFloat(response.headers.get("X-Poll-Interval") || "");
  if (hint > 0) state.pollSeconds = hint;
  if (response.status === 401) {
    showLogin("That key was refused (401).");
    throw new Error("unauthorized");
  }
  return response;
}

// -- SSE over fetch ------------------------------------------------------------------------

// Parses text/event-stream chunks into {id, data} events (comments and retry ignored).
class SseParser {
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = "";
  }
  push(text) {
    this.buffer += text.replace(/\r\n?/g, "\n");
    let end;
    while ((end = this.buffer.indexOf("\n\n")) >= 0) {
      const block = this.buffer.slice(0, end);
      this.buffer = this.buffer.slice(end + 2);
      let id = null;
      const data = [];
      for (const line of block.split("\n")) {
        if (!line || line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? "" : line.slice(colon + 1);
        if (value.startsWith(" ")) value = value.slice(1);
        if (field === "id") id = value;
        else if (field === "data") data.push(value);
      }
      if (data.length) this.onEvent({ id, data: data.join("\n") });
    }
  }
}

// Follows one job: the stream while it works, polling while it does not.
class Follower {
  constructor(jobId) {
    this.jobId = jobId;
    this.lastId = null;
    this.mode = "starting";
    this.stopped = false;
    this.controller = null;
    this.timer = null;
  }

  start() {
    if (streamingCount() < MAX_STREAMS) this.stream();
    else this.poll("more jobs than streams");
  }

  stop() {
    this.stopped = true;
    if (this.controller) this.controller.abort();
    clearTimeout(this.timer);
    clearTimeout(this.pollTimer);
    state.followers.delete(this.jobId);
    renderTransport();
  }

  async stream() {
    if (this.stopped) return;
    clearTimeout(this.timer);
    clearTimeout(this.pollTimer);
    this.setMode("connecting");
    this.controller = new AbortController();
    const extra = { Accept: "text/event-stream" };
    if (this.lastId) extra["Last-Event-ID"] = this.lastId;
    let finished = false;
    try {
      const response = await fetch(`/api/v2/jobs/${this.jobId}/events`, {
        headers: headers(extra),
        signal: this.controller.signal,
      });
      if (response.status === 404) {
        markMissing(this.jobId);
        this.stop();
        return;
      }
      if (!response.ok || !response.body) throw new Error(`stream answered ${response.status}`);
      this.setMode("live");
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      const parser = new SseParser((event) => {
        if (event.id) this.lastId = event.id;
        const job = JSON.parse(event.data);
        update(job);
        if (FINISHED.has(job.status)) finished = true;
      });
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parser.push(value);
      }
    } catch (error) {
      if (this.stopped) return;
    }
    if (finished || this.stopped) {
      this.stop();
      return;
    }
    // The stream broke (network, API restart, 503): poll meanwhile; poll() retries
    // the stream (with Last-Event-ID) after STREAM_RETRY_MS.
    this.poll("stream unavailable");
  }

  async poll(reason) {
    if (this.stopped) return;
    this.setMode("polling", reason);
    clearTimeout(this.timer);
    const tick = async () => {
      if (this.stopped || this.mode !== "polling") return;
      try {
        const response = await api(`/api/v2/jobs/${this.jobId}`);
        if (response.status === 404) {
          markMissing(this.jobId);
          this.stop();
          return;
        }
        this.setMode("polling", reason); // shows the pace the server asked for
        if (response.ok) {
          const job = await response.json();
          update(job);
          if (FINISHED.has(job.status)) {
            this.stop();
            return;
          }
        }
      } catch (error) {
        // Network down: keep trying at the same pace; the badge says we are polling.
      }
      if (this.mode === "polling" && !this.stopped) {
        this.pollTimer = setTimeout(tick, state.pollSeconds * 1000);
      }
    };
    tick();
    // Try the stream again after a while, if a stream slot is free.
    this.timer = setTimeout(() => {
      if (!this.stopped && this.mode === "polling" && streamingCount() < MAX_STREAMS) {
        clearTimeout(this.pollTimer);
        this.stream();
      }
    }, STREAM_RETRY_MS);
  }

  setMode(mode, reason = "") {
    this.mode = mode;
    this.reason = reason;
    const row = document.querySelector(`tr[data-job="${this.jobId}"] .updates`);
    if (row) {
      row.textContent =
        mode === "polling" ? `polling every ${state.pollSeconds}s (${reason})` : mode;
      row.dataset.mode = mode;
    }
    renderTransport();
  }
}

function streamingCount() {
  let count = 0;
  for (const follower of state.followers.values()) {
    if (follower.mode === "live" || follower.mode === "connecting") count += 1;
  }
  return count;
}

function follow(jobId) {
  if (state.followers.has(jobId)) return;
  const follower = new Follower(jobId);
  state.followers.set(jobId, follower);
  follower.start();
}

function renderTransport() {
  const badge = $("transport");
  const modes = [...state.followers.values()].map((f) => f.mode);
  if (!modes.length) {
    badge.dataset.state = "idle";
    badge.textContent = "connected: nothing running";
  } else if (modes.includes("polling")) {
    badge.dataset.state = "polling";
    badge.textContent = "stream unavailable: polling (fallback)";
  } else {
    badge.dataset.state = "live";
    badge.textContent = "live: server-sent events";
  }
}

// -- jobs ---------------------------------------------------------------------------------

function update(job) {
  const known = state.jobs.get(job.job_id);
  if (known && known.version > job.version) return; // never backwards
  state.jobs.set(job.job_id, job);
  const timeline = state.timelines.get(job.job_id) || [];
  const stage = job.progress.current_stage;
  if (!timeline.length || timeline[timeline.length - 1].stage !== stage) {
    timeline.push({ stage, at: job.updated_at });
    state.timelines.set(job.job_id, timeline);
  }
  renderRow(job);
  if (state.detailId === job.job_id) renderDetail(job);
}

function formatEta(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  const minutes = Math.floor(seconds / 60);
  return `${minutes} min ${Math.round(seconds - minutes * 60)} s`;
}

function cell(row, name) {
  return row.querySelector(`.${name}`);
}

function renderRow(job) {
  const body = document.querySelector("#jobs tbody");
  let row = body.querySelector(`tr[data-job="${job.job_id}"]`);
  if (!row) {
    row = document.createElement("tr");
    row.dataset.job = String(job.job_id);
    for (const name of ["id", "bar", "stage", "scenes", "eta", "status", "updates", "actions"]) {
      const td = document.createElement("td");
      td.className = name;
      row.appendChild(td);
    }
    const link = document.createElement("a");
    link.href = "#";
    link.textContent = `#${job.job_id}`;
    link.addEventListener("click", (event) => {
      event.preventDefault();
      showDetail(job.job_id);
    });
    cell(row, "id").appendChild(link);
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("div");
    fill.className = "fill";
    const label = document.createElement("span");
    label.className = "percent";
    bar.append(fill, label);
    cell(row, "bar").appendChild(bar);
    const cancel = document.createElement("button");
    cancel.textContent = "Cancel";
    cancel.className = "cancel";
    cancel.addEventListener("click", () => cancelJob(job.job_id));
    cell(row, "actions").appendChild(cancel);
    // Newest first: insert before the first row with a smaller id.
    const after = [...body.rows].find((r) => Number(r.dataset.job) < job.job_id);
    body.insertBefore(row, after || null);
    $("jobs-empty").hidden = true;
  }
  const p = job.progress;
  row.dataset.status = job.status;
  row.querySelector(".fill").style.width = `${p.percent}%`;
  row.querySelector(".percent").textContent = `${Math.round(p.percent)} %`;
  cell(row, "stage").textContent = p.current_stage;
  cell(row, "scenes").textContent = `${p.scenes_completed}/${p.scenes_total}`;
  cell(row, "eta").textContent = FINISHED.has(job.status) ? "–" : formatEta(p.eta_seconds);
  cell(row, "status").textContent = job.status;
  cell(row, "status").dataset.status = job.status;
  row.querySelector(".cancel").hidden = FINISHED.has(job.status);
  if (FINISHED.has(job.status)) {
    cell(row, "updates").textContent = "finished";
    cell(row, "updates").dataset.mode = "finished";
  }
}

function markMissing(jobId) {
  const row = document.querySelector(`tr[data-job="${jobId}"]`);
  if (row) cell(row, "updates").textContent = "not found";
}

async function loadJobs() {
  try {
    const response = await api("/api/v2/jobs?limit=20");
    if (!response.ok) return;
    const page = await response.json();
    for (const job of page.items.slice().reverse()) {
      update(job);
      if (!FINISHED.has(job.status)) follow(job.job_id);
    }
  } catch (error) {
    // The badge and the rows already show what is known; the next refresh retries.
  }
}

async function submitJob(event) {
  event.preventDefault();
  const error = $("submit-error");
  error.hidden = true;
  try {
    const response = await api("/api/v2/jobs", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt: $("prompt").value, scenes_total: Number($("scenes").value) }),
    });
    const answer = await response.json();
    if (response.status !== 202) {
      error.textContent = `refused (${response.status}): ${JSON.stringify(answer.detail)}`;
      error.hidden = false;
      return;
    }
    const job = await (await api(answer.status_url)).json();
    update(job);
    follow(job.job_id);
  } catch (failure) {
    error.textContent = "could not reach the API";
    error.hidden = false;
  }
}

async function cancelJob(jobId) {
  try {
    await api(`/api/v2/jobs/${jobId}/cancel`, { method: "POST" });
  } catch (error) {
    // The stream or the poll shows the outcome.
  }
  follow(jobId);
}

// -- detail -------------------------------------------------------------------------------

async function showDetail(jobId) {
  state.detailId = jobId;
  $("lookup").value = String(jobId);
  $("detail-missing").hidden = true;
  $("detail").hidden = true;
  try {
    const response = await api(`/api/v2/jobs/${jobId}`);
    if (response.status === 404 || response.status === 422) {
      $("detail-missing").hidden = false;
      return;
    }
    const job = await response.json();
    update(job);
    renderDetail(job);
    if (!FINISHED.has(job.status)) follow(job.job_id);
  } catch (error) {
    $("detail-missing").textContent = "could not reach the API";
    $("detail-missing").hidden = false;
  }
}

function renderDetail(job) {
  $("detail").hidden = false;
  $("detail-title").textContent = `Job #${job.job_id}`;
  $("detail-status").textContent = job.status;
  $("detail-status").dataset.status = job.status;
  const reached = STAGES.indexOf(job.progress.current_stage);
  const seen = new Map((state.timelines.get(job.job_id) || []).map((t) => [t.stage, t.at]));
  const list = $("timeline");
  list.replaceChildren();
  STAGES.forEach((stage, index) => {
    const item = document.createElement("li");
    item.dataset.state = index < reached || job.status === "succeeded" ? "done"
      : index === reached ? (FINISHED.has(job.status) ? "stopped" : "current") : "todo";
    let text = stage;
    if (stage === "rendering") {
      text += ` (${job.progress.scenes_completed}/${job.progress.scenes_total} scenes)`;
    }
    if (seen.has(stage)) text += ` — ${new Date(seen.get(stage)).toLocaleTimeString()}`;
    item.textContent = text;
    list.appendChild(item);
  });
  const error = $("detail-error-text");
  error.hidden = !job.error;
  error.textContent = job.error || "";
}

// -- cache panel --------------------------------------------------------------------------

async function loadCache() {
  try {
    const stats = await (await api("/api/v2/cache/stats")).json();
    const s = stats.statistics;
    $("hit-rate").textContent = `${s.hit_rate} %`;
    $("saved").textContent = String(s.hits);
    $("redis-state").textContent = !stats.cache_enabled ? "caching off"
      : s.redis_available ? "available (breaker closed)" : "unavailable (breaker open)";
    $("redis-state").dataset.state = s.redis_available ? "ok" : "down";
    $("cache-message").textContent = stats.message;
    const history = await (await api("/api/v2/cache/stats/history?limit=100")).json();
    drawChart(history.items.slice().reverse());
  } catch (error) {
    $("cache-message").textContent = "cache statistics unavailable";
  }
}

function drawChart(points) {
  const canvas = $("chart");
  const g = canvas.getContext("2d");
  const w = canvas.width;
  const h = canvas.height;
  const pad = 28;
  g.clearRect(0, 0, w, h);
  g.strokeStyle = "#999";
  g.fillStyle = "#555";
  g.font = "11px sans-serif";
  g.beginPath();
  g.moveTo(pad, 6);
  g.lineTo(pad, h - pad);
  g.lineTo(w - 6, h - pad);
  g.stroke();
  g.fillText("100%", 0, 12);
  g.fillText("0%", 8, h - pad);
  const rates = points.map((p) => Number((p.statistics || p).hit_rate ?? p.hit_rate ?? 0));
  if (!rates.length) {
    g.fillText("no snapshots yet", pad + 10, h / 2);
    return;
  }
  const x = (i) => pad + ((w - pad - 10) * i) / Math.max(rates.length - 1, 1);
  const y = (r) => h - pad - ((h - pad - 8) * Math.min(Math.max(r, 0), 100)) / 100;
  g.strokeStyle = "#2b6cb0";
  g.lineWidth = 2;
  g.beginPath();
  rates.forEach((r, i) => (i ? g.lineTo(x(i), y(r)) : g.moveTo(x(i), y(r))));
  g.stroke();
  g.fillText(`${rates.length} snapshots, newest right`, pad + 6, h - 8);
}

// -- start --------------------------------------------------------------------------------

function showLogin(message) {
  for (const follower of [...state.followers.values()]) follower.stop();
  $("login").hidden = false;
  $("app").hidden = true;
  const error = $("key-error");
  error.hidden = !message;
  error.textContent = message || "";
}

let timers = [];

function startApp() {
  $("login").hidden = true;
  $("app").hidden = false;
  renderTransport();
  loadJobs();
  loadCache();
  timers.forEach(clearInterval);
  timers = [setInterval(loadJobs, LIST_REFRESH_MS), setInterval(loadCache, CACHE_REFRESH_MS)];
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("key").value.trim();
    sessionStorage.setItem(KEY, state.key);
    $("key").value = "";
    startApp();
  });
  $("forget").addEventListener("click", () => {
    sessionStorage.removeItem(KEY);
    state.key = "";
    timers.forEach(clearInterval);
    showLogin("");
  });
  $("submit-form").addEventListener("submit", submitJob);
  $("lookup-form").addEventListener("submit", (event) => {
    event.preventDefault();
    showDetail(Number($("lookup").value));
  });
  if (state.key) startApp();
  else showLogin("");
});
