// The submit form: fields for the experiment, the chosen strategy's config built from its JSON schema.

import { ApiError, createExperiment } from "./api.js";
import { h } from "./dom.js";

const DATASETS = ["digits", "synthetic"];
const PARTITIONERS = {
  iid: [],
  dirichlet: [{ key: "alpha", label: "α", default: 0.5, step: "any" }],
  shards: [{ key: "classes_per_partition", label: "classes per client", default: 2, step: 1 }],
  quantity_skew: [{ key: "alpha", label: "α", default: 0.5, step: "any" }],
  natural: [],
};
const DEFAULT_PARTITIONER = { digits: "dirichlet", synthetic: "natural" };
const MODELS = ["logreg", "mlp", "cnn"];

/** A pydantic property schema with `anyOf: [X, null]` and `$ref` resolved to X, noting nullability. */
function resolveProperty(prop, root) {
  let resolved = { ...prop };
  if (resolved.$ref) {
    const name = resolved.$ref.split("/").at(-1);
    resolved = { ...(root.$defs?.[name] ?? {}), ...resolved };
  }
  if (Array.isArray(resolved.anyOf)) {
    const options = resolved.anyOf.filter((option) => option.type !== "null");
    const nullable = options.length < resolved.anyOf.length;
    if (options.length === 1) resolved = { ...resolved, ...resolveProperty(options[0], root), nullable };
  }
  return resolved;
}

function optionList(values, selected) {
  return values.map((value) => h("option", { value, selected: value === selected }, value));
}

function field(label, path, input, help = null) {
  input.dataset.path = path;
  return h(
    "div",
    { class: "field", "data-field": path },
    h("label", { for: input.id }, label),
    input,
    help ? h("p", { class: "help" }, help) : null,
    h("p", { class: "field-error", "data-error-for": path, role: "alert", hidden: true }),
  );
}

/** One input per config property; `read()` returns the config to send (empty inputs are left out). */
function configInputs(schema) {
  const properties = schema?.properties ?? {};
  const fields = [];
  const readers = [];
  for (const [key, raw] of Object.entries(properties)) {
    const prop = resolveProperty(raw, schema);
    const id = `f-config-${key}`;
    const path = `strategy.config.${key}`;
    const label = prop.title ?? key;
    const helpParts = [prop.description, prop.default !== undefined ? `default: ${JSON.stringify(prop.default)}` : null];
    const help = helpParts.filter(Boolean).join(" · ");
    let input;
    let read;
    if (Array.isArray(prop.enum)) {
      const values = prop.enum.map(String);
      const options = optionList(values, prop.default === undefined ? null : String(prop.default));
      if (prop.nullable) options.unshift(h("option", { value: "", selected: prop.default === null }, "(none)"));
      input = h("select", { id, name: path }, ...options);
      read = () => (input.value === "" ? undefined : prop.enum[values.indexOf(input.value)]);
    } else if (prop.const !== undefined) {
      input = h("input", { id, name: path, type: "text", value: String(prop.const), readonly: true });
      read = () => undefined;
    } else if (prop.type === "boolean") {
      input = h("input", { id, name: path, type: "checkbox", checked: Boolean(prop.default) });
      read = () => input.checked;
    } else if (prop.type === "integer" || prop.type === "number") {
      input = h("input", {
        id,
        name: path,
        type: "number",
        step: prop.type === "integer" ? 1 : "any",
        value: typeof prop.default === "number" ? String(prop.default) : "",
        placeholder: prop.default === null ? "none" : null,
      });
      read = () => (input.value.trim() === "" ? undefined : Number(input.value));
    } else if (prop.type === "string") {
      input = h("input", { id, name: path, type: "text", value: prop.default ?? "" });
      read = () => (input.value === "" && prop.nullable ? undefined : input.value);
    } else {
      // Lists and objects: JSON text, checked by the server.
      input = h("input", {
        id,
        name: path,
        type: "text",
        value: prop.default === undefined || prop.default === null ? "" : JSON.stringify(prop.default),
        placeholder: "JSON",
      });
      read = () => {
        if (input.value.trim() === "") return undefined;
        try {
          return JSON.parse(input.value);
        } catch {
          return input.value; // the server answers 422 next to this field
        }
      };
    }
    fields.push(field(label, path, input, help));
    readers.push([key, read]);
  }
  const read = () => {
    const config = {};
    for (const [key, reader] of readers) {
      const value = reader();
      if (value !== undefined) config[key] = value;
    }
    return config;
  };
  return { fields, read };
}

