// The Usage page: draws what GET /api/v1/usage answers, and nothing else. No framework and no
// request beyond this exporter; the view's state (org, token, time frame, rows) lives in the URL so
// a link opens the same view, and the browser's back button walks back up a drill-down.
"use strict";

(() => {
  const app = document.getElementById("app");
  if (!app) return;

  const SVG_NS = "http://www.w3.org/2000/svg";
  const TIMEFRAMES = ["1h", "1d", "1w"];
  const TOPS = ["10", "25", "100"];
  const SPAN_TEXT = { "1h": "last hour", "1d": "last day", "1w": "last week" };
  const BUCKET_TEXT = { "1h": "1-minute buckets", "1d": "1-hour buckets", "1w": "1-day buckets" };
  const KINDS = {
    org: { title: "Request Counts by Organization", column: "Organization", drill: true },
    token: { title: "Request Counts by Token", column: "Token Name", drill: true },
    user_id: { title: "Request Counts by User ID", column: "User ID", drill: false },
  };
  const METRICS = [
    "total_requests", "failed_requests", "avg_response_time_ms_completion",
    "avg_response_time_ms_embedding", "input_tokens", "output_tokens", "total_tokens",
  ];

  const viewer = { role: app.dataset.role, org: app.dataset.org || null };
  const isAdmin = viewer.role === "admin";

  const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
  const oneDecimal = new Intl.NumberFormat(undefined, { minimumFractionDigits: 1, maximumFractionDigits: 1 });
  const timeZone = knownTimeZone(app.dataset.timezone);
  const timeLabels = {
    "1h": dateFormat({ hour: "2-digit", minute: "2-digit", hourCycle: "h23" }),
    "1d": dateFormat({ hour: "2-digit", minute: "2-digit", hourCycle: "h23" }),
    "1w": dateFormat({ weekday: "short", day: "numeric", month: "short" }),
  };
  const fullTime = dateFormat({ weekday: "short", day: "numeric", month: "short", hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
  const clock = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });

  const el = {
    dashboard: byId("dashboard"),
    status: byId("status"),
    error: byId("error"),
    errorText: byId("error-text"),
    retry: byId("retry"),
    refresh: byId("refresh"),
    updated: byId("updated"),
    orgSelect: byId("org-select"),
    topSelect: byId("top-select"),
    tabs: Array.from(document.querySelectorAll("#timeframe-tabs [role=tab]")),
    breadcrumb: document.querySelector("#breadcrumb ol"),
    timeseries: byId("timeseries"),
    timeseriesNote: byId("timeseries-note"),
    topTitle: byId("top-title"),
    topHead: document.querySelector("#top-table thead tr"),
    topBody: document.querySelector("#top-table tbody"),
    topTable: byId("top-table"),
    topEmpty: byId("top-empty"),
    models: byId("models"),
    modelsEmpty: byId("models-empty"),
  };

  let state = readState(location.search);
  let sequence = 0; // a slower, older answer must never overwrite a newer view
  let retryAction = () => load("none");
  let shown = null; // the answer on screen, redrawn when the window is resized

  // ---- state <-> URL --------------------------------------------------------------------------

  function readState(search) {
    const params = new URLSearchParams(search);
    const timeframe = TIMEFRAMES.includes(params.get("timeframe")) ? params.get("timeframe") : "1d";
    const top = TOPS.includes(params.get("top")) ? params.get("top") : "10";
    const org = params.get("org") || (isAdmin ? "all" : viewer.org);
    const token = org !== "all" && params.get("token") ? params.get("token") : null;
    return { org, token, timeframe, top };
  }

  function query(target) {
    const params = new URLSearchParams();
    params.set("org", target.org);
    if (target.token !== null) params.set("token", target.token);
    params.set("timeframe", target.timeframe);
    params.set("top", target.top);
    return params.toString();
  }

  function go(changes) {
    state = Object.assign({}, state, changes);
    load("push");
  }

  function linkTo(changes, text) {
    const target = Object.assign({}, state, changes);
    const link = document.createElement("a");
    link.href = "?" + query(target);
    link.textContent = text;
    link.addEventListener("click", (event) => {
      if (event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey || event.altKey) return;
      event.preventDefault();
      go(changes);
    });
    return link;
  }

  // ---- loading --------------------------------------------------------------------------------

  async function load(historyMode) {
    const search = "?" + query(state);
    if (historyMode === "push" && search !== location.search) history.pushState(null, "", search);
    else if (historyMode === "replace") history.replaceState(null, "", search);
    syncControls();
    const mine = ++sequence;
    el.dashboard.dataset.state = "loading";
    el.dashboard.setAttribute("aria-busy", "true");
    el.status.textContent = "Loading " + describe(state) + "…";
    let response;
    let body = null;
    try {
      response = await fetch("/api/v1/usage" + search, {
        headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store",
      });
      body = await response.json().catch(() => null);
    } catch (_) {
      if (mine === sequence) showError("The exporter did not answer. Check that it is still running, then try again.");
      return;
    }
    if (mine !== sequence) return;
    if (response.status === 401) {
      showError("Your login has ended or the key is no longer valid. Log in again to continue.", "Log in again",
        () => location.reload());
      return;
    }
    if (!response.ok || body === null || !body.metrics) {
      const reason = body && body.error ? body.error : "The exporter answered " + response.status + ".";
      showError("This view could not be loaded: " + reason);
      return;
    }
    render(body);
    el.error.hidden = true;
    el.dashboard.hidden = false;
    el.dashboard.dataset.state = "ready";
    el.dashboard.dataset.query = search.slice(1);
    el.dashboard.setAttribute("aria-busy", "false");
    el.status.textContent = "Showing " + describe(state) + ".";
    el.updated.textContent = "Updated " + clock.format(new Date());
  }

  function showError(message, actionText, action) {
    el.dashboard.hidden = true;
    el.dashboard.dataset.state = "error";
    el.dashboard.setAttribute("aria-busy", "false");
    el.status.textContent = "";
    el.errorText.textContent = message;
    el.retry.textContent = actionText || "Try again";
    retryAction = action || (() => load("none"));
    el.error.hidden = false;
  }

  function describe(target) {
    let scope = target.org === "all" ? "all organizations" : target.org;
    if (target.token !== null) scope += ", token " + target.token;
    return scope + ", " + SPAN_TEXT[target.timeframe];
  }

  // ---- controls -------------------------------------------------------------------------------

  function syncControls() {
    el.tabs.forEach((tab) => {
      const selected = tab.dataset.timeframe === state.timeframe;
      tab.setAttribute("aria-selected", String(selected));
      tab.tabIndex = selected ? 0 : -1;
      if (selected) el.dashboard.setAttribute("aria-labelledby", tab.id);
    });
    el.topSelect.value = state.top;
    if (el.orgSelect) {
      ensureOrgOption(state.org);
      el.orgSelect.value = state.org;
    }
    renderBreadcrumb();
    document.title = "Usage: " + describe(state) + " · llm-usage-exporter";
  }

  function ensureOrgOption(org) {
    if (Array.from(el.orgSelect.options).some((option) => option.value === org)) return;
    el.orgSelect.append(new Option(org, org));
    sortOrgOptions();
  }

  function sortOrgOptions() {
    const options = Array.from(el.orgSelect.options).filter((option) => option.value !== "all");
    options.sort((a, b) => a.value.localeCompare(b.value));
    options.forEach((option) => el.orgSelect.append(option));
  }

  // The dropdown lists the organizations with traffic in the last week, from the same endpoint.
  async function loadOrgOptions() {
    try {
      const response = await fetch("/api/v1/usage?org=all&timeframe=1w&top=100", {
        headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store",
      });
      if (!response.ok) return;
      const body = await response.json();
      (body.top || []).forEach((row) => { if (row.name) ensureOrgOption(row.name); });
      el.orgSelect.value = state.org;
    } catch (_) {
      // The dropdown still offers "All" and the current org; the main view reports outages.
    }
  }

  if (el.orgSelect) {
    el.orgSelect.addEventListener("change", () => go({ org: el.orgSelect.value, token: null }));
  }
  el.topSelect.addEventListener("change", () => go({ top: el.topSelect.value }));
  el.refresh.addEventListener("click", () => load("none"));
  el.retry.addEventListener("click", () => retryAction());
  el.tabs.forEach((tab, index) => {
    tab.addEventListener("click", () => go({ timeframe: tab.dataset.timeframe }));
    tab.addEventListener("keydown", (event) => {
      const moves = { ArrowRight: index + 1, ArrowLeft: index - 1, Home: 0, End: el.tabs.length - 1 };
      if (!(event.key in moves)) return;
      event.preventDefault();
      const next = el.tabs[(moves[event.key] + el.tabs.length) % el.tabs.length];
      next.focus();
      go({ timeframe: next.dataset.timeframe });
    });
  });
  // Up and down move between the rows' links, so the table reads like a list of choices.
  el.topBody.addEventListener("keydown", (event) => {
    if (!["ArrowDown", "ArrowUp", "Home", "End"].includes(event.key)) return;
    const links = Array.from(el.topBody.querySelectorAll("a"));
    const at = links.indexOf(document.activeElement);
    if (at < 0) return;
    event.preventDefault();
    const to = { ArrowDown: Math.min(at + 1, links.length - 1), ArrowUp: Math.max(at - 1, 0), Home: 0, End: links.length - 1 }[event.key];
    links[to].focus();
  });
  let resizeQueued = false;
  window.addEventListener("resize", () => {
    if (resizeQueued || !shown) return;
    resizeQueued = true;
    requestAnimationFrame(() => {
      resizeQueued = false;
      renderTimeseries(shown.timeseries || [], shown.scope.timeframe, shown.metrics.total_requests);
    });
  });
  window.addEventListener("popstate", () => {
    state = readState(location.search);
    load("none");
  });

  // ---- rendering ------------------------------------------------------------------------------

  function render(body) {
    shown = body;
    renderMetrics(body.metrics);
    renderTop(body.top || [], body.scope.top_kind, body.metrics.total_requests);
    renderModels(body.models || [], body.metrics.total_requests);
    // Last: the table's new width decides how wide the chart's column is.
    renderTimeseries(body.timeseries || [], body.scope.timeframe, body.metrics.total_requests);
  }

  function renderBreadcrumb() {
    const items = [];
    if (isAdmin) {
      items.push(state.org === "all" ? "All organizations" : linkTo({ org: "all", token: null }, "All organizations"));
    }
    if (state.org !== "all") items.push(state.token === null ? state.org : linkTo({ token: null }, state.org));
    if (state.token !== null) items.push(state.token);
    el.breadcrumb.replaceChildren(...items.map((item, index) => {
      const li = document.createElement("li");
      if (typeof item === "string") {
        const span = document.createElement("span");
        span.textContent = item;
        if (index === items.length - 1) span.setAttribute("aria-current", "page");
        li.append(span);
      } else {
        li.append(item);
      }
      return li;
    }));
  }

  function renderMetrics(metrics) {
    METRICS.forEach((key) => {
      const node = document.querySelector(`[data-metric="${key}"]`);
      const value = metrics[key];
      const isMs = key.startsWith("avg_response_time_ms");
      node.dataset.value = value === null ? "" : String(value);
      node.textContent = value === null ? "–" : isMs ? oneDecimal.format(value) : integer.format(value);
      node.title = value === null ? "no " + key.split("_").pop() + " requests with a response time in this window" : "";
      const unit = node.parentElement.querySelector(".metric-unit");
      if (unit) unit.hidden = value === null;
    });
    const share = byId("failed-share");
    share.textContent = metrics.total_requests > 0
      ? oneDecimal.format((100 * metrics.failed_requests) / metrics.total_requests) + " % of requests"
      : "";
  }

  function renderTimeseries(points, timeframe, total) {
    el.timeseriesNote.textContent = "· " + BUCKET_TEXT[timeframe];
    if (!total) {
      el.timeseries.replaceChildren(emptyNote());
      return;
    }
    // Drawn at the panel's own pixel width so axis text keeps its size on any screen.
    const width = Math.max(320, Math.round(el.timeseries.clientWidth || 720));
    const height = 260;
    const margin = { left: 52, right: 12, top: 12, bottom: 30 };
    const plotW = width - margin.left - margin.right;
    const plotH = height - margin.top - margin.bottom;
    const max = Math.max(1, ...points.map((p) => p.requests));
    const step = niceStep(max);
    const top = Math.ceil(max / step) * step;
    const y = (v) => margin.top + plotH - (v / top) * plotH;

    const svg = svgNode("svg", { viewBox: `0 0 ${width} ${height}`, role: "img" });
    const peak = points.reduce((best, p) => (p.requests > best.requests ? p : best), points[0]);
    svg.setAttribute("aria-label",
      `Requests over time: ${integer.format(total)} requests in ${points.length} ${BUCKET_TEXT[timeframe]}, ` +
      `peak ${integer.format(peak.requests)} at ${fullTime.format(new Date(peak.t))}.`);

    for (let v = 0; v <= top + step / 2; v += step) {
      svg.append(svgNode("line", { class: "grid-line", x1: margin.left, x2: width - margin.right, y1: y(v), y2: y(v) }));
      const label = svgNode("text", { class: "axis-text", x: margin.left - 6, y: y(v) + 4, "text-anchor": "end" });
      label.textContent = integer.format(v);
      svg.append(label);
    }
    const slot = plotW / points.length;
    const gap = slot > 4 ? Math.min(slot * 0.2, 6) : 0;
    points.forEach((point, index) => {
      const x = margin.left + index * slot + gap / 2;
      const h = Math.max(0, margin.top + plotH - y(point.requests));
      const bar = svgNode("rect", {
        class: "bar", x: x.toFixed(2), width: Math.max(0.5, slot - gap).toFixed(2),
        y: (margin.top + plotH - h).toFixed(2), height: h.toFixed(2), "data-t": point.t, "data-requests": point.requests,
      });
      const title = svgNode("title", {});
      title.textContent = `${fullTime.format(new Date(point.t))}: ${integer.format(point.requests)} requests`;
      bar.append(title);
      svg.append(bar);
    });
    const labelEvery = Math.max(1, Math.ceil(points.length / 7));
    points.forEach((point, index) => {
      if (index % labelEvery !== 0) return;
      const label = svgNode("text", {
        class: "axis-text", x: margin.left + (index + 0.5) * slot, y: height - 10, "text-anchor": "middle",
      });
      label.textContent = timeLabels[timeframe].format(new Date(point.t));
      svg.append(label);
    });
    el.timeseries.replaceChildren(svg);
  }

  function renderTop(rows, kind, total) {
    const spec = KINDS[kind] || KINDS.org;
    el.topTitle.textContent = spec.title;
    const tokens = kind === "token";
    const headers = [["#", "num"], [spec.column, ""], ["Requests", "num"], ["Input Tokens", "num"],
      ["Output Tokens", "num"], ["Total Tokens", "num"]];
    if (tokens) headers.push(["Token Owner", ""], ["Service Account", ""]);
    el.topHead.replaceChildren(...headers.map(([text, cls]) => {
      const th = document.createElement("th");
      th.scope = "col";
      th.textContent = text;
      if (cls) th.className = cls;
      return th;
    }));
    const empty = !total || rows.length === 0;
    el.topEmpty.hidden = !empty;
    el.topTable.hidden = empty;
    el.topBody.replaceChildren(...rows.map((row) => {
      const tr = document.createElement("tr");
      tr.dataset.name = row.name;
      const nameCell = document.createElement("th");
      nameCell.scope = "row";
      if (row.name === "" || row.name === null) {
        nameCell.append(noneNote(kind === "user_id" ? "(no user id)" : "(none)"));
      } else if (spec.drill) {
        const changes = kind === "org" ? { org: row.name, token: null } : { token: row.name };
        nameCell.append(linkTo(changes, row.name));
      } else {
        nameCell.textContent = row.name;
      }
      const cells = [numberCell(row.rank), nameCell, numberCell(row.requests), numberCell(row.input_tokens),
        numberCell(row.output_tokens), numberCell(row.total_tokens)];
      if (tokens) cells.push(textCell(row.token_owner), textCell(row.service_account));
      tr.append(...cells);
      return tr;
    }));
  }

  function renderModels(models, total) {
    el.modelsEmpty.hidden = total > 0 && models.length > 0;
    const max = Math.max(1, ...models.map((m) => m.requests));
    el.models.replaceChildren(...models.map((m) => {
      const li = document.createElement("li");
      li.dataset.model = m.model;
      li.dataset.requests = m.requests;
      if (m.requests === 0) li.className = "zero";
      const name = document.createElement("span");
      name.className = "bar-name";
      name.textContent = m.model;
      name.title = m.model;
      const track = document.createElement("span");
      track.className = "bar-track";
      track.setAttribute("aria-hidden", "true");
      const fill = document.createElement("span");
      fill.className = "bar-fill";
      fill.style.width = ((100 * m.requests) / max).toFixed(2) + "%";
      track.append(fill);
      const value = document.createElement("span");
      value.className = "bar-value";
      value.textContent = integer.format(m.requests);
      value.setAttribute("aria-label", integer.format(m.requests) + " requests");
      li.append(name, track, value);
      return li;
    }));
  }

  // ---- small helpers --------------------------------------------------------------------------

  function byId(id) {
    return document.getElementById(id);
  }

  function svgNode(name, attributes) {
    const node = document.createElementNS(SVG_NS, name);
    Object.entries(attributes).forEach(([key, value]) => node.setAttribute(key, String(value)));
    return node;
  }

  function numberCell(value) {
    const td = document.createElement("td");
    td.className = "num";
    td.textContent = value === null || value === undefined ? "" : integer.format(value);
    return td;
  }

  function textCell(value) {
    const td = document.createElement("td");
    if (value) td.textContent = value;
    else td.append(noneNote("–"));
    return td;
  }

  function noneNote(text) {
    const span = document.createElement("span");
    span.className = "none";
    span.textContent = text;
    return span;
  }

  function emptyNote() {
    const p = document.createElement("p");
    p.className = "empty";
    p.textContent = "no requests in this window";
    return p;
  }

  // Round axis steps (1, 2, 5 x 10^n) so grid lines fall on numbers people read at a glance.
  function niceStep(max) {
    const raw = max / 4;
    const magnitude = Math.pow(10, Math.floor(Math.log10(raw)));
    const norm = raw / magnitude;
    const step = (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10) * magnitude;
    return Math.max(1, step);
  }

  function knownTimeZone(name) {
    try {
      new Intl.DateTimeFormat(undefined, { timeZone: name });
      return name;
    } catch (_) {
      return "UTC";
    }
  }

  function dateFormat(options) {
    return new Intl.DateTimeFormat(undefined, Object.assign({ timeZone }, options));
  }

  if (el.orgSelect) loadOrgOptions();
  load("replace");
})();
