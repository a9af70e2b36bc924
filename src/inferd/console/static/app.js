// inferd console: a single page over the public HTTP API. No framework, no build step.
//
// Every call goes through api(), which adds the API key (kept in sessionStorage only, so it
// dies with the tab) and turns {"error": {code, message}} bodies into ApiError. A 401 opens
// the key dialog. Server-Sent Events are read with fetch() and a stream reader rather than
// EventSource, because EventSource cannot send an Authorization header.

import { LineChart } from "./chart.js";
import { createDriftView } from "./drift.js";

const BASE = new URL("../", location.href); // the server root, also behind a path prefix
const KEY_STORE = "inferd.console.key";
const LIVE_EVERY_MS = 1500;
const MODELS_EVERY_MS = 5000;
const LIVE_WINDOW_S = 10;

const state = {
  key: sessionStorage.getItem(KEY_STORE),
  usage: null,
  admin: false,
  models: [],
  defaultModel: null,
  view: null,
  repository: null, // false once the server said it has no /v1/admin/repository
};

// ------------------------------------------------------------------------------ helpers
const $ = (selector, root = document) => root.querySelector(selector);

/** Nodes from a mix of nodes, strings, nested arrays and null/false (left out). */
function nodes(...items) {
  return items.flat(Infinity).filter((item) => item != null && item !== false)
    .map((item) => (item instanceof Node ? item : document.createTextNode(String(item))));
}

/** Replace the children of `target` (anything nodes() takes). */
function fill(target, ...items) {
  target.replaceChildren(...nodes(items));
}

/** el("td", {class: "num", text: "3"}, child, ...) */
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value == null || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...nodes(children));
  return node;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });
}

function fmtNumber(value, digits = 1) {
  if (value == null || Number.isNaN(value)) return "–";
  if (Math.abs(value) >= 100) return value.toFixed(0);
  return value.toFixed(digits);
}

function fmtMs(ms) {
  if (ms == null) return "–";
  if (ms >= 10000) return (ms / 1000).toFixed(1) + " s";
  if (ms >= 100) return ms.toFixed(0) + " ms";
  if (ms >= 10) return ms.toFixed(1) + " ms";
  return ms.toFixed(2) + " ms";
}

function fmtTime(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleString();
}

function fmtAgo(epochSeconds) {
  const seconds = Math.max(0, Date.now() / 1000 - epochSeconds);
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

function pretty(value) {
  return typeof value === "string" ? value : JSON.stringify(value, null, 2);
}

let noticeTimer = null;
function notice(text, kind = "info") {
  const box = $("#notice");
  box.textContent = text;
  box.className = kind;
  box.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { box.hidden = true; }, kind === "error" ? 10000 : 5000);
}

// ------------------------------------------------------------------------------ API
class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/**
 * Call the API at `path` (relative to the server root, no leading slash).
 * Returns the parsed JSON body, or the Response itself with `raw: true`.
 */