/**
 * Where a 422 error belongs: FastAPI's `loc` (["body", "dataset", "digits", "partitioner", …])
 * walked along the body sent, skipping the union tags that are not keys of it.
 */
export function errorPath(loc, body) {
  const path = [];
  let node = body;
  for (const segment of loc.slice(loc[0] === "body" ? 1 : 0)) {
    if (node && typeof node === "object" && Object.hasOwn(node, segment)) {
      path.push(segment);
      node = node[segment];
    } else if (path.length >= 1 && path[0] === "strategy" && path.at(-1) === "config") {
      path.push(String(segment)); // an unknown config key still names its field
      break;
    }
  }
  return path.join(".");
}

/**
 * Build the submit form into `container`.
 *
 * @param {HTMLElement} container
 * @param {{data: object[]}} strategies  GET /strategies
 */
export function renderSubmitForm(container, strategies) {
  const byName = new Map(strategies.data.map((s) => [s.name, s]));
  const names = [...byName.keys()].sort();
  const initial = byName.has("fedavg") ? "fedavg" : names[0];

  const name = h("input", { id: "f-name", name: "name", type: "text", placeholder: "e.g. digits-fedavg", maxlength: 200 });
  const strategy = h("select", { id: "f-strategy", name: "strategy.name" }, ...optionList(names, initial));
  const summary = h("p", { id: "f-strategy-summary", class: "help" });
  const configBox = h("fieldset", { id: "f-strategy-config", class: "config-fields" });
  const dataset = h("select", { id: "f-dataset", name: "dataset.name" }, ...optionList(DATASETS, "digits"));
  const partitioner = h("select", { id: "f-partitioner", name: "dataset.partitioner.name" }, ...optionList(Object.keys(PARTITIONERS), "dirichlet"));
  const partitionerParams = h("div", { id: "f-partitioner-params", class: "inline-fields" });
  const model = h("select", { id: "f-model", name: "model.name" }, ...optionList(MODELS, "mlp"));
  const rounds = h("input", { id: "f-rounds", name: "rounds", type: "number", min: 1, step: 1, value: "5" });
  const minClients = h("input", { id: "f-min-clients", name: "clients.min", type: "number", min: 1, step: 1, value: "2" });
  const submit = h("button", { id: "submit-button", type: "submit", class: "primary" }, "Submit experiment");
  const message = h("div", { id: "form-message", role: "alert", hidden: true });

  let config = { fields: [], read: () => ({}) };
  let paramReaders = [];

  function showStrategy() {
    const plugin = byName.get(strategy.value);
    summary.textContent = plugin?.summary ?? "";
    config = configInputs(plugin?.config_schema ?? {});
    configBox.replaceChildren(
      h("legend", {}, `${strategy.value} settings`),
      ...(config.fields.length ? config.fields : [h("p", { class: "muted" }, "Nothing to configure.")]),
    );
  }

  function showPartitioner() {
    paramReaders = [];
    const inputs = PARTITIONERS[partitioner.value].map((param) => {
      const input = h("input", {
        id: `f-partitioner-${param.key}`,
        name: `dataset.partitioner.${param.key}`,
        type: "number",
        step: param.step,
        value: String(param.default),
      });
      paramReaders.push([param.key, input]);
      return field(param.label, `dataset.partitioner.${param.key}`, input);
    });
    partitionerParams.replaceChildren(...inputs);
  }

  strategy.addEventListener("change", showStrategy);
  partitioner.addEventListener("change", showPartitioner);
  dataset.addEventListener("change", () => {
    partitioner.value = DEFAULT_PARTITIONER[dataset.value];
    showPartitioner();
  });

  const form = h(
    "form",
    { id: "submit-form", novalidate: true, "aria-label": "Submit an experiment" },
    h(
      "div",
      { class: "form-grid" },
      field("Name", "name", name),
      field("Strategy", "strategy.name", strategy),
      field("Dataset", "dataset.name", dataset),
      field("Partitioner", "dataset.partitioner.name", partitioner),
      partitionerParams,
      field("Model", "model.name", model),
      field("Rounds", "rounds", rounds),
      field("Min clients", "clients.min", minClients),
    ),
    summary,
    configBox,
    h("div", { class: "form-actions" }, submit, message),
  );

  function body() {
    const partitionerSpec = { name: partitioner.value };
    for (const [key, input] of paramReaders) {
      if (input.value.trim() !== "") partitionerSpec[key] = Number(input.value);
    }
    const number = (input) => (input.value.trim() === "" ? null : Number(input.value));
    return {
      name: name.value.trim() || `${dataset.value}-${strategy.value}`,
      strategy: { name: strategy.value, config: config.read() },
      dataset: { name: dataset.value, partitioner: partitionerSpec },
      model: { name: model.value },
      rounds: number(rounds),
      clients: { min: number(minClients) },
    };
  }

  function clearErrors() {
    for (const el of form.querySelectorAll(".field-error")) {
      el.hidden = true;
      el.textContent = "";
    }
    for (const el of form.querySelectorAll(".field.invalid")) el.classList.remove("invalid");
    message.hidden = true;
    message.className = "";
  }

  function showErrors(details, sent) {
    const general = [];
    for (const detail of details) {
      const path = errorPath(detail.loc ?? [], sent);
      const target = findErrorSlot(form, path);
      const text = String(detail.msg ?? "invalid").replace(/^Value error, /, "");
      if (target === null) {
        general.push(path ? `${path}: ${text}` : text);
        continue;
      }
      target.hidden = false;
      target.textContent = target.textContent ? `${target.textContent}; ${text}` : text;
      target.closest(".field")?.classList.add("invalid");
    }
    message.hidden = false;
    message.className = "banner banner-error";
    message.textContent = general.length
      ? `The experiment was not submitted: ${general.join("; ")}`
      : "The experiment was not submitted: fix the fields marked in red.";
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    const sent = body();
    submit.disabled = true;
    submit.textContent = "Submitting…";
    try {
      const created = await createExperiment(sent);
      message.hidden = false;
      message.className = "banner banner-info";
      message.textContent = `Experiment ${created.id} submitted.`;
      window.location.assign(`/experiments/${created.id}`);
    } catch (err) {
      if (err instanceof ApiError && err.status === 422 && err.details.length) showErrors(err.details, sent);
      else {
        message.hidden = false;
        message.className = "banner banner-error";
        message.textContent = `Could not submit: ${err.message}`;
      }
    } finally {
      submit.disabled = false;
      submit.textContent = "Submit experiment";
    }
  });

  showStrategy();
  showPartitioner();
  container.replaceChildren(form);
}

/** The error slot of the field named by `path`, or of the nearest field under or above it. */
function findErrorSlot(form, path) {
  if (!path) return null;
  const slots = [...form.querySelectorAll(".field-error")];
  let prefix = path;
  while (prefix) {
    const exact = slots.find((slot) => slot.dataset.errorFor === prefix);
    if (exact) return exact;
    const below = slots.find((slot) => slot.dataset.errorFor.startsWith(`${prefix}.`));
    if (below) return below;
    prefix = prefix.includes(".") ? prefix.slice(0, prefix.lastIndexOf(".")) : "";
  }
  return null;
}
