// The tagllm console: tags, a playground, jobs with live curves, and a training form.
// Plain ES module, no build step, no dependencies; every call goes to the documented API
// (/openapi.json), with the key (if any) in an Authorization header, never in a URL.

// ---------------------------------------------------------------- DOM helpers

/** Creates an element: attributes (`on*` become listeners) and children (strings are text). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c !== undefined && c !== null && c !== false) el.append(c instanceof Node ? c : String(c));
  }
  return el;
}

const fmt = (x, digits = 4) =>
  x === null || x === undefined ? "—" : typeof x === "number" ? (Number.isInteger(x) ? String(x) : x.toPrecision(digits)) : String(x);

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

const when = (ms) => (ms ? new Date(ms).toLocaleString() : "—");

// ---------------------------------------------------------------- the API

const KEY = "tagllm.key";
const key = {
  get: () => sessionStorage.getItem(KEY) || "",
  set: (v) => (v ? sessionStorage.setItem(KEY, v) : sessionStorage.removeItem(KEY)),
};

class ApiError extends Error {
  constructor(status, body) {
    super((body && body.error) || `HTTP ${status}`);
    this.status = status;
    this.type = (body && body.error_type) || "unknown";
  }
}

function headers(extra = {}) {
  const k = key.get();
  return k ? { ...extra, Authorization: `Bearer ${k}` } : extra;
}

/** Calls the API; JSON in and out. A 401/403 opens the key dialog, then the error throws. */
async function api(path, { method = "GET", json, body, contentType, signal } = {}) {
  const hs = headers(contentType ? { "Content-Type": contentType } : {});
  if (json !== undefined) {
    hs["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const r = await fetch(path, { method, headers: hs, body, signal });
  const text = await r.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = { error: text, error_type: "bad_response" };
  }
  if (!r.ok) {
    const err = new ApiError(r.status, data);
    if (r.status === 401 || r.status === 403) askForKey(err.message);
    throw err;
  }
  return data;
}

/** Reads a server-sent event stream to its end: `onEvent(name, data)` per event. */
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const field = (name) =>
        block.split("\n").filter((l) => l.startsWith(name + ":")).map((l) => l.slice(name.length + 1).replace(/^ /, "")).join("\n");
      const data = field("data");
      if (data) onEvent(field("event") || "message", JSON.parse(data));
    }
  }
}

/** Opens an event stream with fetch (EventSource cannot send a key header). */
async function openEvents(path, { method = "GET", json, signal } = {}) {
  const hs = headers({ Accept: "text/event-stream" });
  if (json !== undefined) hs["Content-Type"] = "application/json";
  const r = await fetch(path, { method, headers: hs, body: json === undefined ? undefined : JSON.stringify(json), signal });
  if (!r.ok) {
    const err = new ApiError(r.status, await r.json().catch(() => null));
    if (r.status === 401 || r.status === 403) askForKey(err.message);
    throw err;
  }
  return r;
}

// ---------------------------------------------------------------- the key dialog

function askForKey(reason) {
  const dialog = document.getElementById("key-dialog");
  const why = document.getElementById("key-reason");
  why.hidden = !reason;
  why.textContent = reason || "";
  document.getElementById("key-input").value = "";
  if (!dialog.open) dialog.showModal();
}

function setUpKeyDialog() {
  const dialog = document.getElementById("key-dialog");
  document.getElementById("key-button").addEventListener("click", () => askForKey());
  dialog.addEventListener("close", () => {
    if (dialog.returnValue === "save") key.set(document.getElementById("key-input").value.trim());
    if (dialog.returnValue === "forget") key.set("");
    if (dialog.returnValue === "save" || dialog.returnValue === "forget") {
      showServer();
      route();
    }
    updateKeyButton();
  });
  updateKeyButton();
}

function updateKeyButton() {
  document.getElementById("key-button").textContent = key.get() ? "API key ✓" : "API key";
}

// ---------------------------------------------------------------- shared pieces

function errorBox(err) {
  return h("p", { class: "error", role: "alert" }, err instanceof Error ? err.message : String(err));
}

function stateBadge(state) {
  return h("span", { class: `badge state-${state}` }, state);
}

