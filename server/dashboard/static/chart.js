// A small SVG line chart: numeric x (rounds or seconds), one or more series, one <circle> per point.

const SVG_NS = "http://www.w3.org/2000/svg";
const WIDTH = 560;
const DEFAULT_HEIGHT = 260;
const MARGIN = { top: 14, right: 18, bottom: 42, left: 58 };

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  node.append(...children);
  return node;
}

/**
 * Round numbers that cover [min, max] in about `count` steps (1, 2 or 5 times a power of ten).
 * With `integer`, the step is at least 1 (x axes count rounds).
 */
export function niceTicks(min, max, count = 5, { integer = false } = {}) {
  if (!(max > min)) {
    // A single value: give it some room so it is not drawn on the frame.
    const pad = min === 0 ? 1 : Math.abs(min) * 0.1;
    [min, max] = [min - (integer ? 1 : pad), max + (integer ? 1 : pad)];
  }
  const rough = (max - min) / count;
  const magnitude = 10 ** Math.floor(Math.log10(rough));
  const ratio = rough / magnitude;
  let step = magnitude * (ratio >= 7.5 ? 10 : ratio >= 3.5 ? 5 : ratio >= 1.5 ? 2 : 1);
  if (integer) step = Math.max(1, Math.round(step));
  const start = Math.floor(min / step) * step;
  const stop = Math.ceil(max / step) * step;
  const ticks = [];
  for (let i = 0; start + i * step <= stop + step / 2; i += 1) {
    // toPrecision trims float noise such as 0.30000000000000004.
    ticks.push(Number((start + i * step).toPrecision(12)));
  }
  return { min: start, max: stop, ticks };
}

function extent(values) {
  return [Math.min(...values), Math.max(...values)];
}

/**
 * Draw a line chart into `container`, replacing what it held.
 *
 * @param {HTMLElement} container
 * @param {object} spec
 * @param {{name: string, label: string, color: string, points: {x: number, y: number}[]}[]} spec.series
 * @param {string} spec.title  accessible name of the chart
 * @param {string} spec.xLabel
 * @param {string} spec.yLabel
 * @param {[number, number]} [spec.xDomain]  at least this x range (e.g. 0 to the planned rounds)
 * @param {[number, number]} [spec.yDomain]  at least this y range (e.g. 0 to 1 for accuracy)
 * @param {(y: number) => string} [spec.formatY]  for point tooltips
 * @param {(y: number) => string} [spec.formatTick]  for y-axis labels; defaults to formatY
 * @param {string} [spec.emptyText]
 * @param {boolean} [spec.xInteger]  x counts rounds (the default); false for a continuous x such as time
 * @param {(x: number) => string} [spec.formatX]  for x-axis labels and tooltips; defaults to String
 * @param {(x: number) => string} [spec.pointLabel]  tooltip prefix of a point; defaults to "Round x"
 * @param {number} [spec.xTicks]  about how many x ticks (8)
 * @param {number} [spec.height]  view-box height, for smaller charts
 */
export function renderLineChart(container, spec) {
  const { series, title, xLabel, yLabel, formatY = String, emptyText = "No data yet" } = spec;
  const formatTick = spec.formatTick ?? formatY;
  const formatX = spec.formatX ?? String;
  const pointLabel = spec.pointLabel ?? ((x) => `Round ${x}`);
  const HEIGHT = spec.height ?? DEFAULT_HEIGHT;
  const plotted = series.filter((s) => s.points.length > 0);
  const root = svg("svg", {
    viewBox: `0 0 ${WIDTH} ${HEIGHT}`,
    class: "chart",
    role: "img",
    "aria-label": title,
  });
  const left = MARGIN.left;
  const right = WIDTH - MARGIN.right;
  const top = MARGIN.top;
  const bottom = HEIGHT - MARGIN.bottom;

  if (plotted.length === 0) {
    root.append(
      svg("rect", { x: left, y: top, width: right - left, height: bottom - top, class: "chart-frame" }),
      svg("text", { x: (left + right) / 2, y: (top + bottom) / 2, class: "chart-empty" }, emptyText),
    );
    container.replaceChildren(root);
    return;
  }

  const xs = plotted.flatMap((s) => s.points.map((p) => p.x));
  const ys = plotted.flatMap((s) => s.points.map((p) => p.y));
  const [xMin, xMax] = extent([...xs, ...(spec.xDomain ?? [])]);
  const [yMin, yMax] = extent([...ys, ...(spec.yDomain ?? [])]);
  const xAxis = niceTicks(xMin, xMax, spec.xTicks ?? 8, { integer: spec.xInteger ?? true });
  const yAxis = niceTicks(yMin, yMax, 5);
  const scaleX = (x) => left + ((x - xAxis.min) / (xAxis.max - xAxis.min)) * (right - left);
  const scaleY = (y) => bottom - ((y - yAxis.min) / (yAxis.max - yAxis.min)) * (bottom - top);

  const grid = svg("g", { class: "chart-grid" });
  for (const tick of yAxis.ticks) {
    const y = scaleY(tick);
    grid.append(
      svg("line", { x1: left, x2: right, y1: y, y2: y }),
      svg("text", { x: left - 8, y, class: "tick-y" }, formatTick(tick)),
    );
  }
  for (const tick of xAxis.ticks) {
    const x = scaleX(tick);
    grid.append(
      svg("line", { x1: x, x2: x, y1: bottom, y2: bottom + 5 }),
      svg("text", { x, y: bottom + 18, class: "tick-x" }, formatX(tick)),
    );
  }
  root.append(
    grid,
    svg("line", { x1: left, x2: right, y1: bottom, y2: bottom, class: "chart-axis" }),
    svg("line", { x1: left, x2: left, y1: top, y2: bottom, class: "chart-axis" }),
    svg("text", { x: (left + right) / 2, y: HEIGHT - 6, class: "axis-label" }, xLabel),
    svg(
      "text",
      {
        x: 0,
        y: 0,
        class: "axis-label",
        transform: `translate(14 ${(top + bottom) / 2}) rotate(-90)`,
      },
      yLabel,
    ),
  );

  for (const s of plotted) {
    const points = [...s.points].sort((a, b) => a.x - b.x);
    const d = points
      .map((p, i) => `${i === 0 ? "M" : "L"}${scaleX(p.x).toFixed(1)} ${scaleY(p.y).toFixed(1)}`)
      .join(" ");
    const group = svg("g", { class: "chart-series", "data-series": s.name });
    group.append(svg("path", { d, stroke: s.color, class: "series-line" }));
    for (const p of points) {
      group.append(
        svg(
          "circle",
          {
            cx: scaleX(p.x).toFixed(1),
            cy: scaleY(p.y).toFixed(1),
            r: 3.5,
            fill: s.color,
            "data-series": s.name,
            "data-round": p.round ?? p.x,
          },
          svg("title", {}, `${pointLabel(p.x, p)} · ${s.label}: ${formatY(p.y)}`),
        ),
      );
    }
    root.append(group);
  }

  const children = [root];
  if (plotted.length > 1) {
    const legend = document.createElement("ul");
    legend.className = "chart-legend";
    legend.dataset.testid = "chart-legend";
    for (const s of plotted) {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = s.color;
      item.append(swatch, s.label);
      legend.append(item);
    }
    children.push(legend);
  }
  container.replaceChildren(...children);
}
