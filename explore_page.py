"""The explorer's page: its HTML and its script (vanilla JS, drawing on <canvas>), kept apart from
`explore.py`, which fills it with the data. Read by students: the script is commented."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Attention explorer: {TITLE}</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; margin: 1.2em; color: #222; max-width: 1100px; }
  h1 { font-size: 1.3em; margin: 0 0 .2em; }
  .prompt { font-size: 1.15em; margin: 0 0 .8em; }
  #main { display: flex; gap: 1.2em; align-items: flex-start; flex-wrap: wrap; }
  canvas { image-rendering: pixelated; border: 1px solid #999; }
  #view { cursor: crosshair; width: min(512px, 52vw); height: auto; }  /* 512 drawn pixels, shrunk on small screens */
  #controls { flex: 1 1 340px; }  /* beside the image when there is room, below it otherwise */
  .row { margin: .5em 0; }
  #words button { margin: 2px; padding: 3px 8px; border: 1px solid #888; background: #f4f4f4; border-radius: 4px;
                  cursor: pointer; font: inherit; }
  #words button.on { background: #222; color: #fff; }
  #words.off { opacity: .4; pointer-events: none; }
  #step { width: 260px; }
  #readout { font-family: ui-monospace, monospace; font-size: 13px; white-space: pre; }
  .bar { display: inline-block; height: 10px; background: #d9541f; vertical-align: middle; }
  details { margin-top: 1em; max-width: 900px; }
  #error { color: #b00; }
</style></head>
<body>
<h1>Attention explorer</h1>
<p class="prompt">&ldquo;{TITLE}&rdquo;</p>
<p id="error"></p>
<div id="main">
  <canvas id="view" width="512" height="512"></canvas>
  <div id="controls">
    <div class="row"><canvas id="plain" width="160" height="160" title="the image alone"></canvas></div>
    <div class="row">
      <label><input type="radio" name="mode" value="cross" checked> cross-attention: pixel &rarr; word</label><br>
      <label><input type="radio" name="mode" value="self"> self-attention: pixel &rarr; pixels (click the image)</label>
    </div>
    <div class="row" id="words"></div>
    <div class="row">step <input type="range" id="step" min="0" value="0"> <button id="play">&#9654;</button>
      <span id="steplabel"></span></div>
    <div class="row">layer <select id="layer"></select></div>
    <div class="row">overlay <input type="range" id="alpha" min="0" max="100" value="60">
      <label><input type="checkbox" id="fixed"> one colour scale for all steps</label></div>
    <div id="readout"></div>
  </div>
</div>
<details open><summary>What am I looking at?</summary>
<p>The image is the model's <b>predicted final image (x0) at the chosen step</b>, decoded by the VAE: the noisy
latent x_t minus the noise the UNet predicts. The attention of that step was computed on x_t, the UNet's input.</p>
<p><b>Cross-attention</b>: each image position (a query) spreads a probability of 1 over the 77 text tokens (keys).
The map of a word is that probability, averaged over the attention heads and over the word's tokens,
shown over the image (bright = more). Most of the probability goes to the start token, which is not shown, so a
word's values are small. Layers with maps larger than 32x32 are only kept as the mean over the layers of their
resolution.</p>
<p><b>Self-attention</b>: click a pixel; the map shows the probability it gives each other position. Kept only for
maps of at most {SELF_SIDE}x{SELF_SIDE} positions (a map is positions x positions per layer and step), averaged
over the heads; maps larger than 8x8 only as the mean over the layers of their resolution.</p>
<p>Every map is coloured by its own maximum, unless "one colour scale" is ticked (then by the largest value of
this word, or this pixel, over all steps). Maps are stored as 8-bit values per map (0-255 of the map's maximum),
so values are exact to about 0.2% of each map's maximum. Only the conditional rows of classifier-free guidance
are recorded.</p>
</details>
<script id="sdlens-meta" type="application/json">{META}</script>
<script id="sdlens-data" type="application/octet-stream">{DATA}</script>
<script>
{SCRIPT}
</script>
</body></html>
"""

