// inferd console: the Drift view, over GET /v1/models/{name}/drift.
//
// For each served version of the chosen model: the window (rows, age), the total input drift
// (the largest feature PSI), the prediction drift and confidence against the reference, and
// one line per feature with its PSI, its mean against the reference's, and its bins (the
// reference's share of each bin next to the window's). app.js hands in its DOM and API helpers.

const DRIFT_EVERY_MS = 5000;
const LEVELS = { stable: "ready", moderate: "loading", significant: "failed", unknown: "" };
const STATUS = {
  ok: ["ok", "ready"],
  drift: ["drift", "failed"],
  insufficient_data: ["few rows", "loading"],
  no_reference: ["no reference", ""],
};

function fmtPsi(value) {
  return value == null ? "–" : value.toFixed(3);
}

function fmtShare(value) {
  return value == null ? "–" : `${(value * 100).toFixed(1)} %`;
}

function fmtValue(value) {
  if (value == null) return "–";
  return Math.abs(value) >= 100 ? value.toFixed(0) : value.toPrecision(3);
}

function fmtAge(seconds) {
  if (seconds == null) return "–";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

export function createDriftView({ $, el, fill, api, notice }) {
  let timer = null;

  /** The reference's share of each bin beside the window's, as paired bars. */
  function binBars(bins) {
    const top = Math.max(0.001, ...bins.map((b) => Math.max(b.reference ?? 0, b.window ?? 0)));
    const bar = (share, kind) => {
      const span = el("span", { class: `bin ${kind}` });
      span.style.height = `${Math.round(((share ?? 0) / top) * 100)}%`;
      return span;
    };
    return el("div", { class: "bins", title: "grey: reference, blue: window" },
      bins.map((b) => el("span", {
        class: "bin-pair",
        title: `${b.category != null ? `category ${b.category}` : `${b.lower ?? "−∞"} … ${b.upper ?? "+∞"}`}`
          + `: reference ${fmtShare(b.reference)}, window ${fmtShare(b.window)} (${b.count})`,
      }, bar(b.reference, "ref"), bar(b.window, "win"))));
  }

  function featureRow(f) {
    return el("tr", { dataset: { feature: f.name } },
      el("td", {}, el("strong", {}, f.name), el("div", { class: "sub" }, f.kind)),
      el("td", { class: "num", dataset: { field: "psi" } }, fmtPsi(f.psi)),
      el("td", {}, el("span", { class: `badge ${LEVELS[f.level] ?? ""}` }, f.level)),
      el("td", { class: "num" }, fmtValue(f.mean), el("div", { class: "sub" }, `ref ${fmtValue(f.reference_mean)}`)),
      el("td", { class: "num" }, f.shift_sigmas == null ? "–" : `${f.shift_sigmas >= 0 ? "+" : ""}${f.shift_sigmas.toFixed(2)} σ`),
      el("td", {}, binBars(f.bins || [])));
  }

  function classTable(predictions) {
    const classes = predictions.classes || [];
    if (!classes.length) return null;
    return el("table", { class: "grid compact", dataset: { part: "classes" } },
      el("thead", {}, el("tr", {}, el("th", {}, "Class"), el("th", { class: "num" }, "Window"),
        el("th", { class: "num" }, "Reference"), el("th", { class: "num" }, "Count"))),
      el("tbody", {}, classes.map((c) => el("tr", { dataset: { label: c.label } },
        el("td", {}, c.label), el("td", { class: "num" }, fmtShare(c.window)),
        el("td", { class: "num" }, fmtShare(c.reference)), el("td", { class: "num" }, String(c.count))))));
  }

  function versionCard(v) {
    const [label, badge] = STATUS[v.status] || [v.status, ""];
    const w = v.window || {};
    const p = v.predictions || null;
    const confidence = p?.confidence || null;
    const tile = (name, value, sub, field) => el("div", { class: "tile", dataset: { field } },
      el("span", { class: "label" }, name), el("span", { class: "value" }, value),
      sub && el("span", { class: "sub" }, sub));
    return el("div", { class: "card drift-version", dataset: { version: v.version } },
      el("h2", {}, `v${v.version}`, v.default && el("span", { class: "badge tag" }, "default"),
        el("span", { class: `badge ${badge}`, dataset: { field: "status" } }, label)),
      v.status === "no_reference"
        ? el("p", { class: "muted", dataset: { field: "detail" } }, v.detail)
        : el("div", { class: "tiles" },
          tile("Input drift", fmtPsi(v.input_drift?.psi), v.input_drift?.feature, "input-psi"),
          tile("Prediction drift", fmtPsi(p?.psi), p ? `${p.rows} predictions` : null, "prediction-psi"),
          tile("Confidence", fmtShare(confidence?.window), confidence?.reference != null ? `reference ${fmtShare(confidence.reference)}` : null, "confidence"),
          tile("Window rows", String(w.rows ?? 0), w.enough_rows ? null : `gauges from ${w.min_rows} rows`, "rows"),
          tile("Window age", fmtAge(w.age_seconds), `of ${fmtAge(w.seconds)}`, "age")),
      v.error && el("p", { class: "error" }, v.error),
      v.features && el("div", { class: "card flush" }, el("table", { class: "grid drift-features" },
        el("thead", {}, el("tr", {}, el("th", {}, "Feature"), el("th", { class: "num" }, "PSI"),
          el("th", {}, "Level"), el("th", { class: "num" }, "Mean"), el("th", { class: "num" }, "Shift"),
          el("th", {}, "Bins (reference, window)"))),
        el("tbody", {}, v.features.map(featureRow)))),
      p && classTable(p));
  }

  async function poll() {
    clearTimeout(timer);
    const name = $("#drift-model").value;
    if (!name || $("#view-drift").hidden) return;
    if (!document.hidden) {
      try {
        const doc = await api(`v1/models/${encodeURIComponent(name)}/drift`);
        $("#drift-updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
        if (!doc.enabled) {
          fill($("#drift-body"), el("p", { class: "muted card" }, doc.detail));
        } else {
          fill($("#drift-body"), doc.versions.map(versionCard));
        }
      } catch (error) {
        if (error.status !== 401) notice(`Could not read drift: ${error.message}`, "error");
      }
    }
    timer = setTimeout(poll, DRIFT_EVERY_MS);
  }

  return {
    enter() {
      poll();
    },
    poll,
  };
}
