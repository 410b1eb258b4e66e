// The client timeline: a Gantt-style SVG, one row per node, one bar per task from dispatch to arrival.

import { formatAxisSeconds, formatDuration } from "./dom.js";

const SVG_NS = "http://www.w3.org/2000/svg";
const WIDTH = 1100;
const LABEL_W = 150;
const ROW_H = 24;
const TOP = 22;
const BOTTOM = 30;
const RIGHT = 24;

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  node.append(...children);
  return node;
}

const ms = (iso) => (iso ? new Date(iso).getTime() : Number.NaN);

/**
 * When a task left and came back, in ms since the epoch. Older rows have no dispatch time: the
 * task then ends when it was recorded and started its (wall, else training) duration earlier.
 */
export function taskSpan(update) {
  const end = Number.isFinite(ms(update.arrived_at)) ? ms(update.arrived_at) : ms(update.created_at);
  let start = ms(update.dispatched_at);
  if (!Number.isFinite(start)) {
    const seconds = update.wall_duration_s ?? update.train_time_s ?? 0;
    start = end - seconds * 1000;
  }
  return { start, end: Math.max(start, end) };
}

/** Fresh updates blue, then amber and red as they grow staler. */
export function stalenessColor(staleness) {
  if (!staleness) return "#2563eb";
  if (staleness === 1) return "#f59e0b";
  if (staleness === 2) return "#ea580c";
  return "#b91c1c";
}

function compareNodeIds(a, b) {
  // uint64 ids as strings: compare as BigInt so 9 sorts before 10.
  const [x, y] = [BigInt(a), BigInt(b)];
  return x < y ? -1 : x > y ? 1 : 0;
}

/**
 * Draw the timeline into `container`.
 *
 * @param {HTMLElement} container
 * @param {object[]} updates  UpdatePublic rows
 * @param {object[]} rounds  RoundPublic rows, for the round boundaries
 */
export function renderTimeline(container, updates, rounds) {
  if (updates.length === 0) {
    container.replaceChildren(
      Object.assign(document.createElement("p"), {
        className: "muted empty-note",
        textContent: "No client tasks recorded yet.",
      }),
    );
    return;
  }
  const nodes = [...new Set(updates.map((u) => u.node_id))].sort(compareNodeIds);
  const spans = updates.map((u) => ({ update: u, ...taskSpan(u) }));
  const t0 = Math.min(...spans.map((s) => s.start));
  const t1 = Math.max(...spans.map((s) => s.end), ...rounds.map((r) => ms(r.finished_at)).filter(Number.isFinite));
  const span = Math.max(t1 - t0, 1000);
  const height = TOP + nodes.length * ROW_H + BOTTOM;
  const scaleX = (t) => LABEL_W + ((t - t0) / span) * (WIDTH - LABEL_W - RIGHT);
  const root = svg("svg", {
    viewBox: `0 0 ${WIDTH} ${height}`,
    class: "timeline",
    role: "img",
    "aria-label": "Client timeline: one row per node, one bar per task",
  });

  // Time ticks: about eight, in whole seconds.
  const step = [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1800, 3600].find((s) => (span / 1000) / s <= 8) ?? 7200;
  const axis = svg("g", { class: "chart-grid" });
  for (let s = 0; s * 1000 <= span; s += step) {
    const x = scaleX(t0 + s * 1000);
    axis.append(
      svg("line", { x1: x, x2: x, y1: TOP, y2: height - BOTTOM }),
      svg("text", { x, y: height - BOTTOM + 16, class: "tick-x" }, formatAxisSeconds(s)),
    );
  }
  root.append(axis);

  // Round boundaries: when each round was aggregated.
  for (const r of rounds) {
    const t = ms(r.finished_at);
    if (!Number.isFinite(t)) continue;
    const x = scaleX(t);
    root.append(
      svg("line", { x1: x, x2: x, y1: TOP - 4, y2: height - BOTTOM, class: "round-mark" }),
      svg("text", { x, y: TOP - 8, class: "round-mark-label" }, `R${r.server_round}`),
    );
  }

  nodes.forEach((node, row) => {
    const y = TOP + row * ROW_H;
    root.append(
      svg("rect", { x: 0, y, width: WIDTH, height: ROW_H, class: row % 2 ? "row-odd" : "row-even" }),
      svg("text", { x: LABEL_W - 10, y: y + ROW_H / 2, class: "node-label" }, shortNode(node)),
    );
  });

  for (const { update: u, start, end } of spans) {
    const row = nodes.indexOf(u.node_id);
    const y = TOP + row * ROW_H + 4;
    const x = scaleX(start);
    const width = Math.max(3, scaleX(end) - x);
    const failed = u.status === "failed";
    const rejected = u.status === "rejected";
    const color = stalenessColor(u.staleness);
    const bar = svg("rect", {
      x: x.toFixed(1),
      y,
      width: width.toFixed(1),
      height: ROW_H - 8,
      rx: 3,
      class: `task-bar task-${u.status}`,
      fill: failed ? "#fee2e2" : rejected ? "#e5e7eb" : color,
      stroke: failed ? "#b91c1c" : rejected ? "#6b7280" : color,
      "data-testid": "task-bar",
      "data-node": u.node_id,
      "data-round": u.server_round,
      "data-status": u.status,
      "data-staleness": u.staleness,
    });
    const lines = [
      `Node ${u.node_id} · round ${u.server_round} · ${u.status}`,
      `${formatDuration((end - start) / 1000)}, staleness ${u.staleness}`,
    ];
    if (u.local_steps !== null && u.local_steps !== undefined) lines.push(`${u.local_steps} local steps`);
    if (u.reason) lines.push(u.reason);
    bar.append(svg("title", {}, lines.join("\n")));
    root.append(bar);
    if (failed || rejected) {
      root.append(
        svg("text", { x: (x + width / 2).toFixed(1), y: y + (ROW_H - 8) / 2, class: `task-mark task-mark-${u.status}` }, failed ? "✕" : "!"),
      );
    }
  }

  const legend = document.createElement("ul");
  legend.className = "chart-legend";
  legend.id = "timeline-legend";
  const items = [
    ["#2563eb", "fresh (staleness 0)"],
    ["#f59e0b", "staleness 1"],
    ["#ea580c", "staleness 2"],
    ["#b91c1c", "staleness ≥ 3"],
    ["#e5e7eb", "rejected (!)"],
    ["#fee2e2", "failed (✕)"],
  ];
  for (const [color, label] of items) {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch swatch-box";
    swatch.style.background = color;
    item.append(swatch, label);
    legend.append(item);
  }
  container.replaceChildren(root, legend);
}

/** Long uint64 ids shortened for the row label; the full id is in the tooltip and the clients table. */
export function shortNode(nodeId) {
  return nodeId.length > 12 ? `…${nodeId.slice(-10)}` : nodeId;
}
