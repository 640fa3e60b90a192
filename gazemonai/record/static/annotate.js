// gazemonai annotation page: calibration, then the images one after another; the server records.
// Every event carries the page's clock (seconds); the view geometry says where the image is drawn
// (viewport CSS px: image pixel edge (u, v) at (left + u*scale, top + v*scale)), so the server maps
// gaze on the screen to image pixels under zoom, pan, letterboxing and any devicePixelRatio.
"use strict";

const $ = (id) => document.getElementById(id);
const now = () => (performance.timeOrigin + performance.now()) / 1000;
const state = {
  phase: "loading", index: -1, images: [], info: null, geometry: null, view: null,
  calib: null, calibResult: null, lastResult: null, latencies: [], latencyParts: [], results: [], messages: [], summary: null,
  skipped: 0, pointer: { cx: 0, cy: 0, inside: false },
};
window.gazemonai = state; // read by tests and benchmarks

// ------------------------------------------------------------------ server calls, in order
let queue = Promise.resolve();
function post(path, body) {
  const p = queue.then(() => fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ ...body, now: now() }),
  })).then(async (r) => {
    const data = await r.json();
    if (!r.ok) throw new Error(data.error || r.statusText);
    return data;
  });
  queue = p.catch(() => {});
  return p;
}

function toast(text, seconds = 6) {
  state.messages.push(text);
  const el = document.createElement("div");
  el.className = "toast";
  el.textContent = text;
  $("toasts").appendChild(el);
  setTimeout(() => el.remove(), seconds * 1000);
}

function panel(title, html, keys) {
  $("panel").hidden = false;
  $("title").textContent = title;
  $("text").innerHTML = html;
  $("keys").innerHTML = keys;
}

function screenGeometry() {
  // viewport's top-left on the screen: 0, 0 in full screen; otherwise the window's position plus
  // its frame (the browser's toolbars sit above the viewport)
  const full = !!document.fullscreenElement;
  const frameX = Math.max(0, (window.outerWidth - window.innerWidth) / 2);
  const frameY = Math.max(0, window.outerHeight - window.innerHeight - frameX);
  return {
    screen_w: window.screen.width, screen_h: window.screen.height,
    view_x: full ? 0 : window.screenX + frameX, view_y: full ? 0 : window.screenY + frameY,
    dpr: window.devicePixelRatio,
  };
}

// ------------------------------------------------------------------ pointer source
// The pointer stands in for gaze, sampled like a 60 Hz tracker: samples on a fixed time grid, each
// at the position the pointer had at that instant (from the pointer events' own time stamps), so a
// late timer (a busy machine) delays samples but never leaves a hole or moves them in time; a still
// pointer is a fixation too. Valid while the pointer is over the page; sent every 100 ms.
const RATE_HZ = 60, MAX_CATCH_UP_S = 5;
let pending = [], moves = [], nextT = null;
function recordMove(e, inside) {
  const t = (performance.timeOrigin + e.timeStamp) / 1000;
  moves.push({ t, cx: e.clientX, cy: e.clientY, inside });
  state.pointer = { cx: e.clientX, cy: e.clientY, inside };
}
function samplePointer() {
  if (!state.info || state.info.source !== "pointer") return;
  const end = now();
  if (nextT === null || end - nextT > MAX_CATCH_UP_S) nextT = end;
  while (nextT <= end) {
    while (moves.length > 1 && moves[1].t <= nextT) moves.shift(); // moves[0]: in force at nextT
    const p = moves.length && moves[0].t <= nextT ? moves[0] : null; // null: not seen yet
    pending.push({ t: nextT, cx: p ? p.cx : 0, cy: p ? p.cy : 0, valid: p ? p.inside : false });
    nextT += 1 / RATE_HZ;
  }
}
function flushSamples() {
  samplePointer(); // every grid instant up to now
  if (!pending.length) return queue;
  const batch = pending;
  pending = [];
  return post("/api/samples", { samples: batch, screen: screenGeometry() }).catch((e) => toast(`samples lost: ${e.message}`));
}
document.addEventListener("pointermove", (e) => {
  recordMove(e, true);
  if (drag) {
    state.view.left += e.clientX - drag.x;
    state.view.top += e.clientY - drag.y;
    drag = { x: e.clientX, y: e.clientY };
    applyView("pan");
  }
});
document.documentElement.addEventListener("mouseleave", (e) => recordMove(e, false));

