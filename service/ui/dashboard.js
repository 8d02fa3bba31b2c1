// The XSAM dashboard: plain DOM over the REST API (/v1), charts by plotly.js (served from the
// plotly wheel). The token lives in sessionStorage only; view state lives in the URL's #hash.
"use strict";

const TOKEN_KEY = "xsam-token";
const TERMINAL = ["succeeded", "failed", "cancelled"];
const POLL_MS = 2000;
const MAX_POINTS = 400;
// Chart → the metric series it shows.
const CHARTS = {
  loss: ["train/loss", "val/loss", "test/loss"],
  accuracy: ["train/acc", "val/acc", "test/acc"],
  lr: ["lr"],
  alpha: ["xsam/alpha"],
  phi: ["xsam/phi"],
  sharpness: ["xsam/sharpness"],
};
const TITLES = { loss: "loss", accuracy: "accuracy", lr: "learning rate", alpha: "α", phi: "φ",
  sharpness: "sharpness" };

let timers = [];

// --- the API ---------------------------------------------------------------------------------

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const response = await fetch(path, {
    ...options,
    headers: { ...(options.headers || {}), Authorization: `Bearer ${token}` },
  });
  if (response.status === 401) throw new Unauthorized("token refused");
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (e) { /* not JSON */ }
    throw new Error(`${response.status}: ${typeof detail === "string" ? detail : JSON.stringify(detail)}`);
  }
  return options.raw ? response : response.json();
}

// --- small DOM helpers -------------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "onclick") node.addEventListener("click", v);
    else if (v !== undefined && v !== null) node.setAttribute(k, v);
  }
  for (const child of children.flat()) {
    node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  }
  return node;
}

function table(headers, rows) {
  return el("table", {}, el("tr", {}, headers.map((h) => el("th", {}, h))), rows);
}

const fmt = (v, digits = 4) => (v === null || v === undefined ? "–" :
  typeof v === "number" ? Number(v.toPrecision(digits)).toString() : String(v));
const pct = (f) => (f === null || f === undefined ? "–" : `${(100 * f).toFixed(0)}%`);
function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  return s >= 3600 ? `${Math.floor(s / 3600)}h${Math.floor((s % 3600) / 60)}m` :
    s >= 60 ? `${Math.floor(s / 60)}m${s % 60}s` : `${s}s`;
}
const stat = (s) => (s ? `${fmt(s.mean)} ± ${fmt(s.sd)}` : "–");

function every(ms, fn) {
  const tick = async () => {
    try { await fn(); } catch (e) { report(e); }
  };
  timers.push(setInterval(tick, ms));
  return tick();
}

function report(error) {
  if (error instanceof Unauthorized) { signOut("That token was refused."); return; }
  const view = document.getElementById("view");
  let box = document.getElementById("view-error");
  if (!box) { box = el("p", { id: "view-error", class: "error" }); view.prepend(box); }
  box.textContent = String(error.message || error);
}

// --- charts (plotly) -----------------------------------------------------------------------------

const LAYOUT = { margin: { l: 50, r: 10, t: 30, b: 35 }, legend: { orientation: "h" },
  xaxis: { title: { text: "step" } } };
const CONFIG = { displaylogo: false, responsive: true };

// A series as traces: its line, and, where the API downsampled it into buckets, the min/max
// envelope drawn as a band (so a spike stays visible).
function seriesTraces(name, points) {
  const x = points.map((p) => p.step);
  const traces = [];
  if (points.some((p) => p.min !== undefined && p.min !== null)) {
    traces.push({ x, y: points.map((p) => p.min), mode: "lines", line: { width: 0 },
      showlegend: false, hoverinfo: "skip", meta: "envelope-low", name: `${name} min` });
    traces.push({ x, y: points.map((p) => p.max), mode: "lines", line: { width: 0 },
      fill: "tonexty", fillcolor: "rgba(100,100,200,0.2)", showlegend: false,
      hoverinfo: "skip", meta: "envelope", name: `${name} min–max` });
  }
  traces.push({ x, y: points.map((p) => p.value), mode: "lines", name, meta: "series" });
  return traces;
}

function draw(div, traces, title, extra = {}) {
  Plotly.react(div, traces,
    { ...LAYOUT, title: { text: title, font: { size: 14 }, x: 0.02, xanchor: "left" }, ...extra },
    CONFIG);
}

// --- the token ----------------------------------------------------------------------------------

function signOut(message) {
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById("token-error").textContent = message || "";
  route();
}

