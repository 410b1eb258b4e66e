// The nodes page: every SuperNode the server has heard from, its node config and health.

import { listNodes } from "../api.js";
import { formatAgo, formatParams, formatTime, h, setApiError, setRefreshStatus } from "../dom.js";

const POLL_MS = 5000;

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
    document.getElementById("nodes-note").textContent =
      `A node is stale when it has not been heard from for ${Math.round(nodes.stale_after_s)} s. ` +
      "Nodes are heard from when they take part in a round.";
    if (nodes.data.length === 0) {
      body.replaceChildren(
        h("tr", {}, h("td", { colspan: 5, class: "empty" }, "No SuperNode has reported yet: nodes appear once they take part in a round.")),
      );
      return;
    }
    body.replaceChildren(
      ...nodes.data.map((n) =>
        h(
          "tr",
          { "data-testid": "node-row", "data-node": n.node_id },
          h("td", { class: "mono" }, n.node_id),
          h(
            "td",
            {},
            h("span", { class: `badge ${n.stale ? "status-stale" : "status-online"}`, "data-testid": "node-health" }, n.stale ? "stale" : "online"),
          ),
          h("td", { class: "time" }, formatAgo(n.seconds_since_seen)),
          h("td", { class: "time" }, formatTime(n.first_seen)),
          h("td", { class: "params" }, Object.keys(n.node_config).length ? formatParams(n.node_config, []) : "—"),
        ),
      ),
    );
  }

  refresh();
}
