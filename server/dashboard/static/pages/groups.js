// FedCompass's arrival groups, from its `fedcompass-assign` and `fedcompass-aggregate` events.

import { dash, formatAxisSeconds, h } from "../dom.js";

export const GROUP_KINDS = ["fedcompass-assign", "fedcompass-aggregate"];
// A long run opens a group every few aggregations: the newest are the ones worth reading.
const SHOWN_GROUPS = 50;

/** A time on the experiment's clock (seconds since it started), or "—" when not known. */
function at(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return dash;
  return Math.abs(seconds) < 60 ? `${seconds.toFixed(1)} s` : formatAxisSeconds(seconds);
}

/**
 * The groups the log describes, by id: when each opened, its expected and latest arrival times
 * (as last announced), who was sent work in it with how many local steps, and when it aggregated
 * with which of its members back in time.
 */
export function arrivalGroups(log) {
  const groups = new Map();
  const group = (gid) => {
    if (!groups.has(gid)) {
      groups.set(gid, { gid, openedAt: null, expectedAt: null, latestAt: null, members: [], aggregatedAt: null, back: [], late: [] });
    }
    return groups.get(gid);
  };
  for (const event of log) {
    const data = event.data ?? {};
    if (event.kind === "fedcompass-assign") {
      for (const g of data.groups ?? []) {
        const entry = group(g.group);
        entry.openedAt ??= data.time_s ?? null;
        entry.expectedAt = g.expected_at ?? null;
        entry.latestAt = g.latest_at ?? null;
      }
      for (const a of data.assignments ?? []) {
        const entry = group(a.group);
        entry.openedAt ??= data.time_s ?? null;
        entry.members.push({ nodeId: String(a.node_id), steps: a.local_steps });
      }
    } else if (event.kind === "fedcompass-aggregate") {
      const late = new Set((data.late ?? []).map(String));
      for (const gid of data.groups ?? []) {
        const entry = group(gid);
        entry.aggregatedAt = data.time_s ?? null;
        const members = new Set(entry.members.map((m) => m.nodeId));
        entry.back = (data.nodes ?? []).map(String).filter((n) => members.has(n) && !late.has(n));
        // Late updates from earlier groups were merged into this aggregation.
        entry.late = [...late];
      }
    }
  }
  return [...groups.values()].sort((a, b) => a.gid - b.gid);
}

/** The arrival-groups table, newest group first; null when the run has no groups. */
export function groupsPanel(log) {
  const groups = arrivalGroups(log);
  if (groups.length === 0) return null;
  const columns = ["Group", "Opened", "Expected back", "Latest", "Members (node × local steps)", "Aggregated", "Back in time", "Late merged"];
  const head = h("thead", {}, h("tr", {}, ...columns.map((label) => h("th", { scope: "col" }, label))));
  const body = h("tbody");
  const shown = groups.slice(-SHOWN_GROUPS).reverse();
  for (const g of shown) {
    const back = new Set(g.back);
    const members = g.members.map((m) =>
      h(
        "span",
        { class: `chip${g.aggregatedAt !== null && !back.has(m.nodeId) ? " chip-missed" : ""}`, "data-testid": "group-member", title: `node ${m.nodeId}: ${m.steps} local steps` },
        `${m.nodeId} × ${m.steps}`,
      ),
    );
    body.append(
      h(
        "tr",
        { "data-testid": "group-row", "data-group": g.gid, "data-state": g.aggregatedAt === null ? "open" : "aggregated" },
        h("td", { class: "mono" }, String(g.gid)),
        h("td", {}, at(g.openedAt)),
        // Unknown until a member's speed is measured: the first group waits for everyone.
        h("td", { "data-testid": "group-expected" }, g.expectedAt === null ? "when all are back" : at(g.expectedAt)),
        h("td", { "data-testid": "group-latest" }, at(g.latestAt)),
        h("td", {}, h("div", { class: "chips" }, ...members)),
        h("td", { "data-testid": "group-aggregated" }, g.aggregatedAt === null ? "open" : at(g.aggregatedAt)),
        h("td", { class: "num" }, g.aggregatedAt === null ? dash : String(g.back.length)),
        h("td", { class: "num" }, g.aggregatedAt === null ? dash : String(g.late.length)),
      ),
    );
  }
  const hidden = groups.length - shown.length;
  return h(
    "div",
    { id: "arrival-groups", "data-testid": "arrival-groups" },
    h("h3", {}, "Arrival groups"),
    h(
      "p",
      { class: "muted" },
      "FedCompass sends each client the local steps that bring it back with an open group; a group aggregates when all its members are back, or at its latest time with those who are. Times are on the experiment's clock.",
      hidden > 0 ? ` The ${hidden} oldest groups are not shown.` : "",
    ),
    h("div", { class: "table-scroll rounds-scroll" }, h("table", { id: "groups-table" }, head, body)),
  );
}