// ------------------------------------------------------------------ view: fit, zoom, pan
let drag = null;
function fitView(img, keepZoom) {
  const vw = window.innerWidth, vh = window.innerHeight;
  const fit = Math.min(vw / img.naturalWidth, vh / img.naturalHeight);
  const zoom = keepZoom && state.view ? state.view.zoom : 1;
  const scale = fit * zoom;
  state.view = { zoom, fit, scale, left: (vw - img.naturalWidth * scale) / 2, top: (vh - img.naturalHeight * scale) / 2 };
}
function zoomAt(factor, cx, cy) {
  const v = state.view;
  const zoom = Math.min(20, Math.max(0.5, v.zoom * factor));
  const scale = v.fit * zoom, f = scale / v.scale;
  v.left = cx - (cx - v.left) * f;
  v.top = cy - (cy - v.top) * f;
  v.zoom = zoom;
  v.scale = scale;
  applyView("zoom");
}
function geometry() {
  const img = $("view"), r = img.getBoundingClientRect();
  return { ...screenGeometry(), left: r.left, top: r.top, scale: r.width / img.naturalWidth,
    image_w: img.naturalWidth, image_h: img.naturalHeight };
}
function placeLayers() {
  const v = state.view, img = $("view");
  for (const el of [img, $("overlay")]) {
    el.style.left = `${v.left}px`;
    el.style.top = `${v.top}px`;
    el.style.width = `${img.naturalWidth * v.scale}px`;
    el.style.height = `${img.naturalHeight * v.scale}px`;
  }
  drawDots();
}
function applyView(reason) {
  if (!state.view) return;
  placeLayers();
  if (state.phase !== "image") return;
  state.geometry = geometry();
  post("/api/geometry", { index: state.index, t: now(), geometry: state.geometry, reason })
    .catch((e) => toast(`view change not recorded: ${e.message}`));
}
document.addEventListener("wheel", (e) => {
  if (!state.view || !["image", "result"].includes(state.phase)) return;
  e.preventDefault();
  zoomAt(Math.exp(-e.deltaY * 0.0015), e.clientX, e.clientY);
}, { passive: false });
document.addEventListener("pointerdown", (e) => {
  if (state.view && ["image", "result"].includes(state.phase)) drag = { x: e.clientX, y: e.clientY };
});
document.addEventListener("pointerup", () => { drag = null; });
window.addEventListener("resize", () => {
  if (!state.view || !["image", "result"].includes(state.phase)) return;
  const img = $("view"), v = state.view;
  // keep the image point at the viewport's centre where it was, at the same zoom
  const u = (window.innerWidth / 2 - v.left) / v.scale, w = (window.innerHeight / 2 - v.top) / v.scale;
  fitView(img, true);
  state.view.left = window.innerWidth / 2 - u * state.view.scale;
  state.view.top = window.innerHeight / 2 - w * state.view.scale;
  if (state.phase === "image") {
    toast("window resized mid-image: the new placement is recorded from now on (fixations are split there)");
  }
  applyView("resize");
});