function facts(pairs) {
  return h("dl", { class: "facts" }, pairs.flatMap(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

/** The `{slot}` names of a template, in order, once each. */
function slotsOf(template) {
  const names = [...template.matchAll(/\{([A-Za-z0-9_]{1,64})\}/g)].map((m) => m[1]);
  return [...new Set(names)];
}

/** A line chart as SVG: series of [x, y] points, with axes, grid and a text summary. */
function lineChart(series, { xLabel, yLabel }) {
  const W = 720, H = 320, L = 60, R = 16, T = 14, B = 44;
  const all = series.flatMap((s) => s.points);
  const wrap = h("div", { class: "chart" });
  if (all.length === 0) return h("p", { class: "muted" }, "No points yet: the curve appears with the first heartbeat.");
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  if (y0 === y1) [y0, y1] = [y0 - Math.abs(y0 || 1) * 0.1, y1 + Math.abs(y1 || 1) * 0.1];
  const pad = (y1 - y0) * 0.05;
  [y0, y1] = [y0 - pad, y1 + pad];
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const ns = "http://www.w3.org/2000/svg";
  const s = (tag, attrs, text) => {
    const el = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    return el;
  };
  const summary = series
    .filter((se) => se.points.length)
    .map((se) => `${se.name}: ${se.points.length} points, from ${fmt(se.points[0][1])} at step ${se.points[0][0]} to ${fmt(se.points.at(-1)[1])} at step ${se.points.at(-1)[0]}`)
    .join("; ");
  const svg = s("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": `${yLabel} by ${xLabel}. ${summary}` });
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + ((y1 - y0) * i) / 4, y = Y(yv);
    svg.append(s("line", { class: "grid-line", x1: L, x2: W - R, y1: y, y2: y }));
    svg.append(s("text", { x: L - 6, y: y + 4, "text-anchor": "end" }, fmt(yv, 3)));
  }
  // Steps on whole, round numbers (1, 2 or 5 times a power of ten).
  const raw = (x1 - x0) / 5, pow = 10 ** Math.floor(Math.log10(raw));
  const step = Math.max(1, [1, 2, 5, 10].map((m) => m * pow).find((v) => v >= raw));
  for (let xv = Math.ceil(x0 / step) * step; xv <= x1; xv += step) {
    svg.append(s("text", { x: X(xv), y: H - B + 16, "text-anchor": "middle" }, String(xv)));
  }
  svg.append(s("line", { class: "axis", x1: L, x2: L, y1: T, y2: H - B }));
  svg.append(s("line", { class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B }));
  svg.append(s("text", { x: (L + W - R) / 2, y: H - 6, "text-anchor": "middle" }, xLabel));
  svg.append(s("text", { x: 12, y: (T + H - B) / 2, transform: `rotate(-90 12 ${(T + H - B) / 2})`, "text-anchor": "middle" }, yLabel));
  for (const se of series) {
    if (!se.points.length) continue;
    const d = se.points.map((p, i) => `${i ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    svg.append(s("path", { d, fill: "none", stroke: se.color, "stroke-width": 2 }));
    if (se.dots) for (const p of se.points) svg.append(s("circle", { cx: X(p[0]), cy: Y(p[1]), r: 3.5, fill: se.color }));
  }
  wrap.append(
    h("div", { class: "legend", "aria-hidden": "true" }, series.map((se) => h("span", { style: `--c: ${se.color}` }, se.name))),
    svg,
  );
  return wrap;
}

// ---------------------------------------------------------------- Tags

/** The few numbers that say how good a tag is: its test splits, else its validation. */
function headline(manifest) {
  const m = manifest.metrics || {};
  const keys = ["mse", "r2", "pearson", "spearman", "accuracy", "f1", "chrf", "bleu", "loss"];
  const pick = (obj) =>
    keys.filter((k) => typeof obj[k] === "number").slice(0, 2).map((k) => `${k} ${fmt(obj[k], 3)}`).join(", ");
  if (m.test && typeof m.test === "object") {
    const parts = Object.entries(m.test)
      .filter(([, v]) => v && typeof v === "object")
      .slice(0, 2)
      .map(([split, v]) => `${split}: ${pick(v)}`);
    if (parts.length) return parts.join(" · ");
  }
  // A trained tag's held-out metrics sit at the top; the shipped tags' under `validation`.
  const heldOut = m.validation || m;
  const line = pick(heldOut);
  return line ? `held-out: ${line}` : "—";
}

async function showTags(view, signal) {
  view.append(h("h1", {}, "Tags"));
  const reload = h("button", { type: "button", class: "secondary" }, "Reload from disk");
  const status = h("p", { role: "status" });
  reload.addEventListener("click", async () => {
    reload.disabled = true;
    try {
      const r = await api("/tags/reload", { method: "POST" });
      status.textContent = `Reloaded: ${r.added.length} added, ${r.replaced.length} replaced, ${r.removed.length} removed.`;
      route();
    } catch (e) {
      status.replaceChildren(errorBox(e));
    } finally {
      reload.disabled = false;
    }
  });
  view.append(h("div", { class: "row" }, reload, status));
  const list = await api("/tags", { signal });
  const details = await Promise.all(
    list.tags.map((t) => api(`/tags/${encodeURIComponent(t.name)}`, { signal }).catch(() => null)),
  );
  const rows = list.tags.map((t, i) =>
    h("tr", {},
      h("td", {}, h("a", { href: `#/tags/${encodeURIComponent(t.name)}` }, t.name)),
      h("td", { class: "hide-narrow" }, t.kind),
      h("td", { class: "num" }, t.version),
      h("td", { class: "num hide-narrow" }, t.num_vectors),
      h("td", {}, t.head || (t.kind === "function" ? "generation" : "—")),
      h("td", { class: "hide-narrow" }, t.template ? h("code", {}, t.template) : "—"),
      h("td", {}, details[i] ? headline(details[i].manifest) : "—"),
    ),
  );
  view.append(
    h("div", { class: "table-wrap" },
      h("table", {},
        h("caption", {}, `${list.tags.length} tags served`),
        h("thead", {}, h("tr", {}, ["Name", "Kind", "Version", "Vectors", "Head", "Template", "Metrics"].map((c, i) =>
          h("th", { scope: "col", class: [1, 3, 5].includes(i) ? "hide-narrow" : null }, c)))),
        h("tbody", {}, rows),
      ),
    ),
  );
  const errors = Object.entries(list.errors || {});
  view.append(h("h2", {}, "Bundles that failed validation"));
  view.append(
    errors.length
      ? h("ul", { class: "failed-bundles" }, errors.map(([dir, why]) => h("li", {}, h("strong", {}, dir), ": ", why)))
      : h("p", { class: "muted" }, "None: every bundle on disk is served."),
  );
}

/** A nested metrics object as a table: one row per leaf, named by its path. */
function metricsTable(metrics) {
  const rows = [];
  const walk = (prefix, v) => {
    if (v && typeof v === "object" && !Array.isArray(v)) {
      for (const [k, x] of Object.entries(v)) walk(prefix ? `${prefix} / ${k}` : k, x);
    } else rows.push(h("tr", {}, h("th", { scope: "row" }, prefix), h("td", { class: "num" }, fmt(v))));
  };
  walk("", metrics);
  return rows.length
    ? h("div", { class: "table-wrap" }, h("table", {}, h("tbody", {}, rows)))
    : h("p", { class: "muted" }, "No metrics recorded.");
}

async function showTag(view, signal, name) {
  const d = await api(`/tags/${encodeURIComponent(name)}`, { signal });
  const m = d.manifest;
  view.append(h("p", {}, h("a", { href: "#/tags" }, "← All tags")));
  view.append(h("h1", {}, `<${m.name}>`, " ", h("span", { class: "muted" }, `v${m.version}`)));
  if (d.error) view.append(h("p", { class: "error", role: "alert" }, `The bundle on disk is not served: ${d.error}`));
  view.append(
    h("div", { class: "panel" },
      facts([
        ["Kind", m.kind],
        ["Source", d.source],
        ["Vectors", m.num_vectors],
        ["Head", m.head ? m.head.type : m.kind === "function" ? "none (generation)" : "—"],
        ["Template", m.template ? h("code", {}, m.template) : "—"],
        ["Domain tags", (m.domain_tags || []).join(", ") || "—"],
        ["Base model", h("code", {}, m.base_model || "—")],
      ]),
      m.kind === "function"
        ? h("p", {}, h("a", { href: `#/playground/${encodeURIComponent(m.name)}` }, "Try it in the playground →"))
        : null,
    ),
  );
  view.append(h("h2", {}, "Metrics"), metricsTable(m.metrics || {}));
  view.append(
    h("h2", {}, "Provenance"),
    h("details", {}, h("summary", {}, "How this tag was trained"), h("pre", {}, JSON.stringify(m.provenance || {}, null, 2))),
  );
}

// ---------------------------------------------------------------- Playground

async function showPlayground(view, signal, chosen) {
  view.append(h("h1", {}, "Playground"));
  const list = await api("/tags", { signal });
  const functions = list.tags.filter((t) => t.kind === "function");
  const CUSTOM = "";
  const select = h("select", { id: "pg-function", name: "function" },
    functions.map((t) => h("option", { value: t.name, selected: t.name === chosen }, `${t.name} (${t.head || "generation"})`)),
    h("option", { value: CUSTOM, selected: chosen === CUSTOM }, "Custom template…"),
  );
  const template = h("textarea", { id: "pg-template", rows: 2, spellcheck: "false", "aria-describedby": "pg-template-hint" });
  const templateField = h("div", { class: "field" },
    h("label", { for: "pg-template" }, "Template"),
    template,
    h("p", { class: "hint", id: "pg-template-hint" }, "Compose any served tags as <Tag>, with inputs as {slot}."),
  );
  const slots = h("div", { class: "grid", id: "pg-slots" });
  const params = h("fieldset", {},
    h("legend", {}, "Generation"),
    h("div", { class: "grid" },
      h("div", { class: "field" }, h("label", { for: "pg-max" }, "max_new_tokens"),
        h("input", { id: "pg-max", type: "number", min: 1, value: 32, inputmode: "numeric" })),
      h("div", { class: "field" }, h("label", { for: "pg-temp" }, "temperature"),
        h("input", { id: "pg-temp", type: "number", min: 0, step: "0.1", value: 0 })),
    ),
  );
  const submit = h("button", { type: "submit" }, "Predict");
  const result = h("section", { id: "pg-result", class: "result", "aria-live": "polite", "aria-label": "Prediction" });
  const form = h("form", { class: "panel", id: "pg-form" },
    h("div", { class: "field" }, h("label", { for: "pg-function" }, "Function tag"), select),
    templateField, slots, params, submit,
  );

  const tagOf = () => functions.find((t) => t.name === select.value);
  const renderSlots = () => {
    const t = tagOf();
    template.readOnly = Boolean(t);
    if (t) template.value = t.template || "";
    const kept = Object.fromEntries([...slots.querySelectorAll("textarea")].map((el) => [el.name, el.value]));
    slots.replaceChildren(
      ...slotsOf(template.value).map((slot) =>
        h("div", { class: "field" },
          h("label", { for: `pg-slot-${slot}` }, `{${slot}}`),
          h("textarea", { id: `pg-slot-${slot}`, name: slot, rows: 2, spellcheck: "false" }, kept[slot] || ""),
        ),
      ),
    );
    params.hidden = Boolean(t && t.head);
  };
  select.addEventListener("change", () => {
    history.replaceState(null, "", `#/playground/${encodeURIComponent(select.value)}`);
    renderSlots();
  });
  template.addEventListener("input", renderSlots);
  renderSlots();

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const t = tagOf();
    const input = Object.fromEntries([...slots.querySelectorAll("textarea")].map((el) => [el.name, el.value]));
    const body = t ? { function: t.name, inputs: [input] } : { template: template.value, inputs: [input] };
    if (!t || !t.head) {
      const parameters = { max_new_tokens: Number(document.getElementById("pg-max").value) };
      const temp = Number(document.getElementById("pg-temp").value);
      if (temp > 0) parameters.temperature = temp;
      body.parameters = parameters;
    }
    submit.disabled = true;
    result.replaceChildren(h("p", { class: "muted" }, "Running…"));
    const started = performance.now();
    const used = (r) => h("p", { class: "muted" },
      `Tags used: ${Object.entries(r.tags).map(([n, v]) => `${n} v${v}`).join(", ") || "none"} · ${(performance.now() - started).toFixed(0)} ms`);
    try {
      if (body.parameters) {
        // Generation: the text streams in as it is decoded.
        body.stream = true;
        const events = await openEvents("/predict", { method: "POST", json: body });
        const text = h("pre", { id: "pg-text-live" });
        result.replaceChildren(text);
        let done = null;
        await readEvents(events, (event, data) => {
          if (event === "token") text.textContent += data.text;
          else if (event === "done") done = data;
          else if (event === "error") throw new ApiError(500, data);
        });
        if (!done) throw new Error("the stream ended without an answer");
        result.replaceChildren(renderPrediction(done.predictions[0]), used(done));
      } else {
        const r = await api("/predict", { method: "POST", json: body });
        result.replaceChildren(renderPrediction(r.predictions[0]), used(r));
      }
    } catch (e) {
      result.replaceChildren(errorBox(e));
    } finally {
      submit.disabled = false;
    }
  });
  view.append(form, result);
}

