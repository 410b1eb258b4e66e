// The submit form: the experiment's own fields, then the chosen strategy's and the chosen
// workload's configs, both built by one renderer from the JSON schemas the API serves
// (GET /strategies, GET /workloads). Nothing here names a workload, dataset, partitioner or model:
// plugins come and go, and the form follows their schemas.

import { ApiError, createExperiment } from "./api.js";
import { h } from "./dom.js";

// Past this nesting depth a property is edited as JSON text: a recursive schema must not
// unfold forever, and no real config nests this deep.
const MAX_DEPTH = 6;

/** The schema a local `$ref` ("#/$defs/Name") points at inside `root` ({} if it points nowhere). */
function deref(ref, root) {
  // pydantic emits local refs only; anything else is left to the server to judge.
  if (typeof ref !== "string" || !ref.startsWith("#/")) return {};
  let node = root;
  for (const part of ref.slice(2).split("/")) {
    node = node?.[part.replaceAll("~1", "/").replaceAll("~0", "~")];
  }
  return node && typeof node === "object" ? node : {};
}

/**
 * A property schema with `$ref` (and a one-element `allOf`, pydantic's older way of adding a
 * description to a ref) resolved, and `anyOf: [X, null]` reduced to X, noting nullability. The
 * property's own keys (title, description, default) win over the referenced schema's.
 */
function resolveProperty(prop, root, seen = 0) {
  let resolved = { ...prop };
  if (seen > MAX_DEPTH) return resolved;
  if (Array.isArray(resolved.allOf) && resolved.allOf.length === 1) {
    const { allOf, ...own } = resolved;
    resolved = { ...resolveProperty(allOf[0], root, seen + 1), ...own };
  }
  if (resolved.$ref) {
    const { $ref, ...own } = resolved;
    resolved = { ...resolveProperty(deref($ref, root), root, seen + 1), ...own };
  }
  for (const key of ["anyOf", "oneOf"]) {
    if (!Array.isArray(resolved[key])) continue;
    const options = resolved[key].filter((option) => option.type !== "null");
    if (options.length === resolved[key].length) continue;
    resolved = { ...resolved, nullable: true };
    if (options.length === 1) {
      const { [key]: _dropped, ...own } = resolved;
      resolved = { ...resolveProperty(options[0], root, seen + 1), ...own };
    } else {
      resolved = { ...resolved, [key]: options };
    }
  }
  return resolved;
}

/** The tag value a union variant (an object schema) carries in `tagKey`, or undefined. */
function variantTag(variant, tagKey) {
  const tag = variant.properties?.[tagKey];
  if (!tag) return undefined;
  if (tag.const !== undefined) return tag.const;
  if (Array.isArray(tag.enum) && tag.enum.length === 1) return tag.enum[0];
  return undefined;
}

/**
 * A tagged union's variants ({tag, schema}) and tag key, or null if `prop` is not one. The tag
 * key is the `discriminator`'s, or else the one property every variant fixes to its own value
 * (a union of models told apart by a Literal field, without pydantic's `discriminator`).
 */
function unionOf(prop, root) {
  const options = prop.oneOf ?? prop.anyOf;
  if (!Array.isArray(options) || options.length < 2) return null;
  const variants = options.map((option) => resolveProperty(option, root));
  if (!variants.every((v) => v.properties && typeof v.properties === "object")) return null;
  const candidates = prop.discriminator?.propertyName
    ? [prop.discriminator.propertyName]
    : Object.keys(variants[0].properties);
  for (const tagKey of candidates) {
    const tags = variants.map((v) => variantTag(v, tagKey));
    if (tags.every((t) => typeof t === "string") && new Set(tags).size === tags.length) {
      return { tagKey, variants: variants.map((schema, i) => ({ tag: tags[i], schema })) };
    }
  }
  return null;
}