function setUpToken() {
  const form = document.getElementById("token-form");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = document.getElementById("token");
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    input.value = "";
    try {
      await api("/v1/jobs?limit=1");
      document.getElementById("token-error").textContent = "";
      route();
    } catch (e) {
      signOut(e instanceof Unauthorized ? "That token was refused." : String(e.message));
    }
  });
  document.getElementById("sign-out").addEventListener("click", () => signOut(""));
}

// --- views ----------------------------------------------------------------------------------------

async function jobsView(view, params) {
  const status = params.get("status") || "";
  const study = params.get("study") || "";
  const select = el("select", { id: "status-filter" },
    ["", "queued", "running", "succeeded", "failed", "cancelled"].map((s) =>
      el("option", s === status ? { value: s, selected: "" } : { value: s }, s || "any status")));
  select.addEventListener("change", () => {
    const q = new URLSearchParams();
    if (select.value) q.set("status", select.value);
    if (study) q.set("study", study);
    location.hash = q.toString() ? `#/jobs?${q}` : "#/jobs";
  });
  const holder = el("div");
  view.append(el("h1", {}, study ? `Jobs of study ${study}` : "Jobs"),
    el("div", { class: "row" }, "Status: ", select), holder);
  await every(3000, async () => {
    const q = new URLSearchParams({ limit: "100" });
    if (status) q.set("status", status);
    if (study) q.set("study", study);
    const jobs = await api(`/v1/jobs?${q}`);
    const rows = jobs.items.map((j) => {
      const p = j.progress || {};
      return el("tr", { class: "link", onclick: () => { location.hash = `#/jobs/${j.id}`; } },
        el("td", {}, String(j.id)), el("td", {}, j.name || ""),
        el("td", { class: `status-${j.status}` }, j.status),
        el("td", {}, p.epoch !== undefined && p.epoch !== null ? `${pct(p.fraction)} (epoch ${p.epoch}/${p.epochs})` : pct(p.fraction)),
        el("td", {}, j.status === "running" ? duration(p.eta_s) : "–"),
        el("td", {}, fmt(j.latest_metrics["test/acc"]?.value)),
        el("td", {}, j.study_id ? `study ${j.study_id}` : ""),
        el("td", {}, new Date(j.created_at).toLocaleString()));
    });
    holder.replaceChildren(table(
      ["id", "name", "status", "progress", "ETA", "test/acc", "study", "created"], rows));
  });
}