function renderPrediction(p) {
  if ("value" in p) return h("div", {}, h("p", { class: "big", id: "pg-value" }, fmt(p.value, 5)), h("p", { class: "muted" }, "regression value, in the target's units"));
  if ("label" in p) {
    const scores = Object.entries(p.scores).sort((a, b) => b[1] - a[1]);
    return h("div", {},
      h("p", { class: "big", id: "pg-label" }, p.label),
      h("table", {}, h("caption", {}, "Probability of each label"), h("tbody", {}, scores.map(([label, s]) =>
        h("tr", {}, h("th", { scope: "row" }, label), h("td", { class: "num" }, fmt(s, 3)),
          h("td", { style: "width: 50%" }, h("div", { class: "bar", style: `width: ${(s * 100).toFixed(1)}%` })))))),
    );
  }
  return h("div", {}, h("pre", { id: "pg-text" }, p.text || "(empty)"), h("p", { class: "muted" }, `finish reason: ${p.finish_reason}`));
}

// ---------------------------------------------------------------- Jobs

function progressCell(j) {
  return h("td", {},
    h("progress", { max: Math.max(j.total_steps, 1), value: j.step, "aria-label": `step ${j.step} of ${j.total_steps}` }),
    ` ${j.step}/${j.total_steps}`);
}

