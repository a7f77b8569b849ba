// gridq monitor: live regions over SSE, and the job log tail. No framework, no external fetch.
"use strict";
(function () {
  const live = document.getElementById("live");
  const regions = () => document.querySelectorAll("[data-live][id]");
  let pending = false, last = 0, timer = null;
  // Every stream this page opens, closed when the page is hidden: a page kept in the
  // back/forward cache must not hold a connection (browsers allow six per host).
  const streams = [];
  const openStream = (url) => { const es = new EventSource(url); streams.push(es); return es; };
  window.addEventListener("pagehide", () => { for (const es of streams) es.close(); });
  window.addEventListener("pageshow", (ev) => { if (ev.persisted) location.reload(); });

  async function refresh() {
    pending = false; last = Date.now();
    try {
      const r = await fetch(location.href, { headers: { "X-Gridq-Live": "1" }, credentials: "same-origin" });
      if (!r.ok) return;
      const doc = new DOMParser().parseFromString(await r.text(), "text/html");
      for (const el of regions()) {
        const fresh = doc.getElementById(el.id);
        if (fresh && fresh.innerHTML !== el.innerHTML) el.innerHTML = fresh.innerHTML;
      }
    } catch (e) { /* the next change tries again */ }
  }
  function schedule() {
    if (pending || regions().length === 0) return;
    pending = true;
    const wait = Math.max(0, 1000 - (Date.now() - last));
    clearTimeout(timer); timer = setTimeout(refresh, wait);
  }
  if (window.EventSource && regions().length) {
    const es = openStream("/api/v1/events");
    es.addEventListener("change", schedule);
    es.onopen = () => live && live.classList.add("on");
    es.onerror = () => live && live.classList.remove("on");
  }

  // The job page's log: new lines as they arrive.
  const log = document.getElementById("log");
  if (log && log.dataset.stream && window.EventSource) {
    const url = log.dataset.stream + "&after_attempt=" + encodeURIComponent(log.dataset.afterAttempt) +
      "&after_seq=" + encodeURIComponent(log.dataset.afterSeq);
    const es = openStream(url);
    es.addEventListener("line", (ev) => {
      const l = JSON.parse(ev.data);
      const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
      const lastLine = log.lastElementChild;
      if (!lastLine || lastLine.dataset.attempt !== String(l.attempt)) {
        const mark = document.createElement("span");
        mark.className = "attempt"; mark.dataset.attempt = l.attempt;
        mark.textContent = "── attempt " + l.attempt + " ──\n";
        log.appendChild(mark);
      }
      const span = document.createElement("span");
      span.className = "line" + (l.stream === "stderr" ? " err" : "");
      span.dataset.attempt = l.attempt;
      span.textContent = l.line + "\n";
      log.appendChild(span);
      if (atEnd) log.scrollTop = log.scrollHeight;
    });
    es.addEventListener("end", () => es.close());
  }

  // Forms that change something put the session's CSRF token in as they are sent.
  const meta = document.querySelector('meta[name="csrf-token"]');
  document.addEventListener("submit", (ev) => {
    const f = ev.target;
    if (f.method === "post" && meta && !f.querySelector('input[name="csrf"]')) {
      const i = document.createElement("input");
      i.type = "hidden"; i.name = "csrf"; i.value = meta.content; f.appendChild(i);
    }
  });
})();
