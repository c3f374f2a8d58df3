// finegrain ui: one page, no framework. Views are picked by the URL's hash:
// #/runs, #/run/ID, #/compare/ID,ID,..., #/sweep/ID, #/continual/ID, #/playground/ID, #/launch.
"use strict";

const COLORS = ["#2f6fdf", "#d2552c", "#23874a", "#8a4bd1", "#b7791f", "#1b9aaa", "#c2407f", "#5b6470"];
const main = () => document.getElementById("main");
let timers = [];  // polls of the current view, stopped when the view changes
let viewId = 0;   // bumped per view: a late answer for an old view is dropped

// -- helpers -------------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children.flat()) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

class ApiError extends Error {
  constructor(status, message, body) { super(message); this.status = status; this.body = body; }
}

async function api(path, body) {
  const options = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({}));
  if (response.status === 401) {
    document.getElementById("keybar").hidden = false;
  }
  if (!response.ok && !(data && "ok" in data)) {
    const message = (data && data.error && (data.error.message || data.error)) || response.statusText;
    throw new ApiError(response.status, String(message), data);
  }
  return data;
}

const q = (id) => encodeURIComponent(id);
const fmt = (v, digits = 4) => v === null || v === undefined ? "" : typeof v === "number" ? (Number.isInteger(v) ? String(v) : v.toFixed(digits)) : String(v);
function duration(s) {
  if (s === null || s === undefined) return "";
  s = Math.round(s);
  return s < 60 ? `${s} s` : s < 3600 ? `${Math.floor(s / 60)} min ${s % 60} s` : `${Math.floor(s / 3600)} h ${Math.floor(s % 3600 / 60)} min`;
}
const fixed = (v, digits) => typeof v === "number" ? v.toFixed(digits) : "";
const when = (t) => t ? new Date(t * 1000).toLocaleString() : "";
const badge = (status) => h("span", {class: `badge ${status}`}, status);

function every(ms, fn) { fn(); timers.push(setInterval(fn, ms)); }

function failure(err) {
  return h("p", {class: "error"}, err instanceof Error ? err.message : String(err));
}

// -- charts ----------------------------------------------------------------------------------