async function showJobs(view, signal) {
  view.append(h("h1", {}, "Jobs"), h("p", {}, h("a", { href: "#/train" }, "Start a training job →")));
  const holder = h("div", { class: "table-wrap" });
  view.append(holder);
  const draw = async () => {
    const { jobs } = await api("/jobs?limit=100", { signal });
    holder.replaceChildren(
      h("table", {},
        h("caption", {}, jobs.length ? `${jobs.length} most recent jobs; refreshed every 2 s` : "No jobs yet."),
        h("thead", {}, h("tr", {}, ["Job", "Tag", "Stage", "State", "Progress", "ETA", "Loss", "Best held-out", "Created"].map((c, i) =>
          h("th", { scope: "col", class: [2, 7, 8].includes(i) ? "hide-narrow" : null }, c)))),
        h("tbody", {}, jobs.map((j) =>
          h("tr", {},
            h("td", {}, h("a", { href: `#/jobs/${j.id}`, class: "mono" }, j.id.slice(0, 8))),
            h("td", {}, j.tag),
            h("td", { class: "num hide-narrow" }, j.stage),
            h("td", {}, stateBadge(j.state)),
            progressCell(j),
            h("td", {}, duration(j.eta_seconds)),
            h("td", { class: "num" }, fmt(j.loss)),
            h("td", { class: "num hide-narrow" }, fmt(j.best_loss)),
            h("td", { class: "hide-narrow" }, when(j.created_at)),
          ))),
      ),
    );
  };
  await draw();
  const timer = setInterval(() => draw().catch(() => {}), 2000);
  signal.addEventListener("abort", () => clearInterval(timer));
}

