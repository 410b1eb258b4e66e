// The nodes page: every SuperNode the SuperLink lists and every one the server recorded in a
// round, with its connection, when it was last seen and its node config; below them the public
// keys registered for SuperNode authentication (GET /node-keys) and the node each one admits.

import { listNodes } from "../api.js";
import { dash, formatAgo, formatParams, formatTime, h, setApiError, setRefreshStatus } from "../dom.js";
import { connection } from "../nodestate.js";

const POLL_MS = 5000;
const COLUMNS = 6;
const KEY_COLUMNS = 5;

/** GET /node-keys: {data, supernode_auth, superlink}, or {denied} for a 401/403 (admins only). */
async function listNodeKeys() {
  const response = await fetch("/api/v1/node-keys", { cache: "no-store", headers: { Accept: "application/json" } });
  if (response.status === 401 || response.status === 403) return { denied: true, data: [] };
  // A server without the route (an older one behind this page): no keys section at all.
  if (response.status === 404) return { missing: true, data: [] };
  if (!response.ok) throw new Error(`node keys: HTTP ${response.status}`);
  return response.json();
}

/** The keys' section, made once under the nodes table (the page's HTML predates it). */
function keysSection() {
  let section = document.getElementById("node-keys-section");
  if (section) return section;
  section = h(
    "div",
    { id: "node-keys-section" },
    h("h3", { id: "node-keys-heading" }, "Registered SuperNode keys"),
    h("p", { class: "muted", "data-testid": "node-keys-auth" }),
    h(
      "div",
      { class: "table-scroll" },
      h(
        "table",
        { "data-testid": "node-keys-table", "aria-labelledby": "node-keys-heading" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            ...["Name", "Fingerprint", "Node", "Connection", "Added"].map((t) => h("th", { scope: "col" }, t)),
          ),
        ),
        h("tbody", { id: "node-keys-body" }),
      ),
    ),
  );
  document.getElementById("nodes-section").append(section);
  return section;
}

function renderKeys(keys) {
  const section = keysSection();
  const note = section.querySelector('[data-testid="node-keys-auth"]');
  const body = document.getElementById("node-keys-body");
  if (keys.denied) {
    note.textContent = "Registered keys are shown to admins.";
    body.replaceChildren();
    return;
  }
  note.textContent = keys.supernode_auth
    ? "SuperNode authentication is on: the SuperLink admits only registered keys (florist node add)."
    : "SuperNode authentication is off: any SuperNode may connect. Registered keys take effect when the SuperLink runs with it (florist server --secure).";
  if (keys.data.length === 0) {
    body.replaceChildren(h("tr", {}, h("td", { colspan: KEY_COLUMNS, class: "empty" }, "No key is registered.")));
    return;
  }
  body.replaceChildren(
    ...keys.data.map((k) => {
      const c = connection(k.node, keys.superlink);
      return h(
        "tr",
        { "data-testid": "node-key-row", "data-key": String(k.id) },
        h("td", { "data-testid": "node-key-name" }, k.name),
        h("td", { class: "mono", "data-testid": "node-key-fingerprint", title: k.public_key }, k.fingerprint),
        h("td", { class: "mono", "data-testid": "node-key-node" }, k.node_id),
        h("td", {}, h("span", { class: `badge status-${c.state}`, "data-testid": "node-key-status", title: c.title }, c.label)),
        h("td", { class: "time" }, formatTime(k.added_at)),
      );
    }),
  );
}

/** The key a node authenticated with, by its node id (keys are registered as one node each). */
function keyBadge(keysByNode, nodeId) {
  const key = keysByNode.get(nodeId);
  if (!key) return null;
  return h("span", { class: "badge", style: "margin-left: 0.4rem", "data-testid": "node-key-badge", title: key.fingerprint }, `key: ${key.name}`);
}

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
      // A failing key listing must not hide the nodes: it is reported, and they are drawn.
      const [nodes, keys] = await Promise.all([listNodes(), listNodeKeys().catch((err) => ({ error: err, data: [] }))]);
      setApiError(keys.error ? keys.error.message : null);
      setRefreshStatus(`updated ${new Date().toLocaleTimeString()}`);
      const keysByNode = new Map(keys.data.map((k) => [k.node_id, k]));
      render(nodes, keysByNode);
      if (!keys.error && !keys.missing) renderKeys(keys);
    } catch (err) {
      setApiError(err.message);
    }
    window.setTimeout(refresh, POLL_MS);
  }

  function render(nodes, keysByNode) {
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
          h("td", { class: "mono" }, n.node_id, attackBadge(n.node_config), keyBadge(keysByNode, n.node_id)),
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