/** What input a resolved property gets. */
function kindOf(prop, root, depth) {
  if (depth > MAX_DEPTH) return "json";
  if (unionOf(prop, root)) return "union";
  if (Array.isArray(prop.enum)) return "enum";
  if (prop.const !== undefined) return "const";
  if (prop.type === "boolean") return "boolean";
  if (prop.type === "integer" || prop.type === "number") return "number";
  if (prop.type === "string") return "string";
  if (prop.type === "array") {
    const items = resolveProperty(prop.items ?? {}, root);
    if (["integer", "number", "string"].includes(items.type) && !Array.isArray(items.enum)) return "list";
  }
  if (prop.properties && typeof prop.properties === "object") return "object";
  return "json"; // free-form dicts, tuples, unions of scalars: JSON text, checked by the server
}

function optionList(values, selected, labels = values) {
  return values.map((value, i) => h("option", { value, selected: value === selected }, labels[i]));
}

/** The first paragraph of a description: pydantic copies whole numpydoc docstrings into it. */
function firstParagraph(text) {
  return text ? String(text).split(/\n\s*\n/)[0].replace(/\s+/g, " ").trim() : "";
}

/** "≥ 0, < 1" from a number schema's bounds. */
function boundsNote(prop) {
  const parts = [
    prop.minimum !== undefined ? `≥ ${prop.minimum}` : null,
    prop.exclusiveMinimum !== undefined ? `> ${prop.exclusiveMinimum}` : null,
    prop.maximum !== undefined ? `≤ ${prop.maximum}` : null,
    prop.exclusiveMaximum !== undefined ? `< ${prop.exclusiveMaximum}` : null,
  ];
  return parts.filter(Boolean).join(", ");
}

function field(label, path, input, help = null) {
  input.dataset.path = path;
  return h(
    "div",
    { class: "field", "data-field": path },
    h("label", { for: input.id }, label),
    input,
    help instanceof Node ? help : help ? h("p", { class: "help" }, help) : null,
    h("p", { class: "field-error", "data-error-for": path, role: "alert", hidden: true }),
  );
}

/** An error slot for a whole object (a config, a nested object, a union), above its fields. */
function objectErrorSlot(path) {
  return h("p", { class: "field-error", "data-error-for": path, role: "alert", hidden: true });
}

function listNote(itemType) {
  return `comma-separated ${{ integer: "integers", number: "numbers" }[itemType] ?? "values"}`;
}

/** One list item as typed: a number where the schema wants one, else the text (the server says why). */
function listItem(text, type) {
  if (type === "integer" && /^[+-]?\d+$/.test(text)) return Number(text);
  if (type === "number" && text !== "" && Number.isFinite(Number(text))) return Number(text);
  return text;
}

/**
 * Inputs for every property of the object schema `schema`; `read()` returns the object to send.
 * A property left empty is left out, so the server's default applies (pydantic leaves defaults
 * made by a factory out of the schema, and the form must not guess them).
 *
 * @param {object} schema  an object schema (a config model's, a nested model's, a union variant's)
 * @param {object} options
 * @param {object} options.root    the schema holding `$defs` for `$ref`s (the top-level schema)
 * @param {string} options.path    dotted path of the object in the request body: fields' names
 *   and error slots ("workload.config.partitioner"), matched against 422 `loc`s
 * @param {string} options.id      prefix of the inputs' element ids
 * @param {object} [options.values]  values to prefill over the schema's defaults (a parent's
 *   default object, e.g. a union's default variant with its settings)
 * @param {string} [options.skip]  a property not to render (a union variant's tag: the union's
 *   select sets it)
 * @returns {{fields: HTMLElement[], read: () => object}}
 */
export function schemaFields(schema, { root = schema, path, id, values = {}, skip = null, depth = 0 }) {
  const properties = schema?.properties ?? {};
  const required = new Set(Array.isArray(schema?.required) ? schema.required : []);
  const fields = [];
  const readers = [];
  for (const [key, raw] of Object.entries(properties)) {
    if (key === skip) continue;
    const prop = resolveProperty(raw, root);
    const preset = values && typeof values === "object" && Object.hasOwn(values, key) ? values[key] : prop.default;
    const built = propertyInput(prop, {
      root,
      key,
      path: `${path}.${key}`,
      id: `${id}-${key}`,
      preset,
      required: required.has(key),
      depth,
    });
    if (built.field) fields.push(built.field);
    readers.push([key, built.read]);
  }
  const read = () => {
    const object = {};
    for (const [key, reader] of readers) {
      const value = reader();
      if (value !== undefined) object[key] = value;
    }
    return object;
  };
  return { fields, read };
}

