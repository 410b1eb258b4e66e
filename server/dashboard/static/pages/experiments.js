// The experiments page: every experiment with its progress, a submit form, and picks for Compare.

import { cancelExperiment, listExperiments, listStrategies, listWorkloads } from "../api.js";
import {
  ACTIVE_STATUSES,
  CANCELLABLE_STATUSES,
  bestRoundNote,
  dash,
  experimentDuration,
  formatDuration,
  formatPercent,
  formatShortTime,
  h,
  progress,
  setApiError,
  setRefreshStatus,
  statusBadge,
} from "../dom.js";
import { renderSubmitForm } from "../form.js";

const ACTIVE_POLL_MS = 2000;
// When nothing runs, still look now and then, so experiments started elsewhere show up.
const IDLE_POLL_MS = 10000;
const COLUMNS = 12;

export function mountExperimentsPage() {
  const section = document.getElementById("experiments-section");
  section.hidden = false;
  const state = { experiments: [], count: 0, loaded: false, picked: new Set(), message: null };
  let timer = null;
  let renderedKey = null;

  const compareButton = document.getElementById("compare-button");
  compareButton.addEventListener("click", () => {
    const ids = [...state.picked].sort((a, b) => a - b);
    window.location.assign(`/compare?ids=${ids.join(",")}`);
  });

  Promise.all([listStrategies(), listWorkloads()])
    .then(([strategies, workloads]) => renderSubmitForm(document.getElementById("submit-form-box"), strategies, workloads))
    .catch((err) => {
      document.getElementById("submit-form-box").replaceChildren(
        h("p", { class: "banner banner-error" }, `Cannot load the strategies and workloads: ${err.message}`),
      );
    });

  async function refresh() {
    window.clearTimeout(timer);
    try {
      const list = await listExperiments();
      state.experiments = list.data;
      state.count = list.count;
      state.loaded = true;
      setApiError(null);
      const live = state.experiments.some((e) => ACTIVE_STATUSES.has(e.status));
      setRefreshStatus(`${live ? "● live · " : ""}updated ${new Date().toLocaleTimeString()}`, live);
    } catch (err) {
      setApiError(err.message);
    }
    render();
    const live = state.experiments.some((e) => ACTIVE_STATUSES.has(e.status));
    timer = window.setTimeout(refresh, live ? ACTIVE_POLL_MS : IDLE_POLL_MS);
  }

  async function onCancel(id) {
    try {
      await cancelExperiment(id);
      state.message = { kind: "info", text: `Cancellation of experiment ${id} requested.` };
    } catch (err) {
      state.message = {
        kind: "error",
        text: err.status === 409 ? `Experiment ${id} has already finished.` : `Could not cancel: ${err.message}`,
      };
    }
    refresh();
  }

  function updateCompare() {
    const n = state.picked.size;
    compareButton.disabled = n === 0;
    compareButton.textContent = n === 0 ? "Compare" : `Compare ${n}`;
  }

  function render() {
    const message = document.getElementById("list-message");
    message.hidden = state.message === null;
    if (state.message) {
      message.className = `banner banner-${state.message.kind}`;
      message.textContent = state.message.text;
    }
    updateCompare();
    // Durations of running experiments change every second; the key includes the minute only.
    const key = JSON.stringify([state.experiments, state.loaded, [...state.picked]]);
    if (key === renderedKey) return;
    renderedKey = key;
    const body = document.getElementById("experiments-body");
    if (!state.loaded) return; // still the static "Loading…" row
    if (state.experiments.length === 0) {
      body.replaceChildren(
        h("tr", {}, h("td", { colspan: COLUMNS, class: "empty" }, "No experiments yet. Submit one with the form below, the CLI or the API.")),
      );
    } else {
      body.replaceChildren(...[...state.experiments].sort((a, b) => b.id - a.id).map(row));
    }
    const countNote = document.getElementById("experiments-count");
    countNote.hidden = state.count <= state.experiments.length;
    countNote.textContent = `Showing ${state.experiments.length} of ${state.count} experiments.`;
  }

  function row(e) {
    const open = () => window.location.assign(`/experiments/${e.id}`);
    const pick = h("input", {
      type: "checkbox",
      class: "pick",
      "data-testid": "compare-pick",
      "aria-label": `Compare experiment ${e.id}`,
      checked: state.picked.has(e.id),
      onClick: (event) => event.stopPropagation(),
      onChange: (event) => {
        if (event.target.checked) state.picked.add(e.id);
        else state.picked.delete(e.id);
        updateCompare();
      },
    });
    const cancel = CANCELLABLE_STATUSES.has(e.status)
      ? h(
          "button",
          {
            type: "button",
            class: "danger small",
            "data-testid": "row-cancel",
            onClick: (event) => {
              event.stopPropagation();
              onCancel(e.id);
            },
          },
          "Cancel",
        )
      : null;
    return h(
      "tr",
      {
        "data-testid": "experiment-row",
        "data-experiment-id": e.id,
        tabindex: 0,
        onClick: open,
        onKeydown: (event) => {
          if (event.target === event.currentTarget && (event.key === "Enter" || event.key === " ")) {
            event.preventDefault();
            open();
          }
        },
      },
      h("td", { class: "pick-cell" }, pick),
      h("td", { class: "num" }, String(e.id)),
      h(
        "td",
        { class: "name" },
        h("a", { href: `/experiments/${e.id}`, onClick: (ev) => ev.stopPropagation() }, e.name),
        // A Flower app run with `flwr run`, not submitted here: it has no Florist spec.
        e.source === "external"
          ? [" ", h("span", { class: "badge", "data-testid": "external-badge", title: `${e.app ?? "a Flower app"}, run with flwr run` }, "external")]
          : null,
        // Virtual clients on Flower's Simulation Engine (docs/simulation.md).
        e.mode === "simulation"
          ? [" ", h("span", { class: "badge", "data-testid": "simulation-badge", title: `${e.clients?.virtual ?? "?"} virtual clients, ${e.clients?.per_round ?? "?"} a round` }, "simulation")]
          : null,
      ),
      h("td", {}, statusBadge(e.status)),
      h("td", {}, e.strategy?.name ?? dash),
      h("td", {}, e.workload?.name ?? dash),
      h("td", { "data-testid": "progress" }, ...progress(e)),
      h("td", { class: "num", "data-testid": "best-accuracy", title: bestRoundNote(e) || null }, formatPercent(e.best_accuracy)),
      h("td", { class: "time" }, formatShortTime(e.started_at ?? e.created_at)),
      h("td", { class: "num", "data-testid": "duration" }, formatDuration(experimentDuration(e))),
      h("td", { class: "error-cell", title: e.error ?? "" }, e.status === "failed" && e.error ? "⚠" : ""),
      h("td", {}, cancel),
    );
  }

  refresh();
}
