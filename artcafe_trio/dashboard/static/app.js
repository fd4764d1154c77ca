"use strict";
// artcafe-trio dashboard. No dependencies, no build step.
// The token comes in the address once (?token=...), moves to sessionStorage and is then
// sent only in an Authorization header; the live feed is read with fetch() (EventSource
// cannot send headers), so the token never sits in an address the server logs.
(function () {
  const TOKEN_KEY = "artcafe-token";
  const params = new URLSearchParams(location.search);
  if (params.has("token")) {
    sessionStorage.setItem(TOKEN_KEY, params.get("token"));
    params.delete("token");
    const rest = params.toString();
    history.replaceState(null, "", location.pathname + (rest ? "?" + rest : "") + location.hash);
  }
  const token = sessionStorage.getItem(TOKEN_KEY) || "";
  const headers = { Authorization: "Bearer " + token };

  const agents = new Map();        // "tenant/agent" -> agent JSON (+ local fields)
  const histories = new Map();     // "tenant/agent" -> {segments, uptime, fetched}
  const events = [];               // newest last, at most MAX_EVENTS
  const MAX_EVENTS = 300;
  let counters = {};
  let offset = 0;                  // hub clock - browser clock, seconds
  let sortKey = "agent_id", sortDir = 1;

  const $ = (id) => document.getElementById(id);
  const tbody = document.querySelector("#presence tbody");
  const feedState = $("feed-state");

  function hubNow() { return Date.now() / 1000 + offset; }
  function setFeed(state, text) { feedState.dataset.state = state; feedState.textContent = text; }
  function fmtSeconds(s) {
    if (s === null || s === undefined) return "–";
    if (s < 1) return (s * 1000).toFixed(0) + " ms";
    if (s < 60) return s.toFixed(1) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
    if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
    return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
  }
  function fmtTime(t) {
    if (!t) return "–";
    return new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z";
  }
  function el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else node.setAttribute(k, v);
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }
  function keyOf(a) { return a.tenant_id + "/" + a.agent_id; }

  // --- rendering -----------------------------------------------------------
  function matches(a) {
    const tenant = $("tenant-filter").value, status = $("status-filter").value;
    const q = $("search").value.trim().toLowerCase();
    if (tenant && a.tenant_id !== tenant) return false;
    if (status && a.status !== status) return false;
    if (!q) return true;
    const hay = [a.tenant_id, a.agent_id, a.status, a.reason || "", (a.capabilities || []).join(" "),
      JSON.stringify(a.metadata || {})].join(" ").toLowerCase();
    return hay.includes(q);
  }
  function compare(x, y) {
    const a = x[sortKey], b = y[sortKey];
    if (a === b) return keyOf(x) < keyOf(y) ? -1 : 1;
    if (a === null || a === undefined) return 1;
    if (b === null || b === undefined) return -1;
    return (a < b ? -1 : 1) * sortDir;
  }
  function cell(row, label, text, cls) {
    const td = el("td", { "data-label": label, class: cls || "" }, text);
    row.appendChild(td);
    return td;
  }
  function bar(key) {
    const h = histories.get(key);
    const wrap = el("div", { class: "bar", role: "img" });
    if (!h || !h.segments) { wrap.setAttribute("aria-label", "no history yet"); return wrap; }
    const span = (h.until - h.since) || 1;
    let outages = 0;
    for (const s of h.segments) {
      const part = el("span", { class: s.status, "data-status": s.status, title: s.status + (s.reason ? " (" + s.reason + ")" : "") +
        " " + fmtTime(s.start) + " – " + fmtTime(s.end) });
      part.style.width = (100 * (s.end - s.start) / span) + "%";
      wrap.appendChild(part);
      if (s.status === "offline") outages++;
    }
    const up = h.uptime === null ? "unknown" : (100 * h.uptime).toFixed(1) + " % up";
    wrap.setAttribute("aria-label", "last 24 h: " + up + ", " + outages + " offline period" + (outages === 1 ? "" : "s"));
    return wrap;
  }
  function render() {
    const rows = [...agents.values()].filter(matches).sort(compare);
    tbody.replaceChildren();
    for (const a of rows) {
      const key = keyOf(a);
      const tr = el("tr", { "data-key": key, "data-status": a.status });
      if (a._renderedAt) tr.dataset.renderedAt = String(a._renderedAt);
      if (a._transitionAt) tr.dataset.transitionAt = String(a._transitionAt);
      cell(tr, "tenant", a.tenant_id);
      cell(tr, "agent", a.agent_id, "agent");
      const st = cell(tr, "status", "");
      st.appendChild(el("span", { class: "status " + a.status }, a.status));
      cell(tr, "reason", a.reason || "–", "reason");
      const since = cell(tr, "since", a.since ? fmtSeconds(Math.max(0, hubNow() - a.since)) + " ago" : "–", "num since");
      since.title = fmtTime(a.since);
      if (a.since) since.dataset.t = String(a.since);
      const age = cell(tr, "heartbeat age", "–", "num age");
      if (a.last_heartbeat && a.status === "online") age.dataset.t = String(a.last_heartbeat);
      if (a.heartbeat_timeout) age.dataset.timeout = String(a.heartbeat_timeout);
      cell(tr, "interval / timeout", a.heartbeat_interval ? fmtSeconds(a.heartbeat_interval) + " / " + fmtSeconds(a.heartbeat_timeout) : "none", "num");
      cell(tr, "measured interval", a.measured_interval_avg !== null ? fmtSeconds(a.measured_interval_avg) : "–", "num measured");
      cell(tr, "ACK RTT", a.rtt !== null ? fmtSeconds(a.rtt) : "–", "num rtt");
      cell(tr, "reconnects 1 h", String(a.reconnects_1h), "num");
      cell(tr, "take-overs 1 h", String(a.takeovers_1h), "num");
      const meta = [(a.capabilities || []).join(", "), Object.keys(a.metadata || {}).length ? JSON.stringify(a.metadata) : ""]
        .filter(Boolean).join(" · ");
      cell(tr, "capabilities", meta || "–", "meta");
      cell(tr, "hub", a.hub_id || "–", "meta hub");
      const h = cell(tr, "last 24 h", "");
      h.appendChild(bar(key));
      const hist = histories.get(key);
      if (hist && hist.uptime !== null && hist.uptime !== undefined) {
        h.appendChild(el("span", { class: "uptime" }, " " + (100 * hist.uptime).toFixed(1) + " %"));
      }
      tbody.appendChild(tr);
    }
    $("empty").hidden = rows.length > 0;
    tick();
  }
  function tick() {
    const now = hubNow();
    for (const td of tbody.querySelectorAll("td.age")) {
      if (!td.dataset.t) { td.textContent = "–"; continue; }
      const age = Math.max(0, now - Number(td.dataset.t));
      td.textContent = fmtSeconds(age);
      td.classList.toggle("late", td.dataset.timeout && age > Number(td.dataset.timeout) / 2);
    }
    for (const td of tbody.querySelectorAll("td.since")) {
      if (td.dataset.t) td.textContent = fmtSeconds(Math.max(0, now - Number(td.dataset.t))) + " ago";
    }
  }
  function renderCounters() {
    $("c-online").textContent = String(counters.online ?? "–");
    const reasons = counters.offline || {};
    $("c-offline").textContent = String(Object.values(reasons).reduce((s, n) => s + n, 0));
    $("c-reasons").textContent = Object.entries(reasons).map(([r, n]) => r + ": " + n).join(", ") || "none";
    const rate = (v) => (v === null || v === undefined) ? "–" : v.toFixed(1);
    $("c-heartbeats").textContent = rate(counters.heartbeats_per_s);
    $("c-messages").textContent = rate(counters.messages_per_s);
  }
  function renderTenants() {
    const select = $("tenant-filter"), chosen = select.value;
    const tenants = [...new Set([...agents.values()].map((a) => a.tenant_id))].sort();
    const have = [...select.options].slice(1).map((o) => o.value);
    if (have.join("\n") === tenants.join("\n")) return;
    select.replaceChildren(el("option", { value: "" }, "all"), ...tenants.map((t) => el("option", { value: t }, t)));
    select.value = tenants.includes(chosen) ? chosen : "";
  }
  function describe(e) {
    switch (e.kind) {
      case "presence": return e.tenant_id + "/" + e.agent_id + " " + e.status + " (" + e.reason + ")";
      case "takeover": return e.tenant_id + "/" + e.agent_id + " taken over by session " + e.new_session_id;
      case "slow_consumer": return (e.tenant_id || "admin") + "/" + e.agent_id + " cut off: " + e.reason;
      case "auth_failure": return "authentication refused from " + e.address + " (" + e.code + ", " + e.failures + " recent)";
      default: return e.kind;
    }
  }
  function renderEvents() {
    const kind = $("event-filter").value, list = $("events");
    list.replaceChildren();
    for (const e of events.slice().reverse()) {
      if (kind && e.kind !== kind) continue;
      const li = el("li", { "data-kind": e.kind });
      li.appendChild(el("time", {}, fmtTime(e.time)));
      li.appendChild(el("span", { class: "kind" }, e.kind === "presence" ? (e.status === "online" ? "● online" : "○ offline") : e.kind.replace("_", " ")));
      li.appendChild(document.createTextNode(describe(e)));
      list.appendChild(li);
    }
  }
  function pushEvent(e) {
    events.push(e);
    if (events.length > MAX_EVENTS) events.splice(0, events.length - MAX_EVENTS);
  }

  // --- data ---------------------------------------------------------------
  function applySnapshot(doc, withEvents) {
    offset = doc.now - Date.now() / 1000;
    $("scope").textContent = doc.scope === "*" ? "scope: every tenant (admin)" : "scope: tenant " + doc.scope;
    const fresh = new Map();
    for (const a of doc.agents) {
      const old = agents.get(keyOf(a));
      if (old && old.status === a.status) { a._renderedAt = old._renderedAt; a._transitionAt = old._transitionAt; }
      fresh.set(keyOf(a), a);
    }
    agents.clear();
    for (const [k, v] of fresh) agents.set(k, v);
    counters = doc.counters || {};
    if (withEvents && doc.events) { events.length = 0; doc.events.forEach(pushEvent); renderEvents(); }
    renderTenants(); renderCounters(); render();
    loadHistories();
  }
  function applyEvent(name, e) {
    pushEvent(e);
    if (name === "presence" && e.agent) {
      e.agent._renderedAt = Date.now();
      e.agent._transitionAt = Math.round(e.time * 1000);
      agents.set(keyOf(e.agent), e.agent);
      const online = [...agents.values()].filter((a) => a.status === "online").length;
      counters.online = online;
      const off = {};
      for (const a of agents.values()) if (a.status !== "online") off[a.reason || "unknown"] = (off[a.reason || "unknown"] || 0) + 1;
      counters.offline = off;
      renderTenants(); renderCounters(); render();
      histories.delete(keyOf(e.agent));
      loadHistories();
    }
    renderEvents();
  }

  let historyBusy = 0;
  function loadHistories() {
    const now = Date.now();
    for (const a of agents.values()) {
      if (historyBusy >= 4) return;
      const key = keyOf(a), h = histories.get(key);
      if (h && (h.loading || now - h.fetched < 60000)) continue;
      historyBusy++;
      histories.set(key, Object.assign(h || {}, { loading: true, fetched: now }));
      const url = "/api/history?agent=" + encodeURIComponent(a.agent_id) + "&tenant=" + encodeURIComponent(a.tenant_id);
      fetch(url, { headers }).then((r) => r.ok ? r.json() : null).then((doc) => {
        if (doc) histories.set(key, Object.assign(doc, { fetched: Date.now(), loading: false }));
        else histories.set(key, { fetched: Date.now(), loading: false });
      }).catch(() => histories.set(key, { fetched: Date.now(), loading: false }))
        .finally(() => { historyBusy--; render(); loadHistories(); });
    }
  }

  // --- the live feed (server-sent events over fetch) -------------------------------
  let failures = 0, wasLive = false;
  async function follow() {
    while (true) {
      try {
        const response = await fetch("/api/events", { headers, cache: "no-store" });
        if (response.status === 401 || response.status === 403) {
          // A token that worked and no longer does: revoked, or the hub's admin token,
          // which is new at every hub start (a stored token outlives restarts).
          setFeed("refused", wasLive
            ? "refused: this token is no longer valid (revoked, or the hub's admin token, new at every hub start; "
              + "`artcafe-trio dashboard-token --all-tenants` makes one that survives restarts)"
            : "refused: token not valid (reopen with ?token=)");
          document.body.dataset.refused = wasLive ? "expired" : "1";
          return;
        }
        if (!response.ok || !response.body) throw new Error("HTTP " + response.status);
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        while (true) {
          const { value, done } = await reader.read();
          if (done) break;
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            let name = "message", data = "";
            for (const line of block.split("\n")) {
              if (line.startsWith("event: ")) name = line.slice(7);
              else if (line.startsWith("data: ")) data += line.slice(6);
            }
            if (!data) continue;
            const doc = JSON.parse(data);
            if (name === "snapshot") {
              applySnapshot(doc, "events" in doc);
              failures = 0;
              wasLive = true;
              setFeed("live", "live");
            } else if (name === "resync") {
              setFeed("reconnecting", "resyncing…");
            } else {
              applyEvent(name, doc);
            }
          }
        }
        throw new Error("feed ended");
      } catch (err) {
        failures++;
        setFeed("reconnecting", "reconnecting…");
        const ceiling = Math.min(5000, 250 * 2 ** Math.min(failures, 5));
        await new Promise((resolve) => setTimeout(resolve, ceiling / 2 + Math.random() * ceiling / 2));
      }
    }
  }

  // --- controls -------------------------------------------------------------
  for (const id of ["search", "tenant-filter", "status-filter"]) {
    $(id).addEventListener("input", render);
  }
  $("event-filter").addEventListener("input", renderEvents);
  for (const button of document.querySelectorAll("th button[data-sort]")) {
    button.addEventListener("click", () => {
      const key = button.dataset.sort;
      sortDir = key === sortKey ? -sortDir : 1;
      sortKey = key;
      for (const b of document.querySelectorAll("th button")) b.removeAttribute("aria-sort");
      button.setAttribute("aria-sort", sortDir > 0 ? "ascending" : "descending");
      render();
    });
  }
  setInterval(tick, 250);
  if (!token) { setFeed("refused", "refused: no token"); return; }
  follow();
})();
