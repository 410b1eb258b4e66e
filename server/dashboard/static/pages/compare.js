// Compare: accuracy curves of several experiments on one chart, against round or wall time.

import { getExperiment, listRounds } from "../api.js";
import { renderLineChart } from "../chart.js";
import {
  ACTIVE_STATUSES,
  PALETTE,
  bestRoundNote,
  axisToggle,
  dash,
  experimentDuration,
  formatAxisSeconds,
  formatDuration,
  formatPercent,
  h,
  secondsBetween,
  setApiError,
  setRefreshStatus,
  statusBadge,
} from "../dom.js";

const POLL_MS = 2000;

/** The ids in `?ids=1,2,3`, in order, without duplicates; anything not an integer is reported. */
export function parseIds(search) {
  const raw = new URLSearchParams(search).get("ids") ?? "";
  const parts = raw.split(",").map((part) => part.trim()).filter(Boolean);
  return { ids: [...new Set(parts.filter((p) => /^\d+$/.test(p)))], invalid: parts.filter((p) => !/^\d+$/.test(p)) };
}

export function mountComparePage() {
  const section = document.getElementById("compare-section");
  section.hidden = false;
  const { ids, invalid } = parseIds(window.location.search);
  const state = { xAxis: "round", loaded: [], missing: [...invalid] };
  let timer = null;

  async function load(id) {
    try {
      const [experiment, rounds] = await Promise.all([getExperiment(id), listRounds(id)]);
      return { experiment, rounds: rounds.data };
    } catch (err) {
      if (err.status === 404) return { missing: id };
      throw err;
    }
  }

  async function refresh() {
    window.clearTimeout(timer);
    try {
      const results = await Promise.all(ids.map(load));
      state.loaded = results.filter((r) => r.experiment);
      state.missing = [...invalid, ...results.filter((r) => r.missing).map((r) => r.missing)];
      setApiError(null);
    } catch (err) {
      setApiError(err.message);
    }
    const live = state.loaded.some((r) => ACTIVE_STATUSES.has(r.experiment.status));
    setRefreshStatus(`${live ? "● live · " : ""}updated ${new Date().toLocaleTimeString()}`, live);
    render();
    if (live) timer = window.setTimeout(refresh, POLL_MS);
  }

  function render() {
    const body = document.getElementById("compare-body");
    if (ids.length === 0 && invalid.length === 0) {
      body.replaceChildren(
        h("p", { id: "compare-empty", class: "banner banner-info" }, "Pick experiments on the ", h("a", { href: "/" }, "Experiments page"), " (the checkboxes), then press Compare."),
      );
      return;
    }
    const missing = state.missing.length
      ? h(
          "p",
          { id: "compare-missing", class: "banner banner-warning", role: "alert" },
          `Not found: ${state.missing.map((id) => `experiment ${id}`).join(", ")}`,
        )
      : null;
    const chart = h("div", { id: "compare-chart", class: "chart-box", "data-testid": "compare-chart" });
    const series = state.loaded.map(({ experiment: e, rounds }, index) => {
      const t0 = e.started_at ?? rounds[0]?.started_at;
      return {
        name: `exp-${e.id}`,
        label: `#${e.id} ${e.name} (${e.strategy?.name ?? dash})`,
        color: PALETTE[index % PALETTE.length],
        points: rounds
          .map((r) => ({
            // Virtual time exists only for runs on the virtual clock; others drop out of that view.
            x:
              state.xAxis === "round"
                ? r.server_round
                : state.xAxis === "virtual"
                  ? r.virtual_time_s
                  : secondsBetween(t0, r.finished_at),
            y: r.metrics?.accuracy,
            round: r.server_round,
          }))
          .filter((p) => typeof p.x === "number" && typeof p.y === "number"),
      };
    });
    const maxRounds = Math.max(1, ...state.loaded.map((r) => r.experiment.num_rounds));
    renderLineChart(chart, {
      title: "Test accuracy of the compared experiments",
      xLabel: { round: "round", time: "wall time since start", virtual: "virtual time since start" }[
        state.xAxis
      ],
      yLabel: "test accuracy",
      xDomain: state.xAxis === "round" ? [0, maxRounds] : [0, 1],
      xInteger: state.xAxis === "round",
      formatX: state.xAxis === "round" ? String : formatAxisSeconds,
      xTicks: state.xAxis === "round" ? 8 : 6,
      pointLabel: state.xAxis === "round" ? undefined : (x, p) => `Round ${p.round} at ${formatDuration(x)}`,
      yDomain: [0, 1],
      formatY: (y) => formatPercent(y),
      formatTick: (y) => formatPercent(y, 0),
      emptyText: "No evaluated rounds yet",
      series,
    });
    // The chart draws a legend only for two or more plotted series; the table below names them all.
    const toggle = axisToggle(
      "compare-x-toggle",
      state.xAxis,
      (value) => {
        state.xAxis = value;
        render();
      },
      [
        ["round", "Per round"],
        ["time", "Wall time"],
        ["virtual", "Virtual time"],
      ],
    );
    const rows = state.loaded.map(({ experiment: e, rounds }, index) =>
      h(
        "tr",
        { "data-testid": "compare-row", "data-experiment-id": e.id },
        h("td", {}, h("span", { class: "swatch swatch-line", style: `background:${PALETTE[index % PALETTE.length]}` })),
        h("td", { class: "num" }, String(e.id)),
        h("td", { class: "name" }, h("a", { href: `/experiments/${e.id}` }, e.name)),
        h("td", {}, statusBadge(e.status)),
        h("td", {}, e.strategy?.name ?? dash),
        h("td", {}, e.workload?.name ?? dash),
        h("td", { class: "num" }, `${e.current_round} / ${e.num_rounds}`),
        h("td", { class: "num", "data-testid": "best-accuracy", title: bestRoundNote(e) || null }, formatPercent(e.best_accuracy)),
        h("td", { class: "num" }, formatPercent(rounds.at(-1)?.metrics?.accuracy)),
        h("td", { class: "num" }, formatDuration(experimentDuration(e))),
      ),
    );
    const table = h(
      "table",
      { id: "compare-table" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          ...["", "ID", "Name", "Status", "Strategy", "Workload", "Rounds", "Test acc., best round (by validation)", "Last test accuracy", "Duration"].map((label, i) =>
            h("th", { scope: "col", class: [1, 6, 7, 8, 9].includes(i) ? "num" : null }, label),
          ),
        ),
      ),
      h("tbody", {}, ...rows),
    );
    body.replaceChildren(
      ...[
        missing,
        h("div", { class: "panel-head" }, h("h3", {}, "Test accuracy"), toggle),
        h("figure", { class: "wide-figure" }, chart),
        h("div", { class: "table-scroll" }, table),
      ].filter(Boolean),
    );
  }

  render();
  refresh();
}
