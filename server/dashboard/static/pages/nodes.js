// The nodes page: every SuperNode the SuperLink lists and every one the server recorded in a
// round, with its connection, when it was last seen and its node config.

import { listNodes } from "../api.js";
import { dash, formatAgo, formatParams, formatTime, h, setApiError, setRefreshStatus } from "../dom.js";
import { connection } from "../nodestate.js";

const POLL_MS = 5000;
const COLUMNS = 6;

/** A node whose node-config sets an attack (client/attacks.py) is marked as an attacker. */
export function attackBadge(config) {
  const attack = config?.attack;
  if (!attack || attack === "none") return null;
  const strength = config["attack-strength"];
  const text = strength === undefined ? `attacker: ${attack}` : `attacker: ${attack} ×${strength}`;
  return h("span", { class: "badge status-failed attack", "data-testid": "node-attack", title: "Byzantine attack set by this node's node-config" }, text);
}

export function mountNodesPage() {
  const section = document.getElementById("nodes-section");
  section.hidden = false;

  async function refresh() {
    try {
      const nodes = await listNodes();
      setApiError(null);
      setRefreshStatus(`updated ${new Date().toLocaleTimeString()}`);
      render(nodes);
    } catch (err) {
      setApiError(err.message);
    }
    window.setTimeout(refresh, POLL_MS);
  }

  function render(nodes) {
    const body = document.getElementById("nodes-body");
    const live = nodes.superlink === "ok";
    const staleNote = `A node is stale when it has not taken part in a round for ${Math.round(nodes.stale_after_s)} s.`;
    document.getElementById("nodes-note").textContent = live
      ? "Connection is the SuperLink's live view: online while the SuperNode's heartbeat comes in. " +
        "Last seen is the last round a node took part in."
      : `The SuperLink's node list is unavailable (${nodes.superlink}): only nodes that took part in a round ` +
        `are listed, and their health is when they last did. ${staleNote}`;
    if (nodes.data.length === 0) {
      const text = live
        ? "No SuperNode is connected to the SuperLink."
        : "No SuperNode has reported yet: nodes appear once they take part in a round.";
      body.replaceChildren(h("tr", {}, h("td", { colspan: COLUMNS, class: "empty" }, text)));
      return;
    }
    body.replaceChildren(
      ...nodes.data.map((n) => {
        const c = connection(n, nodes.superlink);
        const since = c.state === "online" ? n.connected_at : n.disconnected_at;
        return h(
          "tr",
          { "data-testid": "node-row", "data-node": n.node_id, "data-state": c.state },
          h("td", { class: "mono" }, n.node_id, attackBadge(n.node_config)),
          h(
            "td",
            {},
            h("span", { class: `badge status-${c.state}`, "data-testid": "node-health", title: c.title }, c.label),
          ),
          h("td", { class: "time", "data-testid": "node-since" }, live && since ? formatTime(since) : dash),
          h("td", { class: "time", "data-testid": "node-last-seen" }, n.last_seen ? formatAgo(n.seconds_since_seen) : "never"),
          h("td", { class: "time" }, formatTime(n.first_seen)),
          h("td", { class: "params" }, Object.keys(n.node_config).length ? formatParams(n.node_config, []) : dash),
        );
      }),
    );
  }

  refresh();
}
