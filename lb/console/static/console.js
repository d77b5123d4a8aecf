// kvgate console: polls /ui/api/status once a second and draws models, replicas, rings and
// traffic; the playground streams /v1/chat/completions with fetch and an SSE reader. No
// framework and no build step: this file is served as written.
"use strict";

const API = "api/status";
const POLL_MS = 1000;
const COLORS = ["#2b6cb0", "#dd6b20", "#2f855a", "#b83280", "#6b46c1", "#c53030", "#2c7a7b",
                "#975a16", "#4a5568", "#d69e2e", "#38a169", "#805ad5"];
const RING_STRATEGIES = ["PrefixHash", "CacheAware"];
const state = { key: sessionStorage.getItem("kvgate-key") || "", rings: {}, ringKeys: {} };

// -- small DOM helpers --------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v;
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
  for (const c of children.flat()) if (c) el.append(c);
  return el;
}

function headers(extra) {
  const out = Object.assign({}, extra || {});
  if (state.key) out.Authorization = "Bearer " + state.key;
  return out;
}

const ms = (s) => (s === null || s === undefined ? "–" : s < 1 ? (s * 1000).toFixed(0) + " ms" : s.toFixed(2) + " s");
const pct = (x) => (x * 100).toFixed(x < 0.1 ? 1 : 0) + "%";

// -- status polling -----------------------------------------------------------------------------

async function poll() {
  try {
    const res = await fetch(API, { headers: headers(), cache: "no-store" });
    const body = await res.json().catch(() => ({}));
    if (res.status === 401 || res.status === 403) {
      askForKey(body.error ? body.error.message : "An API key is needed.");
    } else if (!res.ok) {
      setConn("status API: " + (body.error ? body.error.message : res.status), true);
    } else {
      document.getElementById("key-form").hidden = true;
      setConn("live · " + new Date().toLocaleTimeString(), false);
      render(body);
    }
  } catch (err) {
    setConn("gateway unreachable", true);
  }
  setTimeout(poll, POLL_MS);
}

function setConn(text, bad) {
  const el = document.getElementById("conn");
  el.textContent = text;
  el.classList.toggle("bad", bad);
}

function askForKey(message) {
  document.getElementById("key-form").hidden = false;
  document.getElementById("key-error").textContent = message;
  setConn("locked", true);
}

document.getElementById("key-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.key = document.getElementById("key-input").value.trim();
  sessionStorage.setItem("kvgate-key", state.key);
  document.getElementById("key-error").textContent = "";
});

// -- models -------------------------------------------------------------------------------------

function render(doc) {
  const models = doc.models || [];
  const box = document.getElementById("models");
  box.replaceChildren(...(models.length ? models.map(modelCard) : [h("p", { class: "muted" }, "No models.")]));
  renderRings(models);
  fillPicker(models);
}

function modelCard(m) {
  const t = m.traffic || {};
  const ttft = t.ttftSeconds || {};
  const desired = m.desired === null || m.desired === undefined ? m.ready : m.desired;
  return h("div", { class: "card model", "data-model": m.name },
    h("div", { class: "card-head" },
      h("h3", {}, m.name),
      h("span", { class: "tag" }, m.engine),
      h("span", { class: "tag strategy" }, m.strategy),
      (m.features || []).map((f) => h("span", { class: "tag" }, f)),
      m.adapters && m.adapters.length ? h("span", { class: "muted" }, "adapters: " + m.adapters.join(", ")) : null),
    h("div", { class: "figures" },
      figure("replicas ready/desired", h("span", { class: "ready" }, `${m.ready}/${desired}`)),
      figure("in flight", h("span", { class: "inflight" }, m.inFlight)),
      figure("queued", h("span", { class: "waiting" }, m.waiting)),
      figure("requests/s (1 min)", h("span", { class: "rps" }, (t.requestsPerSecond || 0).toFixed(2))),
      figure("first byte p50 / p90 / p99 (5 min)", `${ms(ttft.p50)} / ${ms(ttft.p90)} / ${ms(ttft.p99)}`),
      figure(`requests/s, last ${Math.round(((t.series || []).length * (t.bucketSeconds || 5)) / 60)} min`, sparkline(t))),
    replicaTable(m));
}