async function api(path, { method = "GET", json, body, headers = {}, signal, raw = false } = {}) {
  const sent = new Headers(headers);
  if (state.key) sent.set("Authorization", `Bearer ${state.key}`);
  let payload = body;
  if (json !== undefined) {
    sent.set("Content-Type", "application/json");
    payload = JSON.stringify(json);
  }
  const response = await fetch(new URL(path, BASE), { method, headers: sent, body: payload, signal });
  if (!response.ok) {
    let code = `http_${response.status}`;
    let message = `${method} /${path}: ${response.status} ${response.statusText}`;
    try {
      const doc = await response.json();
      if (doc && doc.error) ({ code, message } = doc.error);
    } catch { /* not JSON: keep the status line */ }
    if (response.status === 401) askForKey(state.key ? "The server no longer accepts this key." : "");
    throw new ApiError(response.status, code, message);
  }
  if (raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

// ------------------------------------------------------------------------------ API key
let keyWaiters = [];

function askForKey(message) {
  const dialog = $("#key-dialog");
  $("#key-error").textContent = message;
  $("#key-error").hidden = !message;
  if (!dialog.open) {
    dialog.showModal();
    $("#key-input").focus();
  }
  return new Promise((resolve) => keyWaiters.push(resolve));
}

async function submitKey(event) {
  event.preventDefault();
  const key = $("#key-input").value.trim();
  if (!key) return;
  const previous = state.key;
  state.key = key;
  $("#key-submit").disabled = true;
  try {
    const usage = await fetch(new URL("v1/usage", BASE), {
      headers: { Authorization: `Bearer ${key}` },
    });
    if (usage.status === 401) {
      state.key = previous;
      $("#key-error").textContent = "This key was not accepted. Check it and try again.";
      $("#key-error").hidden = false;
      return;
    }
    sessionStorage.setItem(KEY_STORE, key);
    $("#key-input").value = "";
    $("#key-dialog").close();
    setIdentity(usage.ok ? await usage.json() : null);
    const waiters = keyWaiters;
    keyWaiters = [];
    waiters.forEach((resolve) => resolve());
    refreshView();
  } catch (error) {
    state.key = previous;
    $("#key-error").textContent = `Could not reach the server: ${error.message}`;
    $("#key-error").hidden = false;
  } finally {
    $("#key-submit").disabled = false;
  }
}

function forgetKey() {
  sessionStorage.removeItem(KEY_STORE);
  state.key = null;
  location.reload();
}

function setIdentity(usage) {
  state.usage = usage;
  const authOff = !usage || usage.auth === "off";
  state.admin = authOff || (usage.scopes || []).includes("admin");
  document.body.classList.toggle("is-admin", state.admin);
  $("#identity").textContent = authOff
    ? "authentication off"
    : `${usage.user} · ${(usage.scopes || []).join(", ") || "no scopes"}`;
  $("#forget-key").hidden = !state.key;
}

async function identify() {
  try {
    setIdentity(await api("v1/usage"));
  } catch (error) {
    if (error.status === 401) return askForKey(state.key ? "This key was not accepted." : "");
    notice(`Could not read the caller's identity: ${error.message}`, "error");
  }
  return undefined;
}

// ------------------------------------------------------------------------------ navigation
const VIEWS = ["models", "live", "drift", "playground", "history"];

function route() {
  const wanted = location.hash.slice(1);
  const view = VIEWS.includes(wanted) ? wanted : "models";
  state.view = view;
  for (const name of VIEWS) $(`#view-${name}`).hidden = name !== view;
  for (const link of document.querySelectorAll(".tabs a")) {
    if (link.dataset.tab === view) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  refreshView();
}

function refreshView() {
  if (state.key === null && keyWaiters.length) return; // waiting for a key
  if (state.view === "models") loadModels();
  if (state.view === "live") startLive();
  if (state.view === "drift") enterDrift();
  if (state.view === "playground") enterPlayground();
  if (state.view === "history" && !hist.loaded) loadHistory();
}

async function pollHealth() {
  const pill = $("#health");
  try {
    const response = await fetch(new URL("health/ready", BASE));
    const doc = await response.json();
    pill.textContent = doc.status === "ready" ? "ready" : "not ready";
    pill.className = `pill ${doc.status === "ready" ? "ready" : doc.error ? "failed" : "loading"}`;
    pill.title = doc.error || Object.entries(doc.models || {}).map(([n, s]) => `${n}: ${s}`).join("\n");
  } catch {
    pill.textContent = "unreachable";
    pill.className = "pill failed";
  }
  setTimeout(pollHealth, MODELS_EVERY_MS);
}

// ------------------------------------------------------------------------------ models
/**
 * A model's versions as {version, state, default, load_seconds, loaded_at, error}: from
 * `versions` (one line per version) or, on older servers, `versions_available`.
 */
function versionsOf(model) {
  if (Array.isArray(model.versions)) {
    return model.versions.map((v) => (v !== null && typeof v === "object"
      ? { ...v, version: String(v.version) }
      : { version: String(v) }));
  }
  return (model.versions_available || []).map((v) => ({
    version: String(v),
    state: String(v) === String(model.version) ? model.state : undefined,
    default: String(v) === String(model.version),
  }));
}

/** "tabular", "image" or "text": what the playground offers for this model. */
function kindOf(model) {
  const inputs = model.inputs || {};
  const features = Array.isArray(inputs.features) ? inputs.features : [];
  if (inputs.type === "image") return "image";
  if (features.length) return "tabular";
  // A batched model without features takes pictures; text models are not batched.
  if (model.batching && !model.generation) return "image";
  return "text";
}

function deviceOf(model) {
  if (model.device) return model.device;
  if (model.runtime === "sklearn") return "cpu"; // scikit-learn runs on the CPU only
  return model.generation?.device || "–";
}

let modelsTimer = null;

async function loadModels() {
  clearTimeout(modelsTimer);
  try {
    const doc = await api("v1/models");
    state.models = doc.models || [];
    state.defaultModel = doc.default;
    let repository = null;
    if (state.admin && state.repository !== false) {
      try {
        repository = await api("v1/admin/repository");
      } catch (error) {
        if (error.status === 404) state.repository = false; // no admin API here: stop asking
      }
    }
    renderModels(mergeRepository(state.models, repository));
    fillModelSelects();
  } catch (error) {
    if (error.status !== 401) notice(`Could not list models: ${error.message}`, "error");
  }
  if (state.view === "models") modelsTimer = setTimeout(loadModels, MODELS_EVERY_MS);
}

/**
 * Served models, plus what the admin repository index adds (one row per model and version):
 * versions on disk that are not loaded, and models that are not served at all.
 */
function mergeRepository(served, repository) {
  const rows = served.map((m) => ({ ...m, versions: versionsOf(m) }));
  const index = Array.isArray(repository?.models) ? repository.models : [];
  for (const line of index) {
    if (!line || !line.name || !line.version) continue;
    let row = rows.find((m) => m.name === line.name);
    if (!row) {
      row = { name: line.name, state: "unloaded", versions: [], served: false };
      rows.push(row);
    }
    if (!row.versions.some((v) => v.version === String(line.version))) {
      const lineState = String(line.state || "").toLowerCase();
      row.versions.push({
        version: String(line.version),
        state: lineState === "unavailable" ? "unloaded" : lineState,
        error: line.reason && line.reason !== "not loaded" ? line.reason : null,
        default: Boolean(line.default),
      });
      row.versions.sort((a, b) => Number(a.version) - Number(b.version));
    }
    if (row.served === false && line.reason && line.reason !== "not loaded") row.error = line.reason;
  }
  rows.sort((a, b) => a.name.localeCompare(b.name));
  return rows;
}

function renderModels(models) {
  const body = $("#models-table tbody");
  body.replaceChildren(...models.map(modelRow));
  $("#models-empty").hidden = models.length > 0;
}

function modelRow(m) {
  const versions = m.versions || [];
  const serving = m.default_version ?? m.version ?? null;
  const line = versions.find((v) => v.version === String(serving)) || {};
  const loadSeconds = line.load_seconds ?? m.load_seconds;
  const loadedAt = line.loaded_at ?? m.loaded_at;
  const served = m.served !== false;
  const versionSelect = el("select", { "aria-label": `version of ${m.name}` },
    versions.map((v) => el("option", { value: v.version, selected: v.version === String(serving) },
      `v${v.version}`)));
  const actions = el("div", { class: "row-actions" },
    served
      ? [
        el("button", { type: "button", class: "small secondary", dataset: { action: "load" },
          title: "Load again (new versions warm up before traffic moves)",
          onclick: () => adminAction(m.name, "load") }, "Reload"),
        el("button", { type: "button", class: "small danger", dataset: { action: "unload" },
          onclick: () => adminAction(m.name, "unload") }, "Unload"),
      ]
      : el("button", { type: "button", class: "small", dataset: { action: "load" },
        onclick: () => adminAction(m.name, "load") }, "Load"),
    versions.length > 1 && versionSelect,
    versions.length > 1 && el("button", {
      type: "button", class: "small secondary", dataset: { action: "default" },
      title: "Send requests that name no version to this one (rollback)",
      onclick: () => adminAction(m.name, "default", { version: Number(versionSelect.value) }),
    }, "Make default"),
  );
  return el("tr", { dataset: { model: m.name } },
    el("td", {},
      el("strong", {}, m.name),
      m.name === state.defaultModel && el("span", { class: "badge tag", title: "POST /predict uses it" }, "default"),
      m.description && el("div", { class: "sub" }, m.description)),
    el("td", { class: "mono", dataset: { field: "serving" } }, serving ? `v${serving}` : "–"),
    el("td", {}, el("div", { class: "versions" }, versions.length
      ? versions.map((v) => el("span", {
        class: `version ${v.state || ""}${v.default ? " is-default" : ""}`,
        title: [v.state, v.default && "default", v.error].filter(Boolean).join(" · "),
      }, `v${v.version}`))
      : "–")),
    el("td", {},
      el("span", { class: `badge ${m.state || ""}`, title: m.error || "", dataset: { field: "state" } },
        m.state || "unknown"),
      m.error && el("div", { class: "sub error" }, m.error)),
    el("td", {}, m.runtime || "–", m.task && el("div", { class: "sub" }, m.task)),
    el("td", {}, served ? deviceOf(m) : "–"),
    el("td", {},
      loadSeconds != null ? fmtMs(loadSeconds * 1000) : "–",
      loadedAt && el("div", { class: "sub" }, fmtAgo(loadedAt))),
    el("td", { class: "admin-only" }, actions),
  );
}

async function adminAction(name, action, body) {
  const what = action === "default" ? `serve v${body.version}` : action;
  try {
    await api(`v1/admin/models/${encodeURIComponent(name)}/${action}`, { method: "POST", json: body });
    notice(`${name}: ${what} done.`, "ok");
  } catch (error) {
    notice(`${name}: ${what} failed: ${error.message}`, "error");
  }
  loadModels();
}

function fillModelSelects() {
  const names = state.models.map((m) => m.name);
  const sync = (select, fixed) => {
    const shown = [...select.options].map((o) => o.value).filter((v) => v !== "");
    if (shown.join("\n") === names.join("\n")) return;
    const keep = select.value;
    select.replaceChildren(...fixed, ...names.map((n) => el("option", { value: n }, n)));
    select.value = names.includes(keep) ? keep : "";
  };
  sync($("#live-model"), [el("option", { value: "" }, "All models")]);
  const driftSelect = $("#drift-model");
  sync(driftSelect, []);
  if (!names.includes(driftSelect.value) && names.length) {
    driftSelect.value = names.includes(state.defaultModel) ? state.defaultModel : names[0];
  }
  const pg = $("#pg-model");
  sync(pg, []);
  if (!names.includes(pg.value) && names.length) {
    pg.value = names.includes(state.defaultModel) ? state.defaultModel : names[0];
  }
  configurePlayground();
}

// ------------------------------------------------------------------------------ live view
const live = {
  timer: null,
  model: "",
  rate: null,
  latency: null,
};

function startLive() {
  if (!live.rate) {
    live.rate = new LineChart($("#chart-rate"), {
      series: [{ name: "requests/s", color: "#2457d6" }, { name: "rejections/s", color: "#d92d20" }],
    });
    live.latency = new LineChart($("#chart-latency"), {
      series: [
        { name: "p50", color: "#12b76a" },
        { name: "p95", color: "#f79009" },
        { name: "p99", color: "#d92d20" },
      ],
    });
  }
  if (!state.models.length) loadModels();
  clearTimeout(live.timer);
  pollLive();
}

async function pollLive() {
  clearTimeout(live.timer);
  if (state.view !== "live") return;
  if (!document.hidden) {
    try {
      renderLive(await api(`v1/stats?window=${LIVE_WINDOW_S}`));
    } catch (error) {
      if (error.status !== 401) notice(`Could not read live stats: ${error.message}`, "error");
    }
  }
  live.timer = setTimeout(pollLive, LIVE_EVERY_MS);
}

/** A model's split, result cache and shadow figures in one line ("" when it has none). */
function trafficText(traffic) {
  if (!traffic) return "";
  const parts = [];
  if (traffic.split) {
    parts.push("split " + Object.entries(traffic.split)
      .map(([v, share]) => `v${v} ${(share * 100).toFixed(share < 0.1 ? 1 : 0)}%`).join(" / "));
  }
  if (traffic.cache && traffic.cache.hit_ratio !== null) {
    parts.push(`cache ${(traffic.cache.hit_ratio * 100).toFixed(1)}% hits`);
  }
  for (const [version, counts] of Object.entries(traffic.shadow || {})) {
    const agreement = counts.agreement === null || counts.agreement === undefined
      ? "–" : `${(counts.agreement * 100).toFixed(1)}% agree`;
    const troubles = [["error", "errors"], ["dropped", "dropped"]]
      .filter(([k]) => counts[k]).map(([k, word]) => `${counts[k]} ${word}`);
    parts.push(`shadow v${version} ${agreement}` + (troubles.length ? ` (${troubles.join(", ")})` : ""));
  }
  return parts.join(" · ");
}

function renderLive(stats) {
  const selected = $("#live-model").value;
  if (selected !== live.model) {
    live.model = selected;
    live.rate.clear();
    live.latency.clear();
  }
  const figures = selected ? stats.models[selected] || null : stats.total;
  const set = (id, text) => { $(id).textContent = text; };
  set("#tile-rps", figures ? fmtNumber(figures.requests_per_second) : "–");
  set("#tile-p50", figures ? fmtMs(figures.p50_ms) : "–");
  set("#tile-p95", figures ? fmtMs(figures.p95_ms) : "–");
  set("#tile-p99", figures ? fmtMs(figures.p99_ms) : "–");
  set("#tile-batch", figures ? fmtNumber(figures.mean_batch_size) : "–");
  set("#tile-queue", figures ? String(figures.queue_depth) : "–");
  set("#tile-rejections", figures ? fmtNumber(figures.rejections_per_second) : "–");
  $("#live-window").textContent =
    `last ${Math.round(stats.window_seconds)} s · updated ${new Date(stats.time * 1000).toLocaleTimeString()}`;

  if (figures) {
    live.rate.push(stats.time, [figures.requests_per_second, figures.rejections_per_second]);
    live.latency.push(stats.time, [figures.p50_ms, figures.p95_ms, figures.p99_ms]);
  }
  live.rate.draw();
  live.latency.draw();

  const rows = Object.entries(stats.models).map(([name, m]) => {
    const rejected = Object.entries(m.rejections_total || {});
    return el("tr", { dataset: { model: name } },
      el("td", {}, el("strong", {}, name)),
      el("td", { class: "num" }, fmtNumber(m.requests_per_second)),
      el("td", { class: "num" }, fmtNumber(m.p50_ms, 2)),
      el("td", { class: "num" }, fmtNumber(m.p95_ms, 2)),
      el("td", { class: "num" }, fmtNumber(m.p99_ms, 2)),
      el("td", { class: "num" }, fmtNumber(m.mean_batch_size)),
      el("td", { class: "num" }, String(m.queue_depth)),
      el("td", { class: "num", title: rejected.map(([r, n]) => `${r}: ${n}`).join(", ") },
        String(rejected.reduce((sum, [, n]) => sum + n, 0))),
      el("td", { class: "num" }, String(m.timeouts_total)),
      el("td", { class: "num", dataset: { field: "requests_total" } }, String(m.requests_total)),
      el("td", { dataset: { field: "traffic" } }, trafficText(m.traffic)),
    );
  });
  $("#live-table tbody").replaceChildren(...rows);
  const jobs = Object.entries(stats.jobs || {}).filter(([, n]) => n > 0);
  $("#live-jobs").textContent = jobs.length
    ? `Long-running requests: ${jobs.map(([s, n]) => `${n} ${s}`).join(" · ")}`
    : "";
}

// ------------------------------------------------------------------------------ drift view
const drift = createDriftView({ $, el, fill, api, notice });

async function enterDrift() {
  if (!state.models.length) await loadModels();
  drift.enter();
}

// ------------------------------------------------------------------------------ playground
const playground = { stream: null };

function currentModel() {
  return state.models.find((m) => m.name === $("#pg-model").value) || null;
}

function enterPlayground() {
  if (!state.models.length) loadModels();
  else configurePlayground();
}

function configurePlayground() {
  const model = currentModel();
  const kind = model ? kindOf(model) : null;
  if (playground.configured === model?.name) return;
  playground.configured = model?.name;
  $("#pg-tabular").hidden = kind !== "tabular" || !model?.batching;
  $("#pg-image").hidden = kind !== "image";
  $("#pg-no-predict").hidden = !(kind === "text" || (kind === "tabular" && !model?.batching));
  $("#pg-result").hidden = true;
  $("#pg-long").hidden = kind === "image"; // pictures go to /classify only
  if (!model) return;
  $("#pg-model-info").textContent = [
    (model.default_version ?? model.version) && `v${model.default_version ?? model.version}`,
    model.runtime, model.task, model.state,
  ].filter(Boolean).join(" · ");
  if (kind === "tabular") fillFeatures(model);
  if (kind === "image") {
    const classes = (model.outputs?.labels || model.outputs?.classes || []).length || 100;
    $("#pg-topk").max = String(classes); // the server refuses more than the model has
    $("#pg-topk").value = String(Math.min(5, classes));
  }
  // The long-running form: a prompt for text models, the example row for tabular ones.
  if (kind === "text") {
    $("#pg-input").value = "the quick brown fox";
    $("#pg-params").value = JSON.stringify({ max_new_tokens: 32 });
  } else if (kind === "tabular") {
    $("#pg-input").value = JSON.stringify({ features: model.inputs.example || [] });
    $("#pg-params").value = "";
  } else {
    $("#pg-input").value = "";
    $("#pg-params").value = "";
  }
}

function fillFeatures(model) {
  const { features, example } = model.inputs;
  $("#pg-features").replaceChildren(...features.map((name, i) =>
    el("label", {}, name,
      el("input", {
        type: "number", step: "any", required: true, name, dataset: { index: i },
        value: example && example[i] != null ? example[i] : "",
      }))));
}

async function predict(event) {
  event.preventDefault();
  const model = currentModel();
  if (!model) return;
  const inputs = [...document.querySelectorAll("#pg-features input")];
  const features = inputs.map((input) => Number(input.value));
  const button = $("#pg-predict-btn");
  button.disabled = true;
  const started = performance.now();
  try {
    const answer = await api(`v1/models/${encodeURIComponent(model.name)}/predict`, {
      method: "POST", json: { features },
    });
    showPrediction(model, answer, performance.now() - started);
  } catch (error) {
    showError(error);
  } finally {
    button.disabled = false;
  }
}

function showPrediction(model, answer, elapsed) {
  const labels = model.outputs?.labels || [];
  const probabilities = answer.probabilities || [];
  const result = $("#pg-result");
  fill(result,
    el("div", { class: "answer", id: "pg-answer" },
      String(answer.label ?? answer.prediction),
      answer.confidence != null &&
        el("span", { class: "conf" }, `${(answer.confidence * 100).toFixed(1)} %`)),
    el("div", { class: "latency", id: "pg-latency" },
      `Round trip ${fmtMs(elapsed)} · model v${answer.model_version} · request ${answer.request_id}`),
    probabilities.length ? bars(probabilities.map((p, i) => [labels[i] ?? String(i), p])) : null,
  );
  result.hidden = false;
}

function bars(pairs) {
  return el("div", { class: "bars" }, pairs.flatMap(([label, p]) => {
    const fill = el("span");
    fill.style.width = `${Math.max(0, Math.min(1, p)) * 100}%`;
    return [el("span", {}, label), el("div", { class: "bar" }, fill),
      el("span", { class: "pct" }, `${(p * 100).toFixed(1)} %`)];
  }));
}

function showError(error) {
  const result = $("#pg-result");
  fill(result, el("p", { class: "error", id: "pg-error" },
    `${error.status ? error.status + " " : ""}${error.code ? error.code + ": " : ""}${error.message}`));
  result.hidden = false;
}

function previewImage() {
  const file = $("#pg-file").files[0];
  const preview = $("#pg-preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.hidden = !file;
  if (file) preview.src = URL.createObjectURL(file);
}

async function classify(event) {
  event.preventDefault();
  const model = currentModel();
  const file = $("#pg-file").files[0];
  if (!model || !file) {
    notice("Choose an image first.", "error");
    return;
  }
  const topK = Math.min(Math.max(1, Number($("#pg-topk").value) || 5), Number($("#pg-topk").max));
  const button = $("#pg-classify-btn");
  button.disabled = true;
  const started = performance.now();
  try {
    const answer = await api(`v1/models/${encodeURIComponent(model.name)}/classify?top_k=${topK}`, {
      method: "POST", body: file, headers: { "Content-Type": file.type || "application/octet-stream" },
    });
    const elapsed = performance.now() - started;
    const top = answer.predictions?.[0];
    fill($("#pg-result"),
      el("div", { class: "answer", id: "pg-answer" }, top ? top.label : "no prediction",
        top && el("span", { class: "conf" }, `${(top.probability * 100).toFixed(1)} %`)),
      el("div", { class: "latency", id: "pg-latency" },
        `Inference ${fmtMs(answer.inference_time_ms)} · round trip ${fmtMs(elapsed)} · model v${answer.version}`),
      bars((answer.predictions || []).map((p) => [p.label, p.probability])),
    );
    $("#pg-result").hidden = false;
  } catch (error) {
    showError(error);
  } finally {
    button.disabled = false;
  }
}

// Long-running requests: submit, then follow the event stream as it arrives.

function readInput(model) {
  const text = $("#pg-input").value;
  if (kindOf(model) === "text") return text;
  try {
    return JSON.parse(text);
  } catch {
    return text; // plain text for models that take a string
  }
}

async function submitLongRunning(event) {
  event.preventDefault();
  const model = currentModel();
  if (!model) return;
  let parameters;
  const rawParams = $("#pg-params").value.trim();
  if (rawParams) {
    try {
      parameters = JSON.parse(rawParams);
    } catch (error) {
      notice(`Parameters are not valid JSON: ${error.message}`, "error");
      return;
    }
    if (parameters === null || typeof parameters !== "object" || Array.isArray(parameters)) {
      notice("Parameters must be a JSON object.", "error");
      return;
    }
  }
  playground.stream?.abort();
  const button = $("#pg-submit-btn");
  button.disabled = true;
  try {
    const submitted = await api("v1/requests", {
      method: "POST", json: { model: model.name, input: readInput(model), parameters },
    });
    hist.loaded = false; // the history has a new request
    followInPlayground(submitted.id);
  } catch (error) {
    notice(`Submit failed: ${error.message}`, "error");
  } finally {
    button.disabled = false;
  }
}

function followInPlayground(id) {
  const controller = new AbortController();
  playground.stream = controller;
  const status = $("#pg-stream-status");
  const out = $("#pg-stream-out");
  const result = $("#pg-stream-result");
  let count = 0;
  let attempt = 0;
  $("#pg-stream").hidden = false;
  $("#pg-stream-id").textContent = id;
  out.replaceChildren();
  result.hidden = true;
  $("#pg-stream-count").textContent = "";
  const setStatus = (value) => {
    status.textContent = value;
    status.className = `badge ${value}`;
    status.dataset.status = value;
  };
  setStatus("submitted");
  const cancel = $("#pg-cancel");
  cancel.disabled = false;
  cancel.onclick = async () => {
    cancel.disabled = true;
    try {
      await api(`v1/requests/${id}/cancel`, { method: "POST" });
    } catch (error) {
      notice(`Cancel failed: ${error.message}`, "error");
    }
  };

  const onEvent = (ev) => {
    const data = ev.data;
    if (ev.event === "status") {
      if (data.attempt && data.attempt !== attempt) {
        if (attempt && count) out.append(el("div", { class: "muted" }, `— attempt ${data.attempt} —`));
        attempt = data.attempt;
      }
      setStatus(data.status);
    } else if (ev.event === "response") {
      count += 1;
      const piece = data.response;
      out.append(typeof piece === "string"
        ? el("span", { class: "chunk" }, piece)
        : el("span", { class: "chunk json-chunk" }, JSON.stringify(piece)));
      out.scrollTop = out.scrollHeight;
      $("#pg-stream-count").textContent = `${count} response${count === 1 ? "" : "s"}`;
    } else if (ev.event === "done" || ev.event === "error") {
      setStatus(data.status);
      cancel.disabled = true;
      const shown = ev.event === "done" ? data.result : data.error;
      if (shown != null) {
        result.textContent = (ev.event === "done" ? "Result: " : "Error: ") + pretty(shown);
        result.classList.toggle("error", ev.event === "error");
        result.hidden = false;
      }
    }
  };
  followEvents(id, onEvent, controller.signal).catch((error) => {
    if (!controller.signal.aborted) {
      setStatus("error");
      notice(`Lost the event stream: ${error.message}`, "error");
    }
  });
}

/**
 * Follow a request's events until `done` or `error`. A stream that ends early (a proxy
 * timeout, a restarted server) is resumed with Last-Event-ID after the server's retry delay.
 */
async function followEvents(id, onEvent, signal) {
  let lastId = null;
  let retryMs = 1000;
  let failures = 0;
  while (!signal.aborted) {
    try {
      const headers = { Accept: "text/event-stream" };
      if (lastId) headers["Last-Event-ID"] = lastId;
      const response = await api(`v1/requests/${encodeURIComponent(id)}/events`, {
        headers, signal, raw: true,
      });
      failures = 0;
      for await (const ev of sseEvents(response.body, signal)) {
        if (ev.retry != null) retryMs = ev.retry;
        if (ev.id != null) lastId = ev.id;
        if (!ev.event) continue;
        onEvent(ev);
        if (ev.event === "done" || ev.event === "error") return;
      }
    } catch (error) {
      if (signal.aborted) return;
      if (error instanceof ApiError && error.status < 500 && error.status !== 429) throw error;
      failures += 1;
      if (failures > 5) throw error;
    }
    await sleep(retryMs, signal);
  }
}

/** Parse a text/event-stream body into {id, event, data, retry} objects. */
async function* sseEvents(body, signal) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  const onAbort = () => reader.cancel().catch(() => {});
  signal?.addEventListener("abort", onAbort, { once: true });
  let buffer = "";
  let fields = { data: [] };
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      for (;;) {
        const end = buffer.search(/\r\n|\r|\n/);
        if (end < 0) break;
        // A lone CR at the end may be the first half of CRLF: wait for the next chunk.
        if (buffer[end] === "\r" && end + 1 === buffer.length) break;
        const line = buffer.slice(0, end);
        buffer = buffer.slice(end + (buffer.startsWith("\r\n", end) ? 2 : 1));
        if (line === "") {
          if (fields.data.length || fields.event || fields.retry != null) yield finish(fields);
          fields = { data: [] };
        } else if (!line.startsWith(":")) {
          const colon = line.indexOf(":");
          const name = colon < 0 ? line : line.slice(0, colon);
          let value = colon < 0 ? "" : line.slice(colon + 1);
          if (value.startsWith(" ")) value = value.slice(1);
          if (name === "data") fields.data.push(value);
          else if (name === "event") fields.event = value;
          else if (name === "id") fields.id = value;
          else if (name === "retry" && /^\d+$/.test(value)) fields.retry = Number(value);
        }
      }
    }
  } finally {
    signal?.removeEventListener("abort", onAbort);
    reader.cancel().catch(() => {}); // a consumer that stops early closes the connection
  }
}

function finish(fields) {
  const text = fields.data.join("\n");
  let data = text;
  try {
    data = JSON.parse(text);
  } catch { /* not JSON: keep the text */ }
  return { id: fields.id ?? null, event: fields.event ?? (fields.data.length ? "message" : null), data, retry: fields.retry ?? null };
}

// ------------------------------------------------------------------------------ history
const hist = { cursors: [null], page: 0, loaded: false, selected: null, seq: 0 };

async function loadHistory() {
  const seq = ++hist.seq; // only the latest load renders: answers may come out of order
  const limit = $("#hist-limit").value;
  const cursor = hist.cursors[hist.page];
  const query = new URLSearchParams({ limit });
  if (cursor) query.set("cursor", cursor);
  try {
    const doc = await api(`v1/requests?${query}`);
    if (seq !== hist.seq) return; // a later load (another page or size) replaced this one
    hist.loaded = true;
    hist.cursors.length = hist.page + 1;
    if (doc.next_cursor) hist.cursors.push(doc.next_cursor);
    renderHistory(doc);
  } catch (error) {
    if (seq !== hist.seq) return;
    if (error.status !== 401) notice(`Could not list requests: ${error.message}`, "error");
  }
}

function renderHistory(doc) {
  const rows = doc.requests.map((r) => el("tr", {
    dataset: { id: r.id }, class: r.id === hist.selected ? "selected" : null,
    tabindex: 0,
    onclick: () => showRequest(r.id),
    onkeydown: (e) => { if (e.key === "Enter") showRequest(r.id); },
  },
  el("td", { class: "mono" }, r.id),
  el("td", {}, r.model, r.version && el("span", { class: "sub" }, ` v${r.version}`)),
  el("td", {}, el("span", { class: `badge ${r.status}` }, r.status)),
  el("td", {}, fmtTime(r.created_at)),
  el("td", { class: "num" }, `${r.attempts}/${r.max_attempts}`),
  el("td", { class: "num" }, String((r.responses || []).length))));
  $("#hist-table tbody").replaceChildren(...rows);
  $("#hist-empty").hidden = rows.length > 0 || hist.page > 0;
  $("#hist-newer").disabled = hist.page === 0;
  $("#hist-older").disabled = !doc.next_cursor;
  $("#hist-page").textContent = `Page ${hist.page + 1}`;
}

function pageHistory(step) {
  hist.page = Math.max(0, hist.page + step);
  loadHistory();
}

function restartHistory() {
  hist.cursors = [null];
  hist.page = 0;
  loadHistory();
}

async function showRequest(id) {
  hist.selected = id;
  for (const row of document.querySelectorAll("#hist-table tbody tr")) {
    row.classList.toggle("selected", row.dataset.id === id);
  }
  const panel = $("#hist-detail");
  try {
    const r = await api(`v1/requests/${encodeURIComponent(id)}`);
    const active = r.status === "queued" || r.status === "running";
    fill(panel,
      el("h2", {}, el("code", {}, r.id), el("span", { class: `badge ${r.status}` }, r.status)),
      el("dl", { class: "meta" },
        el("dt", {}, "Model"), el("dd", {}, `${r.model}${r.version ? ` v${r.version}` : ""}`),
        el("dt", {}, "Created"), el("dd", {}, fmtTime(r.created_at)),
        el("dt", {}, "Started"), el("dd", {}, fmtTime(r.started_at)),
        el("dt", {}, "Finished"), el("dd", {}, fmtTime(r.finished_at)),
        el("dt", {}, "Attempts"), el("dd", {}, `${r.attempts} of ${r.max_attempts}`)),
      el("h3", { class: "hint" }, "Input"),
      el("pre", { class: "output small" }, pretty(r.input)),
      r.parameters && Object.keys(r.parameters).length
        ? [el("h3", { class: "hint" }, "Parameters"), el("pre", { class: "output small" }, pretty(r.parameters))]
        : null,
      el("h3", { class: "hint" }, `Responses (${r.responses.length})`),
      el("ol", { class: "responses", id: "hist-responses" }, r.responses.map((item, i) =>
        el("li", {},
          el("span", { class: "when" }, `#${i + 1} · ${fmtTime(item.sent_at)}`),
          el("pre", {}, pretty(item.response))))),
      r.error && [el("h3", { class: "hint" }, "Error"), el("pre", { class: "output small error" }, r.error)],
      active && el("div", { class: "actions" }, el("button", {
        type: "button", class: "danger",
        onclick: async () => {
          try {
            await api(`v1/requests/${encodeURIComponent(id)}/cancel`, { method: "POST" });
          } catch (error) {
            notice(`Cancel failed: ${error.message}`, "error");
          }
          showRequest(id);
        },
      }, "Cancel")),
    );
  } catch (error) {
    fill(panel, el("p", { class: "error" }, error.message));
  }
}

// ------------------------------------------------------------------------------ start
function bind() {
  window.addEventListener("hashchange", route);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden && state.view === "live") pollLive();
  });
  window.addEventListener("resize", () => { live.rate?.draw(); live.latency?.draw(); });
  $("#key-form").addEventListener("submit", submitKey);
  $("#key-dialog").addEventListener("cancel", (event) => event.preventDefault());
  $("#forget-key").addEventListener("click", forgetKey);
  $("#models-refresh").addEventListener("click", loadModels);
  $("#live-model").addEventListener("change", () => pollLive());
  $("#drift-model").addEventListener("change", () => drift.poll());
  $("#drift-refresh").addEventListener("click", () => drift.poll());
  $("#pg-model").addEventListener("change", configurePlayground);
  $("#pg-tabular").addEventListener("submit", predict);
  $("#pg-example").addEventListener("click", () => {
    const model = currentModel();
    if (model) fillFeatures(model);
  });
  $("#pg-file").addEventListener("change", previewImage);
  $("#pg-image").addEventListener("submit", classify);
  $("#pg-submit").addEventListener("submit", submitLongRunning);
  $("#hist-limit").addEventListener("change", restartHistory);
  $("#hist-refresh").addEventListener("click", restartHistory);
  $("#hist-newer").addEventListener("click", () => pageHistory(-1));
  $("#hist-older").addEventListener("click", () => pageHistory(1));
}

async function start() {
  bind();
  pollHealth();
  await identify();
  route();
  document.body.dataset.ready = "true"; // the page has its identity and first view
}

start();