// A line chart of series [{name, points: [[x, y], ...]}], drawn as inline SVG.
function chart(title, series, id) {
  const W = 480, H = 200, L = 48, R = 10, T = 10, B = 24;
  const all = series.flatMap((s) => s.points).filter((p) => Number.isFinite(p[1]));
  const box = h("div", {class: "chart", id: id || null});
  box.append(h("div", {class: "title"}, title));
  const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", "data-points": String(all.length)});
  box.append(root);
  if (!all.length) {
    root.append(svg("text", {x: W / 2, y: H / 2, "text-anchor": "middle"}, "no points yet"));
    return box;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    root.append(svg("line", {class: "grid-line", x1: L, x2: W - R, y1: sy(y), y2: sy(y)}));
    root.append(svg("text", {x: L - 4, y: sy(y) + 3, "text-anchor": "end"}, Math.abs(y) < 1e-3 && y !== 0 ? y.toExponential(1) : +y.toPrecision(3)));
  }
  root.append(svg("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B}));
  root.append(svg("text", {x: L, y: H - 8}, `step ${x0}`), svg("text", {x: W - R, y: H - 8, "text-anchor": "end"}, `${x1}`));
  series.forEach((s, i) => {
    const color = s.color || COLORS[i % COLORS.length];
    const pts = s.points.filter((p) => Number.isFinite(p[1]));
    root.append(svg("polyline", {points: pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" "), stroke: color, "data-n": String(pts.length)}));
    if (pts.length < 30) pts.forEach((p) => root.append(svg("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: color})));
  });
  if (series.length > 1) {
    box.append(h("div", {class: "legend"}, series.map((s, i) => {
      const sw = h("span", {class: "swatch"});
      sw.style.background = s.color || COLORS[i % COLORS.length];
      return h("span", {}, sw, s.name);
    })));
  }
  return box;
}

// The validation scores worth a curve, where a task logs them (the rest are in metrics.json).
const SCORES = ["accuracy", "macro_f1", "micro_f1", "f1", "exact_match", "rougeL", "mse", "r2", "pearson"];

// The curves a metrics.jsonl holds: training loss and learning rate, and each validation score.
function curveSeries(records) {
  const train = records.filter((r) => !r.split);
  const validation = records.filter((r) => r.split === "validation");
  const out = {train_loss: train.filter((r) => "train_loss" in r).map((r) => [r.step, r.train_loss]),
               lr: train.filter((r) => "lr" in r).map((r) => [r.step, r.lr])};
  const numeric = [...new Set(validation.flatMap((r) => Object.keys(r).filter((k) => typeof r[k] === "number" && !["step", "epoch"].includes(k) && !k.startsWith("num_"))))];
  const shown = numeric.filter((k) => SCORES.includes(k));
  for (const k of shown.length ? shown : numeric.slice(0, 4)) {
    out[`validation ${k}`] = validation.filter((r) => typeof r[k] === "number").map((r) => [r.step, r[k]]);
  }
  return out;
}

// -- Runs -----------------------------------------------------------------------------------

const COLUMNS = [["id", "run"], ["status", "status"], ["task", "task"], ["model", "model"], ["method", "method"],
                 ["started", "started"], ["duration", "duration"], ["value", "headline"]];
const runsState = {sort: "started", desc: true, filter: "", selected: new Set()};

async function viewRuns(my) {
  const box = h("div", {});
  main().replaceChildren(h("h2", {}, "Runs"), box);
  const render = (data) => {
    if (my !== viewId) return;
    document.getElementById("root").textContent = data.root;
    const filter = runsState.filter.toLowerCase();
    let rows = data.runs.filter((r) => !filter || [r.id, r.task, r.model, r.method, r.status, r.error].some((v) => v && String(v).toLowerCase().includes(filter)));
    const key = runsState.sort;
    rows.sort((a, b) => {
      const x = a[key], y = b[key];
      const c = x === y ? 0 : x === null || x === undefined ? 1 : y === null || y === undefined ? -1 : x < y ? -1 : 1;
      return runsState.desc ? -c : c;
    });
    const search = h("input", {type: "search", id: "filter", placeholder: "filter: name, task, model, method, status", size: 40, value: runsState.filter});
    search.addEventListener("input", () => { runsState.filter = search.value; render(data); document.getElementById("filter").focus(); });
    const compare = h("button", {id: "compare-selected", disabled: runsState.selected.size < 2,
      onclick: () => { location.hash = `#/compare/${[...runsState.selected].map(q).join(",")}`; }}, `Compare selected (${runsState.selected.size})`);
    const head = h("tr", {}, h("th", {}), COLUMNS.map(([k, label]) => h("th", {class: `sortable${["duration", "value"].includes(k) ? " num" : ""}`, "data-key": k,
      onclick: () => { runsState.desc = runsState.sort === k ? !runsState.desc : false; runsState.sort = k; render(data); }},
      label, runsState.sort === k ? (runsState.desc ? " ▾" : " ▴") : "")));
    const body = rows.map((r) => {
      const tick = h("input", {type: "checkbox", checked: runsState.selected.has(r.id), "aria-label": `select ${r.id}`});
      tick.addEventListener("click", (e) => { e.stopPropagation(); tick.checked ? runsState.selected.add(r.id) : runsState.selected.delete(r.id); render(data); });
      return h("tr", {class: "clickable", "data-run": r.id, onclick: () => { location.hash = `#/run/${q(r.id)}`; }},
        h("td", {}, tick),
        h("td", {}, h("div", {}, r.id), r.error ? h("div", {class: "error run-error"}, r.error) : null),
        h("td", {}, badge(r.status)), h("td", {}, r.task || ""), h("td", {}, r.model || ""), h("td", {}, r.method || ""),
        h("td", {}, when(r.started)), h("td", {class: "num"}, duration(r.duration)),
        h("td", {class: "num", title: r.metric ? `${r.split} ${r.metric}` : ""}, r.value === null ? "" : `${r.metric} ${r.value.toFixed(4)}`));
    });
    box.replaceChildren(h("div", {class: "toolbar"}, search, compare, h("span", {class: "muted"}, `${rows.length} of ${data.runs.length} runs`)),
      h("table", {id: "runs"}, h("thead", {}, head), h("tbody", {}, body)),
      ...(data.runs.length ? [] : [h("p", {class: "muted"}, "No runs here yet: train one with `finegrain train ... --output RUNS_DIR/NAME`, or from Launch.")]),
      ...collections(data));
  };
  let last = null;
  every(3000, async () => {
    try {
      const data = await api("/api/runs");
      const text = JSON.stringify(data);
      if (text !== last && document.activeElement?.id !== "filter") { last = text; render(data); }
    } catch (err) { if (my === viewId) box.replaceChildren(failure(err)); }
  });
}

// -- one run ----------------------------------------------------------------------------------

async function viewRun(my, id) {
  // A run just launched has no directory until `train` starts: wait for it while its job lives.
  for (;;) {
    let known, jobs;
    try { [known, jobs] = await Promise.all([api("/api/runs"), api("/api/jobs")]); } catch (err) { main().replaceChildren(failure(err)); return; }
    if (my !== viewId) return;
    if (known.runs.some((r) => r.id === id)) break;
    if (!jobs.jobs.some((j) => j.name === id && ["queued", "running"].includes(j.state))) {
      main().replaceChildren(h("p", {class: "error"}, `no run '${id}' under the runs directory`));
      return;
    }
    main().replaceChildren(h("p", {class: "muted"}, `waiting for run ${id} to start…`));
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }
  let data;
  try { data = await api(`/api/run?run=${q(id)}`); } catch (err) { main().replaceChildren(failure(err)); return; }
  if (my !== viewId) return;
  const s = data.summary;
  const curves = h("div", {class: "grid", id: "curves"});
  const statusBox = h("span", {id: "run-status"}, badge(s.status));
  main().replaceChildren(
    h("h2", {}, `Run ${s.id} `, statusBox),
    h("div", {class: "card"},
      h("div", {}, `${s.task || "?"} · ${s.model || "?"} · ${s.method || "?"} · started ${when(s.started)} · ${duration(s.duration)}`),
      s.value !== null ? h("div", {}, `${s.split} ${s.metric}: `, h("b", {}, fmt(s.value))) : null,
      s.error ? h("div", {class: "error"}, s.error) : null,
      data.playground ? h("a", {href: `#/playground/${q(s.id)}`}, "Try it in the playground →") : null),
    h("h3", {}, "Learning curves"), curves,
    report(id, data),
    data.files.includes("test_predictions.jsonl") ? testPredictions(my, id) : null,
    h("h3", {}, "Effective config"), h("pre", {id: "config"}, data.config_text));
  const records = [];
  let next = 0, status = s.status;
  const draw = () => {
    const series = curveSeries(records);
    curves.replaceChildren(...Object.entries(series).filter(([, pts]) => pts.length || true)
      .map(([name, pts]) => chart(name, [{name, points: pts}], `curve-${name.replace(/\W+/g, "_")}`)));
  };
  draw();
  // Polled while the run trains; once it stops, one more poll catches its last records.
  let polling = false;
  const poll = async () => {
    if (polling) return;
    polling = true;
    try {
      const got = await api(`/api/curve?run=${q(id)}&start=${next}`);
      if (my !== viewId) return;
      if (got.records.length) { records.push(...got.records); next = got.next; draw(); }
      if (got.status !== status) {
        if (status === "running") { viewRun(my, id); return; }  // finished or stopped: show its report and error
        status = got.status; statusBox.replaceChildren(badge(status));
      }
    } catch (err) { /* a run being rewritten: try again at the next poll */ } finally { polling = false; }
  };
  every(1500, poll);
}

// The report: per-class precision/recall/F1 and the confusion matrix from metrics.json, then the
// run's own report.html (sandboxed: it can neither run scripts nor reach this page).
function report(id, data) {
  const box = h("div", {id: "report"});
  const metrics = data.metrics || {};
  const split = metrics.test ? "test" : "validation";
  const m = metrics[split];
  if (!m) return box;
  box.append(h("h3", {}, `Report (${split}${m.num_examples ? `, ${m.num_examples} examples` : ""})`));
  const per = m.per_class || m.per_type;
  if (per) {
    box.append(h("table", {id: "per-class"}, h("thead", {}, h("tr", {}, ["class", "precision", "recall", "F1", "support"].map((c, i) => h("th", {class: i ? "num" : ""}, c)))),
      h("tbody", {}, Object.entries(per).map(([label, v]) => h("tr", {}, h("td", {}, label), ["precision", "recall", "f1", "support"].map((k) => h("td", {class: "num"}, fmt(v[k], 3))))))));
  }
  if (Array.isArray(m.confusion_matrix) && Array.isArray(m.labels)) {
    const max = Math.max(1, ...m.confusion_matrix.flat());
    box.append(h("h3", {}, "Confusion matrix (rows: gold, columns: predicted)"),
      h("table", {class: "cm", id: "confusion"}, h("tr", {}, h("th", {}), m.labels.map((l) => h("th", {}, l))),
        m.confusion_matrix.map((row, i) => h("tr", {}, h("th", {}, m.labels[i]), row.map((n, j) => {
          const td = h("td", {class: i === j ? "diag" : ""}, n);
          td.style.background = `rgba(47, 111, 223, ${(0.08 + 0.6 * n / max).toFixed(3)})`;
          return td;
        })))));
  }
  if (data.files.includes("report.html")) {
    box.append(h("h3", {}, "Full report"), h("iframe", {class: "report", sandbox: "", title: "report", src: `/api/file?run=${q(id)}&name=report.html`}));
  } else if (data.files.includes("confusion_matrix.png")) {
    box.append(h("img", {src: `/api/file?run=${q(id)}&name=confusion_matrix.png`, alt: "confusion matrix"}));
  }
  return box;
}

// -- test predictions of NER, relation and QA runs ---------------------------------------------

// `text` with `spans` ({start, end, cls, label, title}) marked. Spans may overlap (gold and predicted
// answers): the text is cut at every span's edges and each piece carries the classes of all spans over it.
function marked(text, spans) {
  spans = spans.filter((s) => Number.isInteger(s.start) && Number.isInteger(s.end) && s.start < s.end);
  const cuts = [...new Set([0, text.length, ...spans.flatMap((s) => [s.start, s.end])])].filter((c) => c >= 0 && c <= text.length).sort((a, b) => a - b);
  const out = [];
  for (let i = 0; i + 1 < cuts.length; i++) {
    const [a, b] = [cuts[i], cuts[i + 1]];
    const over = spans.filter((s) => s.start <= a && s.end >= b);
    if (!over.length) { out.push(text.slice(a, b)); continue; }
    out.push(h("mark", {class: [...new Set(over.flatMap((s) => s.cls.split(" ")))].join(" "), title: over.map((s) => s.title).filter(Boolean).join("; ") || null},
      text.slice(a, b), over.filter((s) => s.end === b && s.label).map((s) => h("sup", {}, s.label))));
  }
  return out;
}

const spanKey = (e) => `${e.type}|${e.start}|${e.end}`;

// One test example: gold against predicted, what is wrong in red (a missed gold entity dashed).
function predictionCard(task, r) {
  const card = h("div", {class: `prediction ${r.correct ? "right" : "wrong"}`, "data-index": r.index});
  const where = h("span", {class: "muted source", title: r.source}, r.source.split("/").pop());
  if (task === "ner" && r.wrong_words) {  // plain tags (parts of speech): each word with its tag, the wrong ones red
    const wrong = new Set(r.wrong_words);
    card.append(h("div", {class: "line"}, r.words.flatMap((w, i) => [h("mark", {class: `entity ${wrong.has(i) ? "wrong" : "right"}`,
      title: wrong.has(i) ? `predicted ${r.predicted[i]}, gold ${r.gold[i]}` : r.gold[i]}, w, h("sup", {}, r.predicted[i])), " "])), where);
  } else if (task === "ner") {
    const gold = new Set(r.gold.map(spanKey)), predicted = new Set(r.predicted.map(spanKey));
    card.append(
      h("div", {class: "line gold-line"}, h("span", {class: "tag"}, "gold"), marked(r.text, r.gold.map((e) => ({...e, label: e.type,
        cls: `entity gold${predicted.has(spanKey(e)) ? "" : " missed"}`, title: predicted.has(spanKey(e)) ? `${e.type}: found` : `${e.type}: missed`})))),
      h("div", {class: "line predicted-line"}, h("span", {class: "tag"}, "predicted"), marked(r.text, r.predicted.map((e) => ({...e, label: e.type,
        cls: `entity ${gold.has(spanKey(e)) ? "right" : "wrong"}`, title: `${e.type} ${fmt(e.score, 3)}${gold.has(spanKey(e)) ? "" : ": not in gold"}`})))),
      where);
  } else if (task === "relation") {
    card.append(
      h("div", {class: "line"}, marked(r.text, [{...r.head, cls: "entity head", label: "e1"}, {...r.tail, cls: "entity tail", label: "e2"}])),
      h("div", {class: "line"}, "gold ", h("b", {}, r.gold), " · predicted ", h("b", {class: r.correct ? "ok" : "error"}, r.predicted), ` (${fmt(r.probability, 3)})`, " ", where));
  } else if (task === "qa") {
    const p = r.predicted;
    const spans = [...r.gold.map((a) => ({...a, cls: "gold", title: "gold answer"})),
      {start: p.start, end: p.end, cls: `answer ${r.correct ? "right" : "wrong"}`, title: `predicted (${fmt(p.score, 3)})`}];
    card.append(
      h("div", {class: "line question"}, h("b", {}, r.question)),
      h("div", {class: "line context"}, marked(r.context, spans)),
      h("div", {class: "line"}, "predicted ", h("b", {class: r.correct ? "ok" : "error"}, p.answer ? `“${p.answer}”` : "(no answer)"),
        ` EM ${r.exact_match} F1 ${fmt(r.f1, 2)} · gold `, r.gold.length ? r.gold.map((a) => `“${a.text}”`).join(" | ") : "(no answer)", " ", where));
  }
  return card;
}

// The run's test predictions (test_predictions.jsonl), a page at a time, the wrong ones first.
function testPredictions(my, id) {
  const LIMIT = 20;
  const state = {errors: true, offset: 0};
  const list = h("div", {id: "prediction-list"});
  const info = h("span", {class: "muted", id: "predictions-count"});
  const only = h("input", {type: "checkbox", id: "errors-only", checked: true});
  const prev = h("button", {class: "secondary", id: "predictions-prev", onclick: () => { state.offset = Math.max(0, state.offset - LIMIT); load(); }}, "← previous");
  const next = h("button", {class: "secondary", id: "predictions-next", onclick: () => { state.offset += LIMIT; load(); }}, "next →");
  only.addEventListener("change", () => { state.errors = only.checked; state.offset = 0; load(); });
  const legend = h("span", {class: "legend-marks"}, h("mark", {class: "entity gold"}, "gold"), h("mark", {class: "entity right"}, "right"),
    h("mark", {class: "entity wrong"}, "wrong"), h("mark", {class: "entity gold missed"}, "missed"));
  const load = async () => {
    let got;
    try { got = await api(`/api/predictions?run=${q(id)}&errors=${state.errors}&offset=${state.offset}&limit=${LIMIT}`); }
    catch (err) { list.replaceChildren(failure(err)); return; }
    if (my !== viewId) return;
    const shown = got.records.length ? `${got.offset + 1}–${got.offset + got.records.length} of ${got.matched}` : "none";
    info.textContent = `${got.errors} of ${got.total} test examples wrong; showing ${shown}`;
    prev.disabled = got.offset === 0;
    next.disabled = got.offset + LIMIT >= got.matched;
    list.replaceChildren(...(got.records.length ? got.records.map((r) => predictionCard(got.task, r))
      : [h("p", {class: "muted"}, state.errors ? "No wrong prediction in the test split." : "No test predictions.")]));
  };
  load();
  return h("div", {id: "predictions"}, h("h3", {}, "Test predictions"),
    h("div", {class: "toolbar"}, h("label", {}, only, " wrong ones only"), prev, next, info, legend), list);
}

// -- Compare ----------------------------------------------------------------------------------

// The sweeps and continual sequences under the runs directory, as lists of links.
function collections(data) {
  const list = (title, id, ids, view) => ids.length ? [h("h3", {}, title), h("ul", {id}, ids.map((x) => h("li", {}, h("a", {href: `#/${view}/${q(x)}`}, x))))] : [];
  return [...list("Sweeps", "sweeps", data.sweeps || [], "sweep"), ...list("Continual sequences", "sequences", data.sequences || [], "continual")];
}

async function viewCompare(my, ids) {
  if (ids.length < 2) {
    main().replaceChildren(h("h2", {}, "Compare"), h("p", {class: "muted"}, "Tick two or more runs in Runs and press Compare selected."));
    let data;
    try { data = await api("/api/runs"); } catch (err) { main().append(failure(err)); return; }
    if (my === viewId) main().append(...collections(data));
    return;
  }
  let data;
  try { data = await api(`/api/compare?${ids.map((id) => `run=${q(id)}`).join("&")}`); } catch (err) { main().replaceChildren(failure(err)); return; }
  if (my !== viewId) return;
  const names = data.runs.map((r) => r.id);
  const table = (rows, id, digits) => h("table", {id, class: "diff"}, h("thead", {}, h("tr", {}, h("th", {}, "key"), names.map((n) => h("th", {}, n)))),
    h("tbody", {}, rows.map((r) => {
      const differs = new Set(r.values.map((v) => JSON.stringify(v))).size > 1;  // highlighted
      return h("tr", {}, h("td", {}, r.key), r.values.map((v) => h("td", {class: `${typeof v === "number" ? "num" : ""}${differs ? " changed" : ""}`},
        typeof v === "object" && v !== null ? JSON.stringify(v) : fmt(v, digits))));
    })));
  const perRun = data.curves.map(curveSeries);
  const keys = [...new Set(perRun.flatMap((s) => Object.keys(s)))].filter((k) => k !== "lr");
  main().replaceChildren(h("h2", {}, `Compare ${names.length} runs`),
    h("h3", {}, "Metrics"), data.metrics.length ? table(data.metrics, "compare-metrics", 4) : h("p", {class: "muted"}, "No finished run among them."),
    h("h3", {}, "Curves"), h("div", {class: "grid", id: "compare-curves"}, keys.map((k) => chart(k, perRun.map((s, i) => ({name: names[i], points: s[k] || []})), `compare-${k.replace(/\W+/g, "_")}`))),
    h("h3", {}, "Config keys that differ"), data.config.length ? table(data.config, "compare-config", 6) : h("p", {class: "muted"}, "The configs are the same."));
  // The sweep or continual sequence these runs belong to: its own table, below the runs'.
  for (const id of data.sweeps) {
    try {
      const got = await api(`/api/sweep?sweep=${q(id)}`);
      if (my === viewId) main().append(h("h3", {}, "Sweep ", h("a", {href: `#/sweep/${q(id)}`}, id)), h("div", {class: "card compare-sweep"}, markdown(got.table)));
    } catch (err) { main().append(failure(err)); }
  }
  for (const id of data.sequences) {
    try {
      const c = await api(`/api/continual?sequence=${q(id)}`);
      if (my === viewId) main().append(h("h3", {}, "Continual sequence ", h("a", {href: `#/continual/${q(id)}`}, id)), h("div", {class: "compare-continual"}, continualTables(c)));
    } catch (err) { main().append(failure(err)); }
  }
}

// -- a sweep's table ---------------------------------------------------------------------------

// The markdown `finegrain sweep` writes (headings, tables of mean ± std, notes) as HTML.
function markdown(text) {
  const out = [];
  const lines = text.split("\n");
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i];
    if (line.startsWith("#")) out.push(h("h3", {}, line.replace(/^#+\s*/, "")));
    else if (line.startsWith("|")) {
      const rows = [];
      for (; i < lines.length && lines[i].startsWith("|"); i++) rows.push(lines[i].slice(1, lines[i].trimEnd().endsWith("|") ? lines[i].trimEnd().length - 1 : undefined).split("|").map((c) => c.trim()));
      i--;
      const body = rows.slice(rows.length > 1 && rows[1].every((c) => /^:?-+:?$/.test(c)) ? 2 : 1);
      out.push(h("table", {class: "sweep-table"}, h("thead", {}, h("tr", {}, rows[0].map((c) => h("th", {}, c.replace(/\*\*/g, ""))))),
        h("tbody", {}, body.map((r) => h("tr", {}, r.map((c) => h("td", {}, c.replace(/\*\*/g, ""))))))));
    } else if (line.trim()) out.push(h("p", {}, line.replace(/[*`]/g, "")));
  }
  return out;
}

async function viewSweep(my, id) {
  let data;
  try { data = await api(`/api/sweep?sweep=${q(id)}`); } catch (err) { main().replaceChildren(failure(err)); return; }
  if (my !== viewId) return;
  main().replaceChildren(h("h2", {}, `Sweep ${id}`), h("div", {id: "sweep", class: "card"}, markdown(data.table)),
    ...(data.plot ? [h("img", {src: `/api/sweep-plot?sweep=${q(id)}`, alt: "headline score of the sweep's runs", id: "sweep-plot"})] : []));
}

// -- a continual sequence's tables ----------------------------------------------------------------

async function viewContinual(my, id) {
  let c;
  try { c = await api(`/api/continual?sequence=${q(id)}`); } catch (err) { main().replaceChildren(failure(err)); return; }
  if (my !== viewId) return;
  main().replaceChildren(h("h2", {}, `Continual sequence ${id}`), ...continualTables(c));
}

// A sequence's summary (strategy, average accuracy, BWT), its accuracy matrix and its per-stage table.
function continualTables(c) {
  const stages = c.stages || c.accuracy_matrix.map((_, i) => `stage ${i}`);
  const matrix = h("table", {class: "cm accuracy-matrix"}, h("tr", {}, h("th", {}, "after ↓ / tested on →"), stages.map((s) => h("th", {}, s))),
    c.accuracy_matrix.map((row, i) => h("tr", {}, h("th", {}, `after ${stages[i]}`), stages.map((_, j) => {
      if (j >= row.length) return h("td", {class: "empty"}, "");
      const td = h("td", {class: i === j ? "diag" : ""}, fixed(row[j], 3));
      td.style.background = `rgba(35, 135, 74, ${(0.08 + 0.6 * Math.max(0, Math.min(1, row[j]))).toFixed(3)})`;
      return td;
    }))));
  const perStage = h("table", {class: "continual-stages"}, h("thead", {}, h("tr", {}, ["stage", "last score", "forgetting", "seconds"].map((t, i) => h("th", {class: i ? "num" : ""}, t)))),
    h("tbody", {}, stages.map((s, j) => h("tr", {}, h("td", {}, s), h("td", {class: "num"}, fixed(c.accuracy_matrix.at(-1)[j], 3)),
      h("td", {class: "num"}, fixed((c.forgetting || [])[j], 3)), h("td", {class: "num"}, fixed((c.seconds || [])[j], 1))))));
  return [
    h("div", {class: "card continual-summary"}, `${c.kind || ""} · strategy ${c.strategy || "?"} · average accuracy `, h("b", {}, fixed(c.average_accuracy, 4)),
      " · BWT ", h("b", {class: c.bwt < 0 ? "error" : "ok"}, fixed(c.bwt, 4)), c.total_seconds !== undefined ? ` · ${duration(c.total_seconds)}` : ""),
    h("h3", {}, "Accuracy matrix (rows: after training a stage; columns: the stage tested)"), matrix,
    h("h3", {}, "Per stage"), perStage,
    h("p", {class: "muted"}, "BWT (backward transfer): the mean over earlier stages of the last score minus the score just after training it; negative is forgetting.")];
}

// -- Playground --------------------------------------------------------------------------------

async function viewPlayground(my, id) {
  let runs;
  try { runs = (await api("/api/runs")).runs.filter((r) => r.status === "finished"); } catch (err) { main().replaceChildren(failure(err)); return; }
  if (my !== viewId) return;
  if (!id && runs.length) id = runs[0].id;
  const pick = h("select", {id: "playground-run", onchange: () => { location.hash = `#/playground/${q(pick.value)}`; }},
    runs.map((r) => h("option", {value: r.id, selected: r.id === id}, `${r.id} (${r.task})`)));
  const area = h("div", {id: "playground"});
  main().replaceChildren(h("h2", {}, "Playground"), h("div", {class: "toolbar"}, h("label", {}, "Run ", pick), h("span", {class: "muted"}, "answered by the same code as finegrain serve")), area);
  if (!id) { area.append(h("p", {class: "muted"}, "No finished run to try yet.")); return; }
  let info;
  try { info = (await api(`/api/run?run=${q(id)}`)).playground; } catch (err) { area.append(failure(err)); return; }
  if (!info) { area.append(h("p", {class: "muted"}, "This run has no trained weights yet.")); return; }
  const out = h("div", {id: "prediction", class: "card"});
  const send = async (payload, button) => {
    button.disabled = true;
    out.replaceChildren(h("span", {class: "muted"}, "predicting… (the first call loads the model)"));
    try { return await api("/api/predict", {run: id, ...payload}); }
    catch (err) { out.replaceChildren(failure(err)); return null; }
    finally { button.disabled = false; }
  };
  if (info.field === "messages") {
    const log = h("div", {class: "chat card", id: "chat"});
    const box = h("textarea", {id: "playground-input", rows: 3, placeholder: "Say something…"});
    const messages = [];
    const go = h("button", {id: "predict", onclick: async () => {
      if (!box.value.trim()) return;
      messages.push({role: "user", content: box.value});
      log.append(h("div", {class: "user"}, `you: ${box.value}`)); box.value = "";
      const got = await send({messages}, go);
      if (got) { messages.push({role: "assistant", content: got.reply}); log.append(h("div", {class: "assistant"}, `model: ${got.reply}`)); out.replaceChildren(); }
    }}, "Send");
    area.append(log, box, h("div", {class: "toolbar"}, go), out);
    return;
  }
  let read;
  if (info.task === "qa") {
    const question = h("input", {type: "text", id: "playground-question", size: 80, placeholder: "Question"});
    const context = h("textarea", {id: "playground-input", rows: 6, placeholder: "Context"});
    area.append(h("div", {}, question), context);
    read = () => ({question: question.value, context: context.value});
  } else if (info.field === "texts") {
    const text = h("textarea", {id: "playground-input", rows: 4, placeholder: "Type or paste a text"});
    area.append(text);
    read = () => text.value;
  } else {
    const json = h("textarea", {id: "playground-input", rows: 6}, JSON.stringify({text: "Anna lives in Paris", head: [0, 4], tail: [14, 19]}));
    area.append(h("p", {class: "muted"}, `One ${info.task} item as JSON, as finegrain serve takes it:`), json);
    read = () => { try { return JSON.parse(json.value); } catch { return json.value; } };
  }
  const go = h("button", {id: "predict", onclick: async () => {
    const input = read();
    const got = await send({input}, go);
    if (got) out.replaceChildren(showPrediction(info.task, input, got.prediction));
  }}, "Predict");
  area.append(h("div", {class: "toolbar"}, go), out);
}

// A prediction as the task shows best: probability bars, entities in the text, the answer in its context.
function showPrediction(task, input, p) {
  const box = h("div", {});
  if (p.probabilities) {
    box.append(h("div", {}, "label: ", h("b", {id: "predicted-label"}, Array.isArray(p.labels) ? p.labels.join(", ") : p.label)));
    const rows = Object.entries(p.probabilities).sort((a, b) => b[1] - a[1]);
    box.append(h("table", {id: "probabilities"}, rows.map(([label, v]) => {
      const fill = h("span", {}); fill.style.width = `${(100 * v).toFixed(1)}%`;
      return h("tr", {}, h("td", {}, label), h("td", {}, h("div", {class: "bar"}, fill)), h("td", {class: "num"}, v.toFixed(3)));
    })));
    if (p.head && p.tail && input && typeof input.text === "string") {  // a relation: its two mentions in the text
      box.append(h("div", {id: "mentions"}, marked(input.text, [{...p.head, cls: "entity head", label: "e1"}, {...p.tail, cls: "entity tail", label: "e2"}])));
    }
  } else if (Array.isArray(p.entities) && !p.entities.length && (p.tags || []).some((t) => t !== "O")) {
    // Plain tags (parts of speech): tags that are no entity's, so each word with its own.
    box.append(h("div", {id: "tags"}, p.words.flatMap((w, i) => [h("mark", {class: "entity"}, w, h("sup", {}, p.tags[i])), " "])));
  } else if (Array.isArray(p.entities) && typeof input === "string") {
    const text = h("div", {id: "entities"});
    let at = 0;
    for (const e of [...p.entities].sort((a, b) => a.start - b.start)) {
      if (e.start < at) continue;
      text.append(input.slice(at, e.start), h("mark", {class: "entity", title: `${e.type || e.label} ${fmt(e.score, 3)}`}, input.slice(e.start, e.end), h("sup", {}, e.type || e.label)));
      at = e.end;
    }
    text.append(input.slice(at));
    box.append(text);
    if (!p.entities.length) box.append(h("p", {class: "muted"}, "no entities found"));
  } else if ("answer" in p && input && typeof input.context === "string") {
    const c = input.context;
    const answer = h("div", {id: "answer"}, p.start === null || p.start === undefined ? h("i", {}, "no answer in the context")
      : [c.slice(0, p.start), h("mark", {class: "answer"}, c.slice(p.start, p.end)), c.slice(p.end)]);
    box.append(h("div", {}, "answer: ", h("b", {id: "predicted-label"}, p.answer || "(none)")), answer);
  } else if ("value" in p || "score" in p) {
    box.append(h("div", {}, "value: ", h("b", {id: "predicted-label"}, fmt(p.value ?? p.score))));
  } else {
    box.append(h("div", {}, "label: ", h("b", {id: "predicted-label"}, p.label ?? "")));
  }
  box.append(h("details", {}, h("summary", {}, "JSON"), h("pre", {}, JSON.stringify(p, null, 2))));
  return box;
}

// -- Launch -----------------------------------------------------------------------------------

const EXAMPLE = `task: classification
data:
  dataset: rotten_tomatoes
  max_train_examples: 400
train:
  epochs: 1
`;

// The common keys of the Launch form as a run config; the editor takes it from there.
function formYaml() {
  const value = (id) => document.getElementById(id).value.trim();
  const lines = [`task: ${value("form-task")}`];
  if (value("form-model")) lines.push("model:", `  name: ${JSON.stringify(value("form-model"))}`);
  lines.push("data:", value("form-train") ? `  train: ${JSON.stringify(value("form-train"))}` : `  dataset: ${value("form-dataset") || "rotten_tomatoes"}`);
  if (value("form-method") !== "lora") lines.push("peft:", `  method: ${value("form-method")}`);
  lines.push("train:", `  epochs: ${value("form-epochs") || 1}`);
  if (value("form-lr")) lines.push(`  lr: ${value("form-lr")}`);
  return lines.join("\n") + "\n";
}

async function viewLaunch(my) {
  let options;
  try { options = await api("/api/options"); } catch (err) { main().replaceChildren(failure(err)); return; }
  if (my !== viewId) return;
  const name = h("input", {type: "text", id: "launch-name", value: `run-${new Date().toISOString().slice(0, 16).replace(/[-:T]/g, "")}`, size: 30});
  const editor = h("textarea", {id: "launch-config", rows: 16, spellcheck: "false"}, sessionStorage.getItem("finegrain-launch") || EXAMPLE);
  const message = h("div", {id: "launch-message", class: "editor-error"});
  const jobs = h("div", {id: "jobs"});
  const showError = (got) => {
    if (got.ok) { message.className = "ok"; message.textContent = "valid"; return; }
    message.className = "editor-error"; message.textContent = got.error;
    if (got.line) {  // select the line the error names
      const lines = editor.value.split("\n");
      const start = lines.slice(0, got.line - 1).join("\n").length + (got.line > 1 ? 1 : 0);
      editor.setSelectionRange(start, start + (lines[got.line - 1] || "").length);
    }
  };
  const check = async () => { try { showError(await api("/api/validate", {name: name.value, config: editor.value})); } catch (err) { message.textContent = err.message; } };
  let pending = null;
  editor.addEventListener("input", () => { sessionStorage.setItem("finegrain-launch", editor.value); clearTimeout(pending); pending = setTimeout(check, 600); });
  const launch = h("button", {id: "launch", onclick: async () => {
    try {
      const got = await api("/api/launch", {name: name.value, config: editor.value});
      showError(got);
      if (got.ok) { message.textContent = `queued as ${got.job.name}`; refresh(); }
    } catch (err) { message.textContent = err.message; }
  }}, "Launch");
  const field = (label, id, value, attrs = {}) => h("label", {}, `${label} `, h("input", {type: "text", id, value, size: 14, ...attrs}));
  const form = h("div", {class: "toolbar", id: "launch-form"},
    h("label", {}, "task ", h("select", {id: "form-task"}, options.tasks.map((t) => h("option", {value: t}, t)))),
    field("dataset", "form-dataset", "rotten_tomatoes", {placeholder: "bundled name"}), field("or train file", "form-train", "", {placeholder: "path/to/train.jsonl"}),
    field("model", "form-model", "", {placeholder: "smollm2-135m"}),
    h("label", {}, "method ", h("select", {id: "form-method"}, options.methods.map((m) => h("option", {value: m}, m)))),
    field("epochs", "form-epochs", "1", {size: 4}), field("lr", "form-lr", "", {size: 7, placeholder: "recipe"}),
    h("button", {class: "secondary", id: "form-fill", onclick: () => { editor.value = formYaml(); editor.dispatchEvent(new Event("input")); }}, "Write YAML"));
  main().replaceChildren(h("h2", {}, "Launch a run"),
    h("div", {class: "card"}, form,
      h("div", {class: "toolbar"}, h("label", {}, "Name ", name), h("span", {class: "muted"}, "the run goes to RUNS_DIR/NAME; one trains at a time, the rest wait")),
      editor, message, h("div", {class: "toolbar"}, h("button", {class: "secondary", id: "validate", onclick: check}, "Validate"), launch)),
    h("h3", {}, "Launched"), jobs);
  const refresh = async () => {
    let got;
    try { got = await api("/api/jobs"); } catch (err) { jobs.replaceChildren(failure(err)); return; }
    if (my !== viewId) return;
    jobs.replaceChildren(got.jobs.length ? h("table", {id: "job-table"}, h("thead", {}, h("tr", {}, ["run", "state", "progress", "output", ""].map((c) => h("th", {}, c)))),
      h("tbody", {}, got.jobs.map((j) => {
        const fill = h("span", {}); fill.style.width = j.total ? `${(100 * j.step / j.total).toFixed(1)}%` : "0";
        return h("tr", {"data-job": j.id, "data-state": j.state},
          h("td", {}, h("a", {href: `#/run/${q(j.name)}`}, j.name)), h("td", {}, badge(j.state)),
          h("td", {}, h("div", {class: "progress"}, fill), j.total ? `${j.step}/${j.total} steps` : ""),
          h("td", {}, h("pre", {}, j.tail || "")),
          h("td", {}, ["queued", "running"].includes(j.state) ? h("button", {class: "secondary cancel", onclick: async () => { await api(`/api/jobs/${j.id}/cancel`, {}); refresh(); }}, "Cancel") : null));
      }))) : h("p", {class: "muted"}, "Nothing launched yet."));
  };
  every(1000, refresh);
  check();
}

// -- routing ----------------------------------------------------------------------------------

function route() {
  timers.forEach(clearInterval);
  timers = [];
  const my = ++viewId;
  const [view, arg] = location.hash.replace(/^#\/?/, "").split(/\/(.*)/s);
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.view === ({run: "runs", sweep: "compare", continual: "compare"}[view] || view || "runs"));
  const id = arg ? decodeURIComponent(arg) : "";
  if (view === "run" && id) return viewRun(my, id);
  if (view === "compare") return viewCompare(my, arg ? arg.split(",").map(decodeURIComponent) : []);
  if (view === "playground") return viewPlayground(my, id);
  if (view === "sweep" && id) return viewSweep(my, id);
  if (view === "continual" && id) return viewContinual(my, id);
  if (view === "launch") return viewLaunch(my);
  return viewRuns(my);
}

document.getElementById("keybar").addEventListener("submit", (e) => {
  e.preventDefault();
  document.cookie = `finegrain_key=${encodeURIComponent(document.getElementById("key").value)}; path=/; SameSite=Strict`;
  document.getElementById("keybar").hidden = true;
  route();
});
window.addEventListener("hashchange", route);
route();
