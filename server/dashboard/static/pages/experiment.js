// One experiment, live: a server-sent event stream feeds the charts, the timeline and the tables.

import { cancelExperiment, eventsUrl, getExperiment, listLog, listNodes, resumeExperiment } from "../api.js";
import { renderLineChart } from "../chart.js";
import {
  ACTIVE_STATUSES,
  CANCELLABLE_STATUSES,
  PALETTE,
  bestRoundNote,
  axisToggle,
  dash,
  experimentDuration,
  formatAxisSeconds,
  formatClock,
  formatDuration,
  formatMetric,
  formatNumber,
  formatParams,
  formatPercent,
  formatTime,
  h,
  plainError,
  roundCounter,
  secondsBetween,
  setApiError,
  setRefreshStatus,
  statusBadge,
} from "../dom.js";
import { connection, formatSeen, isTraining, latest, latestDispatches } from "../nodestate.js";
import { attackBadge } from "./nodes.js";
import { GROUP_KINDS, groupsPanel } from "./groups.js";
import { renderTimeline, taskSpan } from "../timeline.js";

// While the experiment runs, how often the clients' connections (GET /nodes) and the runtime's
// decisions (GET …/log) are asked for.
const NODES_POLL_MS = 10000;
// The log's kinds this page reads: work sent (for "training"), the policies' decisions and
// FedCompass's arrival groups.
const LOG_KINDS = ["dispatch", "policy", ...GROUP_KINDS];
const COLORS = { accuracy: "#2563eb", valAccuracy: "#16a34a", loss: "#dc2626", valLoss: "#9333ea", trainLoss: "#d97706" };
// Round metrics the server records (test split, and validation split where the dataset has one);
// anything else a strategy recorded gets its own chart.
const CORE_METRICS = new Set(["accuracy", "loss", "val-accuracy", "val-loss"]);
// Train metrics every client reports, and the runtime's own timing: not the strategy's.
const CORE_TRAIN_METRICS = new Set([
  "train-loss", "train-accuracy", "num-examples", "train-time", "local-steps", "virtual-duration", "wall-duration",
]);