function figure(label, value) {
  return h("div", { class: "figure" }, h("b", {}, value), h("span", {}, label));
}

function sparkline(t) {
  const series = (t.series || []).map((b) => b.requests / (t.bucketSeconds || 5));
  const w = 180, hgt = 28;
  const top = Math.max(1e-9, ...series);
  const pts = series.map((v, i) => `${(i / Math.max(1, series.length - 1)) * w},${hgt - (v / top) * (hgt - 2) - 1}`);
  return svg("svg", { class: "spark", width: w, height: hgt, viewBox: `0 0 ${w} ${hgt}` },
    svg("polyline", { points: pts.join(" "), fill: "none", stroke: "#2b6cb0", "stroke-width": "1.5" }));
}

function replicaTable(m) {
  const cap = m.ring ? m.ring.capacity : 0;
  const rows = (m.replicas || []).map((r) => {
    const e = r.engine;
    return h("tr", { "data-replica": r.name },
      h("td", {}, r.name),
      h("td", { class: "state-" + r.state }, r.state),
      h("td", {}, r.address || "–"),
      h("td", {}, h("span", { class: "inflight" }, r.inFlight), loadBar(r.inFlight, cap)),
      h("td", {}, e ? e.waiting.toFixed(0) : "–"),
      h("td", {}, e ? pct(e.kvUsage) : "–"),
      h("td", {}, r.key && RING_STRATEGIES.includes(m.strategy) ? pct(r.ringShare || 0) : "–"),
      h("td", {}, (r.adapters || []).join(", ") || "–"),
      h("td", { class: r.ejectedSeconds !== null && r.ejectedSeconds !== undefined ? "ejected" : "" },
        r.ejectedSeconds !== null && r.ejectedSeconds !== undefined ? `ejected (${r.ejectedSeconds}s)` : ""));
  });
  return h("table", { class: "replicas" },
    h("thead", {}, h("tr", {}, ["replica", "state", "address", `in flight (bound ${cap})`, "engine queue",
                               "KV cache", "ring share", "adapters", ""].map((c) => h("th", {}, c)))),
    h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 9, class: "muted" }, "no replicas (scaled to zero: a request starts one)"))));
}

function loadBar(load, cap) {
  const frac = cap > 0 ? Math.min(1, load / cap) : 0;
  return h("span", { class: "bar", title: `${load} of ${cap}` },
    h("i", { class: cap > 0 && load > cap ? "over" : cap > 0 && load === cap ? "full" : "",
             style: `width:${(frac * 100).toFixed(0)}%` }));
}

// -- rings --------------------------------------------------------------------------------------

function renderRings(models) {
  const box = document.getElementById("rings");
  const wanted = new Set();
  for (const m of models) {
    const keys = (m.replicas || []).filter((r) => r.key).map((r) => r.key).sort().join("\n");
    wanted.add(m.name);
    if (state.ringKeys[m.name] !== keys) {
      state.ringKeys[m.name] = keys;
      fetchRing(m.name);
    }
  }
  for (const name of Object.keys(state.rings)) if (!wanted.has(name)) delete state.rings[name];
  // Only these strategies route by the ring; the others' rings would say nothing.
  const drawn = models.filter((m) => RING_STRATEGIES.includes(m.strategy) && state.rings[m.name]);
  box.replaceChildren(drawn.length ? h("div", { class: "rings" }, drawn.map((m) => ringView(state.rings[m.name], m)))
    : h("p", { class: "muted" }, "No model routes by the ring (PrefixHash, CacheAware) yet."));
}

async function fetchRing(name) {
  try {
    const res = await fetch("api/ring?model=" + encodeURIComponent(name), { headers: headers(), cache: "no-store" });
    if (res.ok) state.rings[name] = await res.json();
  } catch (err) { /* the next change retries */ }
}

