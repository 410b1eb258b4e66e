// Shared helpers of the dashboard pages: element building, formatting, status badges.

export const dash = "—";

// Statuses that can still change on their own; while any is on screen a page keeps refreshing.
export const ACTIVE_STATUSES = new Set(["pending", "submitted", "running", "cancelling"]);
export const CANCELLABLE_STATUSES = new Set(["pending", "submitted", "running"]);

/** Create an element; `attrs` keys starting with "on" become listeners, children may be strings. */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2).toLowerCase(), value);
    else if (name === "class") node.className = value;
    else if (name === "checked" || name === "value") node[name] = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  node.append(...children.flat().filter((child) => child !== null && child !== undefined));
  return node;
}

/**
 * How an experiment's best round was chosen (the API's best_round and best_by), for a tooltip or
 * a note: the round is chosen on the validation split, and its test accuracy is what is shown.
 */
export function bestRoundNote(experiment) {
  const round = experiment?.best_round;
  if (typeof round !== "number") return "";
  if (experiment.best_by === "validation") {
    return `round ${round}, best validation accuracy (${formatPercent(experiment.best_val_accuracy)})`;
  }
  // Rounds recorded before validation splits existed: the API falls back to the last round.
  return `round ${round}, the last round: no validation metrics recorded`;
}

export function formatPercent(value, digits = 1) {
  return typeof value === "number" ? `${(value * 100).toFixed(digits)}%` : dash;
}

export function formatNumber(value, digits = 4) {
  return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : dash;
}

/** A metric value of unknown scale: few digits, no exponent for ordinary magnitudes. */
export function formatMetric(value) {
  if (typeof value !== "number" || !Number.isFinite(value)) return dash;
  const abs = Math.abs(value);
  if (abs !== 0 && (abs < 1e-3 || abs >= 1e6)) return value.toExponential(2);
  return String(Number(value.toPrecision(4)));
}

export function formatTime(iso) {
  if (!iso) return dash;
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  return date.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

/** A short date and time for tables: "Jan 10, 10:00". */
export function formatShortTime(iso) {
  if (!iso) return dash;
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  return date.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

export function formatClock(iso) {
  if (!iso) return dash;
  const date = new Date(iso);
  return Number.isNaN(date.getTime()) ? iso : date.toLocaleTimeString();
}

/** Seconds as "42 s", "3 min 05 s" or "1 h 02 min". */
export function formatDuration(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds) || seconds < 0) return dash;
  if (seconds < 60) return `${seconds < 10 ? seconds.toFixed(1) : Math.round(seconds)} s`;
  const total = Math.round(seconds);
  if (total < 3600) return `${Math.floor(total / 60)} min ${String(total % 60).padStart(2, "0")} s`;
  return `${Math.floor(total / 3600)} h ${String(Math.floor((total % 3600) / 60)).padStart(2, "0")} min`;
}

/** Seconds between two ISO times (the second defaults to now), or null. */
export function secondsBetween(startIso, endIso = null) {
  if (!startIso) return null;
  const start = new Date(startIso).getTime();
  const end = endIso ? new Date(endIso).getTime() : Date.now();
  return Number.isNaN(start) || Number.isNaN(end) ? null : Math.max(0, (end - start) / 1000);
}

/** A compact time-axis label: "45 s", "2:05", "1:02:05". */
export function formatAxisSeconds(seconds) {
  const total = Math.round(seconds);
  if (Math.abs(total) < 60) return `${total} s`;
  const pad = (n) => String(n).padStart(2, "0");
  if (total < 3600) return `${Math.floor(total / 60)}:${pad(total % 60)}`;
  return `${Math.floor(total / 3600)}:${pad(Math.floor((total % 3600) / 60))}:${pad(total % 60)}`;
}

export function formatAgo(seconds) {
  if (typeof seconds !== "number") return dash;
  return `${formatDuration(seconds)} ago`;
}

export function formatParams(params, skip = ["name"]) {
  if (!params || typeof params !== "object") return "";
  return Object.entries(params)
    .filter(([key]) => !skip.includes(key))
    .map(([key, value]) => `${key}=${nested(value)}`)
    .join(", ");
}

function nested(value) {
  if (value === null || typeof value !== "object") return String(value);
  if (Array.isArray(value)) return JSON.stringify(value);
  const inner = formatParams(value);
  return value.name ? `${value.name}${inner ? `(${inner})` : ""}` : `{${inner}}`;
}

/** The API should send a one-line message; should a Python traceback slip through, keep its last line. */
export function plainError(text) {
  const trimmed = String(text).trim();
  if (!trimmed.includes("Traceback (most recent call last)")) return trimmed;
  const lines = trimmed.split("\n").filter((line) => line.trim() !== "");
  return lines.at(-1).trim();
}

export function statusBadge(status, attrs = {}) {
  return h("span", { class: `badge status-${status}`, "data-testid": "status-badge", ...attrs }, status);
}

export function progress(experiment) {
  const { current_round: done, num_rounds: total } = experiment;
  const fraction = total > 0 ? Math.min(1, done / total) : 0;
  const bar = h("span", { class: "progress-bar", "aria-hidden": "true" }, h("span"));
  bar.firstChild.style.width = `${(fraction * 100).toFixed(1)}%`;
  // An asynchronous run counts updates; its "rounds" are aggregations, capped at num_rounds.
  const text = experiment.asynchronous ? plural(experiment.accepted_updates ?? 0, "update") : `round ${done} / ${total}`;
  const title = experiment.asynchronous ? `aggregation ${done} / ${total}` : null;
  return [h("span", { class: "progress-text", title }, text), bar];
}

/** The header counter of an experiment: rounds, or aggregations and updates when asynchronous. */
export function roundCounter(experiment) {
  const { current_round: done, num_rounds: total } = experiment;
  if (!experiment.asynchronous) return `Round ${done} / ${total}`;
  return `Aggregation ${done} / ${total} · ${plural(experiment.accepted_updates ?? 0, "update")}`;
}

function plural(count, noun) {
  return `${count} ${noun}${count === 1 ? "" : "s"}`;
}

/** Seconds the experiment has run (until now while it runs), or null before it started. */
export function experimentDuration(e) {
  if (!e.started_at) return null;
  if (e.finished_at) return secondsBetween(e.started_at, e.finished_at);
  return ACTIVE_STATUSES.has(e.status) ? secondsBetween(e.started_at) : null;
}

// Eight distinguishable colours for series of several experiments or metrics.
export const PALETTE = [
  "#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4b5563",
];

export function setApiError(message) {
  const banner = document.getElementById("api-error");
  banner.hidden = message === null;
  banner.textContent = message === null ? "" : `Cannot load data from the API: ${message}`;
}

export function setRefreshStatus(text, live = false) {
  const status = document.getElementById("refresh-status");
  status.textContent = text;
  status.classList.toggle("live", live);
}

const AXIS_CHOICES = [
  ["round", "Per round"],
  ["time", "Wall time"],
];

/** The switch of a chart's x axis; ``onChange`` gets the chosen value ("round", "time", …). */
export function axisToggle(id, current, onChange, choices = AXIS_CHOICES) {
  return h(
    "div",
    { id, class: "toggle", role: "group", "aria-label": "x axis" },
    ...choices.map(([value, label]) =>
      h(
        "button",
        {
          type: "button",
          "data-x": value,
          "aria-pressed": String(current === value),
          class: current === value ? "active" : null,
          onClick: () => onChange(value),
        },
        label,
      ),
    ),
  );
}
