// returner console: the overview follows new work, and "Replay all" asks first.
// Loaded from the console itself (the Content-Security-Policy allows no inline script).
"use strict";

// The overview's live part is fetched again every few seconds, while the tab is visible.
(function follow() {
  const live = document.querySelector("[data-live]");
  if (!live) return;
  const state = document.getElementById("live-state");
  const every = Number(live.dataset.every) || 2000;
  let timer = null;

  function show(text, stale) {
    state.textContent = text;
    state.classList.toggle("stale", stale);
  }

  function later() {
    if (timer === null && !document.hidden) timer = setTimeout(refresh, every);
  }

  async function refresh() {
    timer = null;
    try {
      const answer = await fetch(live.dataset.live, {
        headers: { Accept: "text/html" }, credentials: "same-origin", cache: "no-store",
      });
      if (answer.status === 401) {
        window.location.assign("/signin?next=" + encodeURIComponent(location.pathname));
        return;
      }
      if (!answer.ok) throw new Error("HTTP " + answer.status);
      // Rendered by the console, every value in it escaped there.
      live.innerHTML = await answer.text();
      show("live", false);
    } catch (error) {
      show("not updating: " + error.message + "; retrying", true);
    }
    later();
  }

  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      clearTimeout(timer);
      timer = null;
      show("paused", true);
    } else {
      refresh();
    }
  });
  later();
})();

// A form with data-confirm asks before it is sent.
document.addEventListener("submit", (event) => {
  const question = event.target.dataset && event.target.dataset.confirm;
  if (question && !window.confirm(question)) event.preventDefault();
});
