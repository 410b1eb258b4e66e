// A SuperNode's state in words: the SuperLink's live view when GET /nodes could ask it,
// otherwise only when Florist last saw the node in a round.

import { formatShortTime, formatTime } from "./dom.js";

const ms = (iso) => (iso ? new Date(iso).getTime() : Number.NaN);

/** The latest of some ISO times (null ones skipped), as ISO, or null. */
export function latest(...isoTimes) {
  const times = isoTimes.map(ms).filter(Number.isFinite);
  return times.length ? new Date(Math.max(...times)).toISOString() : null;
}

/** Each node's latest dispatch, as ISO, from the log's `dispatch` events (`data.node_ids`). */
export function latestDispatches(events) {
  const byNode = new Map();
  for (const event of events) {
    if (event.kind !== "dispatch") continue;
    for (const nodeId of event.data?.node_ids ?? []) {
      byNode.set(nodeId, latest(byNode.get(nodeId), event.created_at));
    }
  }
  return byNode;
}

/**
 * Whether a node's task is out: it was sent work after its latest recorded update ended. The
 * loop records an update with the aggregation it joins, so a reply waiting for one
 * still reads as training.
 */
export function isTraining(lastDispatch, lastUpdateEnd) {
  if (!Number.isFinite(ms(lastDispatch))) return false;
  return !Number.isFinite(ms(lastUpdateEnd)) || ms(lastDispatch) > ms(lastUpdateEnd);
}

/** A time for "last seen …": the clock time today, a short date and time before. */
export function formatSeen(iso) {
  if (!iso) return "never";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  return date.toDateString() === new Date().toDateString() ? date.toLocaleTimeString() : formatShortTime(iso);
}

/**
 * How a node is connected.
 *
 * @param {object | undefined} node  its NodePublic row, if GET /nodes listed it
 * @param {string} superlink  the list's `superlink` field: "ok" when `node.status` is live
 * @returns {{state: string, label: string, title: string}} state is online, offline, left,
 *   stale, recent or unknown; label is what a badge says
 */
export function connection(node, superlink) {
  if (superlink === "ok") {
    switch (node?.status) {
      case "online":
        return { state: "online", label: "online", title: `connected to the SuperLink since ${formatTime(node.connected_at)}` };
      case "offline":
        return { state: "offline", label: "offline", title: `its heartbeat lapsed at ${formatTime(node.disconnected_at)}` };
      case "registered":
        return { state: "offline", label: "registered", title: "registered with the SuperLink, never connected" };
      case "unregistered":
        return { state: "left", label: "left", title: `left the SuperLink at ${formatTime(node.disconnected_at)}` };
      default:
        return { state: "offline", label: "not connected", title: "the SuperLink does not list this node" };
    }
  }
  const why = `the SuperLink's node list is unavailable (${superlink ?? "not loaded"}): this is only when the node was last seen in a round`;
  if (!node?.last_seen) return { state: "unknown", label: "unknown", title: why };
  return node.stale
    ? { state: "stale", label: "stale", title: why }
    : { state: "recent", label: "seen recently", title: why };
}