/** One property's field (null for a const, which has nothing to choose) and its reader. */
function propertyInput(prop, { root, key, path, id, preset, required, depth }) {
  const label = prop.title ?? key;
  const kind = kindOf(prop, root, depth);
  if (kind === "union") return unionInput(prop, { root, path, id, preset, required, depth, label });
  if (kind === "object") return objectInput(prop, { root, path, id, preset, required, depth, label });
  if (kind === "const") {
    // A Literal with one value: nothing to choose; sent only where the server needs it.
    return { field: null, read: () => (required ? prop.const : undefined) };
  }

  const hasDefault = prop.default !== undefined;
  const helpParts = [
    firstParagraph(prop.description),
    kind === "number" ? boundsNote(prop) : null,
    kind === "list" ? listNote(resolveProperty(prop.items ?? {}, root).type) : null,
    hasDefault ? `default: ${JSON.stringify(prop.default)}` : null,
  ];
  const help = helpParts.filter(Boolean).join(" · ");
  let input;
  let read;
  if (kind === "enum") {
    const values = prop.enum.map(String);
    const selected = preset === undefined || preset === null ? null : String(preset);
    const options = optionList(values, selected);
    if (prop.nullable || (!required && !hasDefault)) {
      options.unshift(h("option", { value: "", selected: selected === null }, prop.nullable ? "(none)" : "(default)"));
    }
    input = h("select", { id, name: path }, ...options);
    read = () => (input.value === "" ? undefined : prop.enum[values.indexOf(input.value)]);
  } else if (kind === "boolean") {
    input = h("input", { id, name: path, type: "checkbox", checked: Boolean(preset) });
    read = () => input.checked;
  } else if (kind === "number") {
    const min = prop.minimum ?? prop.exclusiveMinimum;
    const max = prop.maximum ?? prop.exclusiveMaximum;
    input = h("input", {
      id,
      name: path,
      type: "number",
      step: prop.type === "integer" ? 1 : "any",
      min: typeof min === "number" ? String(min) : null,
      max: typeof max === "number" ? String(max) : null,
      value: typeof preset === "number" ? String(preset) : "",
      placeholder: preset === null ? "none" : hasDefault ? null : "default",
    });
    read = () => (input.value.trim() === "" ? undefined : Number(input.value));
  } else if (kind === "string") {
    input = h("input", { id, name: path, type: "text", value: typeof preset === "string" ? preset : "" });
    read = () => (input.value === "" && (prop.nullable || (!required && !hasDefault)) ? undefined : input.value);
  } else if (kind === "list") {
    const itemType = resolveProperty(prop.items ?? {}, root).type;
    input = h("input", {
      id,
      name: path,
      type: "text",
      value: Array.isArray(preset) ? preset.join(", ") : "",
      placeholder: Array.isArray(preset) ? null : "default",
      inputmode: itemType === "string" ? null : "decimal",
    });
    read = () => {
      const text = input.value.trim();
      // Empty with no known default: leave it out (the server's default); else an empty list.
      if (text === "") return Array.isArray(preset) ? [] : undefined;
      return text.split(",").map((part) => listItem(part.trim(), itemType));
    };
  } else {
    input = h("input", {
      id,
      name: path,
      type: "text",
      value: preset === undefined || preset === null ? "" : JSON.stringify(preset),
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
  return { field: field(label, path, input, help), read };
}

/** A nested object: its own fieldset of fields; left out if nothing in it was set. */
function objectInput(prop, { root, path, id, preset, required, depth, label }) {
  const inner = schemaFields(prop, { root, path, id, values: preset ?? {}, depth: depth + 1 });
  const help = firstParagraph(prop.description);
  const box = h(
    "fieldset",
    { id, class: "config-fields nested-fields", "data-field": path },
    h("legend", {}, label),
    help ? h("p", { class: "help wide" }, help) : null,
    objectErrorSlot(path),
    ...inner.fields,
  );
  const read = () => {
    const value = inner.read();
    return Object.keys(value).length || required ? value : undefined;
  };
  return { field: box, read };
}

/**
 * A tagged union (`oneOf`/`anyOf`, with or without a `discriminator`): a select of its variants,
 * whose choice swaps that variant's own fields in. Errors under the union (pydantic puts the
 * tag in the loc: [..., "partitioner", "dirichlet", "alpha"]) land on the variant's fields, whose
 * paths leave the tag out.
 */
function unionInput(prop, { root, path, id, preset, required, depth, label }) {
  const { tagKey, variants } = unionOf(prop, root);
  const presetTag = preset && typeof preset === "object" ? preset[tagKey] : undefined;
  const known = variants.some((v) => v.tag === presetTag);
  // Without a default the schema knows (pydantic omits factory defaults) an optional union
  // offers "(default)", which sends nothing and lets the server choose.
  const offerDefault = !known && !required;
  const tags = variants.map((v) => v.tag);
  const options = optionList(tags, known ? presetTag : offerDefault ? null : tags[0]);
  if (offerDefault) {
    options.unshift(h("option", { value: "", selected: true }, prop.nullable && preset === null ? "(none)" : "(default)"));
  }
  const select = h("select", { id, name: `${path}.${tagKey}` }, ...options);
  const variantHelp = h("p", { class: "help", "data-variant-help": path });
  const variantBox = h("div", { class: "inline-fields", "data-variant-of": path });
  let current = { read: () => ({}) };

  function showVariant() {
    const variant = variants.find((v) => v.tag === select.value);
    variantHelp.textContent = variant ? firstParagraph(variant.schema.description) : firstParagraph(prop.description);
    if (!variant) {
      current = { read: () => ({}) };
      variantBox.replaceChildren();
      return;
    }
    // The preset's settings belong to its own variant only: another variant starts from its defaults.
    const values = variant.tag === presetTag ? preset : {};
    current = schemaFields(variant.schema, { root, path, id, values, skip: tagKey, depth: depth + 1 });
    variantBox.replaceChildren(...current.fields);
  }
  select.addEventListener("change", showVariant);
  showVariant();

  // A group, not a fieldset with a legend: the select's own label already names the union.
  const box = h(
    "div",
    { class: "union-fields", role: "group", "aria-label": label, "data-union": path },
    field(label, path, select, variantHelp),
    variantBox,
  );
  const read = () => (select.value === "" ? undefined : { [tagKey]: select.value, ...current.read() });
  return { field: box, read };
}

/**
 * Where a 422 error belongs: FastAPI's `loc` (["body", "workload", "config", "partitioner",
 * "dirichlet", "alpha"]) walked along the body sent. A segment the body lacks is a union's tag
 * when more follow (skipped: fields' paths leave tags out), else the name of a missing or
 * unknown key (kept: it still names its field).
 */
export function errorPath(loc, body) {
  const path = [];
  let node = body;
  const segments = loc.slice(loc[0] === "body" ? 1 : 0);
  for (const [i, segment] of segments.entries()) {
    if (node && typeof node === "object" && Object.hasOwn(node, segment)) {
      path.push(String(segment));
      node = node[segment];
    } else if (i === segments.length - 1) {
      path.push(String(segment));
    }
  }
  return path.join(".");
}

/** A config box: a legend, an error slot for the whole config, its fields (or a note). */
function fillConfigBox(box, legend, path, fields) {
  box.replaceChildren(
    h("legend", {}, legend),
    objectErrorSlot(path),
    ...(fields.length ? fields : [h("p", { class: "muted" }, "Nothing to configure.")]),
  );
}

/**
 * Build the submit form into `container`.
 *
 * @param {HTMLElement} container
 * @param {{data: object[]}} strategies  GET /strategies
 * @param {{data: object[], errors?: object}} workloads  GET /workloads
 */
export function renderSubmitForm(container, strategies, workloads) {
  const byName = new Map(strategies.data.map((s) => [s.name, s]));
  const names = [...byName.keys()].sort();
  const initial = byName.has("fedavg") ? "fedavg" : names[0];
  const workloadByName = new Map(workloads.data.map((w) => [w.name, w]));
  const workloadNames = [...workloadByName.keys()];

  const name = h("input", { id: "f-name", name: "name", type: "text", placeholder: "e.g. digits-fedavg", maxlength: 200 });
  const strategy = h("select", { id: "f-strategy", name: "strategy.name" }, ...optionList(names, initial));
  const summary = h("p", { id: "f-strategy-summary", class: "help" });
  const configBox = h("fieldset", { id: "f-strategy-config", class: "config-fields" });
  const workload = h("select", { id: "f-workload", name: "workload.name" }, ...optionList(workloadNames, workloadNames.includes("digits") ? "digits" : workloadNames[0]));
  const workloadSummary = h("p", { id: "f-workload-summary", class: "help" });
  const workloadBox = h("fieldset", { id: "f-workload-config", class: "config-fields" });
  const brokenNames = Object.keys(workloads.errors ?? {});
  const broken = brokenNames.length
    ? h("p", { id: "f-workload-errors", class: "help" }, `Not loaded (see GET /api/v1/workloads): ${brokenNames.join(", ")}`)
    : null;
  const rounds = h("input", { id: "f-rounds", name: "rounds", type: "number", min: 1, step: 1, value: "5" });
  const minClients = h("input", { id: "f-min-clients", name: "clients.min", type: "number", min: 1, step: 1, value: "2" });
  const submit = h("button", { id: "submit-button", type: "submit", class: "primary" }, "Submit experiment");
  const message = h("div", { id: "form-message", role: "alert", hidden: true });

  let config = { fields: [], read: () => ({}) };
  let workloadConfig = { fields: [], read: () => ({}) };

  function showStrategy() {
    const plugin = byName.get(strategy.value);
    summary.textContent = plugin?.summary ?? "";
    config = schemaFields(plugin?.config_schema ?? {}, { path: "strategy.config", id: "f-config" });
    fillConfigBox(configBox, `${strategy.value} settings`, "strategy.config", config.fields);
  }

  function showWorkload() {
    const plugin = workloadByName.get(workload.value);
    // Without server-side test data a run records no accuracy per round: say so before it starts.
    const notes = [plugin?.summary, plugin && !plugin.server_evaluation ? "The server does not evaluate it: no test accuracy per round." : null];
    workloadSummary.textContent = notes.filter(Boolean).join(" ");
    workloadConfig = schemaFields(plugin?.config_schema ?? {}, { path: "workload.config", id: "f-workload-config" });
    fillConfigBox(workloadBox, `${workload.value || "workload"} settings`, "workload.config", workloadConfig.fields);
  }

  strategy.addEventListener("change", showStrategy);
  workload.addEventListener("change", showWorkload);

  const form = h(
    "form",
    { id: "submit-form", novalidate: true, "aria-label": "Submit an experiment" },
    h(
      "div",
      { class: "form-grid" },
      field("Name", "name", name),
      field("Strategy", "strategy.name", strategy),
      field("Workload", "workload.name", workload),
      field("Rounds", "rounds", rounds),
      field("Min clients", "clients.min", minClients),
    ),
    summary,
    configBox,
    workloadSummary,
    broken,
    workloadBox,
    h("div", { class: "form-actions" }, submit, message),
  );

  function body() {
    const number = (input) => (input.value.trim() === "" ? null : Number(input.value));
    return {
      name: name.value.trim() || `${workload.value}-${strategy.value}`,
      strategy: { name: strategy.value, config: config.read() },
      workload: { name: workload.value, config: workloadConfig.read() },
      rounds: number(rounds),
      clients: { min: number(minClients) },
    };
  }

  function clearErrors() {
    for (const el of form.querySelectorAll(".field-error")) {
      el.hidden = true;
      el.textContent = "";
    }
    for (const el of form.querySelectorAll(".invalid")) el.classList.remove("invalid");
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
      (target.closest(".field") ?? target.closest("fieldset"))?.classList.add("invalid");
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
  showWorkload();
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