const TERMINAL = ["succeeded", "failed", "cancelled"];

/** Flat metrics as one line; a nested `step0` (before training) as a second. */
function metricsLine(m) {
  const line = (o) => Object.entries(o).filter(([, v]) => typeof v === "number").map(([k, v]) => `${k} ${fmt(v, 4)}`).join(" · ");
  return h("span", {}, line(m), m.step0 && typeof m.step0 === "object" ? h("span", { class: "muted" }, h("br"), `before training: ${line(m.step0)}`) : "");
}

async function showJob(view, signal, id) {
  view.append(h("p", {}, h("a", { href: "#/jobs" }, "← All jobs")));
  const title = h("h1", {});
  const summary = h("div", { class: "panel", id: "job-summary" });
  const chart = h("section", { "aria-label": "Training curve", id: "job-curve" });
  const cancel = h("button", { type: "button", class: "danger" }, "Cancel job");
  const note = h("p", { role: "status" });
  const progress = h("p", { class: "row", id: "job-progress" });
  view.append(title, h("div", { class: "row" }, progress, cancel, note), h("h2", {}, "Loss"), chart,
    h("h2", {}, "Details"), summary);

  const drawJob = (j) => {
    title.replaceChildren(`Job ${j.id.slice(0, 8)}: <${j.tag}> `, stateBadge(j.state));
    title.dataset.state = j.state;
    progress.replaceChildren(
      h("progress", { max: Math.max(j.total_steps, 1), value: j.step, "aria-label": "progress" }),
      ` step ${j.step} of ${j.total_steps}`,
      j.eta_seconds !== null && j.eta_seconds !== undefined ? ` · about ${duration(j.eta_seconds)} left` : "",
    );
    summary.replaceChildren(facts([
      ["Stage", j.stage],
      ["Training loss", fmt(j.loss)],
      ["Best held-out loss", fmt(j.best_loss)],
      ["Held-out metrics", j.eval ? metricsLine(j.eval) : "—"],
      ["Published version", j.published_version ?? "—"],
      ["Attempts", j.attempts + (j.resumed_from_step ? ` (resumed from step ${j.resumed_from_step})` : "")],
      ["Worker", j.worker || "—"],
      ["Created / started / finished", `${when(j.created_at)} / ${when(j.started_at)} / ${when(j.finished_at)}`],
      ["Error", j.error ? h("span", { class: "error" }, j.error) : "—"],
    ]));
    cancel.hidden = TERMINAL.includes(j.state) || j.cancel_requested;
  };
  let pending = null;
  const drawCurve = async () => {
    const { points } = await api(`/jobs/${id}/curve`, { signal });
    chart.replaceChildren(lineChart([
      { name: "training loss", color: "#2457c5", points: points.filter((p) => p.loss !== null).map((p) => [p.step, p.loss]) },
      { name: "held-out loss", color: "#c2410c", dots: true, points: points.filter((p) => p.eval_loss !== null).map((p) => [p.step, p.eval_loss]) },
    ], { xLabel: "step", yLabel: "loss" }));
  };
  // At most one curve fetch a second, however fast events come.
  const curveSoon = () => {
    if (!pending) pending = setTimeout(() => { pending = null; drawCurve().catch(() => {}); }, 1000);
  };
  signal.addEventListener("abort", () => clearTimeout(pending));
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      drawJob(await api(`/jobs/${id}`, { method: "DELETE" }));
      note.textContent = "Cancellation requested.";
    } catch (e) {
      note.replaceChildren(errorBox(e));
    } finally {
      cancel.disabled = false;
    }
  });

  drawJob(await api(`/jobs/${id}`, { signal }));
  await drawCurve();
  // Live: every change of the job arrives as an event until it ends.
  (async () => {
    try {
      const events = await openEvents(`/jobs/${id}/events`, { signal });
      await readEvents(events, (_, j) => { drawJob(j); curveSoon(); });
      if (!signal.aborted) {
        drawJob(await api(`/jobs/${id}`, { signal }));
        await drawCurve();
      }
    } catch (e) {
      if (!signal.aborted) note.replaceChildren(errorBox(e));
    }
  })();
}

