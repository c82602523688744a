// maecli serve: the page's behaviour. It calls only the JSON API of maecli/serve/app.py, and sets file names as
// text, never as HTML.
"use strict";
const $ = (id) => document.getElementById(id);
let info = null;
let current = null;          // {path} for a folder image, {upload, name, thumb} for an upload
let busy = false, again = false, retrying = false;

async function getJSON(url, options) {
  const response = await fetch(url, options);
  let body = null;
  try { body = await response.json(); } catch (e) { body = {detail: response.statusText}; }
  if (!response.ok) {
    let detail = body && body.detail;
    if (Array.isArray(detail)) detail = detail.map((d) => (d.loc || []).slice(-1) + ": " + d.msg).join("; ");
    const error = new Error(detail || ("HTTP " + response.status));
    error.status = response.status;
    throw error;
  }
  return body;
}

function showError(id, message) { const box = $(id); box.textContent = message; box.hidden = !message; }
function thumbURL(path) { return "/api/thumb?path=" + encodeURIComponent(path); }
function el(tag, props, children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const child of children || []) node.append(child);
  return node;
}
function megabytes(n) { return (n / 1048576).toFixed(0) + " MB"; }

// ---------------------------------------------------------------- reconstruct

function query() {
  const p = new URLSearchParams();
  if (current.path !== undefined) p.set("path", current.path); else p.set("upload", current.upload);
  p.set("mask", $("mask").value);
  p.set("seed", String(Math.max(0, Math.floor(Number($("seed").value) || 0))));
  p.set("patch_stats", $("stats").checked ? "true" : "false");
  p.set("zoom", String(info.zoom));
  return p;
}

// The slider fires many events; one request is in flight at a time and the newest setting always follows it.
async function refresh() {
  if (!current || !info || !info.has_decoder) return;
  if (busy) { again = true; return; }
  busy = true; again = false;
  const p = query();
  $("picture").classList.add("stale");
  try {
    show(await getJSON("/api/reconstruct?" + p), p);
    showError("recon-error", "");
  } catch (e) {
    showError("recon-error", e.message);
    if (e.status === 503 && !retrying) {  // the server's queue is full (other tabs, scripts): ask again shortly
      retrying = true;
      setTimeout(() => { retrying = false; refresh(); }, 1000);
    }
  } finally {
    busy = false;
    $("picture").classList.remove("stale");
    if (again) refresh();
  }
}

function show(r, p) {
  const img = $("grid");
  img.src = r.image;
  img.dataset.mask = String(r.mask);
  img.dataset.seed = String(r.seed);
  img.dataset.patchStats = String(r.patch_stats);
  img.dataset.name = r.name;
  img.hidden = false;
  $("picture-hint").hidden = true;
  $("mse").textContent = "hidden-patch MSE " + r.mse.toFixed(4) + " (" + r.hidden + " of " + r.patches +
    " patches hidden), in the loss's space: " + r.target + ".";
  $("note").textContent = r.note ? "Note: " + r.note + "." : r.legend;  // the legend is also in the picture
  $("warning").textContent = r.warning ? "Warning: " + r.warning + "." : "";
  $("command").textContent = r.command;
  $("download").href = "/api/reconstruct.png?" + p;
  $("download").download = "reconstruction.png";
  $("same").hidden = false;
}

function select(source) {
  current = source;
  const name = source.path !== undefined ? source.path : source.name;
  $("current-name").textContent = name;
  $("current-name").classList.remove("muted");
  $("current-thumb").src = source.path !== undefined ? thumbURL(source.path) : source.thumb;
  const original = $("original");
  original.hidden = source.path === undefined;
  if (source.path !== undefined) original.href = "/api/image?path=" + encodeURIComponent(source.path);
  for (const card of document.querySelectorAll("#gallery .thumb"))
    card.classList.toggle("selected", card.dataset.path === source.path);
  refresh();
  neighbours();
}

async function upload(file) {
  if (!file) return;
  if (info && file.size > info.limits.upload_bytes) {
    showError("recon-error", file.name + " is " + megabytes(file.size) + "; the limit is " +
      megabytes(info.limits.upload_bytes) + ".");
    return;
  }
  showError("recon-error", "");
  $("current-name").textContent = "reading " + file.name + "\u2026";
  try {
    // The header tells the server this comes from the page: another web site cannot send it (see guard.py).
    const r = await getJSON("/api/upload?name=" + encodeURIComponent(file.name),
      {method: "POST", body: file, headers: {"Content-Type": "application/octet-stream", "X-Maecli": "1"}});
    select({upload: r.id, name: r.name, thumb: URL.createObjectURL(file)});
  } catch (e) {
    showError("recon-error", file.name + ": " + e.message);
    $("current-name").textContent = current ? (current.path !== undefined ? current.path : current.name)
                                            : "no image chosen";
  }
}

// ---------------------------------------------------------------- similar images