function ringView(ring, model) {
  const size = 150, r = 60, c = size / 2;
  const arcs = [];
  const n = ring.ends.length;
  for (let j = 0; j < n; j++) {
    const start = j === 0 ? ring.ends[n - 1] - 1 : ring.ends[j - 1];
    arcs.push(arc(c, r, start, ring.ends[j], COLORS[ring.owners[j] % COLORS.length]));
  }
  const inflight = Object.fromEntries((model.replicas || []).filter((x) => x.key).map((x) => [x.key, x.inFlight]));
  const cap = model.ring ? model.ring.capacity : ring.capacity;
  const legend = ring.replicas.map((rep, i) => h("tr", { "data-ring-replica": rep.key },
    h("td", {}, h("i", { style: "background:" + COLORS[i % COLORS.length] }), rep.key),
    h("td", {}, pct(rep.share)),
    h("td", {}, `${inflight[rep.key] ?? 0} / ${cap}`, loadBar(inflight[rep.key] ?? 0, cap))));
  return h("div", { class: "card ring", "data-ring": ring.model },
    svg("svg", { width: size, height: size, viewBox: `0 0 ${size} ${size}` },
      n ? arcs : svg("circle", { cx: c, cy: c, r, fill: "none", stroke: "#dde1e8", "stroke-width": 18 })),
    h("div", {},
      h("b", {}, ring.model), h("div", { class: "muted" }, `${ring.strategy} · ${ring.replication} vnodes/replica · bound factor ${ring.meanLoadFactor}%`),
      h("table", { class: "legend" }, h("tr", {}, h("th", {}, "replica"), h("th", {}, "share"), h("th", {}, "load / bound")), legend)));
}

function arc(c, r, from, to, color) {
  const a0 = from * 2 * Math.PI - Math.PI / 2, a1 = to * 2 * Math.PI - Math.PI / 2;
  if (to - from >= 0.999999) return svg("circle", { cx: c, cy: c, r, fill: "none", stroke: color, "stroke-width": 18 });
  const large = to - from > 0.5 ? 1 : 0;
  const d = `M ${c + r * Math.cos(a0)} ${c + r * Math.sin(a0)} A ${r} ${r} 0 ${large} 1 ${c + r * Math.cos(a1)} ${c + r * Math.sin(a1)}`;
  return svg("path", { d, fill: "none", stroke: color, "stroke-width": 18 });
}

// -- playground ---------------------------------------------------------------------------------

function fillPicker(models) {
  const names = [];
  for (const m of models) {
    if (!(m.features || []).includes("TextGeneration")) continue;
    names.push(m.name);
    for (const a of m.adapters || []) names.push(m.name + "_" + a);
  }
  const select = document.getElementById("chat-model");
  const current = [...select.options].map((o) => o.value).join("\n");
  if (current === names.join("\n")) return;
  const chosen = select.value;
  select.replaceChildren(...names.map((n) => h("option", { value: n }, n)));
  if (names.includes(chosen)) select.value = chosen;
}

const conversation = [];

document.getElementById("chat-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const input = document.getElementById("chat-input");
  const text = input.value.trim();
  const model = document.getElementById("chat-model").value;
  if (!text || !model) return;
  input.value = "";
  conversation.push({ role: "user", content: text });
  addMessage("user", "you", text);
  const out = addMessage("assistant", model, "");
  const button = document.getElementById("chat-send");
  button.disabled = true;
  setChatState("waiting for the first token…");
  try {
    const reply = await streamChat(model, out);
    conversation.push({ role: "assistant", content: reply });
    setChatState("done");
  } catch (err) {
    out.classList.add("error");
    out.lastChild.textContent = String(err.message || err);
    conversation.pop();
    setChatState("");
  } finally {
    button.disabled = false;
  }
});

function addMessage(role, who, text) {
  const el = h("div", { class: "msg " + role }, h("span", { class: "who" }, who), h("span", { class: "text" }, text));
  document.getElementById("chat-log").append(el);
  return el;
}

function setChatState(text) { document.getElementById("chat-state").textContent = text; }

async function streamChat(model, out) {
  const max = parseInt(document.getElementById("chat-max").value, 10) || 64;
  const res = await fetch("../v1/chat/completions", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify({ model, messages: conversation, stream: true, max_tokens: max }),
  });
  if (!res.ok) {
    const body = await res.json().catch(() => ({}));
    throw new Error(body.error ? body.error.message : "HTTP " + res.status);
  }
  const text = out.lastChild;
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", reply = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut).replace(/^\r?\n\r?\n/, "");
      for (const line of event.split(/\r?\n/)) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return reply;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          reply += delta.content;
          text.textContent = reply;
          setChatState("streaming…");
        }
      }
    }
  }
  return reply;
}

poll();