// ------------------------------------------------------------------ calibration / validation
const CALIB_POINTS = [[.1, .1], [.5, .1], [.9, .1], [.1, .5], [.5, .5], [.9, .5], [.1, .9], [.5, .9], [.9, .9]];
async function startCalibration() {
  $("view").hidden = true;
  $("overlay").hidden = true;
  $("dots").innerHTML = "";
  if (state.info.source === "gazepoint") {
    // the tracker's own calibration first (its window shows the points), then the page's validation
    state.phase = "tracker-calibration";
    panel("Tracker calibration", "Follow the tracker's calibration points…", "");
    try {
      const r = await post("/api/tracker-calibration", {});
      state.trackerCalibration = r;
      if (r.error) toast(r.error, 10);
      else if (r.ave_error_px != null) toast(`tracker calibration: mean error ${r.ave_error_px.toFixed(1)} px`, 10);
    } catch (e) {
      toast(`tracker calibration failed: ${e.message}`, 10);
    }
  }
  state.phase = "calibration";
  state.calib = { k: -1, targets: [], busy: false };
  nextCalibrationPoint();
}
function nextCalibrationPoint() {
  const c = state.calib;
  c.k += 1;
  if (c.k >= CALIB_POINTS.length) return finishCalibration();
  const [fx, fy] = CALIB_POINTS[c.k];
  c.cx = fx * window.innerWidth;
  c.cy = fy * window.innerHeight;
  const t = $("target");
  t.className = "";
  t.style.transitionDuration = "0s";
  t.style.left = `${c.cx}px`;
  t.style.top = `${c.cy}px`;
  t.style.display = "block";
  panel("Calibration", `Point ${c.k + 1} of ${CALIB_POINTS.length}: look at the red dot and press <kbd>Space</kbd>.`, "");
}
function recordCalibrationPoint() {
  const c = state.calib;
  if (c.busy) return;
  c.busy = true;
  const ms = state.info.calibration_point_s * 1000, t0 = now();
  const t = $("target");
  t.style.transitionDuration = `${ms}ms`;
  t.className = "recording";
  setTimeout(() => {
    c.targets.push({ cx: c.cx, cy: c.cy, t0, t1: now() });
    c.busy = false;
    nextCalibrationPoint();
  }, ms);
}
async function finishCalibration() {
  $("target").style.display = "none";
  state.phase = "validating";
  await flushSamples();
  const stub = { ...screenGeometry(), left: 0, top: 0, scale: 1, image_w: 1, image_h: 1 };
  try {
    const r = await post("/api/calibration", { targets: state.calib.targets, geometry: stub });
    state.calibResult = r;
    const deg = r.deg == null ? "" : ` (${r.deg.toFixed(2)}°)`;
    panel("Validation", `Mean error over ${state.calib.targets.length} points: <b>${r.px.toFixed(1)} px${deg}</b>. ` +
      "It is stored with every fixation of this recording.", "<kbd>Space</kbd> start &nbsp; <kbd>C</kbd> calibrate again");
  } catch (e) {
    state.calibResult = { error: e.message };
    panel("Validation failed", e.message, "<kbd>C</kbd> calibrate again &nbsp; <kbd>Space</kbd> go on without it");
  }
  state.phase = "calibration-result";
}

