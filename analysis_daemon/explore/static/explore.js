// The embedding explorer's page. Token strings come from the trainer and are hostile: they are only
// ever set with textContent, never parsed as HTML. Everything comes from this server's /api.
"use strict";
(function () {
  const started = performance.now();
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  const state = { run: params.get("run"), iters: [], index: 0, points: new Map(), vocab: null,
                  token: null, info: null, neighbours: [], view: null, drag: null, drawnOnce: false };
  const PALETTE = ["#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
                   "#9c755f", "#bab0ac", "#86bcb6", "#d37295", "#fabfd2", "#8cd17d", "#b6992d", "#499894"];

  async function getJSON(url) {
    const res = await fetch(url);
    const body = await res.json();
    if (!res.ok) throw new Error(body.error || res.statusText);
    return body;
  }
  const q = (extra) => {
    const p = new URLSearchParams(extra);
    if (state.run) p.set("run", state.run);
    return p.toString();
  };
  function status(text) { $("status").textContent = text; }
  function iter() { return state.iters[state.index]; }

  async function points(it) {
    if (state.points.has(it)) return state.points.get(it);
    const res = await fetch("/api/points?" + q({ iter: it }));
    if (!res.ok) throw new Error((await res.json()).error);
    const rows = parseInt(res.headers.get("X-Rows"), 10);
    const all = new Float32Array(await res.arrayBuffer());
    const part = (k) => all.subarray(k * rows, (k + 1) * rows);
    const p = { rows, x: part(0), y: part(1), drift: part(2), norm: part(3), cluster: part(4), flag: part(5),
                freq: part(6) };
    p.normRange = range(p.norm, 0.02, 0.98);
    p.driftRange = range(p.drift, 0.02, 1.0);
    let most = 0;  // frequency colours on a log scale from 1 to the most fed token's count
    for (let i = 0; i < rows; i++) if (p.freq[i] > most) most = p.freq[i];
    p.freqMax = most;
    state.points.set(it, p);
    if (state.points.size > 8) state.points.delete(state.points.keys().next().value);
    return p;
  }
  function range(values, lo, hi) {
    const finite = Array.from(values).filter(Number.isFinite).sort((a, b) => a - b);
    if (!finite.length) return [0, 1];
    const a = finite[Math.floor(lo * (finite.length - 1))], b = finite[Math.floor(hi * (finite.length - 1))];
    return a === b ? [a - 1e-6, b + 1e-6] : [a, b];
  }

  function fitView(p) {
    let x0 = Infinity, x1 = -Infinity, y0 = Infinity, y1 = -Infinity;
    for (let i = 0; i < p.rows; i++) {
      const x = p.x[i], y = p.y[i];
      if (!Number.isFinite(x) || !Number.isFinite(y)) continue;
      if (x < x0) x0 = x; if (x > x1) x1 = x; if (y < y0) y0 = y; if (y > y1) y1 = y;
    }
    if (!Number.isFinite(x0)) { x0 = -1; x1 = 1; y0 = -1; y1 = 1; }
    const c = $("map"), pad = 20;
    const scale = Math.min((c.width - 2 * pad) / Math.max(x1 - x0, 1e-9), (c.height - 2 * pad) / Math.max(y1 - y0, 1e-9));
    state.view = { scale, ox: c.width / 2 - scale * (x0 + x1) / 2, oy: c.height / 2 + scale * (y0 + y1) / 2 };
  }
  const sx = (x) => state.view.ox + state.view.scale * x;
  const sy = (y) => state.view.oy - state.view.scale * y;

  function colourOf(p, i, mode) {
    if (mode === "drift") {
      const v = p.drift[i];
      if (!Number.isFinite(v)) return [110, 118, 129];
      const t = Math.max(0, Math.min(1, (v - p.driftRange[0]) / (p.driftRange[1] - p.driftRange[0])));
      return [Math.round(230 - 170 * t), Math.round(70 + 110 * t), Math.round(60 + 190 * t)];  // red: drifted
    }
    if (mode === "norm") {
      const v = p.norm[i];
      if (!Number.isFinite(v)) return [110, 118, 129];
      const t = Math.max(0, Math.min(1, (v - p.normRange[0]) / (p.normRange[1] - p.normRange[0])));
      return [Math.round(40 + 213 * t), Math.round(60 + 171 * t), Math.round(140 - 100 * t)];
    }
    if (mode === "cluster") {
      const c = p.cluster[i];
      if (c <= -2) return [55, 62, 74];
      if (c < 0) return [140, 148, 158];
      const hex = PALETTE[c % PALETTE.length];
      return [parseInt(hex.slice(1, 3), 16), parseInt(hex.slice(3, 5), 16), parseInt(hex.slice(5, 7), 16)];
    }
    if (mode === "frequency") {
      const v = p.freq[i];
      if (!Number.isFinite(v)) return [110, 118, 129];  // not counted
      if (v <= 0) return [214, 40, 200];  // counted, never seen: magenta, apart from the scale
      const t = p.freqMax > 1 ? Math.log(v) / Math.log(p.freqMax) : 1;
      return [Math.round(30 + 220 * t), Math.round(50 + 160 * t), Math.round(110 - 60 * t)];  // dark blue: rare
    }
    const f = p.flag[i];
    if (f === 1) return [255, 140, 30];
    return Number.isFinite(f) ? [70, 90, 120] : [110, 118, 129];
  }

  async function draw() {
    const it = iter();
    if (it === undefined) return;
    const p = await points(it);
    if (!state.view) fitView(p);
    const c = $("map"), ctx = c.getContext("2d");
    const img = ctx.createImageData(c.width, c.height);
    const data = img.data, w = c.width, h = c.height, mode = $("colour").value;
    for (let k = 0; k < data.length; k += 4) { data[k] = 15; data[k + 1] = 21; data[k + 2] = 32; data[k + 3] = 255; }
    let drawn = 0, unseen = 0;
    for (let i = 0; i < p.rows; i++) {
      const x = Math.round(sx(p.x[i])), y = Math.round(sy(p.y[i]));
      if (!(x >= 0 && x < w - 1 && y >= 0 && y < h - 1)) continue;
      drawn++;
      if (p.freq[i] === 0) unseen++;
      const [r, g, b] = colourOf(p, i, mode);
      for (const o of [0, 4, 4 * w, 4 * w + 4]) {
        const at = 4 * (y * w + x) + o;
        data[at] = r; data[at + 1] = g; data[at + 2] = b;
      }
    }
    ctx.putImageData(img, 0, 0);
    document.body.dataset.drawn = String(drawn);
    document.body.dataset.colour = mode;
    document.body.dataset.unseen = String(unseen);  // drawn points counted but never seen (magenta in "frequency")
    if (state.token !== null && state.token < p.rows) {
      ctx.strokeStyle = "#ffffff"; ctx.lineWidth = 1;
      for (const [id] of state.neighbours) {
        if (id >= p.rows) continue;
        ctx.beginPath(); ctx.arc(sx(p.x[id]), sy(p.y[id]), 4, 0, 2 * Math.PI); ctx.stroke();
      }
      ctx.strokeStyle = "#ffd400"; ctx.lineWidth = 2;
      ctx.beginPath(); ctx.arc(sx(p.x[state.token]), sy(p.y[state.token]), 7, 0, 2 * Math.PI); ctx.stroke();
    }
    legend(p, mode);
    status(`iteration ${it} · ${p.rows} tokens`);
    if (!state.drawnOnce) {
      state.drawnOnce = true;
      document.body.dataset.ready = String(Math.round(performance.now() - started));
    }
  }
  function legend(p, mode) {
    const text = {
      drift: `drift cosine vs the previous analysed snapshot: red ${p.driftRange[0].toFixed(3)} (drifted) … blue ${p.driftRange[1].toFixed(3)}; grey: none`,
      norm: `row norm: dark ${p.normRange[0].toPrecision(3)} … yellow ${p.normRange[1].toPrecision(3)}`,
      cluster: "galaxy clusters of the map's token subset (colour per cluster; light grey: singleton; dark: not in the subset)",
      flag: "orange: flagged under-trained; grey: the record lists none",
      frequency: Number.isFinite(p.freq[0])
        ? `tokens fed in total, log scale: dark blue 1 … yellow ${p.freqMax.toLocaleString("en")}; magenta: never seen`
        : "frequency: the trainer counted no tokens for this iteration (publisher.count_tokens)",
    }[mode];
    $("legend").textContent = text;
  }

  async function selectToken(spec) {
    try {
      const info = await getJSON("/api/token?" + q({ token: String(spec) }));
      state.token = info.id;
      $("token-title").textContent = `${info.token === null ? "(no string)" : JSON.stringify(info.token)} · id ${info.id}`;
      $("search").value = info.token === null ? String(info.id) : info.token;
      chart($("chart-drift"), info.iters, info.drift_cosine);
      chart($("chart-norm"), info.iters, info.norm);
      chart($("chart-nbhd"), info.iters, info.neighbourhood_size);
      state.info = info;
      seen(info);
      await showNeighbours();
      await compare();
      const u = new URL(location.href);
      u.searchParams.set("token", String(info.id)); u.searchParams.set("iter", String(iter()));
      history.replaceState(null, "", u);
      document.body.dataset.token = String(info.id);
    } catch (err) {
      $("token-title").textContent = err.message;
      document.body.dataset.token = "error";
    }
    draw();
  }

  function seen(info) {
    // at the selected iteration (else the newest one counted): the run's total, and what that snapshot added
    if (!info) return;
    const totals = info.tokens_total || [];
    let last = info.iters.indexOf(iter());
    if (last < 0 || totals[last] === null || totals[last] === undefined) {
      last = -1;
      totals.forEach((v, i) => { if (v !== null) last = i; });
    }
    $("token-seen").textContent = last < 0 ? "tokens seen: not counted (the trainer sent no token counts)"
      : `tokens seen: ${info.tokens_total[last].toLocaleString("en")} in total since iteration ` +
        `${info.tokens_total_since[last]} (${(info.tokens_seen[last] ?? 0).toLocaleString("en")} in the ` +
        `interval before iteration ${info.iters[last]})`;
  }

  async function showNeighbours() {
    const list = $("neighbours");
    list.replaceChildren();
    $("nb-iter").textContent = `at iteration ${iter()}`;
    state.neighbours = [];
    if (state.token === null) return;
    try {
      const r = await getJSON("/api/neighbours?" + q({ iter: iter(), token: state.token, k: 10 }));
      state.neighbours = r.neighbours;
      for (const [id, tok, cos] of r.neighbours) {
        const li = document.createElement("li");
        li.dataset.id = String(id);
        const cosSpan = document.createElement("span");
        cosSpan.className = "cos"; cosSpan.textContent = cos.toFixed(4);
        li.append(cosSpan, document.createTextNode(tok === null ? `#${id}` : tok));
        li.title = `id ${id}`;
        li.addEventListener("click", () => selectToken(id));
        list.append(li);
      }
    } catch (err) {
      const li = document.createElement("li"); li.textContent = err.message; list.append(li);
    }
  }

  async function compare() {
    $("came").replaceChildren(); $("left").replaceChildren();
    if (state.token === null) return;
    const a = $("cmp-a").value, b = $("cmp-b").value;
    try {
      const [ra, rb] = await Promise.all([a, b].map((it) => getJSON("/api/neighbours?" + q({ iter: it, token: state.token, k: 10 }))));
      const ida = new Set(ra.neighbours.map((n) => n[0])), idb = new Set(rb.neighbours.map((n) => n[0]));
      for (const [target, from, other] of [[$("came"), rb.neighbours, ida], [$("left"), ra.neighbours, idb]]) {
        for (const [id, tok] of from) {
          if (other.has(id)) continue;
          const li = document.createElement("li"); li.textContent = tok === null ? `#${id}` : tok; target.append(li);
        }
      }
    } catch (err) {
      const li = document.createElement("li"); li.textContent = err.message; $("came").append(li);
    }
  }

  function chart(canvas, xs, ys) {
    const ctx = canvas.getContext("2d"), w = canvas.width, h = canvas.height, pad = 6;
    ctx.clearRect(0, 0, w, h);
    const pts = xs.map((x, i) => [x, ys[i]]).filter((p) => p[1] !== null && Number.isFinite(p[1]));
    canvas.dataset.points = String(pts.length);  // what is drawn (the page's tests read it)
    ctx.fillStyle = "#6b7785"; ctx.font = "11px system-ui";
    if (!pts.length) { ctx.fillText("no values", pad, h / 2); return; }
    let y0 = Math.min(...pts.map((p) => p[1])), y1 = Math.max(...pts.map((p) => p[1]));
    const counts = pts.every((p) => Number.isInteger(p[1]));  // neighbourhood sizes: whole numbers
    if (y1 - y0 < 1e-9) {
      if (counts) { y0 = Math.max(0, y0 - 1); y1 += 1; }
      else { y0 -= Math.abs(y0) * 0.01 + 1e-6; y1 += Math.abs(y1) * 0.01 + 1e-6; }
    }
    const label = (v) => (counts ? String(v) : v.toPrecision(6));
    const x0 = xs[0], x1 = xs[xs.length - 1] === x0 ? x0 + 1 : xs[xs.length - 1];
    const px = (x) => pad + (w - 2 * pad) * (x - x0) / (x1 - x0), py = (y) => h - pad - (h - 2 * pad) * (y - y0) / (y1 - y0);
    ctx.strokeStyle = "#4e79a7"; ctx.fillStyle = "#4e79a7"; ctx.beginPath();
    pts.forEach(([x, y], i) => (i ? ctx.lineTo(px(x), py(y)) : ctx.moveTo(px(x), py(y))));
    ctx.stroke();
    for (const [x, y] of pts) { ctx.beginPath(); ctx.arc(px(x), py(y), 2, 0, 2 * Math.PI); ctx.fill(); }
    ctx.fillStyle = "#1d232b";
    ctx.fillText(label(y1), pad, 11); ctx.fillText(label(y0), pad, h - 2);
    const cur = iter();
    if (cur !== undefined) { ctx.strokeStyle = "#e15759"; ctx.beginPath(); ctx.moveTo(px(cur), 0); ctx.lineTo(px(cur), h); ctx.stroke(); }
  }

  async function loadRun() {
    const r = await getJSON("/api/iters?" + q({}));
    state.iters = r.iters; state.points.clear(); state.view = null;
    const slider = $("slider");
    slider.max = String(Math.max(0, state.iters.length - 1));
    const wanted = parseInt(params.get("iter") || "", 10);
    const at = state.iters.indexOf(wanted);
    state.index = at >= 0 ? at : state.iters.length - 1;
    slider.value = String(state.index);
    for (const sel of [$("cmp-a"), $("cmp-b")]) {
      sel.replaceChildren(...state.iters.map((it) => { const o = document.createElement("option"); o.value = o.textContent = String(it); return o; }));
    }
    if (state.iters.length) { $("cmp-a").value = String(state.iters[0]); $("cmp-b").value = String(state.iters[state.iters.length - 1]); }
    $("iter-label").textContent = state.iters.length ? String(iter()) : "no token data";
    if (!state.iters.length) { status("this run has no token data (analysed with --no-token-data?)"); return; }
    await draw();
  }

  function nearestPoint(p, cx, cy) {
    let best = -1, bestD = 64;
    for (let i = 0; i < p.rows; i++) {
      const dx = sx(p.x[i]) - cx, dy = sy(p.y[i]) - cy, d = dx * dx + dy * dy;
      if (d < bestD) { bestD = d; best = i; }
    }
    return best;
  }

  function wire() {
    const c = $("map");
    const toCanvas = (e) => { const r = c.getBoundingClientRect(); return [(e.clientX - r.left) * c.width / r.width, (e.clientY - r.top) * c.height / r.height]; };
    c.addEventListener("mousedown", (e) => { const [x, y] = toCanvas(e); state.drag = { x, y, moved: false }; });
    window.addEventListener("mouseup", async (e) => {
      const d = state.drag; state.drag = null;
      if (!d || d.moved || !state.view) return;
      const [x, y] = toCanvas(e);
      const p = await points(iter());
      const i = nearestPoint(p, x, y);
      if (i >= 0) selectToken(i);
    });
    c.addEventListener("mousemove", (e) => {
      if (!state.drag || !state.view) return;
      const [x, y] = toCanvas(e);
      if (Math.abs(x - state.drag.x) + Math.abs(y - state.drag.y) > 2) state.drag.moved = true;
      state.view.ox += x - state.drag.x; state.view.oy += y - state.drag.y;
      state.drag.x = x; state.drag.y = y;
      draw();
    });
    c.addEventListener("wheel", (e) => {
      if (!state.view) return;
      e.preventDefault();
      const [x, y] = toCanvas(e), f = Math.exp(-e.deltaY * 0.0015);
      state.view.ox = x - (x - state.view.ox) * f; state.view.oy = y - (y - state.view.oy) * f; state.view.scale *= f;
      draw();
    }, { passive: false });
    $("slider").addEventListener("input", async () => {
      state.index = parseInt($("slider").value, 10);
      $("iter-label").textContent = String(iter());
      await draw();
      if (state.token !== null) { await showNeighbours(); seen(state.info); draw(); }
    });
    $("colour").addEventListener("change", () => {
      const u = new URL(location.href);
      u.searchParams.set("colour", $("colour").value);
      history.replaceState(null, "", u);
      draw();
    });
    $("cmp-a").addEventListener("change", compare);
    $("cmp-b").addEventListener("change", compare);
    $("search-form").addEventListener("submit", (e) => { e.preventDefault(); const v = $("search").value; if (v !== "") selectToken(v); });
    $("run").addEventListener("change", async () => { state.run = $("run").value; state.token = null; state.info = null; await loadRun(); });
  }

  async function main() {
    wire();
    const colour = params.get("colour");  // ?colour=frequency etc. opens with that colouring
    if (colour !== null && Array.from($("colour").options).some((o) => o.value === colour)) $("colour").value = colour;
    try {
      const r = await getJSON("/api/runs");
      if (!state.run || !r.runs.includes(state.run)) state.run = r.runs[0];
      $("run").replaceChildren(...r.runs.map((name) => { const o = document.createElement("option"); o.value = o.textContent = name; return o; }));
      $("run").value = state.run;
      await loadRun();
      const wanted = params.get("token");
      if (wanted !== null && wanted !== "") await selectToken(wanted);
    } catch (err) {
      status(err.message);
      document.body.dataset.ready = "error";
    }
  }
  main();
})();
