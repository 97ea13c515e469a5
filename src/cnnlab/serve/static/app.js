// The drawing page: canvas strokes -> /api/activations -> bars, model input, layers.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const pad = $("pad");
  const ctx = pad.getContext("2d");
  const INK = "#111";
  const DELAY_MS = 70;   // debounce while drawing
  const UNREACHABLE = "The server cannot be reached: is cnnlab serve still running?";

  let strokes = [];      // [{w, pts: [[x, y], ...]}]
  let current = null;    // the stroke being drawn
  let upload = null;     // {file, img} when an uploaded image is shown
  let model = null;      // /api/model
  let timer = null, inFlight = false, again = false, seq = 0;
  let barRows = [];      // [{row, fill, value}] per class
  let layerKey = "";     // structure of the rendered layer view

  // drawing ------------------------------------------------------------------
  function drawStroke(s) {
    ctx.lineCap = "round";
    ctx.lineJoin = "round";
    ctx.strokeStyle = ctx.fillStyle = INK;
    ctx.lineWidth = s.w;
    const p = s.pts;
    if (p.length === 1) {
      ctx.beginPath();
      ctx.arc(p[0][0], p[0][1], s.w / 2, 0, 2 * Math.PI);
      ctx.fill();
      return;
    }
    ctx.beginPath();
    ctx.moveTo(p[0][0], p[0][1]);
    for (let i = 1; i < p.length - 1; i++) {   // smooth through midpoints
      const mx = (p[i][0] + p[i + 1][0]) / 2, my = (p[i][1] + p[i + 1][1]) / 2;
      ctx.quadraticCurveTo(p[i][0], p[i][1], mx, my);
    }
    const last = p[p.length - 1];
    ctx.lineTo(last[0], last[1]);
    ctx.stroke();
  }

  function redraw() {
    ctx.clearRect(0, 0, pad.width, pad.height);
    if (upload && upload.img) {
      const { img } = upload;
      const s = Math.min(pad.width / img.naturalWidth, pad.height / img.naturalHeight);
      const w = img.naturalWidth * s, h = img.naturalHeight * s;
      ctx.imageSmoothingEnabled = true;
      ctx.drawImage(img, (pad.width - w) / 2, (pad.height - h) / 2, w, h);
    }
    strokes.forEach(drawStroke);
    const blank = !strokes.length && !upload;
    $("pad-empty").hidden = !blank;
    $("undo").disabled = !strokes.length;
    $("clear").disabled = blank;
  }

  function point(e) {
    const r = pad.getBoundingClientRect();
    return [(e.clientX - r.left) * pad.width / r.width,
            (e.clientY - r.top) * pad.height / r.height];
  }

  pad.addEventListener("pointerdown", (e) => {
    if (e.button !== 0) return;
    e.preventDefault();
    pad.setPointerCapture(e.pointerId);
    if (upload) {            // drawing starts a new picture
      upload = null;
      $("upload").value = "";
    }
    current = { w: +$("brush").value, pts: [point(e)] };
    strokes.push(current);
    redraw();
    schedule();
  });
  pad.addEventListener("pointermove", (e) => {
    if (!current) return;
    e.preventDefault();
    const events = e.getCoalescedEvents ? e.getCoalescedEvents() : [e];
    for (const ev of (events.length ? events : [e])) current.pts.push(point(ev));
    redraw();
    schedule();
  });
  const end = () => { if (current) { current = null; schedule(); } };
  pad.addEventListener("pointerup", end);
  pad.addEventListener("pointercancel", end);
  pad.addEventListener("lostpointercapture", end);

  $("brush").addEventListener("input", () => { $("brush-value").textContent = $("brush").value; });
  $("undo").addEventListener("click", () => { strokes.pop(); redraw(); schedule(); });
  $("clear").addEventListener("click", () => {
    strokes = [];
    upload = null;
    $("upload").value = "";
    redraw();
    schedule();
  });
  document.addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "z" && strokes.length) {
      e.preventDefault();
      strokes.pop();
      redraw();
      schedule();
    }
  });

  $("upload").addEventListener("change", () => {
    const file = $("upload").files[0];
    if (!file) return;
    strokes = [];
    upload = { file, img: null };
    const img = new Image();
    const url = URL.createObjectURL(file);
    img.onload = () => { if (upload && upload.file === file) { upload.img = img; redraw(); } };
    img.onerror = () => URL.revokeObjectURL(url);   // not previewable; the server decides
    img.src = url;
    redraw();
    schedule(0);
  });

  // talking to the server ------------------------------------------------------
  // body[data-state] is "busy" from a change until its answer is shown, then "idle"
  const setState = (state) => { document.body.dataset.state = state; };
  const settle = () => { if (timer === null && !inFlight && !again) setState("idle"); };

  function schedule(delay = DELAY_MS) {
    setState("busy");
    if (timer !== null) return;              // a send is already due
    timer = setTimeout(() => { timer = null; send(); }, delay);
  }

  function request() {
    if (upload && !strokes.length) {
      const form = new FormData();
      form.append("file", upload.file);
      return { body: form };
    }
    return { headers: { "Content-Type": "application/json" },
             body: JSON.stringify({ image: pad.toDataURL("image/png") }) };
  }

  async function send() {
    if (inFlight) { again = true; return; }
    if (!strokes.length && !upload) { seq++; showEmpty(); settle(); return; }
    inFlight = true;
    const mine = ++seq;
    try {
      const resp = await fetch("/api/activations", { method: "POST", ...request() });
      const data = await resp.json().catch(() => ({ error: `HTTP ${resp.status}` }));
      if (mine === seq) {
        if (!resp.ok) showError(data.error || `HTTP ${resp.status}`);
        else render(data);
      }
    } catch (err) {
      if (mine === seq) showError(UNREACHABLE, "cannot reach the server");
    } finally {
      inFlight = false;
      if (again) { again = false; send(); } else settle();
    }
  }

  // showing results --------------------------------------------------------------
  const pct = (p) => (p >= 0.9995 ? "100" : (100 * p).toFixed(1)) + "%";

  function setStatus(text, isError = false) {
    $("status").textContent = text;
    $("status").classList.toggle("error", isError);
  }

  // no prediction on show: the panel says why, bars, input and maps are cleared
  function clearResult(panelText, layersText) {
    document.body.classList.add("is-empty");
    $("top-label").textContent = "–";
    $("top-prob").textContent = panelText;
    $("input-img").hidden = true;
    $("input-img").removeAttribute("src");
    $("input-blank").hidden = false;
    barRows.forEach((b) => { b.fill.style.width = "0"; b.value.textContent = ""; b.row.classList.remove("best"); });
    $("timing").textContent = "";
    const p = el("p", "placeholder", layersText);
    $("layers").replaceChildren(p);
    layerKey = "";
  }

  function showError(message, panelText = "no prediction") {
    clearResult(panelText, "No activations: the last input could not be classified.");
    setStatus(message, true);
  }

  function showEmpty(message = "draw something") {
    clearResult(message, "Draw or upload an image to see the activations of every layer.");
    setStatus("");
  }

  function render(data) {
    if (data.empty) { showEmpty(data.message || "nothing drawn"); return; }
    document.body.classList.remove("is-empty");
    setStatus("");
    const best = data.top[0];
    $("top-label").textContent = best.label;
    $("top-prob").textContent = pct(best.probability);
    $("input-img").src = data.input;
    $("input-img").hidden = false;
    $("input-blank").hidden = true;
    barRows.forEach((b) => {
      const p = data.probabilities[b.label] || 0;
      b.fill.style.width = (100 * p).toFixed(2) + "%";
      b.value.textContent = pct(p);
      b.row.classList.toggle("best", b.label === best.label);
    });
    $("timing").textContent = `${data.ms.toFixed(1)} ms on the server · ${model ? model.engine : ""} engine`;
    if (data.layers) renderLayers(data.layers);
  }

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  const fmt = (v) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(2) : v.toFixed(3));

  function renderLayers(layers) {
    const key = layers.map((l) => `${l.name}:${l.kind}:${l.shape}:${l.grid}`).join("|");
    const box = $("layers");
    if (key !== layerKey) {
      box.innerHTML = "";
      layers.forEach((l) => box.appendChild(buildLayer(l)));
      layerKey = key;
    }
    layers.forEach((l, i) => updateLayer(box.children[i], l));
  }

  function buildLayer(l) {
    const sec = el("div", `layer layer-${l.kind}`);
    const head = el("div", "layer-head");
    head.appendChild(el("span", "layer-name", l.name));
    head.appendChild(el("span", "layer-type", `${l.type} · ${l.shape.join("×")}`));
    head.appendChild(el("span", "layer-range"));
    sec.appendChild(head);
    if (l.kind === "maps") {
      const grid = el("div", "maps");
      for (let k = 0; k < l.count; k++) {
        const tile = el("div", "map");
        tile.setAttribute("role", "button");
        tile.tabIndex = 0;
        tile.title = `${l.name}, map ${k + 1} of ${l.shape[2]}`;
        placeTile(tile, l, k);
        tile.addEventListener("click", () => zoom(sec, l, k));
        tile.addEventListener("keydown", (e) => { if (e.key === "Enter") zoom(sec, l, k); });
        grid.appendChild(tile);
      }
      sec.appendChild(grid);
      if (l.truncated) sec.appendChild(el("p", "hint", `first ${l.count} of ${l.shape[2]} maps`));
    } else {
      const bars = el("div", "vbars");
      l.values.forEach((_, k) => {
        const col = el("div", "vcol");
        col.appendChild(el("div", "vfill"));
        if (l.labels && l.values.length <= 64) col.appendChild(el("span", "vlabel", l.labels[k]));
        bars.appendChild(col);
      });
      if (l.labels && l.values.length <= 64) bars.classList.add("labelled");
      sec.appendChild(bars);
    }
    return sec;
  }

  function updateLayer(sec, l) {
    sec.querySelector(".layer-range").textContent = `${fmt(l.min)} … ${fmt(l.max)}`;
    if (l.kind === "maps") {
      sec.style.setProperty("--sprite", `url("${l.sprite}")`);
      sec.layer = l;
      return;
    }
    const hi = Math.max(l.max, 0), lo = Math.min(l.min, 0);
    const range = hi - lo || 1, zero = -lo / range;
    sec.querySelectorAll(".vcol").forEach((col, k) => {
      const v = l.values[k], fill = col.firstChild;
      const h = Math.abs(v) / range;
      fill.style.bottom = `${100 * (v >= 0 ? zero : zero - h)}%`;
      fill.style.height = `${100 * h}%`;
      fill.classList.toggle("neg", v < 0);
      col.title = `${l.labels ? l.labels[k] : k}: ${v}`;
    });
  }

  // tile k of a layer's sprite (rows x cols maps of H x W) as a CSS background
  function placeTile(tile, l, k) {
    const [rows, cols] = l.grid, r = Math.floor(k / cols), c = k % cols;
    tile.style.backgroundSize = `${cols * 100}% ${rows * 100}%`;
    tile.style.backgroundPosition =
      `${cols > 1 ? (100 * c) / (cols - 1) : 0}% ${rows > 1 ? (100 * r) / (rows - 1) : 0}%`;
    tile.style.aspectRatio = `${l.shape[1]} / ${l.shape[0]}`;
  }

  function zoom(sec, l0, k) {
    const l = sec.layer || l0;
    const big = $("zoom-map");
    big.style.setProperty("--sprite", sec.style.getPropertyValue("--sprite"));
    placeTile(big, l, k);
    $("zoom-caption").textContent =
      `${l.name}: map ${k + 1} of ${l.shape[2]} (${l.shape[0]}×${l.shape[1]}); black ${fmt(l.min)}, white ${fmt(l.max)}`;
    $("zoom").showModal();
  }
  $("zoom").addEventListener("click", (e) => { if (e.target === $("zoom")) $("zoom").close(); });

  // the model card ---------------------------------------------------------------
  function buildBars(labels) {
    const box = $("bars");
    box.innerHTML = "";
    box.classList.toggle("many", labels.length > 12);
    const longest = Math.max(1, ...labels.map((l) => l.length));
    box.style.setProperty("--label-width", `${Math.min(12, longest) + 1}ch`);
    barRows = labels.map((label) => {
      const row = el("div", "bar-row");
      row.appendChild(el("span", "bar-label", label));
      const track = el("div", "bar-track");
      const fill = el("div", "bar-fill");
      track.appendChild(fill);
      row.appendChild(track);
      const value = el("span", "bar-value", "");
      row.appendChild(value);
      box.appendChild(row);
      return { label, row, fill, value };
    });
  }

  function fact(name, value) {
    if (value === undefined || value === null || value === "") return;
    const item = el("div", "fact");
    item.appendChild(el("dt", "", name));
    item.appendChild(el("dd", "", String(value)));
    $("facts").appendChild(item);
  }

  async function loadModel() {
    let resp;
    try {
      resp = await fetch("/api/model");
    } catch (err) {
      showError(UNREACHABLE, "cannot reach the server");
      return false;
    }
    try {
      model = await resp.json();
      if (!resp.ok) throw new Error(model.error || `HTTP ${resp.status}`);
    } catch (err) {
      model = null;
      showError(`cannot load the model card (${err.message})`);
      return false;
    }
    const s = model.summary, tr = (model.meta && model.meta.training) || {};
    const [h, w, c] = model.input_shape;
    $("model-name").textContent = `${s.name} · ${model.file}`;
    $("engine").textContent = `${model.engine} engine`;
    document.title = `cnnlab · ${s.name}`;
    $("input-caption").textContent = `${h}×${w}${c === 3 ? " RGB" : ""}, as the model sees it`;
    if (model.input_mode === "resize") {
      $("draw-hint").textContent = `This model takes ${h}×${w}${c === 3 ? " colour" : ""} images: ` +
        "upload a photo, or draw (the drawing is resized as it is).";
    }
    buildBars(model.class_names);
    fact("dataset", tr.dataset);
    if (typeof tr.test_accuracy === "number") fact("test accuracy", `${(100 * tr.test_accuracy).toFixed(2)}%`);
    fact("parameters", s.total_params.toLocaleString("en") +
      (s.non_trainable_params ? ` (${s.trainable_params.toLocaleString("en")} trainable)` : ""));
    fact("input", `${h}×${w}×${c}`);
    fact("classes", model.class_names.length);
    fact("epochs", tr.epochs);
    fact("trained with", tr.engine ? `${tr.engine} engine` : undefined);
    fact("date", tr.date ? tr.date.slice(0, 10) : undefined);
    const body = $("summary").querySelector("tbody");
    body.innerHTML = "";
    s.layers.forEach((l) => {
      const tr2 = el("tr");
      tr2.appendChild(el("td", "", l.name));
      tr2.appendChild(el("td", "", l.type));
      tr2.appendChild(el("td", "mono", l.output_shape.filter((d) => d !== null).join("×")));
      tr2.appendChild(el("td", "num", l.params.toLocaleString("en")));
      body.appendChild(tr2);
    });
    const total = el("tr", "total");
    total.appendChild(el("td", "", "total"));
    total.appendChild(el("td"));
    total.appendChild(el("td"));
    total.appendChild(el("td", "num", s.total_params.toLocaleString("en")));
    body.appendChild(total);
    return true;
  }

  redraw();
  setState("loading");
  loadModel().then((ok) => { if (ok && !strokes.length && !upload) showEmpty(); settle(); });
})();