// ------------------------------------------------------------------ images
async function showImage(index) {
  if (index >= state.images.length && state.info.server) {
    // --server: the server's active-learning strategy picks the next image, asked now
    let r;
    try {
      r = await post("/api/next", {});
    } catch (e) {
      r = { error: e.message };
    }
    if (r.error) {
      state.phase = "result";
      panel("The MONAI Label server did not give an image", `${r.error}<br>Everything recorded is in ${state.info.csv}.`,
        "<kbd>Space</kbd> ask again");
      return;
    }
    if (r.done) return endSession();
    state.images[r.index] = r.image;
    state.picked = r;
    index = r.index;
  }
  if (index >= state.images.length) return endSession();
  state.phase = "loading-image";
  state.index = index;
  state.lastResult = null;
  $("overlay").hidden = true;
  $("dots").innerHTML = "";
  $("panel").hidden = true;
  const img = $("view");
  img.hidden = true;
  img.onload = async () => {
    fitView(img, false);
    placeLayers();
    img.hidden = false;
    $("progress").textContent = state.info.server
      ? `${index + 1}  ${state.images[index]}  (${state.info.strategy}` +
        `${state.picked && state.picked.score != null ? ` ${Number(state.picked.score).toFixed(3)}` : ""} @ ${state.info.server})`
      : `${index + 1} / ${state.images.length}  ${state.images[index]}`;
    state.phase = "image"; // after the progress line, which names the image shown
    state.geometry = geometry();
    state.shownAt = performance.now();
    await flushSamples();
    post("/api/begin", { index, t: now(), geometry: state.geometry }).catch((e) => toast(`not recorded: ${e.message}`));
  };
  img.onerror = async () => {
    state.skipped += 1;
    toast(`image ${state.images[index]} failed to load: skipped (${state.skipped} skipped so far)`);
    await post("/api/skip", { index, reason: "the browser could not load or decode it" }).catch(() => {});
    showImage(index + 1);
  };
  img.src = `/api/image/${index}?v=${Date.now()}`;
}
async function finishImage() {
  const keyAt = performance.now(), t = now(), index = state.index;
  state.phase = "finishing";
  await flushSamples();
  const flushedAt = performance.now();
  let r;
  try {
    r = await post("/api/finish", { index, t });
  } catch (e) {
    toast(`image not recorded: ${e.message}; press R to look again`);
    state.phase = "result";
    return;
  }
  state.lastResult = r;
  state.results.push(r);
  const lines = [`<b>${r.fixations.length}</b> fixations in ${r.seconds.toFixed(1)} s; ${r.rows} rows written.`];
  const st = r.stats || {};
  if (st.invalid) lines.push(`${st.invalid} invalid samples (blinks, lost eye) left out.`);
  if (st.outside) lines.push(`${st.outside} fixations off the image left out.`);
  if (r.resized) lines.push(`The window was resized ${r.resized}× mid-image; each placement was mapped on its own.`);
  if (r.disconnected) lines.push("<b>The tracker was disconnected</b>: what was recorded before is kept; press R to look again.");
  if (r.message) lines.push(r.message);
  if (r.server && r.server.saved) lines.push(`Saved to the MONAI Label server ${r.server.server} (tag gaze).`);
  if (r.server && r.server.error) lines.push(`<b>Not saved to the server</b>: ${r.server.error}<br>The rows are kept in ` +
    `${r.server.kept}; the upload is tried again at the next image and at the end.`);
  if (r.server && r.server.retried && r.server.retried.saved.length) lines.push(`Uploaded now: ${r.server.retried.saved.join(", ")}.`);
  const swatch = ["#fff", "#0ff", "#f0f", "#ff0", "#0f0"];
  if (r.levels) lines.push("Pseudo-mask levels: " + r.levels.map((l, k) => `<span style="color:${swatch[k % 5]}">■</span> ` +
    `${k + 1} (≥ ${l.threshold}): ${(100 * l.fraction).toFixed(1)} % of the image`).join(", ") + "; heatmap in red–yellow.");
  const answeredAt = performance.now();
  const done = () => {
    const end = performance.now();
    state.latencies.push((end - keyAt) / 1000);
    state.latencyParts.push({ flush: (flushedAt - keyAt) / 1000, finish: (answeredAt - flushedAt) / 1000,
      overlay: (end - answeredAt) / 1000 });
    state.phase = "result";
    panel(state.images[index], lines.join("<br>"), "<kbd>Space</kbd> next image &nbsp; <kbd>R</kbd> redo this image");
  };
  if (r.rows > 0 && r.levels) {
    const ov = $("overlay");
    ov.onload = () => { ov.hidden = false; drawDots(); done(); };
    ov.onerror = () => { toast("the overlay could not be shown"); done(); };
    ov.src = `/api/overlay/${index}.png?v=${Date.now()}`;
  } else {
    done();
  }
}
function drawDots() {
  const box = $("dots");
  box.innerHTML = "";
  const r = state.lastResult, v = state.view, img = $("view");
  if (!r || !v || $("overlay").hidden) return;
  r.fixations.forEach((f, i) => {
    const d = document.createElement("div");
    d.className = "dot";
    d.textContent = i + 1;
    d.style.left = `${v.left + f.x * img.naturalWidth * v.scale}px`;
    d.style.top = `${v.top + f.y * img.naturalHeight * v.scale}px`;
    box.appendChild(d);
  });
}
async function endSession() {
  state.phase = "end";
  $("view").hidden = true;
  $("overlay").hidden = true;
  $("dots").innerHTML = "";
  await flushSamples();
  const s = await post("/api/end", {});
  state.summary = s;
  const skipped = Object.entries(s.skipped || {}).filter(([, v]) => v.length).map(([k, v]) => `${v.length} ${k.replace(/_/g, " ")}`);
  panel("Done", `${s.images || 0} images recorded into ${s.csv}` +
    (s.seconds_mean != null ? `; ${s.seconds_mean.toFixed(1)} s per image on average (median ` +
      `${s.seconds_median.toFixed(1)} s, total ${s.seconds_total.toFixed(0)} s)` : "") +
    (skipped.length ? `<br>Skipped: ${skipped.join(", ")}` : "") + `<br>Raw samples: ${s.raw}` +
    (s.server ? `<br>${s.uploaded} images saved to ${s.server}` + (Object.keys(s.upload_pending).length
      ? `; <b>not saved there</b> (kept in ${s.csv}): ${Object.entries(s.upload_pending).map(([k, v]) => `${k}: ${v}`).join("; ")}` : "") : ""),
    "You can close this page.");
}

