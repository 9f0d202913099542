// Start GOV.UK Frontend's components (error summary focus, password reveal,
// double-click protection, ...). The pages work without this script.
import { initAll } from "/assets/govuk-frontend.min.js";

initAll();

// The confirmation page: refresh each organisation's status every few seconds
// until all have answered (without this script, the "Check for updates" link
// reloads the page). Changes are announced politely to screen readers.
const live = document.querySelector("[data-live-status]");
const announcer = document.querySelector("[data-announcer]");
const refreshLink = document.querySelector("[data-refresh-link]");
const POLL_MS = 3000;
const GIVE_UP_AFTER_MS = 10 * 60 * 1000;

async function refresh(startedAt) {
  let response;
  try {
    response = await fetch(live.dataset.source, { headers: { Accept: "text/html" }, credentials: "same-origin" });
  } catch {
    return schedule(startedAt); // offline for a moment: try again
  }
  if (!response.ok) return; // signed out, or gone: the link still works
  const fragment = new DOMParser().parseFromString(await response.text(), "text/html");
  const table = fragment.querySelector("[data-agency-status]");
  if (!table) return;
  const before = live.querySelector("[data-status-summary]")?.textContent.trim();
  live.replaceChildren(document.importNode(table, true));
  const after = table.querySelector("[data-status-summary]")?.textContent.trim();
  if (announcer && after && after !== before) announcer.textContent = after;
  if (table.dataset.settled === "true") {
    refreshLink?.parentElement.remove();
    return;
  }
  schedule(startedAt);
}

function schedule(startedAt) {
  if (Date.now() - startedAt < GIVE_UP_AFTER_MS) {
    setTimeout(() => refresh(startedAt), POLL_MS);
  }
}

if (live && live.querySelector("[data-agency-status]")?.dataset.settled !== "true") {
  schedule(Date.now());
}
