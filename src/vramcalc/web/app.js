// The vramcalc page: the form's state <-> the URL <-> the JSON API (vramcalc/serve.py).
// No build step, no libraries: the charts are inline SVG.
"use strict";

const GiB = 2 ** 30;
const SEQ_VALUES = [128, 256, 512, 1024, 2048, 3072, 4096, 6144, 8192, 12288, 16384, 24576,
  32768, 65536, 131072];
// The command line's defaults (commands/options.py PLAN_OPTIONS): a default is not sent, so
// the exported command and the API query carry only what the user changed.
const DEFAULTS = {
  task: "train", method: "qlora", quant: "nf4", rank: "16", targets: "all-linear",
  dora: "false", batch: "1", "seq-len": "512", "gradient-checkpointing": "true",
  optimizer: "paged_adamw_8bit", loop: "trainer", attn: "sdpa",
  "expandable-segments": "false", "prompt-len": "512", "new-tokens": "128", gpus: "1",
  strategy: "", gpu: "", gpu2: "", trainer: "", "loss-kernel": "torch",
  "batch-layout": "padded", "tokens-per-step": "", "offload-activations": "none",
};
const STATE_KEYS = ["model", "task", "method", "quant", "rank", "targets", "dora", "batch",
  "seq-len", "prompt-len", "new-tokens", "gradient-checkpointing", "optimizer", "loop", "attn",
  "expandable-segments", "gpu", "gpu2", "gpus", "strategy", "trainer", "loss-kernel",
  "batch-layout", "tokens-per-step", "offload-activations"];
// The plan options of the memory savers (the command line's --loss-kernel, --batch-layout,
// --tokens-per-step, --offload-activations, --trainer)
const SAVER_SELECTS = ["trainer", "loss-kernel", "batch-layout", "offload-activations"];
// One color per component (render.py LABELS' keys), the same in every chart.
const COLORS = {
  base_weights: "#4e79a7", quant_constants: "#a0cbe8", unquantized_params: "#f28e2b",
  expert_weights: "#ffbe7d", adapter_weights: "#59a14f", gradients: "#8cd17d",
  optimizer_states: "#b6992d", optimizer_paged: "#f1ce63", activations: "#e15759",
  kv_cache: "#ff9d9a", logits_loss: "#b07aa1", transient: "#d4a6c8", cublas_workspace: "#9d7660",
  comm_buffers: "#d7b5a6", allocator_slack: "#79706e", cuda_context: "#bab0ac",
};
const colorOf = (name) => COLORS[name] || "#499894";
const LABELS = {
  base_weights: "base weights", quant_constants: "quantization constants",
  unquantized_params: "unquantized params", expert_weights: "MoE experts",
  adapter_weights: "LoRA parameters", gradients: "gradients",
  optimizer_states: "optimizer states", optimizer_paged: "optimizer (paged)",
  activations: "activations", kv_cache: "KV cache", logits_loss: "logits + loss",
  transient: "transients", cublas_workspace: "cuBLAS workspaces",
  comm_buffers: "communication buffers", allocator_slack: "allocator slack",
  cuda_context: "CUDA context",
};
const CERTAINTY = { fits: "fits", tight: "fits, tight", does_not_fit: "does NOT fit" };