function card(path, caption, onclick) {
  const img = el("img", {alt: path, loading: "lazy", src: thumbURL(path)});
  img.addEventListener("error", () => { img.replaceWith(el("div", {className: "muted", textContent: "unreadable"})); });
  const node = el("div", {className: "thumb", title: path},
                  [img, el("div", {className: "name", textContent: path.split("/").pop()})].concat(caption || []));
  node.dataset.path = path;
  node.addEventListener("click", onclick);
  return node;
}

async function neighbours() {
  const box = $("neighbours");
  if (!info.images || !current) return;
  const p = new URLSearchParams(current.path !== undefined ? {path: current.path} : {upload: current.upload});
  p.set("k", "12");
  try {
    const r = await getJSON("/api/neighbours?" + p);
    showError("similar-error", "");
    box.replaceChildren(...r.results.map((n) => card(n.path,
      [el("div", {className: "sim", textContent: n.similarity.toFixed(3)})], () => select({path: n.path}))));
    if (!r.results.length) box.textContent = "No other image in the folder.";
    box.dataset.query = r.query;
  } catch (e) {
    if (e.status === 503) { box.textContent = e.message; return; }   // the index is being built; it calls back
    showError("similar-error", e.message);
  }
}

async function watchIndex() {
  const s = await getJSON("/api/index");
  const status = $("index-status");
  if (s.state === "waiting" || s.state === "building") {
    status.textContent = "Embedding the folder: " + s.done + " of " + s.total + " images\u2026";
    setTimeout(watchIndex, 1000);
    return;
  }
  if (s.state === "ready") {
    status.textContent = "Nearest neighbours by cosine similarity of the encoder's mean-pooled embeddings (" +
      (s.total - s.skipped) + " images" + (s.skipped ? ", " + s.skipped + " unreadable left out" : "") +
      (s.reused ? "; " + s.reused + " from the cache" : "") + "). Click an image, or upload one.";
  } else {
    status.textContent = "The folder could not be embedded: " + (s.error || s.state);
  }
  if (current) neighbours();
}

async function loadFolder() {
  const r = await getJSON("/api/images");
  const gallery = $("gallery");
  const cards = r.images.map((path) => card(path, [], () => select({path})));
  gallery.replaceChildren(...cards);
  $("folder-count").textContent = r.images.length + " images in " + r.folder;
  $("filter").addEventListener("input", () => {
    const needle = $("filter").value.toLowerCase();
    for (const c of cards) c.hidden = needle && !c.dataset.path.toLowerCase().includes(needle);
  });
}

// ---------------------------------------------------------------- training progress

function niceTicks(lo, hi, count) {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / count, power = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

function drawLoss(points) {
  const box = $("loss");
  if (!points.length) { box.textContent = "No loss logged yet (metrics.jsonl)."; return; }
  const NS = "http://www.w3.org/2000/svg";
  const W = 560, H = 250, L = 54, R = 12, T = 10, B = 34;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  svg.setAttribute("width", "100%");
  svg.id = "loss-svg";
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
    return node;
  };
  const steps = points.map((p) => p.step), losses = points.map((p) => p.loss);
  let x0 = Math.min(...steps), x1 = Math.max(...steps), y0 = Math.min(...losses), y1 = Math.max(...losses);
  if (x1 === x0) x1 = x0 + 1;
  const pad = (y1 - y0) * 0.05 || Math.abs(y1) * 0.05 || 0.05;
  y0 -= pad; y1 += pad;
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), sy = (y) => T + (y1 - y) / (y1 - y0) * (H - T - B);
  for (const t of niceTicks(y0, y1, 5)) {
    add("line", {class: "grid", x1: L, x2: W - R, y1: sy(t), y2: sy(t)});
    add("text", {x: L - 6, y: sy(t) + 4, "text-anchor": "end"}, String(t));
  }
  for (const t of niceTicks(x0, x1, 6)) {
    add("line", {class: "axis", x1: sx(t), x2: sx(t), y1: H - B, y2: H - B + 4});
    add("text", {x: sx(t), y: H - B + 16, "text-anchor": "middle"}, String(t));
  }
  add("line", {class: "axis", x1: L, x2: W - R, y1: H - B, y2: H - B});
  add("line", {class: "axis", x1: L, x2: L, y1: T, y2: H - B});
  add("text", {x: (L + W - R) / 2, y: H - 3, "text-anchor": "middle"}, "step");
  add("text", {x: 12, y: (T + H - B) / 2, "text-anchor": "middle",
               transform: "rotate(-90 12 " + (T + H - B) / 2 + ")"}, "loss");
  const line = points.map((p) => sx(p.step).toFixed(1) + "," + sy(p.loss).toFixed(1)).join(" ");
  add("polyline", {class: "curve", points: line});
  const dot = add("circle", {class: "dot", r: 3.5, cx: -10, cy: -10});
  const label = add("text", {x: W - R, y: T + 12, "text-anchor": "end"}, "");
  const last = points[points.length - 1];
  label.textContent = "last: step " + last.step + ", loss " + last.loss.toFixed(4);
  svg.addEventListener("mousemove", (event) => {
    const box = svg.getBoundingClientRect();
    const x = x0 + ((event.clientX - box.left) * W / box.width - L) / (W - L - R) * (x1 - x0);
    let best = points[0];
    for (const p of points) if (Math.abs(p.step - x) < Math.abs(best.step - x)) best = p;
    dot.setAttribute("cx", sx(best.step)); dot.setAttribute("cy", sy(best.loss));
    label.textContent = "step " + best.step + ": loss " + best.loss.toFixed(4) +
      (best.lr !== undefined ? ", lr " + best.lr.toExponential(2) : "");
  });
  box.replaceChildren(svg);
}