async function jobView(view, id) {
  const head = el("div", { id: "job-head" });
  const charts = el("div", { class: "charts" });
  const chartDivs = {};
  for (const key of Object.keys(CHARTS)) {
    chartDivs[key] = el("div", { class: "chart", id: `chart-${key}` });
    charts.append(chartDivs[key]);
  }
  const probes = el("div", { class: "chart", id: "chart-probes" });
  charts.append(probes);
  const events = el("tbody");
  const logBox = el("pre", { class: "log", id: "log-tail" });
  const logNote = el("p", { id: "log-dropped" });
  const config = el("pre", { id: "job-config" });
  const envBox = el("div", { id: "job-env" });
  const envs = {};
  view.append(el("h1", {}, `Job ${id}`), head, el("section", {}, el("h2", {}, "Charts"), charts),
    el("section", {}, el("h2", {}, "Log"), logNote, logBox),
    el("section", {}, el("h2", {}, "Events"), el("table", {}, el("tr", {},
      el("th", {}, "time"), el("th", {}, "type"), el("th", {}, "message")), events)),
    el("section", {}, el("h2", {}, "Run environment"), envBox),
    el("section", {}, el("h2", {}, "Config"), config));

  let job = null;
  let eventsAfter = 0;
  let logAfter = 0;
  const searches = [];

  async function refreshJob() {
    job = await api(`/v1/jobs/${id}`);
    const p = job.progress || {};
    const actions = [];
    if (!TERMINAL.includes(job.status)) {
      actions.push(el("button", { id: "cancel", onclick: async () => {
        await api(`/v1/jobs/${id}/cancel`, { method: "POST" }); await refreshJob();
      } }, "Cancel"));
    }
    if (job.status === "succeeded") {
      actions.push(el("button", { id: "download", onclick: () => download(id) }, "Download model"));
    }
    const err = job.error ? el("div", { class: "error" },
      el("p", {}, `${job.error.type}: ${job.error.message}`),
      job.error.traceback ? el("pre", { id: "traceback" }, job.error.traceback) : "") : "";
    head.replaceChildren(
      el("div", { class: "row" },
        el("span", { class: `status-${job.status}`, id: "job-status" }, job.status),
        el("span", {}, job.name || ""), el("span", {}, `attempt ${job.attempt}/${job.max_attempts}`),
        el("span", {}, `progress ${pct(p.fraction)}`),
        el("span", {}, job.status === "running" ? `ETA ${duration(p.eta_s)}` : ""),
        job.study_id ? el("a", { href: `#/studies/${job.study_id}` }, `study ${job.study_id} · ${job.cell}`) : "",
        ...actions),
      err);
    if (!config.textContent) config.textContent = JSON.stringify(job.config, null, 2);
  }

  async function refreshCharts() {
    const names = Object.values(CHARTS).flat().join(",");
    const metrics = await api(`/v1/jobs/${id}/metrics?names=${encodeURIComponent(names)}&max_points=${MAX_POINTS}`);
    for (const [key, wanted] of Object.entries(CHARTS)) {
      const traces = wanted.filter((n) => metrics.series[n]?.length)
        .flatMap((n) => seriesTraces(n, metrics.series[n]));
      draw(chartDivs[key], traces, TITLES[key]);
    }
  }

  async function refreshEvents() {
    for (;;) {
      const page = await api(`/v1/jobs/${id}/events?after=${eventsAfter}&limit=500`);
      for (const e of page.items) {
        events.append(el("tr", {}, el("td", {}, new Date(e.time).toLocaleTimeString()),
          el("td", {}, e.type), el("td", {}, e.message)));
        if (e.type === "alpha_search" && e.data?.alphas && e.data?.losses) searches.push(e);
        if (e.type === "environment" && e.data) envs[`${e.data.attempt}:${e.data.rank}`] = e.data;
      }
      eventsAfter = page.next_after;
      if (!page.items.length) break;
    }
    const keys = ["attempt", "rank", "host", "xsam", "git", "python", "torch", "cuda", "nccl", "ray", "gpu", "gpus"];
    const rows = Object.values(envs).sort((a, b) => a.attempt - b.attempt || a.rank - b.rank);
    envBox.replaceChildren(rows.length ? table(keys, rows.map((e) =>
      el("tr", {}, keys.map((k) => el("td", {}, k === "git" && e[k] ? e[k].slice(0, 10) : fmt(e[k], 6)))))) :
      el("p", {}, "not reported yet"));
    // The α probe curves: loss against α at each search (the latest ten).
    const recent = searches.slice(-10);
    draw(probes, recent.map((e) => ({ x: e.data.alphas, y: e.data.losses, mode: "lines+markers",
      name: `step ${e.data.step ?? e.key ?? ""}`, meta: "probe" })), "α probes (loss vs α)",
    { xaxis: { title: { text: "α" } } });
  }

  async function refreshLogs() {
    for (;;) {
      const page = await api(`/v1/jobs/${id}/logs?after=${logAfter}&limit=1000`);
      if (page.items.length) {
        const follow = logBox.scrollTop + logBox.clientHeight >= logBox.scrollHeight - 5;
        logBox.append(page.items.map((l) =>
          `[a${l.attempt} r${l.rank}] ${l.level ? l.level + " " : ""}${l.text}\n`).join(""));
        if (follow) logBox.scrollTop = logBox.scrollHeight;
      }
      logAfter = page.next_after;
      logNote.textContent = page.dropped ?
        `${page.dropped} lines were dropped from the middle of this log (per-job cap).` : "";
      if (!page.items.length) break;
    }
  }

  await refreshJob();
  await Promise.all([refreshCharts(), refreshEvents(), refreshLogs()]);
  every(POLL_MS, async () => {
    if (job && TERMINAL.includes(job.status)) return;  // a finished job does not change
    await refreshJob();
    await Promise.all([refreshCharts(), refreshEvents(), refreshLogs()]);
  });
}