// ------------------------------------------------------------------ keys (a USB pedal sends one too)
document.addEventListener("keydown", (e) => {
  const k = e.key, next = k === " " || k === "ArrowRight" || k === "PageDown" || k === "Enter";
  if (next || ["+", "=", "-", "0"].includes(k)) e.preventDefault();
  if (state.phase === "start" && next) {
    if (document.documentElement.requestFullscreen) document.documentElement.requestFullscreen().catch(() => {});
    startCalibration();
  } else if (state.phase === "start" && (k === "s" || k === "S")) {
    showImage(0);
  } else if (state.phase === "calibration" && next) {
    recordCalibrationPoint();
  } else if (state.phase === "calibration-result") {
    if (k === "c" || k === "C") startCalibration();
    else if (next) showImage(0);
  } else if (state.phase === "image") {
    if (next) finishImage();
    else if (k === "+" || k === "=") zoomAt(1.25, window.innerWidth / 2, window.innerHeight / 2);
    else if (k === "-") zoomAt(0.8, window.innerWidth / 2, window.innerHeight / 2);
    else if (k === "0") { fitView($("view"), false); applyView("zoom"); }
  } else if (state.phase === "result") {
    if (next) showImage(state.index + 1);
    else if (k === "r" || k === "R") showImage(state.index);
  }
});

// ------------------------------------------------------------------ tracker status
async function pollStatus() {
  try {
    const s = await (await fetch("/api/status")).json();
    state.status = s;
    const b = $("banner");
    b.hidden = s.connected;
    if (!s.connected) b.textContent = "Eye tracker disconnected — everything recorded so far is kept; waiting for it to reconnect…";
  } catch (e) {
    $("banner").hidden = false;
    $("banner").textContent = "The annotation server does not answer: is `gazemonai annotate` still running?";
  }
}

async function main() {
  const info = await (await fetch("/api/session")).json();
  state.info = info;
  state.images = info.images;
  setInterval(samplePointer, 1000 / 60);
  setInterval(flushSamples, 100);
  setInterval(pollStatus, 500);
  const already = info.already.length ? `<br>${info.already.length} images already in ${info.csv} for annotator ` +
    `<b>${info.annotator}</b> are left out (nothing there is overwritten).` : "";
  state.phase = "start";
  const where = info.server ? `<br>Images from the MONAI Label server <b>${info.server}</b>, next image by ` +
    `strategy <b>${info.strategy}</b>; the gaze is saved there and in ${info.csv}.` : "";
  if (!state.images.length && !info.server) {
    panel("Nothing to annotate", `Every image is already recorded for annotator <b>${info.annotator}</b>.${already}`, "");
    return;
  }
  panel("gazemonai — annotate by looking",
    `${info.server ? "" : `${info.images.length} images, `}gaze source <b>${info.source}</b>, annotator <b>${info.annotator}</b>, ` +
    `recording <b>${info.recording}</b>.<br>Look at the lesion; press <kbd>Space</kbd> (or <kbd>→</kbd>, or the pedal) ` +
    `to go on. Zoom with the wheel or <kbd>+</kbd>/<kbd>-</kbd>, pan by dragging, <kbd>0</kbd> to fit.${where}${already}`,
    "<kbd>Space</kbd> calibrate (9 points) &nbsp; <kbd>S</kbd> skip calibration");
}
main().catch((e) => panel("The page could not start", String(e), ""));