// ---------------------------------------------------------------- Train

/** A labelled input with a slot for its own error message. */
function field(id, label, control, hint) {
  control.id = id;
  const describedBy = [hint ? `${id}-hint` : null, `${id}-error`].filter(Boolean).join(" ");
  control.setAttribute("aria-describedby", describedBy);
  return h("div", { class: "field", "data-field": id },
    h("label", { for: id }, label),
    control,
    hint ? h("p", { class: "hint", id: `${id}-hint` }, hint) : null,
    h("p", { class: "field-error", id: `${id}-error`, hidden: true }),
  );
}

// Which form field a server message is about: the first of these names it mentions.
const FIELD_WORDS = [
  ["tr-tag", ["tag", "tags", "tag name"]],
  ["tr-template", ["template", "slot"]],
  ["tr-target", ["target"]],
  ["tr-head", ["head"]],
  ["tr-data-file", ["dataset", "records", "examples", "path", "data"]],
  ["tr-steps", ["steps"]],
  ["tr-epochs", ["epochs"]],
  ["tr-batch", ["batch_size"]],
  ["tr-lr", ["learning_rate"]],
  ["tr-vectors", ["num_vectors"]],
  ["tr-eval-every", ["eval_every"]],
  ["tr-init", ["init"]],
  ["tr-extra", ["grad_accum", "warmup_ratio", "weight_decay", "patience", "seed", "head_learning_rate", "head_init", "hyperparameters"]],
  ["tr-stage", ["stage"]],
];