async function download(id) {
  const response = await api(`/v1/jobs/${id}/artifacts/model`, { raw: true });
  const url = URL.createObjectURL(await response.blob());
  const a = el("a", { href: url, download: `job-${id}-model.pt` });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

async function studiesView(view) {
  const holder = el("div");
  view.append(el("h1", {}, "Studies"), holder);
  await every(5000, async () => {
    const studies = await api("/v1/studies?limit=100");
    holder.replaceChildren(table(["id", "name", "status", "jobs", "baseline", "created"],
      studies.items.map((s) => el("tr", { class: "link", onclick: () => { location.hash = `#/studies/${s.id}`; } },
        el("td", {}, String(s.id)), el("td", {}, s.name || ""),
        el("td", { class: `status-${s.status}` }, s.status),
        el("td", {}, Object.entries(s.counts).filter(([, n]) => n).map(([k, n]) => `${n} ${k}`).join(", ")),
        el("td", {}, s.baseline || ""), el("td", {}, new Date(s.created_at).toLocaleString())))));
  });
}

async function studyView(view, id, params) {
  const metric = params.get("metric") || "test/acc";
  const mode = params.get("mode") || (metric.includes("loss") ? "min" : "max");
  const head = el("div");
  const summary = el("div", { id: "study-summary" });
  const curves = el("div", { class: "chart", id: "chart-curves", style: "height: 380px" });
  view.append(el("h1", {}, `Study ${id}`), head,
    el("section", {}, el("h2", {}, `Summary of ${metric} (${mode})`), summary),
    el("section", {}, el("h2", {}, `${metric}: mean ± sd over seeds, per cell`), curves));
  const palette = ["31,119,180", "255,127,14", "44,160,44", "214,39,40", "148,103,189",
    "140,86,75", "227,119,194", "127,127,127", "188,189,34", "23,190,207"];
  const refresh = async () => {
    const study = await api(`/v1/studies/${id}`);
    head.replaceChildren(el("div", { class: "row" },
      el("span", { class: `status-${study.status}`, id: "study-status" }, study.status),
      el("span", {}, study.name || ""), el("span", {}, `seeds ${study.seeds.join(", ")}`),
      el("span", {}, study.baseline ? `baseline ${study.baseline}` : "no baseline"),
      el("a", { href: `#/jobs?study=${id}` }, "its jobs")));
    const s = await api(`/v1/studies/${id}/summary?metric=${encodeURIComponent(metric)}&mode=${mode}`);
    const pair = (v, k) => (v ? `${fmt(v[k].mean_diff)} (p ${fmt(v[k].p, 2)}, wins ${v[k].wins}/${v.n_pairs})` : "–");
    summary.replaceChildren(table(
      ["cell", "n", "final", "best", "last 5", "wall", "final vs baseline", "best vs baseline"],
      s.cells.map((c) => el("tr", {}, el("td", {}, c.key), el("td", {}, String(c.n)),
        el("td", {}, stat(c.final)), el("td", {}, stat(c.best)), el("td", {}, stat(c.last5)),
        el("td", {}, c.wall_s ? duration(c.wall_s.mean) : "–"),
        el("td", {}, pair(c.vs_baseline, "final")), el("td", {}, pair(c.vs_baseline, "best"))))));
    const data = await api(`/v1/studies/${id}/curves?name=${encodeURIComponent(metric)}&max_points=${MAX_POINTS}`);
    const traces = [];
    Object.entries(data.cells).forEach(([key, points], i) => {
      const rgb = palette[i % palette.length];
      const x = points.map((p) => p.step);
      const sd = points.map((p) => p.sd ?? 0);
      traces.push({ x, y: points.map((p, j) => p.mean - sd[j]), mode: "lines", line: { width: 0 },
        showlegend: false, hoverinfo: "skip", meta: "band-low", legendgroup: key });
      traces.push({ x, y: points.map((p, j) => p.mean + sd[j]), mode: "lines", line: { width: 0 },
        fill: "tonexty", fillcolor: `rgba(${rgb},0.2)`, showlegend: false, hoverinfo: "skip",
        meta: "band", name: `${key} ± sd`, legendgroup: key });
      traces.push({ x, y: points.map((p) => p.mean), mode: "lines", name: key,
        line: { color: `rgb(${rgb})` }, meta: "mean", legendgroup: key });
    });
    draw(curves, traces, metric);
    return study;
  };
  const first = await refresh();
  if (first.status === "running") every(5000, refresh);
}

// --- routing --------------------------------------------------------------------------------------

async function route() {
  timers.forEach(clearInterval);
  timers = [];
  const view = document.getElementById("view");
  view.replaceChildren();
  const signedIn = Boolean(sessionStorage.getItem(TOKEN_KEY));
  document.getElementById("token-form").hidden = signedIn;
  document.getElementById("sign-out").hidden = !signedIn;
  if (!signedIn) return;
  const [path, query] = (location.hash.replace(/^#/, "") || "/jobs").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  try {
    if (parts[0] === "jobs" && parts[1]) await jobView(view, Number(parts[1]));
    else if (parts[0] === "studies" && parts[1]) await studyView(view, Number(parts[1]), params);
    else if (parts[0] === "studies") await studiesView(view);
    else await jobsView(view, params);
  } catch (e) {
    report(e);
  }
}

setUpToken();
window.addEventListener("hashchange", route);
route();