let epochs = [];
function showPreview() {
  const i = Number($("epoch").value);
  $("epoch-value").textContent = epochs[i] + " (" + (i + 1) + " of " + epochs.length + ")";
  $("preview").src = "/api/run/previews/" + epochs[i];
  $("preview").hidden = false;
}

async function loadRun() {
  const r = await getJSON("/api/run");
  $("run-status").textContent = "Run folder " + r.run + " (refreshed every 30 s while training goes on).";
  drawLoss(r.metrics);
  const slider = $("epoch");
  const atEnd = !epochs.length || Number(slider.value) === epochs.length - 1;
  epochs = r.previews;
  if (!epochs.length) {
    $("preview-hint").textContent = "No previews in this run (pretrain with --previews N to get one per epoch).";
    return;
  }
  $("preview-hint").textContent = "";
  $("epoch-label").hidden = false;
  slider.max = String(epochs.length - 1);
  if (atEnd) slider.value = String(epochs.length - 1);
  showPreview();
}

// ---------------------------------------------------------------- start

async function start() {
  info = await getJSON("/api/info");
  const m = info.model;
  $("model").textContent = info.weights + " \u00b7 ViT " + m.embed_dim + "-d \u00d7 " + m.depth + " blocks, " +
    m.img_size + " px in " + m.patch_size + " px patches (" + m.patches + "), " +
    (m.in_chans === 1 ? "grayscale" : "RGB") +
    ", " + (m.norm_pix_loss ? "predicts normalized patches" : "predicts pixels") + " \u00b7 " + info.device;
  $("mask").min = String(info.mask_range[0]);
  $("mask").max = String(info.mask_range[1]);
  $("limits").textContent = "Up to " + megabytes(info.limits.upload_bytes) + " and " +
    (info.limits.pixels / 1e6).toFixed(0) + " megapixels; resized and center-cropped to " + m.img_size + " px.";
  if (!m.norm_pix_loss) {
    $("stats").disabled = true;
    $("stats-label").title = "This model predicts pixels: nothing is borrowed.";
    $("stats-label").classList.add("muted");
  }
  if (!info.has_decoder) {
    showError("recon-error", "These weights hold only the encoder: reconstruction needs the decoder. " +
      "Similar images still work.");
  }
  if (!info.images) {
    $("pick-hint").hidden = true;
    $("folder-part").hidden = true;
    $("index-status").textContent = "Start maecli serve with --images DIR to search a folder for similar images.";
  } else {
    loadFolder().catch((e) => showError("similar-error", e.message));
    watchIndex().catch((e) => showError("similar-error", e.message));
  }
  loadRun().catch((e) => { $("run-status").textContent = e.message; });
  setInterval(() => loadRun().catch(() => {}), 30000);
}

$("mask").addEventListener("input", () => { $("mask-value").textContent = $("mask").value; refresh(); });
$("seed").addEventListener("input", refresh);
$("reseed").addEventListener("click", () => { $("seed").value = String(Math.floor(Math.random() * 1e6)); refresh(); });
$("stats").addEventListener("change", refresh);
$("epoch").addEventListener("input", showPreview);
$("preview").addEventListener("load", () => {  // small models make small previews: enlarge by whole pixels
  const img = $("preview"), room = img.parentElement.clientWidth;
  img.style.width = img.naturalWidth * Math.max(1, Math.floor(room / img.naturalWidth)) + "px";
});
$("file").addEventListener("change", () => { upload($("file").files[0]); $("file").value = ""; });
const drop = $("drop");
for (const type of ["dragenter", "dragover"])
  document.addEventListener(type, (e) => { e.preventDefault(); drop.classList.add("over"); });
for (const type of ["dragleave", "drop"])
  document.addEventListener(type, (e) => { e.preventDefault(); drop.classList.remove("over"); });
document.addEventListener("drop", (e) => { if (e.dataTransfer.files.length) upload(e.dataTransfer.files[0]); });
start().catch((e) => { $("model").textContent = "Cannot reach the server: " + e.message; });