export function mountExperimentPage(id) {
  const section = document.getElementById("experiment-detail");
  section.hidden = false;
  const state = {
    experiment: null,
    notFound: false,
    rounds: new Map(), // server_round -> RoundPublic
    updates: [],
    nodes: new Map(), // node_id -> NodePublic
    superlink: null, // GET /nodes' word on the SuperLink: "ok" when the nodes' status is live
    log: [], // EventPublic of LOG_KINDS, by id
    xAxis: "round",
    cancelInFlight: false,
    actionMessage: null,
    streamState: "connecting", // connecting | live | reconnecting | ended | closed
  };
  let source = null;
  let frame = null;

  const scheduleRender = () => {
    if (frame === null) frame = window.requestAnimationFrame(() => {
      frame = null;
      render();
    });
  };

  async function start() {
    render();
    // Ids are integers; anything else cannot exist, and the API would answer 422 rather than 404.
    if (!/^\d+$/.test(id)) {
      state.notFound = true;
      render();
      return;
    }
    try {
      state.experiment = await getExperiment(id);
    } catch (err) {
      if (err.status === 404) state.notFound = true;
      else setApiError(err.message);
      render();
      return;
    }
    pollNodes();
    connect();
    render();
  }

  function loadNodes() {
    listNodes()
      .then((nodes) => {
        state.nodes = new Map(nodes.data.map((n) => [n.node_id, n]));
        state.superlink = nodes.superlink ?? null;
        scheduleRender();
      })
      .catch(() => {}); // the clients table reads "—" for the profile; the banner is for the stream
  }

  /** The log's events after the last one held; a late answer adds only what is still new. */
  function loadLog() {
    listLog(id, { kinds: LOG_KINDS, after: state.log.at(-1)?.id ?? 0 })
      .then((events) => {
        const after = state.log.at(-1)?.id ?? 0;
        const fresh = events.data.filter((event) => event.id > after);
        if (fresh.length === 0) return;
        state.log = [...state.log, ...fresh];
        scheduleRender();
      })
      .catch(() => {}); // without the log the clients table cannot say "training"; nothing else is lost
  }

  /** Nodes and the log now, and again every NODES_POLL_MS while the experiment runs. */
  function pollNodes() {
    loadNodes();
    loadLog();
    const e = state.experiment;
    if (e !== null && ACTIVE_STATUSES.has(e.status) && state.streamState !== "ended") {
      window.setTimeout(pollNodes, NODES_POLL_MS);
    }
  }

  function connect() {
    source = new EventSource(eventsUrl(id));
    source.addEventListener("open", () => {
      state.streamState = "live";
      setApiError(null);
      scheduleRender();
    });
    source.addEventListener("status", (event) => {
      state.experiment = JSON.parse(event.data);
      scheduleRender();
    });
    source.addEventListener("round", (event) => {
      const round = JSON.parse(event.data);
      state.rounds.set(round.server_round, round);
      scheduleRender();
    });
    source.addEventListener("update", (event) => {
      state.updates.push(JSON.parse(event.data));
      scheduleRender();
    });
    source.addEventListener("end", () => {
      // The experiment has finished: close, or EventSource would reconnect for ever.
      source.close();
      state.streamState = "ended";
      loadNodes();
      loadLog();
      scheduleRender();
    });
    source.addEventListener("error", () => {
      if (state.streamState === "ended") return;
      // EventSource retries by itself, resuming from the last event id it saw.
      state.streamState = source.readyState === EventSource.CLOSED ? "closed" : "reconnecting";
      if (state.streamState === "closed") setApiError("the live stream was closed; reload the page to reconnect");
      scheduleRender();
    });
  }

  async function onCancel() {
    state.cancelInFlight = true;
    state.actionMessage = null;
    render();
    try {
      state.experiment = await cancelExperiment(id);
      state.actionMessage = { kind: "info", text: `Cancellation of experiment ${id} requested.` };
    } catch (err) {
      state.actionMessage = {
        kind: "error",
        text: err.status === 409 ? `Experiment ${id} has already finished.` : `Could not cancel: ${err.message}`,
      };
    }
    state.cancelInFlight = false;
    render();
  }

  async function onResume() {
    state.cancelInFlight = true;
    state.actionMessage = null;
    render();
    try {
      await resumeExperiment(id);
      // A new run goes on from the last committed round: follow it from the start.
      window.location.reload();
      return;
    } catch (err) {
      state.actionMessage = { kind: "error", text: `Could not resume: ${err.message}` };
    }
    state.cancelInFlight = false;
    render();
  }

  // ------------------------------------------------------------ rendering

  function render() {
    const e = state.experiment;
    const live = e !== null && ACTIVE_STATUSES.has(e.status) && state.streamState === "live";
    const streamText = {
      connecting: "connecting…",
      live: "● live",
      reconnecting: "reconnecting…",
      ended: "finished",
      closed: "disconnected",
    }[state.streamState];
    setRefreshStatus(e === null ? "" : `${streamText} · updated ${new Date().toLocaleTimeString()}`, live);
    const back = h("a", { href: "/", class: "back-link", "data-testid": "back-link" }, "← All experiments");

    if (state.notFound) {
      document.title = "Florist · not found";
      section.replaceChildren(
        back,
        h("p", { id: "not-found", class: "banner banner-warning", role: "alert" }, `Experiment ${id} not found`),
      );
      return;
    }
    if (e === null) {
      section.replaceChildren(back, h("p", { class: "muted" }, `Loading experiment ${id}…`));
      return;
    }
    document.title = `Florist · #${e.id} ${e.name}`;
    const rounds = [...state.rounds.values()].sort((a, b) => a.server_round - b.server_round);
    // A round's event reaches the page just before the status that counts it: the counter never
    // lags what the chart already draws.
    const counted = {
      ...e,
      current_round: Math.max(e.current_round, rounds.at(-1)?.server_round ?? 0),
      accepted_updates: Math.max(e.accepted_updates ?? 0, state.updates.filter((u) => u.status === "accepted").length),
    };
    const compareLink = h("a", { href: `/compare?ids=${e.id}`, class: "button-link", id: "compare-link" }, "Compare…");
    const parts = [
      back,
      h(
        "div",
        { class: "detail-header" },
        h("h2", { id: "detail-title" }, `#${e.id} · ${e.name}`),
        statusBadge(e.status, { id: "detail-status" }),
        e.mode === "simulation"
          ? h("span", { class: "badge", "data-testid": "simulation-badge", title: "virtual clients on Flower's Simulation Engine" }, `simulation · ${e.clients?.virtual ?? "?"} virtual, ${e.clients?.per_round ?? "?"} a round`)
          : null,
        h("span", { id: "round-counter", class: "round-counter" }, roundCounter(counted)),
        h("span", { id: "stream-state", class: `stream-state stream-${state.streamState}` }, streamText),
        h("span", { class: "spacer" }),
        compareLink,
        // Every recorded round keeps its model until the retention policy drops it; the latest
        // (the final model of a finished run) always stays.
        counted.current_round > 0 && e.source !== "external"
          ? h(
              "a",
              { href: `/api/v1/experiments/${e.id}/model`, download: "", class: "button-link", id: "download-model", title: "The latest global model, as safetensors" },
              "Download model",
            )
          : null,
        CANCELLABLE_STATUSES.has(e.status)
          ? h(
              "button",
              { id: "cancel-button", type: "button", class: "danger", disabled: state.cancelInFlight, onClick: onCancel },
              state.cancelInFlight ? "Cancelling…" : "Cancel",
            )
          : null,
        e.status === "failed" && e.source !== "external"
          ? h(
              "button",
              {
                id: "resume-button",
                type: "button",
                disabled: state.cancelInFlight,
                onClick: onResume,
                title: "Submit it again: a new run goes on from the last committed round",
              },
              state.cancelInFlight ? "Resuming…" : "Resume",
            )
          : null,
      ),
      state.actionMessage
        ? h("p", { id: "action-message", class: `banner banner-${state.actionMessage.kind}` }, state.actionMessage.text)
        : null,
      e.error
        ? h(
            "div",
            { id: "error-message", class: "banner banner-error", role: "alert" },
            h("strong", {}, e.status === "failed" ? "Failed: " : "Error: "),
            h("span", { class: "error-text" }, plainError(e.error)),
          )
        : null,
      facts(e),
      chartsPanel(e, rounds),
      queriesPanel(rounds),
      strategyPanels(e, rounds),
      h("h3", {}, "Client timeline"),
      h("div", { id: "client-timeline", "data-testid": "client-timeline", class: "timeline-box" }),
      h("h3", {}, "Clients"),
      clientsTable(),
      groupsPanel(state.log),
      decisionsPanel(),
      h("h3", {}, "Rounds"),
      roundsTable(rounds),
    ];
    section.replaceChildren(...parts.filter((part) => part !== null));
    renderTimeline(section.querySelector("#client-timeline"), state.updates, rounds);
  }

  function facts(e) {
    const rows = [
      ["Strategy", e.strategy?.name, formatParams(e.strategy?.config, [])],
      // The workload's config as the API stored it, whatever its fields (model, partitioner, …).
      ["Workload", e.workload?.name, formatParams(e.workload?.config)],
      ["Clients", e.clients ? `min ${e.clients.min}` : dash],
      ["Best round (by validation)", bestRoundNote(e) || dash, "", "best-round"],
      ["Test accuracy, best round", formatPercent(e.best_accuracy), "", "best-accuracy"],
      ["Created", formatTime(e.created_at)],
      ["Started", formatTime(e.started_at)],
      ["Finished", formatTime(e.finished_at)],
      ["Duration", formatDuration(experimentDuration(e)), "", "duration"],
    ];
    if (e.resumes > 0) {
      // Each resume is a new run that took over from the last committed round.
      rows.push(["Resumed", `${e.resumes} time${e.resumes === 1 ? "" : "s"}`, "", "resumes"]);
    }
    return h(
      "dl",
      { class: "facts" },
      ...rows.flatMap(([label, value, extra, testid]) => [
        h("dt", {}, label),
        h(
          "dd",
          { "data-testid": testid ? `detail-${testid}` : null },
          value ?? dash,
          extra ? h("span", { class: "params" }, ` ${extra}`) : null,
        ),
      ]),
    );
  }

  /** x of a round: its number, or seconds from the run's start to its aggregation. */
  function xOf(round, t0) {
    if (state.xAxis === "round") return round.server_round;
    return secondsBetween(t0, round.finished_at);
  }

  function axisSpec(e, rounds) {
    const t0 = e.started_at ?? rounds[0]?.started_at ?? null;
    if (state.xAxis === "round") return { t0, xLabel: "round", xDomain: [0, e.num_rounds], xInteger: true };
    return {
      t0,
      xLabel: "wall time since start",
      xDomain: [0, 1],
      xInteger: false,
      formatX: formatAxisSeconds,
      xTicks: 6,
      pointLabel: (x, p) => `Round ${p.round} at ${formatDuration(x)}`,
    };
  }

  function points(rounds, t0, pick) {
    return rounds
      .map((r) => ({ x: xOf(r, t0), y: pick(r), round: r.server_round }))
      .filter((p) => typeof p.x === "number" && typeof p.y === "number" && Number.isFinite(p.y));
  }

  /** The validation curve of `key`, or nothing for runs recorded without a validation split. */
  function validationSeries(rounds, axis, key, label, color) {
    const found = points(rounds, axis.t0, (r) => r.metrics?.[key]);
    return found.length ? [{ name: key, label, color, points: found }] : [];
  }

  function chartsPanel(e, rounds) {
    const axis = axisSpec(e, rounds);
    const accuracyChart = h("div", { id: "accuracy-chart", class: "chart-box", "data-testid": "accuracy-chart" });
    const lossChart = h("div", { id: "loss-chart", class: "chart-box", "data-testid": "loss-chart" });
    renderLineChart(accuracyChart, {
      ...axis,
      title: "Accuracy per round",
      yLabel: "accuracy",
      yDomain: [0, 1],
      formatY: (y) => formatPercent(y),
      formatTick: (y) => formatPercent(y, 0),
      emptyText: "No evaluated rounds yet",
      series: [
        {
          name: "accuracy",
          label: "Test accuracy (server eval)",
          color: COLORS.accuracy,
          points: points(rounds, axis.t0, (r) => r.metrics?.accuracy),
        },
        ...validationSeries(rounds, axis, "val-accuracy", "Validation accuracy (server eval)", COLORS.valAccuracy),
      ],
    });
    renderLineChart(lossChart, {
      ...axis,
      title: "Loss per round",
      yLabel: "loss",
      yDomain: [0, 0],
      formatY: (y) => formatNumber(y),
      formatTick: (y) => String(y),
      emptyText: "No evaluated rounds yet",
      series: [
        { name: "loss", label: "Test loss (server eval)", color: COLORS.loss, points: points(rounds, axis.t0, (r) => r.metrics?.loss) },
        ...validationSeries(rounds, axis, "val-loss", "Validation loss (server eval)", COLORS.valLoss),
        {
          name: "train-loss",
          label: "Train loss (clients)",
          color: COLORS.trainLoss,
          points: points(rounds, axis.t0, (r) => r.train_metrics?.["train-loss"]),
        },
      ],
    });
    const toggle = axisToggle("x-axis-toggle", state.xAxis, (value) => {
      state.xAxis = value;
      render();
    });
    return h(
      "div",
      {},
      h("div", { class: "panel-head" }, h("h3", {}, "Accuracy and loss"), toggle),
      h(
        "div",
        { class: "charts" },
        h("figure", {}, h("figcaption", {}, "Accuracy"), accuracyChart),
        h("figure", {}, h("figcaption", {}, "Loss"), lossChart),
      ),
    );
  }

  /**
   * Zeroth-order runs (FedZO, FZooS: rounds whose train metrics count `zoo-queries`): the objective
   * against the federation's cumulative function queries, the budget these methods are compared on.
   */
  function queriesPanel(rounds) {
    if (!rounds.some((r) => typeof r.train_metrics?.["zoo-queries"] === "number")) return null;
    const sorted = [...rounds].sort((a, b) => a.server_round - b.server_round);
    let total = 0;
    const before = new Map(); // round -> queries spent before it
    const after = new Map(); // round -> queries spent up to and including it
    for (const r of sorted) {
      before.set(r.server_round, total);
      total += r.train_metrics?.["zoo-queries"] ?? 0;
      after.set(r.server_round, total);
    }
    const at = (where, pick) =>
      sorted
        .map((r) => ({ x: where.get(r.server_round), y: pick(r), round: r.server_round }))
        .filter((p) => typeof p.y === "number" && Number.isFinite(p.y));
    const box = h("div", { id: "queries-chart", class: "chart-box", "data-testid": "queries-chart" });
    const series = [
      // The server's objective F of the round's new model, after the round's queries.
      { name: "objective", label: "Objective F (server eval)", color: COLORS.loss, points: at(after, (r) => r.metrics?.objective) },
      // Each client's f_i at the model it was sent, averaged: F of the previous round's model.
      {
        name: "zoo-objective",
        label: "Clients' objective at the model sent (mean)",
        color: COLORS.trainLoss,
        points: at(before, (r) => r.train_metrics?.["zoo-objective"]),
      },
    ];
    const held = at(after, (r) => r.metrics?.["val-objective"]);
    if (held.length) series.push({ name: "val-objective", label: "Objective on held-out data", color: COLORS.valLoss, points: held });
    renderLineChart(box, {
      title: "Objective against function queries",
      xLabel: "function queries (all clients, cumulative)",
      yLabel: "objective",
      xDomain: [0, Math.max(total, 1)],
      xInteger: false,
      formatX: (x) => formatMetric(x),
      xTicks: 6,
      pointLabel: (x, p) => `Round ${p.round} after ${Math.round(x)} queries`,
      yDomain: [0, 0],
      formatY: formatMetric,
      formatTick: formatMetric,
      emptyText: "No round recorded yet",
      series,
    });
    return h(
      "div",
      { id: "queries-panel" },
      h("h3", {}, "Objective against queries"),
      h("div", { class: "charts" }, h("figure", {}, h("figcaption", {}, `${Math.round(total)} queries so far`), box)),
    );
  }

  /** A small chart for every metric beyond the core ones, in rounds' metrics or train_metrics. */
  function strategyPanels(e, rounds) {
    const extra = [];
    const seen = new Set();
    for (const r of rounds) {
      for (const [source, core] of [
        ["metrics", CORE_METRICS],
        ["train_metrics", CORE_TRAIN_METRICS],
      ]) {
        for (const [key, value] of Object.entries(r[source] ?? {})) {
          const id = `${source}:${key}`;
          if (core.has(key) || seen.has(id) || typeof value !== "number") continue;
          seen.add(id);
          extra.push({ source, key });
        }
      }
    }
    if (extra.length === 0) return null;
    const axis = axisSpec(e, rounds);
    const figures = extra.map(({ source, key }, index) => {
      const box = h("div", {
        id: `metric-chart-${key}`,
        class: "chart-box",
        "data-testid": "strategy-chart",
        "data-metric": key,
      });
      renderLineChart(box, {
        ...axis,
        height: 200,
        title: key,
        yLabel: key,
        formatY: formatMetric,
        formatTick: formatMetric,
        series: [{ name: key, label: key, color: PALETTE[(index + 2) % PALETTE.length], points: points(rounds, axis.t0, (r) => r[source]?.[key]) }],
      });
      const where = source === "metrics" ? "server" : "clients";
      return h("figure", {}, h("figcaption", {}, key, h("span", { class: "muted" }, ` (${where})`)), box);
    });
    return h(
      "div",
      { id: "strategy-panels" },
      h("h3", {}, `What ${e.strategy?.name ?? "the strategy"} records`),
      h("div", { class: "charts small-charts" }, ...figures),
    );
  }

  function clientsTable() {
    const dispatches = latestDispatches(state.log);
    const byNode = new Map();
    for (const u of state.updates) {
      const list = byNode.get(u.node_id) ?? [];
      list.push(u);
      byNode.set(u.node_id, list);
    }
    // A node sent its first task has no update yet, but is training.
    for (const nodeId of dispatches.keys()) if (!byNode.has(nodeId)) byNode.set(nodeId, []);
    const head = h(
      "thead",
      {},
      h(
        "tr",
        {},
        ...["Node", "Updates", "Accepted", "Local steps", "Mean staleness", "Mean train time", "Now", "Last seen", "Last update", "Device profile"].map((label, i) =>
          h("th", { scope: "col", class: i >= 1 && i <= 5 ? "num" : null }, label),
        ),
      ),
    );
    const body = h("tbody");
    if (byNode.size === 0) {
      body.append(h("tr", {}, h("td", { colspan: 10, class: "empty" }, "No client has been sent work yet.")));
    }
    for (const [nodeId, list] of [...byNode.entries()].sort((a, b) => (BigInt(a[0]) < BigInt(b[0]) ? -1 : 1))) {
      const accepted = list.filter((u) => u.status === "accepted");
      // How the scheduler treated the node: the local steps its aggregated updates ran (assigned
      // by FedCompass, drawn by AFA, fixed otherwise) and how stale they were on arrival.
      const steps = accepted.map((u) => u.local_steps).filter((k) => typeof k === "number");
      const stepsText = steps.length === 0 ? dash : Math.min(...steps) === Math.max(...steps) ? String(steps[0]) : `${Math.min(...steps)}–${Math.max(...steps)}`;
      const stale = accepted.map((u) => u.staleness).filter((k) => typeof k === "number");
      const staleText = stale.length === 0 ? dash : formatMetric(stale.reduce((a, b) => a + b, 0) / stale.length);
      const times = list.map((u) => u.train_time_s).filter((t) => typeof t === "number");
      const mean = times.length ? times.reduce((a, b) => a + b, 0) / times.length : null;
      const last = list.length ? list.reduce((a, b) => (taskSpan(b).end >= taskSpan(a).end ? b : a)) : null;
      const lastEnd = last === null ? null : new Date(taskSpan(last).end).toISOString();
      const now = currentStatus(nodeId, lastEnd, dispatches.get(nodeId));
      const config = state.nodes.get(nodeId)?.node_config ?? {};
      const profile = config.profile ?? config["device-profile"] ?? null;
      const profileText = profile ?? (Object.keys(config).length ? formatParams(config, []) : dash);
      body.append(
        h(
          "tr",
          { "data-testid": "client-row", "data-node": nodeId },
          h("td", { class: "mono" }, nodeId, attackBadge(config)),
          h("td", { class: "num" }, String(list.length)),
          h("td", { class: "num" }, String(accepted.length)),
          h("td", { class: "num", "data-testid": "client-steps" }, stepsText),
          h("td", { class: "num", "data-testid": "client-staleness" }, staleText),
          h("td", { class: "num" }, mean === null ? dash : `${mean.toFixed(2)} s`),
          h(
            "td",
            {},
            h("span", { class: `badge status-${now.state}`, "data-testid": "client-status", "data-state": now.state, title: now.title }, now.text),
          ),
          h("td", { class: "time" }, formatClock(lastEnd)),
          h("td", {}, last === null ? dash : statusBadge(last.status, { "data-testid": "last-update-status", title: last.reason ?? "" })),
          h("td", { class: "params" }, String(profileText)),
        ),
      );
    }
    return h("div", { class: "table-scroll" }, h("table", { id: "clients-table", "data-testid": "clients-table" }, head, body));
  }

  /**
   * What a client is doing now, as far as the records tell. A task's update is recorded only when
   * its reply arrives (or the server gives up on it), but the log's `dispatch` events say when
   * work left: while the experiment runs, a node sent work after its latest update is
   * "training" (unless the SuperLink says it is gone), another connected one "online"; once the
   * experiment has finished, a connected node is "idle".
   */
  function currentStatus(nodeId, lastUpdateEnd, lastDispatch) {
    const node = state.nodes.get(nodeId);
    const c = connection(node, state.superlink);
    const seen = formatSeen(latest(node?.last_seen, c.state === "online" ? null : node?.disconnected_at, lastUpdateEnd));
    const gone = c.state === "offline" || c.state === "left";
    if (state.experiment.status === "running" && !gone && isTraining(lastDispatch, lastUpdateEnd)) {
      return { state: "training", text: "training", title: `sent work at ${formatClock(lastDispatch)}, no reply recorded since` };
    }
    if (c.state === "online") {
      return ACTIVE_STATUSES.has(state.experiment.status)
        ? { state: "online", text: "online", title: `${c.title}; no work sent since its latest update` }
        : { state: "idle", text: "idle", title: `${c.title}; this experiment has no task left to run` };
    }
    if (c.state === "offline") return { state: "offline", text: `offline (last seen ${seen})`, title: c.title };
    if (c.state === "left") return { state: "left", text: `left (last seen ${seen})`, title: c.title };
    // The SuperLink could not be asked: only when the node was last heard from is known.
    return { state: "unknown", text: `last seen ${seen}`, title: c.title };
  }

  /** The policies' decisions (the log's `policy` events), newest first. */
  function decisionsPanel() {
    const decisions = state.log.filter((event) => event.kind === "policy").reverse();
    const columns = ["Time", "Node", "Action", "Reason"];
    const head = h("thead", {}, h("tr", {}, ...columns.map((label) => h("th", { scope: "col" }, label))));
    const body = h("tbody");
    if (decisions.length === 0) {
      body.append(h("tr", {}, h("td", { colspan: columns.length, class: "empty" }, "No policy decision recorded.")));
    }
    for (const event of decisions) {
      const data = event.data ?? {};
      body.append(
        h(
          "tr",
          { "data-testid": "decision-row", "data-event": event.id, title: event.message },
          h("td", { class: "time" }, formatClock(event.created_at)),
          h("td", { class: "mono" }, data.node_id ?? dash),
          h("td", {}, data.action ?? dash),
          // A round's decision has no reason of its own: its message says what was decided.
          h("td", {}, data.reason ?? event.message),
        ),
      );
    }
    const table = h("table", { id: "decisions-table", "data-testid": "decisions-table" }, head, body);
    return h(
      "div",
      { id: "decisions", "data-testid": "decisions" },
      h("h3", {}, "Decisions"),
      h("div", { class: "table-scroll rounds-scroll" }, table),
    );
  }

  function roundsTable(rounds) {
    const columns = ["Round", "Test accuracy", "Val. accuracy", "Test loss", "Train loss", "Duration", "Updates", "Rejected", "Failures"];
    const head = h("thead", {}, h("tr", {}, ...columns.map((label) => h("th", { scope: "col", class: "num" }, label))));
    const body = h("tbody");
    if (rounds.length === 0) {
      body.append(h("tr", {}, h("td", { colspan: columns.length, class: "empty" }, "No rounds recorded yet.")));
    }
    for (const r of rounds) {
      body.append(
        h(
          "tr",
          { "data-testid": "round-row", "data-round": r.server_round },
          h("td", { class: "num" }, String(r.server_round)),
          h("td", { class: "num" }, formatPercent(r.metrics?.accuracy)),
          h("td", { class: "num" }, formatPercent(r.metrics?.["val-accuracy"])),
          h("td", { class: "num" }, formatNumber(r.metrics?.loss)),
          h("td", { class: "num" }, formatNumber(r.train_metrics?.["train-loss"])),
          h("td", { class: "num" }, formatDuration(r.duration_s)),
          h("td", { class: "num" }, String(r.num_updates ?? dash)),
          h("td", { class: "num" }, String(r.num_rejected ?? dash)),
          h("td", { class: "num" }, String(r.num_failures ?? dash)),
        ),
      );
    }
    const table = h("table", { id: "rounds-table", "data-testid": "rounds-table" }, head, body);
    return h("div", { class: "table-scroll rounds-scroll" }, table);
  }

  start();
}
