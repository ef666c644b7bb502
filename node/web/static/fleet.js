// The fleet dashboard: poll the fleet's state as JSON, recolour the tiles, filter by name or state.
"use strict";

(function () {
  const grid = document.getElementById("grid");
  const text = document.getElementById("filter-text");
  const state = document.getElementById("filter-state");
  const shown = document.getElementById("shown");
  const polled = document.getElementById("polled");
  const pollMs = Math.max(500, parseInt(grid.dataset.pollMs || "3000", 10));

  // Vietnamese names are compared without diacritics, so "ben thanh" finds "Bến Thành".
  function fold(s) {
    return s.normalize("NFD").replace(/[\u0300-\u036f]/g, "").replace(/đ/g, "d").replace(/Đ/g, "D").toLowerCase();
  }

  function applyFilter() {
    const q = fold(text.value.trim());
    const want = state.value;
    let n = 0;
    for (const tile of grid.querySelectorAll(".tile")) {
      const ok = (!q || fold(tile.dataset.name + " " + tile.dataset.unit).includes(q)) &&
        (!want || tile.dataset.state === want);
      tile.hidden = !ok;
      if (ok) n += 1;
    }
    shown.textContent = String(n);
    const params = new URLSearchParams();
    if (text.value.trim()) params.set("q", text.value.trim());
    if (want) params.set("state", want);
    const qs = params.toString();
    history.replaceState(null, "", window.location.pathname + (qs ? "?" + qs : ""));
  }

  async function refresh() {
    try {
      const r = await fetch("api/fleet", { cache: "no-store", credentials: "same-origin" });
      if (!r.ok) throw new Error("HTTP " + r.status);
      const body = await r.json();
      for (const u of body.units) {
        const tile = document.getElementById("unit-" + u.unit);
        if (!tile) continue;
        tile.dataset.state = u.state;
        tile.className = "tile state-" + u.state;
        tile.querySelector(".state").textContent = u.state_label;
        tile.querySelector(".detail").textContent = u.detail;
        tile.title = u.reason || "";
      }
      for (const [key, count] of Object.entries(body.counts)) {
        const el = document.getElementById("count-" + key);
        if (el) el.textContent = String(count);
      }
      polled.textContent = body.polled_at || "—";
      polled.classList.remove("stale");
      applyFilter();
    } catch (err) {
      polled.textContent = "Mất kết nối · Lost contact (" + err.message + ")";
      polled.classList.add("stale");
    }
  }

  text.addEventListener("input", applyFilter);
  state.addEventListener("change", applyFilter);
  applyFilter();
  setInterval(refresh, pollMs);
})();