function fieldFor(message) {
  const words = message.toLowerCase();
  let best = null;
  for (const [id, names] of FIELD_WORDS) {
    for (const n of names) {
      const at = words.search(new RegExp(`(^|[^a-z_])${n.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")}([^a-z_]|$)`));
      if (at >= 0 && (!best || at < best.at)) best = { id, at };
    }
  }
  return best && best.id;
}

async function showTrain(view, signal) {
  view.append(h("h1", {}, "Train a tag"));
  const num = (attrs) => h("input", { type: "number", inputmode: "decimal", ...attrs });
  const stage = h("select", {},
    h("option", { value: 1 }, "1: domain tag(s) on unlabelled text"),
    h("option", { value: 2, selected: true }, "2: a single-domain function tag"),
    h("option", { value: 3 }, "3: a cross-domain function tag"));
  const tag = h("input", { type: "text", required: true, autocomplete: "off", spellcheck: "false" });
  const template = h("input", { type: "text", spellcheck: "false", placeholder: "The molecule <SMILES> {smiles} has druglikeness <QED>" });
  const head = h("select", {},
    h("option", { value: "regression" }, "regression"),
    h("option", { value: "classification" }, "classification"),
    h("option", { value: "none" }, "none (generation)"));
  const target = h("input", { type: "text", spellcheck: "false", placeholder: "qed" });
  const dataFile = h("input", { type: "file", accept: ".jsonl,.ndjson,application/x-ndjson,application/json" });
  const dataPath = h("input", { type: "text", spellcheck: "false", placeholder: "qed/train.jsonl" });
  const evalFile = h("input", { type: "file", accept: ".jsonl,.ndjson,application/x-ndjson,application/json" });
  const steps = num({ min: 1, value: 100 });
  const epochs = num({ min: 0, step: "any", value: 0 });
  const batch = num({ min: 1, value: 8 });
  const lr = num({ min: 0, step: "any", value: 0.001 });
  const vectors = num({ min: 1, value: 1 });
  const evalEvery = num({ min: 0, value: 0 });
  const init = h("input", { type: "text", spellcheck: "false", value: "mean" });
  const extra = h("textarea", { rows: 2, spellcheck: "false", placeholder: '{"grad_accum": 2, "patience": 4}' });
  const submit = h("button", { type: "submit" }, "Queue job");
  const formError = h("div", { "aria-live": "assertive" });
  const form = h("form", { class: "panel", id: "train-form", novalidate: true },
    formError,
    h("fieldset", {}, h("legend", {}, "What to learn"),
      h("div", { class: "grid" },
        field("tr-stage", "Stage", stage),
        field("tr-tag", "Tag name", tag, "Stage 1 may name several, comma-separated."),
        field("tr-head", "Head", head),
        field("tr-target", "Target field", target, "The labelled field (stages 2 and 3)."),
      ),
      field("tr-template", "Template", template, "Stage 1 defaults to <TAG>{text}."),
    ),
    h("fieldset", {}, h("legend", {}, "Data (JSON Lines: one object per line)"),
      h("div", { class: "grid" },
        field("tr-data-file", "Training data: upload", dataFile, "Uploaded with POST /datasets."),
        field("tr-data-path", "…or a path under the server's data root", dataPath),
        field("tr-eval-file", "Held-out data: upload (optional)", evalFile),
      ),
    ),
    h("fieldset", {}, h("legend", {}, "Hyperparameters"),
      h("div", { class: "grid" },
        field("tr-steps", "steps", steps),
        field("tr-epochs", "epochs (0: use steps)", epochs),
        field("tr-batch", "batch_size", batch),
        field("tr-lr", "learning_rate", lr),
        field("tr-vectors", "num_vectors", vectors),
        field("tr-eval-every", "eval_every (0: per epoch)", evalEvery),
        field("tr-init", "init", init, "mean, text:PHRASE or tag:NAME"),
      ),
      field("tr-extra", "More hyperparameters (JSON object)", extra),
    ),
    submit,
  );
  const clearErrors = () => {
    formError.replaceChildren();
    for (const el of form.querySelectorAll(".field-error")) { el.hidden = true; el.textContent = ""; }
    for (const el of form.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
  };
  const showError = (message, id = fieldFor(message)) => {
    const control = id && document.getElementById(id);
    if (!control) {
      formError.replaceChildren(h("p", { class: "error", role: "alert" }, message));
      return;
    }
    const slot = document.getElementById(`${id}-error`);
    slot.textContent = message;
    slot.hidden = false;
    slot.setAttribute("role", "alert");
    control.setAttribute("aria-invalid", "true");
    control.focus();
  };
  const upload = async (file) => {
    const r = await api(`/datasets?name=${encodeURIComponent(file.name)}`, {
      method: "POST", body: await file.text(), contentType: "application/x-ndjson",
    });
    return { id: r.id };
  };

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    clearErrors();
    let hyper;
    try {
      hyper = extra.value.trim() ? JSON.parse(extra.value) : {};
      if (typeof hyper !== "object" || Array.isArray(hyper) || hyper === null) throw new Error("not an object");
    } catch (e) {
      return showError(`More hyperparameters: not a JSON object (${e.message})`, "tr-extra");
    }
    const numberOf = (el) => Number(el.value);
    Object.assign(hyper, {
      steps: numberOf(steps), epochs: numberOf(epochs), batch_size: numberOf(batch),
      learning_rate: numberOf(lr), num_vectors: numberOf(vectors), eval_every: numberOf(evalEvery),
      init: init.value.trim(),
    }, hyper);
    const names = tag.value.split(",").map((s) => s.trim()).filter(Boolean);
    const body = { stage: Number(stage.value), hyperparameters: hyper };
    if (names.length > 1) body.tags = names; else body.tag = names[0] || "";
    if (template.value.trim()) body.template = template.value.trim();
    if (body.stage !== 1) {
      body.head = head.value;
      if (target.value.trim()) body.target = target.value.trim();
    }
    submit.disabled = true;
    try {
      if (dataFile.files[0]) body.dataset = await upload(dataFile.files[0]);
      else if (dataPath.value.trim()) body.dataset = { path: dataPath.value.trim() };
      else return showError("Give training data: upload a JSONL file or name a path.", "tr-data-file");
      if (evalFile.files[0]) body.eval_dataset = await upload(evalFile.files[0]);
      const job = await api("/train", { method: "POST", json: body });
      location.hash = `#/jobs/${job.id}`;
    } catch (e) {
      showError(e.message);
    } finally {
      submit.disabled = false;
    }
  });
  view.append(
    h("p", { class: "muted" }, "Queues a job on the training worker (the admin key, where one is set). The job page then draws its curves live."),
    form,
  );
}

