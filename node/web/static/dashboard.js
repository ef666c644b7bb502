// The node dashboard: poll the server-rendered panels, send the retry action with the CSRF token,
// look dossiers up. Everything inserted as HTML comes from the server, escaped there.
"use strict";

(function () {
  const panels = document.getElementById("panels");
  const live = document.getElementById("live-state");
  const retryResult = document.getElementById("retry-result");
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.getAttribute("content") : "";
  const pollMs = Math.max(500, parseInt(panels.dataset.pollMs || "2000", 10));
  let busy = false;

  function signIn() {
    window.location.assign("/login?next=" + encodeURIComponent(window.location.pathname));
  }

  async function refresh() {
    if (busy) return;
    busy = true;
    try {
      const r = await fetch("/dashboard/panels", { credentials: "same-origin", cache: "no-store" });
      if (r.status === 401) return signIn();
      if (!r.ok) throw new Error("HTTP " + r.status);
      panels.innerHTML = await r.text();
      live.textContent = "Tự động cập nhật · Live — " + new Date().toLocaleTimeString("vi-VN");
      live.classList.remove("stale");
    } catch (err) {
      live.textContent = "Mất kết nối tới nút · Lost contact with the node (" + err.message + ")";
      live.classList.add("stale");
    } finally {
      busy = false;
    }
  }

  panels.addEventListener("click", async function (ev) {
    const button = ev.target.closest("button.retry");
    if (!button) return;
    button.disabled = true;
    const { target, code } = button.dataset;
    const url = "/api/v1/dead-letters/" + encodeURIComponent(target) + "/" + encodeURIComponent(code) + "/retry";
    try {
      const r = await fetch(url, { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": csrf } });
      if (r.status === 401) return signIn();
      if (r.status === 202) {
        retryResult.textContent = "Đã gửi lại " + code + " · Queued " + code + " again (" + target + ")";
        retryResult.className = "ok";
      } else {
        let message = "HTTP " + r.status;
        try { message = (await r.json()).error.message; } catch (_) { /* not the JSON envelope */ }
        retryResult.textContent = "Không gửi lại được · Retry refused: " + message;
        retryResult.className = "error";
      }
    } catch (err) {
      retryResult.textContent = "Không gửi lại được · Retry failed: " + err.message;
      retryResult.className = "error";
    }
    refresh();
  });

  const form = document.getElementById("lookup-form");
  const result = document.getElementById("lookup-result");
  form.addEventListener("submit", async function (ev) {
    ev.preventDefault();
    const code = document.getElementById("lookup-code").value.trim();
    if (!code) return;
    const r = await fetch("/dashboard/dossiers/" + encodeURIComponent(code), { credentials: "same-origin" });
    if (r.status === 401) return signIn();
    result.innerHTML = await r.text();
  });

  setInterval(refresh, pollMs);
})();