SCRIPT = r"""
"use strict";
// The attention explorer. Read top to bottom: 1. decode the data embedded in this page,
// 2. pick the map to show from the current choices, 3. draw it, 4. wire up the controls.

// ---- 1. Decode the embedded data ----------------------------------------------------------------

// base64 text -> ArrayBuffer. The data is in the page itself, so nothing is fetched: the page works
// from file:// with no server (browsers refuse fetch() of local files).
function fromBase64(b64) {
  const text = atob(b64.trim()), bytes = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
  return bytes.buffer;
}

// An array described by {offset, dtype, shape} in the metadata, as a typed-array view of the buffer.
function view(buf, a) {
  const n = a.shape.reduce((x, y) => x * y, 1);
  return a.dtype === "uint8" ? new Uint8Array(buf, a.offset, n) : new Float32Array(buf, a.offset, n);
}

// The page's data: the metadata plus each map source's arrays.
function decodePage(metaText, b64) {
  const meta = JSON.parse(metaText);
  const buf = fromBase64(b64);
  for (const s of meta.cross.concat(meta.self)) {
    s.q = view(buf, s.maps);         // uint8: 255 is the map's maximum
    s.scale = view(buf, s.scales);   // float32: that maximum, a probability
  }
  return meta;
}

// ---- 2. Pick the map to show --------------------------------------------------------------------

// The current map as probabilities [h*w] plus the value that the colour scale's top stands for.
// state: {mode: "cross"|"self", word, step, layer, query: [fy, fx] in 0..1 of the image, fixed}
function currentMap(meta, state) {
  const src = (state.mode === "cross" ? meta.cross : meta.self)[state.layer];
  const [h, w] = src.size, n = h * w;
  // A cross map is one (step, word); a self-attention map is one (step, query pixel).
  const per = state.mode === "cross" ? meta.words.length : n;   // maps per step
  const which = state.mode === "cross" ? state.word : queryIndex(src, state.query);
  const k = state.step * per + which;                           // the map's index
  const values = new Float32Array(n);
  for (let i = 0; i < n; i++) values[i] = src.q[k * n + i] / 255 * src.scale[k];
  let top = src.scale[k];                                       // the map's own maximum
  if (state.fixed) {                                            // or the largest over all steps
    top = 0;
    for (let s = 0; s < meta.steps; s++) top = Math.max(top, src.scale[s * per + which]);
  }
  return {values, top, h, w, src, which};
}

// The query pixel [fy, fx] (fractions of the image) -> the index of its cell in an h x w map.
function queryIndex(src, query) {
  const [h, w] = src.size;
  const i = Math.min(h - 1, Math.floor(query[0] * h)), j = Math.min(w - 1, Math.floor(query[1] * w));
  return i * w + j;
}

// Colour ramp, dark (little attention) to bright: matplotlib's "inferno" at 0, .25, .5, .75, 1.
const RAMP = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];
function colour(v) {
  const x = Math.min(1, Math.max(0, v)) * (RAMP.length - 1);
  const i = Math.min(Math.floor(x), RAMP.length - 2), f = x - i;
  return RAMP[i].map((c, k) => Math.round((1 - f) * c + f * RAMP[i + 1][k]));
}

// ---- 3. Draw ------------------------------------------------------------------------------------

function draw(meta, state, canvas, images) {
  const ctx = canvas.getContext("2d");
  ctx.imageSmoothingEnabled = false;              // nearest neighbour: one map cell = one block
  const W = canvas.width, H = canvas.height;
  ctx.globalAlpha = 1;
  ctx.drawImage(images[state.step], 0, 0, W, H);  // the predicted image of this step
  const plain = document.getElementById("plain"), pctx = plain.getContext("2d");
  pctx.imageSmoothingEnabled = false;             // and alone, beside the controls
  pctx.drawImage(images[state.step], 0, 0, plain.width, plain.height);
  const m = currentMap(meta, state);
  // The heatmap at its own size (h x w pixels), then scaled up onto the image.
  const small = document.createElement("canvas");
  small.width = m.w; small.height = m.h;
  const pix = small.getContext("2d").createImageData(m.w, m.h);
  for (let i = 0; i < m.h * m.w; i++) {
    const [r, g, b] = colour(m.top > 0 ? m.values[i] / m.top : 0);
    pix.data.set([r, g, b, 255], 4 * i);
  }
  small.getContext("2d").putImageData(pix, 0, 0);
  ctx.globalAlpha = state.alpha;
  ctx.drawImage(small, 0, 0, W, H);
  ctx.globalAlpha = 1;
  // Mark the chosen pixel's cell (the query in self-attention mode).
  const q = queryIndex(m.src, state.query), cw = W / m.w, ch = H / m.h;
  ctx.strokeStyle = "#0f0"; ctx.lineWidth = 2;
  if (state.mode === "self" || state.clicked) ctx.strokeRect((q % m.w) * cw, Math.floor(q / m.w) * ch, cw, ch);
  return m;
}

// Text under the controls: what is shown, and for the chosen pixel its attention to every word.
function readout(meta, state, m) {
  const t = meta.timesteps[state.step];
  const q = queryIndex(m.src, state.query), [i, j] = [Math.floor(q / m.w), q % m.w];
  let s = `step ${state.step + 1} of ${meta.steps} (t = ${t}), ${m.src.label}\n`;
  if (state.mode === "cross") {
    s += `word "${meta.words[state.word]}": largest value ${m.src.scale[state.step * meta.words.length + state.word].toFixed(4)}`;
    s += `\n\nattention of cell (${i}, ${j}) to each word:\n`;
    const n = m.h * m.w, W = meta.words.length;
    meta.words.forEach((word, k) => {
      const idx = state.step * W + k, v = m.src.q[idx * n + q] / 255 * m.src.scale[idx];
      s += `${word.padEnd(12).slice(0, 12)} ${v.toFixed(4)} <span class="bar" style="width:${Math.round(v * 300)}px"></span>\n`;
    });
  } else {
    s += `query cell (${i}, ${j}) of ${m.h}x${m.w}: largest value ${m.src.scale[state.step * m.h * m.w + q].toFixed(4)}`;
  }
  return s;
}

// ---- 4. Controls --------------------------------------------------------------------------------

// Escape text for innerHTML (words come from the prompt).
const esc = s => s.replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));

async function main() {
  const $ = id => document.getElementById(id);
  let meta;
  try {
    meta = decodePage($("sdlens-meta").textContent, $("sdlens-data").textContent);
  } catch (e) {
    $("error").textContent = "Could not decode the data: " + e;
    throw e;
  }
  const canvas = $("view");
  const [ih, iw] = meta.image;
  canvas.width = 512; canvas.height = Math.round(512 * ih / iw);
  $("plain").height = Math.round(160 * ih / iw);
  // Initial choices; the part of the address after # may set them (#mode=self&word=2&step=9&layer=0&q=.5,.5).
  const p = new URLSearchParams(location.hash.slice(1));
  const state = {mode: p.get("mode") === "self" && meta.self.length ? "self" : "cross",
                 word: 0, step: meta.steps - 1, layer: 0, query: [0.5, 0.5], alpha: 0.6, fixed: false, clicked: false};
  if (p.has("word")) {
    const w = p.get("word"), k = meta.words.indexOf(w);
    state.word = k >= 0 ? k : Math.min(meta.words.length - 1, Math.max(0, parseInt(w) || 0));
  }
  if (p.has("step")) state.step = Math.min(meta.steps - 1, Math.max(0, parseInt(p.get("step")) || 0));
  if (p.has("q")) { state.query = p.get("q").split(",").map(Number); state.clicked = true; }
  const layers = () => (state.mode === "cross" ? meta.cross : meta.self);
  state.layer = state.mode === "cross" ? meta.default : 0;
  if (p.has("layer")) state.layer = Math.min(layers().length - 1, Math.max(0, parseInt(p.get("layer")) || 0));

  // One <img> per step, decoded from its data URL; redraw when each arrives.
  const images = meta.images.map(url => { const im = new Image(); im.src = url; return im; });
  const ready = Promise.all(images.map(im => im.decode()));

  function fillLayers() {
    $("layer").innerHTML = layers().map((s, k) => `<option value="${k}">${esc(s.label)}</option>`).join("");
    $("layer").value = state.layer;
  }
  function update() {
    for (const b of $("words").children) b.classList.toggle("on", +b.dataset.k === state.word);
    $("words").classList.toggle("off", state.mode !== "cross");
    $("step").value = state.step;
    $("steplabel").textContent = `${state.step + 1} / ${meta.steps}`;
    const m = draw(meta, state, canvas, images);
    $("readout").innerHTML = readout(meta, state, m);
    history.replaceState(null, "", `#mode=${state.mode}&word=${state.word}&step=${state.step}` +
                         `&layer=${state.layer}&q=${state.query.map(v => v.toFixed(3)).join(",")}`);
  }

  $("words").innerHTML = meta.words.map((w, k) => `<button data-k="${k}">${esc(w)}</button>`).join("");
  $("words").onclick = e => { if (e.target.dataset.k !== undefined) { state.word = +e.target.dataset.k; update(); } };
  $("step").max = meta.steps - 1;
  $("step").oninput = e => { state.step = +e.target.value; update(); };
  $("layer").onchange = e => { state.layer = +e.target.value; update(); };
  $("alpha").oninput = e => { state.alpha = e.target.value / 100; update(); };
  $("fixed").onchange = e => { state.fixed = e.target.checked; update(); };
  for (const r of document.querySelectorAll("input[name=mode]")) {
    r.checked = r.value === state.mode;
    r.disabled = r.value === "self" && !meta.self.length;
    r.onchange = () => {
      state.mode = r.value;
      state.layer = state.mode === "cross" ? meta.default : 0;
      fillLayers(); update();
    };
  }
  canvas.onclick = e => {  // the clicked pixel, as fractions of the image, so it fits every map size
    const box = canvas.getBoundingClientRect();
    state.query = [(e.clientY - box.top) / box.height, (e.clientX - box.left) / box.width];
    state.clicked = true;
    update();
  };
  let timer = null;        // the play button steps through the sampling steps
  $("play").onclick = () => {
    if (timer) { clearInterval(timer); timer = null; return; }
    if (state.step === meta.steps - 1) state.step = 0;
    timer = setInterval(() => {
      if (state.step >= meta.steps - 1) { clearInterval(timer); timer = null; return; }
      state.step++; update();
    }, 150);
  };
  document.addEventListener("keydown", e => {  // arrow keys move the step
    if (e.target.tagName === "SELECT") return;
    if (e.key === "ArrowRight") state.step = Math.min(meta.steps - 1, state.step + 1);
    else if (e.key === "ArrowLeft") state.step = Math.max(0, state.step - 1);
    else return;
    update();
  });
  fillLayers();
  await ready;
  update();
}

// In a browser, run; under node (tests) only the functions above are defined.
if (typeof document !== "undefined") main();
"""