// ---------------------------------------------------------------- router

const VIEWS = {
  tags: (v, s, arg) => (arg ? showTag(v, s, arg) : showTags(v, s)),
  playground: (v, s, arg) => showPlayground(v, s, arg),
  jobs: (v, s, arg) => (arg ? showJob(v, s, arg) : showJobs(v, s)),
  train: (v, s) => showTrain(v, s),
};

let current = null;

async function route() {
  if (current) current.abort();
  current = new AbortController();
  const signal = current.signal;
  const [name, ...rest] = location.hash.replace(/^#\/?/, "").split("/");
  const section = VIEWS[name] ? name : "tags";
  const arg = rest.length ? decodeURIComponent(rest.join("/")) : undefined;
  for (const a of document.querySelectorAll("[data-nav]")) {
    if (a.dataset.nav === section) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const view = document.getElementById("view");
  view.replaceChildren();
  view.dataset.view = section;
  document.title = `${section[0].toUpperCase()}${section.slice(1)} · tagllm`;
  try {
    await VIEWS[section](view, signal, arg);
  } catch (e) {
    if (!signal.aborted) view.append(errorBox(e));
  }
  if (!signal.aborted) view.dataset.ready = "true";
}

async function showServer() {
  const line = document.getElementById("server");
  try {
    const info = await api("/info");
    line.textContent = `${info.model.name} · ${(info.model.parameters / 1e6).toFixed(1)}M parameters · tagllm ${info.version}`;
  } catch (e) {
    line.textContent = e.status === 401 || e.status === 403 ? "Give an API key to see this server." : `Server: ${e.message}`;
  }
}

window.addEventListener("hashchange", () => {
  route().then(() => document.getElementById("view").focus({ preventScroll: true }));
});
setUpKeyDialog();
showServer();
route();