const $ = (id) => document.getElementById(id);
const gib = (b) => (b / GiB).toFixed(2);
const esc = (s) => String(s).replace(/[&<>"']/g, (c) => ({
  "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

let gpuCatalog = [];
let trainerPresets = {};  // /api/trainers: name -> {controls, other, loss}
let modelInfo = {};  // name -> models --json entry, for hub ids in the exports
let lastPlan = null;
let lastCheck = null;
let exportKind = "command";
let generation = 0;  // the newest update; older answers are dropped
let inputAt = null;  // performance.now() of the input that started the pending update

// ---- state ------------------------------------------------------------------------------

function readState() {
  const s = {};
  s.model = $("model").value.trim();
  s.task = document.querySelector("input[name=task]:checked").value;
  s.method = $("method").value;
  s.quant = $("quant").value;
  s.rank = $("rank").value;
  s.targets = $("targets").value.trim();
  s.dora = String($("dora").checked);
  s.batch = $("batch").value;
  s["seq-len"] = String(SEQ_VALUES[Number($("seq").value)]);
  s["prompt-len"] = $("prompt-len").value;
  s["new-tokens"] = $("new-tokens").value;
  s["gradient-checkpointing"] = String($("gradient-checkpointing").checked);
  s.optimizer = $("optimizer").value;
  s.loop = $("loop").value;
  s.attn = $("attn").value;
  s["expandable-segments"] = String($("expandable-segments").checked);
  s.gpu = $("gpu").value;
  s.gpu2 = $("gpu2").value;
  s.gpus = $("gpus").value;
  s.strategy = $("strategy").value;
  for (const k of SAVER_SELECTS) s[k] = $(k).value;
  s["tokens-per-step"] = s["batch-layout"] === "padding-free" ? $("tokens-per-step").value.trim() : "";
  return s;
}

function writeState(params) {
  const get = (k) => (params.has(k) ? params.get(k) : null);
  if (get("model") !== null) $("model").value = get("model");
  const task = get("task");
  if (task) {
    const radio = document.querySelector(`input[name=task][value="${CSS.escape(task)}"]`);
    if (radio) radio.checked = true;
  }
  for (const k of ["method", "quant", "optimizer", "loop", "attn", "strategy", "gpu", "gpu2",
    ...SAVER_SELECTS]) {
    if (get(k) !== null) setSelect($(k), get(k));
  }
  for (const k of ["rank", "targets", "prompt-len", "new-tokens", "gpus", "tokens-per-step"]) {
    if (get(k) !== null) $(k).value = get(k);
  }
  for (const k of ["dora", "gradient-checkpointing", "expandable-segments"]) {
    if (get(k) !== null) $(k).checked = get(k) === "true";
  }
  if (get("batch") !== null) {
    const b = Number(get("batch"));
    if (b > Number($("batch").max)) $("batch").max = String(b);
    $("batch").value = String(b);
  }
  if (get("seq-len") !== null) {
    const n = Number(get("seq-len"));
    if (Number.isInteger(n) && n > 0 && !SEQ_VALUES.includes(n)) {
      // a length the slider lacks (a link written by hand): the slider gets it as a stop
      SEQ_VALUES.push(n);
      SEQ_VALUES.sort((a, b) => a - b);
      $("seq").max = String(SEQ_VALUES.length - 1);
    }
    $("seq").value = String(Math.max(0, SEQ_VALUES.indexOf(n)));
  }
  const unknown = [...params.keys()].filter((k) => !STATE_KEYS.includes(k));
  if (unknown.length) {
    $("model-info").textContent = `not understood in the link, left out: ${unknown.join(", ")}`;
  }
}

function setSelect(el, value) {
  if (![...el.options].some((o) => o.value === value)) {
    el.add(new Option(value, value));
  }
  el.value = value;
}

// The API query for one endpoint: only what differs from the command line's defaults.
function apiParams(s, endpoint) {
  const p = new URLSearchParams();
  p.set("model", s.model);
  const put = (k) => { if (s[k] !== DEFAULTS[k] && s[k] !== "") p.set(k, s[k]); };
  if (s.task !== "train") {
    p.set("task", s.task);
    put("batch");
    if (s.task === "infer") { put("prompt-len"); put("new-tokens"); }
    p.set("quant", s.quant);
    put("rank"); put("targets");
    return p;
  }
  put("method");
  if (s.method === "qlora") put("quant");
  if (s.method !== "full") { put("rank"); put("targets"); put("dora"); }
  put("batch");
  if (endpoint !== "sweep") put("seq-len");
  for (const k of ["gradient-checkpointing", "optimizer", "loop", "attn", "expandable-segments",
    ...SAVER_SELECTS]) {
    put(k);
  }
  // the memory curve sweeps the sequence length: a fixed token count would pass batch x
  // seq-len at its short end, so the curve plans full padding-free rows
  if (endpoint !== "sweep") put("tokens-per-step");
  if (s.strategy && (endpoint === "plan" || endpoint === "check")) {
    p.set("gpus", s.gpus);
    p.set("strategy", s.strategy);
  }
  return p;
}

function gpuList(s) {
  return [s.gpu, s.gpu2].filter((g, i, all) => g && all.indexOf(g) === i);
}

function pageQuery(s) {
  const p = new URLSearchParams();
  for (const k of STATE_KEYS) {
    if (k === "model" || (s[k] !== DEFAULTS[k] && s[k] !== "")) p.set(k, s[k]);
  }
  return p;
}

// ---- talking to the server --------------------------------------------------------------

async function api(path, params) {
  const url = `/api/${path}` + (params ? `?${params}` : "");
  const res = await fetch(url);
  const body = await res.json();
  if (!res.ok) {
    if (res.status === 404 && await reupload(params)) return api(path, params);
    throw new Error(body.error || `${res.status} ${res.statusText}`);
  }
  return body;
}

// A link naming an uploaded config works where this browser uploaded it before: the file
// is kept in localStorage and sent again when the server no longer has it.
async function reupload(params) {
  const model = params && params.get("model");
  if (!model || !model.startsWith("upload:")) return false;
  const text = localStorage.getItem(`vramcalc:${model}`);
  if (!text) return false;
  const res = await fetch("/api/config", { method: "POST", body: text,
    headers: { "Content-Type": "application/json" } });
  return res.ok;
}

function scheduleUpdate(delay) {
  clearTimeout(scheduleUpdate.timer);
  scheduleUpdate.timer = setTimeout(update, delay);
}

async function update() {
  const gen = ++generation;
  const s = readState();
  syncVisibility(s);
  history.replaceState(null, "", `?${pageQuery(s)}`);
  $("link").href = location.href;
  renderExport(s);
  const gpus = gpuList(s);
  const checkParams = apiParams(s, "check");
  for (const g of gpus) checkParams.append("gpu", g);
  $("status").textContent = "computing...";
  const started = inputAt;
  inputAt = null;
  try {
    // Both requests leave now; the server answers them in turn, plan first. The chart is
    // drawn as soon as the plan arrives, the verdicts when the check does.
    const planParams = apiParams(s, "plan");
    const planAnswer = api("plan", planParams);
    const checkAnswer = gpus.length ? api("check", checkParams) : Promise.resolve(null);
    checkAnswer.catch(() => {});  // a failed check is reported below, after the plan's
    const plan = await planAnswer;
    if (gen !== generation) return;
    const sameGpus = lastCheck && document.body.dataset.checkGpus === gpus.join(",");
    renderChart(plan, sameGpus ? lastCheck : null);  // the GPU lines of the last check
    $("error").hidden = true;
    const chartMs = started === null ? null : performance.now() - started;
    const check = await checkAnswer;
    if (gen !== generation) return;
    // the queries behind what is drawn (the browser test reads them)
    document.body.dataset.planQuery = planParams.toString();
    document.body.dataset.checkQuery = gpus.length ? checkParams.toString() : "";
    document.body.dataset.checkGpus = gpus.join(",");
    lastPlan = plan;
    lastCheck = check;
    renderChart(plan, check);
    renderVerdicts(check);
    renderSuggestions(check);
    const took = started === null ? null : performance.now() - started;
    if (took !== null) {
      document.body.dataset.chartMs = chartMs.toFixed(1);
      document.body.dataset.updateMs = took.toFixed(1);
    }
    document.body.dataset.generation = String(gen);
    $("status").textContent = took === null ? "" :
      `chart in ${chartMs.toFixed(0)} ms, verdicts in ${took.toFixed(0)} ms`;
  } catch (err) {
    if (gen !== generation) return;
    showError(err.message);
  }
  scheduleCurve(s);
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
  $("status").textContent = "";
  document.body.dataset.generation = String(generation);
}

// ---- the breakdown chart ----------------------------------------------------------------

// Components of one estimate: per GPU for several GPUs (the busiest rank's), else the plan's.
function componentsOf(plan) {
  if (plan.components) return plan.components;
  if (plan.per_gpu && plan.per_gpu.components) return plan.per_gpu.components;
  return {};
}

function requiredOf(plan) {
  if (plan.required_device_bytes !== undefined) return plan.required_device_bytes;
  if (plan.per_gpu && plan.per_gpu.required_device_bytes !== undefined) {
    return plan.per_gpu.required_device_bytes;
  }
  return null;
}

function renderChart(plan, check) {
  const comps = Object.entries(componentsOf(plan)).filter(([, b]) => b > 0);
  const total = comps.reduce((a, [, b]) => a + b, 0);
  const required = requiredOf(plan);
  let lines = (check && check.gpus ? check.gpus : []).map((g) => [g.name, g.free_bytes]);
  if (check && check.gpus_checked) {
    lines = [[`${check.gpus_checked} less margin`, check.budget_bytes_per_gpu]];
  }
  const scale = Math.max(total, required || 0, ...lines.map(([, b]) => b)) * 1.04 || 1;
  const W = 860, left = 10, barY = 36, barH = 46, usable = W - 2 * left;
  const x = (b) => left + (b / scale) * usable;
  let svg = `<svg viewBox="0 0 ${W} 120" role="img" aria-label="memory breakdown" id="bar">`;
  let at = 0;
  comps.forEach(([name, b]) => {
    const w = Math.max((b / scale) * usable, 0.5);
    svg += `<rect class="seg" x="${x(at).toFixed(2)}" y="${barY}" width="${w.toFixed(2)}" ` +
      `height="${barH}" fill="${colorOf(name)}" data-component="${esc(name)}" ` +
      `data-bytes="${b}"><title>${esc(LABELS[name] || name)}: ${gib(b)} GiB</title></rect>`;
    at += b;
  });
  lines.sort((a, b) => a[1] - b[1]).forEach(([name, b], i) => {
    const y = i % 2 ? 11 : 25;  // close lines' labels on two rows
    svg += `<line x1="${x(b)}" x2="${x(b)}" y1="${y + 3}" y2="${barY + barH + 8}" class="gpu-line"/>` +
      `<text x="${x(b) - 4}" y="${y}" class="gpu-label" text-anchor="end">${esc(name)} ` +
      `${gib(b)} GiB</text>`;
  });
  if (required !== null) {
    svg += `<line x1="${x(required)}" x2="${x(required)}" y1="${barY - 4}" ` +
      `y2="${barY + barH + 14}" class="req-line"/>` +
      `<text x="${x(required)}" y="${barY + barH + 28}" class="req-label" ` +
      `text-anchor="${x(required) > W * 0.85 ? "end" : "middle"}">required ${gib(required)} ` +
      "GiB</text>";
  }
  svg += "</svg>";
  let legend = '<table class="legend" id="legend"><tbody>';
  comps.forEach(([name, b]) => {
    legend += `<tr data-component="${esc(name)}" data-bytes="${b}"><td><span class="swatch" ` +
      `style="background:${colorOf(name)}"></span>${esc(LABELS[name] || name)}</td>` +
      `<td class="num">${gib(b)}</td><td class="num dim">${(100 * b / total).toFixed(1)} %</td></tr>`;
  });
  legend += "</tbody></table>";
  $("chart").innerHTML = svg + legend;
  const host = plan.host_bytes || (plan.per_gpu && plan.per_gpu.host_bytes) || 0;
  $("total").textContent = required === null ? "" :
    `(required ${gib(required)} GiB; peak on the device ${gib(total)} GiB` +
    (host ? `; host ${gib(host)} GiB for offloaded activations)` : ")");
  $("total").dataset.hostBytes = String(host);
  $("total").dataset.requiredBytes = required === null ? "" : String(required);
  const notes = plan.notes || (plan.per_gpu && plan.per_gpu.notes) || [];
  $("notes").textContent = notes.join(" ");
}

// A check's time on a catalog card (timing/cost.py TrainTime fields): one line, and the
// seconds per step as a data attribute (the browser test compares them with the API's)
function timeOf(t) {
  if (t.step_seconds === undefined) return ["", ""];
  const every = t.gpus ? ` on ${t.gpus} GPUs` : "";
  return [` data-step-seconds="${t.step_seconds}"`,
    `<div class="dim time">${t.step_seconds.toPrecision(3)} s/step, ` +
    `${Math.round(t.tokens_per_second).toLocaleString("en-US")} tokens/s${every} ` +
    `(${esc(t.time_basis)})</div>`];
}

function renderVerdicts(check) {
  if (check && check.gpus_checked) {  // several GPUs (--gpus N --strategy): the busiest one
    const c = check.fits ? "fits" : "does_not_fit";
    const [attr, line] = timeOf(check);
    $("verdicts").innerHTML = `<div class="verdict ${c}" data-gpu="${esc(check.gpus_checked)}" ` +
      `data-certainty="${c}"${attr}><div class="word">${CERTAINTY[c]}</div>` +
      `<div class="gpu">${esc(check.gpus_checked)}</div><div class="dim">the busiest GPU needs ` +
      `${gib(check.required_device_bytes)} GiB of ${gib(check.budget_bytes_per_gpu)} GiB ` +
      `(memory less the margin)</div>${line}</div>`;
    return;
  }
  if (!check || !check.gpus) {
    $("verdicts").innerHTML = "";
    return;
  }
  $("verdicts").innerHTML = check.gpus.map((g) => {
    // --task infer|merge answers fits_free without a certainty band
    const certainty = g.certainty || (g.fits_free ? "fits" : "does_not_fit");
    const word = CERTAINTY[certainty];
    const [attr, line] = timeOf(g);
    return `<div class="verdict ${esc(certainty)}" data-gpu="${esc(g.name)}" ` +
      `data-certainty="${esc(certainty)}" data-required="${g.required_device_bytes}"${attr}>` +
      `<div class="word">${esc(word)}</div><div class="gpu">${esc(g.name)}</div>` +
      `<div class="dim">needs ${gib(g.required_device_bytes)} + ` +
      `${gib(check.margin_bytes)} GiB margin of ${gib(g.free_bytes)} GiB; headroom ` +
      `${g.headroom_bytes >= 0 ? "+" : ""}${gib(g.headroom_bytes)} GiB</div>${line}</div>`;
  }).join("");
}

function renderSuggestions(check) {
  if (!check || !check.suggestions) { $("suggestions").innerHTML = ""; return; }
  let html = "";
  if (check.suggestions.length) {
    html += `<h3>${check.fits ? "More room" : "Changes that make it fit"} ` +
      `(${esc(check.best_gpu.name)})</h3><ul class="suggestions">`;
    for (const sg of check.suggestions) {
      // advice.py Suggestion.command_flags: the flags, plus the trainer's accumulation
      const acc = sg.gradient_accumulation_steps;
      const flags = sg.flags + (acc ? `, gradient accumulation ${acc}` : "");
      html += `<li>${esc(sg.description)}: needs ${gib(sg.required_device_bytes)} GiB ` +
        `<code>${esc(flags)}</code></li>`;
    }
    html += "</ul>";
  }
  const failing = (check.gpus || []).filter((g) => g.certainty === "does_not_fit");
  if (check.fits && failing.length) {
    html += `<p class="dim">Changes are searched for the GPU with the most memory ` +
      `(${esc(check.best_gpu.name)}, as <code>vramcalc check</code> does); pick ` +
      `${esc(failing[0].name)} alone to see what makes it fit there.</p>`;
  }
  if (!check.suggestions.length && !check.fits && check.larger_gpu) {
    html += `<p>Nothing makes it fit ${esc(check.best_gpu.name)}; the smallest catalog GPU ` +
      `it fits: <b>${esc(check.larger_gpu)}</b>.</p>`;
  }
  if (!check.fits && check.several_gpus && check.several_gpus.length) {
    html += `<h3>Or on several ${esc(check.best_gpu.name)}</h3><ul class="suggestions">` +
      check.several_gpus.slice(0, 3).map((o) => `<li><code>${esc(o.flags)}</code>: needs ` +
        `${gib(o.required_device_bytes)} GiB per GPU</li>`).join("") + "</ul>";
  }
  $("suggestions").innerHTML = html;
}

// ---- the curve --------------------------------------------------------------------------

// Memory vs sequence length, one /api/plan per point, drawn as the points arrive. One
// request at a time, abandoned when the form changes: the server runs one estimate at a
// time, so a long `sweep` request would hold back the chart of the next slider move.
const CURVE_X = [256, 512, 1024, 2048, 4096, 8192, 16384, 32768];

function scheduleCurve(s) {
  clearTimeout(scheduleCurve.timer);
  scheduleCurve.timer = setTimeout(() => renderCurve(s, generation), 200);
}

async function renderCurve(s, gen) {
  if (s.task !== "train" || s.strategy) {
    $("curve").innerHTML = '<p class="dim">The curve is drawn for one-GPU training plans.</p>';
    return;
  }
  const caps = (lastCheck && lastCheck.gpus ? lastCheck.gpus : []).map((g) => ({
    name: g.name, memory: g.free_bytes, budget: g.free_bytes - lastCheck.margin_bytes }));
  const pts = [];
  for (const x of CURVE_X) {
    if (gen !== generation) return;
    const p = apiParams(s, "plan");
    if (x !== Number(DEFAULTS["seq-len"])) p.set("seq-len", String(x)); else p.delete("seq-len");
    let plan;
    try {
      plan = await api("plan", p);
    } catch (err) {
      if (gen === generation) $("curve").innerHTML = `<p class="error">${esc(err.message)}</p>`;
      return;
    }
    if (gen !== generation) return;
    pts.push([x, plan.required_device_bytes]);
    drawCurve(s, pts, caps, pts.length === CURVE_X.length);
  }
}

function drawCurve(s, pts, caps, done) {
  const xs = CURVE_X;
  const W = 860, H = 260, L = 58, R = 16, T = 14, B = 36;
  // The y range ends near the GPUs' memory (or the current point): a 32k-token step of a
  // large model needs ten times a card, and a full range would flatten every line.
  const cur = Number(s["seq-len"]);
  const ys = pts.map(([, y]) => y);
  const near = Math.max(...caps.map((c) => c.memory), ...ys.slice(0, 4));
  const ymax = Math.min(Math.max(...ys, near), near * 1.6) * 1.08;
  const lx = (v) => L + (Math.log2(v / xs[0]) / Math.log2(xs[xs.length - 1] / xs[0])) * (W - L - R);
  const ly = (b) => T + (1 - b / ymax) * (H - T - B);
  let svg = `<svg viewBox="0 0 ${W} ${H}" role="img" aria-label="memory vs sequence length" ` +
    `id="curve-svg" data-done="${done}">`;
  const step = niceStep(ymax / GiB);
  for (let g = 0; g * step * GiB <= ymax; g++) {
    const y = ly(g * step * GiB);
    svg += `<line x1="${L}" x2="${W - R}" y1="${y}" y2="${y}" class="grid"/>` +
      `<text x="${L - 6}" y="${y + 4}" text-anchor="end" class="axis">${+(g * step).toFixed(2)}</text>`;
  }
  xs.forEach((v) => {
    svg += `<text x="${lx(v)}" y="${H - B + 16}" text-anchor="middle" class="axis">${v}</text>`;
  });
  svg += `<text x="${L}" y="${H - 4}" class="axis">sequence length (log scale); GiB required` +
    `${done ? "" : " (computing...)"}</text>`;
  caps.forEach((c, i) => {
    const right = i % 2 === 0;  // labels alternate sides, so close lines keep both readable
    const last = pts.filter(([, y]) => y <= c.budget).map(([x]) => x).pop();
    const upto = !done ? "" : last === undefined ? ": none fits" : `: fits up to ${last}`;
    svg += `<line x1="${L}" x2="${W - R}" y1="${ly(c.memory)}" y2="${ly(c.memory)}" ` +
      `class="gpu-line"/><text x="${right ? W - R : L + 6}" y="${ly(c.memory) - 4}" ` +
      `text-anchor="${right ? "end" : "start"}" class="gpu-label">${esc(c.name)} ` +
      `${gib(c.memory)} GiB${upto}</text>`;
  });
  svg += `<clipPath id="plot-area"><rect x="${L}" y="${T - 4}" width="${W - L - R + 4}" ` +
    `height="${H - T - B + 4}"/></clipPath><g clip-path="url(#plot-area)">`;
  const path = pts.map(([x, y], i) => `${i ? "L" : "M"}${lx(x).toFixed(1)},${ly(y).toFixed(1)}`).join("");
  svg += `<path d="${path}" class="curve"/>`;
  pts.forEach(([x, y]) => {
    svg += `<circle cx="${lx(x)}" cy="${ly(y)}" r="3.5" class="pt" data-x="${x}" ` +
      `data-bytes="${y}"><title>${x}: ${gib(y)} GiB</title></circle>`;
  });
  svg += "</g>";
  if (cur >= xs[0] && cur <= xs[xs.length - 1]) {
    svg += `<line x1="${lx(cur)}" x2="${lx(cur)}" y1="${T}" y2="${H - B}" class="cur-line"/>`;
  }
  svg += "</svg>";
  $("curve").innerHTML = svg;
}

function niceStep(range) {
  const raw = range / 6;
  const mag = 10 ** Math.floor(Math.log10(raw));
  return [1, 2, 5, 10].map((m) => m * mag).find((m) => m >= raw);
}

// ---- compare and fit --------------------------------------------------------------------

async function showCompare() {
  const s = readState();
  const p = apiParams(s, "compare");
  for (const k of ["method", "quant", "optimizer"]) p.delete(k);
  p.set("switches", "true");  // compare --switches: the memory-saver table below
  $("tables").innerHTML = '<p class="dim">comparing...</p>';
  try {
    const c = await api("compare", p);
    let html = `<h3>${esc(c.model)}: every method</h3><table class="grid-table" id="compare-table">` +
      "<thead><tr><th>Method</th><th>Trainable</th><th>Peak allocated GiB</th>" +
      "<th>Required GiB</th><th>Smallest GPU</th></tr></thead><tbody>";
    for (const m of c.methods) {
      const sg = m.smallest_gpu;
      html += `<tr><td>${esc(m.label)}</td>` + (m.error ? `<td colspan="4" class="dim">cannot ` +
        `start: ${esc(m.error)}</td>` : `<td class="num">${(m.trainable_params / 1e6).toFixed(1)}M</td>` +
        `<td class="num">${gib(m.peak_allocated_bytes)}</td>` +
        `<td class="num">${gib(m.required_device_bytes)}</td>` +
        `<td>${sg ? esc(sg.name) + (sg.certainty === "tight" ? " (tight)" : "") : "none"}</td>`) +
        "</tr>";
    }
    $("tables").innerHTML = html + "</tbody></table>" + saversTable(c);
  } catch (err) {
    $("tables").innerHTML = `<p class="error">${esc(err.message)}</p>`;
  }
}

// What each memory saver buys (compare --json loss_kernels and switches): every method's
// required GiB under each; host GiB of offloading in parentheses; - where it does not apply
function saversTable(c) {
  const rows = c.methods.filter((m) => !m.error);
  if (!rows.length) return "";
  const cols = [];
  for (const k of Object.keys(rows[0].loss_kernels)) cols.push([`loss ${k}`, (m) => m.loss_kernels[k]]);
  for (const [field, cells] of Object.entries(rows[0].switches)) {
    for (const v of Object.keys(cells)) {
      cols.push([field === "layout" ? v : `offload ${v}`, (m) => m.switches[field][v]]);
    }
  }
  let html = "<h3>Required GiB with each memory saver</h3>" +
    '<table class="grid-table" id="savers-table"><thead><tr><th>Method</th>' +
    cols.map(([h]) => `<th>${esc(h)}</th>`).join("") + "</tr></thead><tbody>";
  for (const m of rows) {
    html += `<tr><td>${esc(m.label)}</td>` + cols.map(([, get]) => {
      const cell = get(m);
      if (!cell || cell.required_device_bytes === null) {
        return `<td class="num dim" title="${esc(cell ? cell.error : "")}">-</td>`;
      }
      const host = cell.host_bytes ? ` (${gib(cell.host_bytes)})` : "";
      return `<td class="num" data-bytes="${cell.required_device_bytes}">` +
        `${gib(cell.required_device_bytes)}${host}</td>`;
    }).join("") + "</tr>";
  }
  return html + "</tbody></table>";
}

async function showFit() {
  const s = readState();
  if (!s.gpu) { $("tables").innerHTML = '<p class="error">pick a GPU first</p>'; return; }
  const p = new URLSearchParams({ gpu: s.gpu });
  if (s["seq-len"] !== DEFAULTS["seq-len"]) p.set("seq-len", s["seq-len"]);
  $("tables").innerHTML = '<p class="dim">searching the catalog...</p>';
  try {
    const f = await api("fit", p);
    const rows = f.rows.filter((r) => r.fits);
    // as `vramcalc fit` prints it (render.py print_fit): the pairs that fit at batch 1
    let html = `<h3>What fits ${esc(f.gpu)} (${gib(f.gpu_memory_bytes)} GiB, margin ` +
      `${gib(f.margin_bytes)}) at batch 1 x ${f.seq_len} tokens: ${rows.length} of ` +
      `${f.rows.length} model x method pairs</h3>` +
      '<table class="grid-table" id="fit-table"><thead><tr><th>Model</th><th>Method</th>' +
      "<th>Needs GiB</th><th>Fits</th><th>Max batch</th><th>Max seq-len</th></tr>" +
      "</thead><tbody>";
    let past = false;
    for (const r of rows) {
      let seq = r.max_seq_len ? String(r.max_seq_len) : "-";
      if (r.max_seq_len && r.max_position_embeddings !== null &&
          r.max_seq_len > r.max_position_embeddings) { seq += "*"; past = true; }
      html += `<tr><td>${esc(r.model)}</td><td>${esc(r.label)}</td>` +
        `<td class="num">${gib(r.required_device_bytes)}</td>` +
        `<td>${r.certainty === "tight" ? "tight" : "yes"}</td>` +
        `<td class="num">${r.max_batch || "-"}</td><td class="num">${seq}</td></tr>`;
    }
    html += "</tbody></table>";
    if (past) html += '<p class="dim">* longer than the model\'s max_position_embeddings</p>';
    html += '<p class="dim">Max batch at this sequence length and max seq-len at batch 1 are ' +
      "searched with the upper end of the required band (as <code>--max</code>), so a pair " +
      "that fits only tight shows - or less than asked.</p>";
    $("tables").innerHTML = html;
  } catch (err) {
    $("tables").innerHTML = `<p class="error">${esc(err.message)}</p>`;
  }
}

// ---- exports ----------------------------------------------------------------------------

function shellQuote(v) {
  return /^[A-Za-z0-9_./:=,@+-]+$/.test(v) ? v : `'${v.replace(/'/g, "'\\''")}'`;
}

function hubId(name) {
  const info = modelInfo[name];
  if (!info) return name;
  return info.aliases.find((a) => a.includes("/")) || name;
}

function commandFor(s) {
  const gpus = gpuList(s);
  const sub = gpus.length > 1 ? "check" : "plan";
  const p = apiParams(s, sub);
  const args = ["vramcalc", sub];
  for (const [k, v] of p) args.push(`--${k}`, shellQuote(v));
  for (const g of gpus) args.push("--gpu", shellQuote(g));
  return args.join(" ");
}

const PY_DTYPE = { bf16: "torch.bfloat16", fp16: "torch.float16", fp32: "torch.float32" };

function peftSnippet(s) {
  const lines = ["import torch", "from peft import LoraConfig", "from transformers import BitsAndBytesConfig", ""];
  lines.push(...bnbLines(s), ...loraLines(s));
  return lines.join("\n");
}

function bnbLines(s) {
  if (s.method !== "qlora") return ["quantization_config = None  # a 16-bit base"];
  if (s.quant === "int8") return ["quantization_config = BitsAndBytesConfig(load_in_8bit=True)"];
  return ["quantization_config = BitsAndBytesConfig(",
    "    load_in_4bit=True,",
    `    bnb_4bit_quant_type="${s.quant}",`,
    "    bnb_4bit_use_double_quant=True,",
    "    bnb_4bit_compute_dtype=torch.bfloat16,",
    ")"];
}

function loraLines(s) {
  if (s.method === "full") return ["peft_config = None  # full fine-tuning"];
  const targets = s.targets === "all-linear" ? '"all-linear"'
    : `[${s.targets.split(",").map((t) => `"${t.trim()}"`).join(", ")}]`;
  return ["peft_config = LoraConfig(",
    `    r=${s.rank},`, "    lora_alpha=32,", "    lora_dropout=0.05,",
    `    target_modules=${targets},`, `    use_dora=${s.dora === "true" ? "True" : "False"},`,
    '    task_type="CAUSAL_LM",', ")"];
}

function trlSnippet(s) {
  const id = hubId(s.model);
  return ["import torch", "from peft import LoraConfig", "from transformers import BitsAndBytesConfig",
    "from trl import SFTConfig, SFTTrainer", "", ...bnbLines(s), ...loraLines(s), "",
    "args = SFTConfig(",
    '    output_dir="out",',
    `    per_device_train_batch_size=${s.batch},`,
    `    max_length=${s["seq-len"]},`,
    `    gradient_checkpointing=${s["gradient-checkpointing"] === "true" ? "True" : "False"},`,
    `    optim="${s.optimizer}",`,
    "    bf16=True,",
    ...trlSaverLines(s),
    ...(s.strategy ? [`    # ${s.gpus} GPUs, ${s.strategy}: launch with accelerate / torchrun and its config`] : []),
    "    model_init_kwargs={",
    '        "quantization_config": quantization_config,',
    `        "attn_implementation": "${s.attn}",`,
    '        "dtype": torch.bfloat16,',
    "    },",
    ")",
    `trainer = SFTTrainer(model="${id}", args=args, train_dataset=dataset, peft_config=peft_config)`,
    "",
    "# check it before the first step (pip install qlora-vramcalc):",
    "from vramcalc.integrations import VramcalcCallback",
    "trainer.add_callback(VramcalcCallback(strict=True))",
  ].join("\n");
}

// The memory savers as SFTConfig arguments (trl 1.x sft_config.py; what --from-config
// reads back: training_config.py _trl)
function trlSaverLines(s) {
  const out = [];
  const loss = {
    torch: ['    loss_type="nll",  # TRL <= 1.14: the model\'s own loss on the full logits'],
    liger: ["    use_liger_kernel=True,"],
    "trl-chunked": ['    loss_type="chunked_nll",  # TRL 1.4-1.14'],
    "trl-fused": ['    loss_type="nll",  # TRL >= 1.15: SFTTrainer\'s fused LM head, always on'],
    cce: ['    loss_type="nll",  # cut-cross-entropy: cce_patch(model) before SFTTrainer'],
    chunked: ['    loss_type="nll",  # torchtune CEWithChunkedOutputLoss: a loss of your own'],
  }[s["loss-kernel"]];
  out.push(...(loss || []));
  if (s["batch-layout"] === "padding-free") {
    out.push("    padding_free=True,  # needs attn_implementation flash_attention_2");
    if (s["tokens-per-step"]) out.push(`    # planned: ${s["tokens-per-step"]} real tokens per step`);
  } else if (s["batch-layout"] === "packed") {
    out.push("    # packed rows with position_ids (axolotl sample_packing): TRL's packing=True is padding-free");
  }
  if (s["offload-activations"] === "all") out.push("    activation_offloading=True,");
  if (s["offload-activations"] === "checkpoints") {
    out.push('    gradient_checkpointing_kwargs={"use_reentrant": False, "offload": True},');
  }
  return out;
}

function axolotlSnippet(s) {
  const out = [`base_model: ${hubId(s.model)}`];
  if (s.method === "qlora") {
    out.push(s.quant === "int8" ? "load_in_8bit: true" : "load_in_4bit: true");
    out.push("adapter: qlora");
    if (s.quant === "fp4") out.push("bnb_config_kwargs:", "  bnb_4bit_quant_type: fp4");
    // trainers.py _AXOLOTL_KBIT: what --from-config reads back
    out.push("# axolotl prepares a 4/8-bit model its own way (norms, embeddings and lm_head " +
      "in bf16, fp32 adapters): vramcalc plans it as --no-kbit-prep");
  } else if (s.method === "lora") {
    out.push("adapter: lora");
  }
  if (s.method !== "full") {
    out.push(`lora_r: ${s.rank}`, "lora_alpha: 32", "lora_dropout: 0.05");
    if (s.targets === "all-linear") out.push("lora_target_linear: true");
    else out.push("lora_target_modules:", ...s.targets.split(",").map((t) => `  - ${t.trim()}`));
    if (s.dora === "true") out.push("peft_use_dora: true");
  }
  out.push(`micro_batch_size: ${s.batch}`, `sequence_len: ${s["seq-len"]}`,
    `gradient_checkpointing: ${s["gradient-checkpointing"]}`, `optimizer: ${s.optimizer}`,
    "bf16: true");
  out.push({ sdpa: "sdp_attention: true", flash_attention_2: "flash_attention: true",
    eager: "eager_attention: true" }[s.attn]);
  // the memory savers (axolotl schemas; what --from-config reads back: _axolotl)
  if (s["loss-kernel"] === "liger") {
    out.push("plugins:", "  - axolotl.integrations.liger.LigerPlugin", "liger_rope: true",
      "liger_rms_norm: true", "liger_glu_activation: true",
      "liger_fused_linear_cross_entropy: true");
  } else if (s["loss-kernel"] === "cce") {
    out.push("plugins:", "  - axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin",
      "cut_cross_entropy: true");
  } else if (s["loss-kernel"] !== "torch") {
    out.push(`# loss kernel ${s["loss-kernel"]}: not an axolotl option`);
  }
  if (s["batch-layout"] === "packed") out.push("sample_packing: true");
  if (s["batch-layout"] === "padding-free") {
    out.push("# padding-free batches: not an axolotl option (sample_packing packs rows)");
  }
  if (s["offload-activations"] === "all") out.push("activation_offloading: true");
  if (s["offload-activations"] === "checkpoints") out.push("activation_offloading: hidden_states");
  return out.join("\n") + "\n";
}

function renderExport(s) {
  const text = {
    command: () => commandFor(s),
    trl: () => trlSnippet(s),
    axolotl: () => axolotlSnippet(s),
    peft: () => peftSnippet(s),
  }[exportKind]();
  $("export").textContent = text;
  $("export").dataset.kind = exportKind;
  $("export").dataset.command = commandFor(s);
  $("export").dataset.axolotl = axolotlSnippet(s);
}

// ---- visibility, setup ------------------------------------------------------------------

function syncVisibility(s) {
  document.body.dataset.task = s.task;
  document.body.dataset.method = s.method;
  document.body.dataset.layout = s["batch-layout"];
  $("seq-out").textContent = s["seq-len"];
  $("batch-out").textContent = s.batch;
  const quant = $("quant");
  quant.disabled = s.task === "train" && s.method !== "qlora";
  for (const o of quant.options) o.hidden = o.value === "none" && s.task === "train";
  if (!quant.querySelector('option[value="none"]')) quant.add(new Option("none (16-bit)", "none"));
}

// A trainer preset sets the controls to that trainer's defaults (trainers.py, as
// `--trainer NAME` applies them to the options not given), so what the page shows is what
// it plans; the preset's options the page has no control for are listed under it.
function applyTrainer(name) {
  const preset = trainerPresets[name];
  $("trainer-info").textContent = "";
  if (!preset) return;
  writeState(new URLSearchParams(preset.controls));
  const loss = preset.loss === "none" ? "" : ` Its default loss: ${preset.loss}.`;
  $("trainer-info").textContent = (preset.other.length ?
    `Also set: ${preset.other.join(", ")}.` : "") + loss;
}

async function loadModels(q) {
  try {
    const { models } = await api("models", new URLSearchParams({ q }));
    const list = $("model-list");
    list.innerHTML = "";
    for (const m of models) {
      modelInfo[m.name] = m;
      list.append(new Option(`${(m.params / 1e9).toFixed(1)}B ${m.model_type}`, m.name));
    }
  } catch (err) {
    showError(err.message);
  }
}

async function uploadConfig(file) {
  const text = await file.text();
  const res = await fetch("/api/config", { method: "POST", body: text,
    headers: { "Content-Type": "application/json" } });
  const body = await res.json();
  if (!res.ok) { showError(body.error); return; }
  localStorage.setItem(`vramcalc:${body.model}`, text);
  $("model").value = body.model;
  $("model-info").textContent = `${file.name}: ${body.spec.name}, ` +
    `${(body.spec.params / 1e9).toFixed(2)}B parameters, ${body.spec.num_hidden_layers} layers`;
  inputAt = performance.now();
  update();
}

async function init() {
  const { gpus } = await api("gpus");
  gpuCatalog = gpus;
  trainerPresets = (await api("trainers")).trainers;
  for (const sel of [$("gpu"), $("gpu2")]) {
    if (sel.id === "gpu") sel.add(new Option("(none)", ""));
    for (const g of gpus) sel.add(new Option(`${g.name} (${gib(g.memory_bytes)} GiB)`, g.name));
  }
  $("gpu").value = "rtx-4090";
  await loadModels("");
  writeState(new URLSearchParams(location.search));
  const form = $("form");
  form.addEventListener("input", (ev) => {
    if (ev.target.id === "upload") return;
    inputAt = performance.now();
    if (ev.target.id === "model") loadModels(ev.target.value);
    if (ev.target.id === "trainer") applyTrainer(ev.target.value);
    // a slider moves many times a second: recompute once it pauses for 30 ms
    scheduleUpdate(ev.target.type === "range" ? 30 : 120);
  });
  form.addEventListener("change", (ev) => {
    if (ev.target.id === "upload" && ev.target.files.length) uploadConfig(ev.target.files[0]);
  });
  $("compare-btn").addEventListener("click", showCompare);
  $("fit-btn").addEventListener("click", showFit);
  for (const b of $("export-tabs").querySelectorAll("button")) {
    b.addEventListener("click", () => {
      exportKind = b.dataset.kind;
      for (const o of $("export-tabs").querySelectorAll("button")) o.classList.toggle("on", o === b);
      renderExport(readState());
    });
  }
  $("copy").addEventListener("click", () => navigator.clipboard.writeText($("export").textContent));
  window.addEventListener("popstate", () => { writeState(new URLSearchParams(location.search)); update(); });
  await update();
  document.body.dataset.ready = "true";
}

init().catch((err) => showError(err.message));
