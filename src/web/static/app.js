// Capstan dashboard: live run updates over Server-Sent Events (/events/runs).
// Runs tables marked data-live="yes" get new runs inserted (when they match the
// table's filters) and known runs updated in place; a run page that is not final
// reloads when its run changes. No other script runs on these pages.
(function () {
  "use strict";

  function cell(cls, child) {
    var td = document.createElement("td");
    td.className = cls;
    if (typeof child === "string") td.textContent = child; else if (child) td.appendChild(child);
    return td;
  }

  function link(href, text) {
    var a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    return a;
  }

  function statusBadge(status) {
    var s = document.createElement("span");
    s.className = "status " + status;
    s.textContent = status;
    return s;
  }

  function buildRow(run) {
    var tr = document.createElement("tr");
    tr.setAttribute("data-run", run.id);
    tr.setAttribute("data-status", run.status);
    tr.setAttribute("data-plugin", run.plugin);
    var idLink = link("/runs/" + encodeURIComponent(run.id), run.id.slice(-12));
    idLink.title = run.id;
    tr.appendChild(cell("id", idLink));
    tr.appendChild(cell("plugin", link("/plugins/" + encodeURIComponent(run.plugin), run.plugin)));
    tr.appendChild(cell("run-status", statusBadge(run.status)));
    tr.appendChild(cell("trigger", run.trigger));
    tr.appendChild(cell("queued", run.queued));
    tr.appendChild(cell("duration", run.duration));
    tr.appendChild(cell("error", run.error));
    return tr;
  }

  function applyToTable(table, run) {
    var tbody = table.tBodies[0];
    if (!tbody) return;
    var rows = tbody.querySelectorAll("tr[data-run]");
    for (var i = 0; i < rows.length; i++) {
      if (rows[i].getAttribute("data-run") === run.id) {
        var fresh = buildRow(run);
        tbody.replaceChild(fresh, rows[i]);
        return;
      }
    }
    if (table.getAttribute("data-live") !== "yes") return;
    var fp = table.getAttribute("data-filter-plugin");
    var fs = table.getAttribute("data-filter-status");
    if (fp && fp !== run.plugin) return;
    if (fs && fs !== run.status) return;
    var row = buildRow(run);
    row.className = "fresh";
    tbody.insertBefore(row, tbody.firstChild);
    var none = document.getElementById("no-runs");
    if (none) none.parentNode.removeChild(none);
  }

  function start() {
    var tables = document.querySelectorAll("table#runs");
    var outcome = document.querySelector("#outcome[data-final=no]");
    if (!tables.length && !outcome) return;
    if (typeof EventSource === "undefined") return;
    var live = document.getElementById("live");
    var source = new EventSource("/events/runs");
    source.onopen = function () {
      if (live) live.setAttribute("data-state", "open");
      // The run may have ended between the page and the stream: look once.
      if (outcome && window.fetch && window.DOMParser) {
        fetch(window.location.href, { credentials: "same-origin" })
          .then(function (r) { return r.ok ? r.text() : ""; })
          .then(function (text) {
            var doc = new DOMParser().parseFromString(text, "text/html");
            if (doc.querySelector("#outcome[data-final=yes]")) window.location.reload();
          })
          .catch(function () {});
      }
    };
    source.onerror = function () { if (live) live.setAttribute("data-state", "closed"); };
    source.addEventListener("run", function (e) {
      var run;
      try { run = JSON.parse(e.data); } catch (err) { return; }
      for (var i = 0; i < tables.length; i++) applyToTable(tables[i], run);
      if (outcome && outcome.getAttribute("data-run") === run.id &&
          run.status !== "queued" && run.status !== "running") {
        source.close();
        window.location.reload();
      }
    });
    window.addEventListener("pagehide", function () { source.close(); });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
