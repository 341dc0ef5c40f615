// Forms generated from the API's own JSON Schema (/openapi.json), so every option the API takes is offered
// with its description, default and bounds, and nothing here restates the job spec. Fields left blank are
// omitted, so the API applies its own defaults; the API's 422 field errors are shown next to the field.
import { h } from "./dom.js";

let uid = 0;
const NULL_OPTION = "\u0000null";
const nextId = (path) => `f${++uid}-${path.replace(/[^a-zA-Z0-9]+/g, "-")}`;

/** Resolve a local $ref against the OpenAPI document. */
export function resolve(doc, schema) {
  let s = schema;
  while (s && s.$ref) s = s.$ref.split("/").slice(1).reduce((node, key) => node[key], doc);
  return s;
}

/** Split `anyOf: [X, {type: null}]` into X and "nullable"; other unions stay as they are. */
function unwrapNullable(doc, schema) {
  const s = resolve(doc, schema);
  if (s && Array.isArray(s.anyOf)) {
    const options = s.anyOf.filter((o) => o.type !== "null");
    if (options.length === 1) return { schema: { ...resolve(doc, options[0]), description: s.description ?? resolve(doc, options[0]).description, default: s.default, title: s.title }, nullable: true };
  }
  return { schema: s, nullable: false };
}

function label(name, schema) {
  return schema.title || name.replace(/_/g, " ");
}

function describe(id, schema, extra) {
  const parts = [schema.description, extra].filter(Boolean);
  return parts.length ? h("small", { id: `${id}-hint`, class: "hint" }, parts.join(" · ")) : null;
}

function errorSlot(id) {
  return h("small", { id: `${id}-error`, class: "field-error", "aria-live": "polite" });
}

function bounds(schema) {
  const out = [];
  if (schema.minimum !== undefined) out.push(`≥ ${schema.minimum}`);
  if (schema.exclusiveMinimum !== undefined) out.push(`> ${schema.exclusiveMinimum}`);
  if (schema.maximum !== undefined) out.push(`≤ ${schema.maximum}`);
  if (schema.default !== undefined && schema.default !== null && typeof schema.default !== "object") out.push(`default ${schema.default}`);
  return out.join(", ");
}

/**
 * Build a field for `schema` at `path` (dotted, as the API reports errors: "steps.0.group_size").
 * Returns {element, read}, where read() gives the value to send or undefined to omit it.
 */
export function field(doc, name, rawSchema, path, required = false) {
  const { schema, nullable } = unwrapNullable(doc, rawSchema);
  const id = nextId(path);
  const hintId = `${id}-hint`;
  const describedBy = `${hintId} ${id}-error`;
  const wrap = (control, read, inline = false) => ({
    element: h(
      "div",
      { class: inline ? "field inline" : "field", dataset: { path } },
      inline ? control : null,
      h("label", { for: id }, label(name, schema), required ? " *" : ""),
      inline ? null : control,
      describe(id, schema, bounds(schema)),
      errorSlot(id),
    ),
    read,
  });

  if (schema.const !== undefined) {
    return { element: null, read: () => schema.const };
  }
  if (Array.isArray(schema.enum)) {
    const select = h(
      "select",
      { id, name: path, "aria-describedby": describedBy, required: required && !nullable },
      !required || nullable || schema.default === undefined ? h("option", { value: "" }, schema.default !== undefined && schema.default !== null ? `default (${schema.default})` : "—") : null,
      schema.enum.map((v) => h("option", { value: String(v) }, String(v))),
      // A nullable enum's null is a choice of its own (e.g. group_size null = one scale per output channel).
      nullable ? h("option", { value: NULL_OPTION }, "null") : null,
    );
    const read = () => {
      if (select.value === "") return undefined;
      if (select.value === NULL_OPTION) return null;
      return schema.enum.find((v) => String(v) === select.value);
    };
    return wrap(select, read);
  }
  if (schema.type === "boolean") {
    if (nullable || schema.default === undefined) {
      // Three states: the API's default (often automatic), true, false.
      const select = h("select", { id, name: path, "aria-describedby": describedBy }, h("option", { value: "" }, "default"), h("option", { value: "true" }, "true"), h("option", { value: "false" }, "false"));
      return wrap(select, () => (select.value === "" ? undefined : select.value === "true"));
    }
    const box = h("input", { id, name: path, type: "checkbox", checked: Boolean(schema.default), "aria-describedby": describedBy });
    return wrap(box, () => (box.checked === Boolean(schema.default) ? undefined : box.checked), true);
  }
  if (schema.type === "integer" || schema.type === "number") {
    const attrs = { id, name: path, type: "number", inputmode: schema.type === "integer" ? "numeric" : "decimal", "aria-describedby": describedBy, required, step: schema.type === "integer" ? "1" : "any" };
    if (schema.minimum !== undefined) attrs.min = schema.minimum;
    if (schema.maximum !== undefined) attrs.max = schema.maximum;
    if (schema.default !== undefined && schema.default !== null) attrs.placeholder = String(schema.default);
    const input = h("input", attrs);
    return wrap(input, () => (input.value === "" ? undefined : Number(input.value)));
  }
  if (schema.type === "string") {
    const input = h("input", { id, name: path, type: "text", "aria-describedby": describedBy, required, placeholder: schema.default ?? "" });
    return wrap(input, () => (input.value.trim() === "" ? undefined : input.value.trim()));
  }
  if (schema.type === "array" && ["string", "integer", "number"].includes(resolve(doc, schema.items || {}).type)) {
    const itemType = resolve(doc, schema.items).type;
    const input = h("input", { id, name: path, type: "text", "aria-describedby": describedBy, placeholder: "comma-separated" });
    return wrap(input, () => {
      const items = input.value.split(",").map((v) => v.trim()).filter(Boolean);
      if (!items.length) return undefined;
      return itemType === "string" ? items : items.map(Number);
    });
  }
  if (schema.type === "object" && schema.properties) {
    return objectFieldset(doc, name, schema, path, { optional: nullable || !required });
  }
  // Anything richer (unions of objects, maps): a JSON box, still validated by the API.
  const area = h("textarea", { id, name: path, rows: 3, "aria-describedby": describedBy, placeholder: "JSON", spellcheck: "false" });
  return wrap(area, () => {
    if (area.value.trim() === "") return undefined;
    try {
      return JSON.parse(area.value);
    } catch {
      throw Object.assign(new Error(`${path}: not valid JSON`), { field: path });
    }
  });
}

/** A fieldset of an object's properties; optional objects are sent only when one of their fields is set. */
export function objectFieldset(doc, name, schema, path, { optional = false, skip = [] } = {}) {
  const required = new Set(schema.required || []);
  const children = Object.entries(schema.properties)
    .filter(([key]) => !skip.includes(key))
    .map(([key, sub]) => [key, field(doc, key, sub, path ? `${path}.${key}` : key, required.has(key))]);
  const element = h(
    "fieldset",
    { dataset: { path } },
    h("legend", {}, label(name, schema)),
    schema.description ? h("p", { class: "hint" }, schema.description) : null,
    h("small", { class: "field-error", "aria-live": "polite" }),
    children.map(([, f]) => f.element),
  );
  const read = () => {
    const out = {};
    for (const [key, f] of children) {
      const value = f.read();
      if (value !== undefined) out[key] = value;
    }
    const meaningful = Object.keys(out).filter((k) => resolve(doc, schema.properties[k]).const === undefined);
    return optional && !meaningful.length ? undefined : out;
  };
  return { element, read };
}

/** Candidate form paths for an API error path, most specific first. Pydantic puts a discriminated union's
 * tag in the location ("steps.0.quantize.group_size"), which the form does not have, so it is also tried without. */
function candidates(field) {
  const parts = (field || "").split(".").filter(Boolean);
  const untagged = parts.filter((p, i) => !(i > 0 && /^\d+$/.test(parts[i - 1]) && !/^\d+$/.test(p) && i < parts.length));
  const out = [];
  for (const list of [parts, untagged]) {
    for (let n = list.length; n > 0; n--) out.push(list.slice(0, n).join("."));
  }
  return [...new Set(out)].sort((a, b) => b.split(".").length - a.split(".").length);
}

/** Show the API's field errors (`errors[].field` like "steps.0.group_size") beside the matching fields. */
export function showFieldErrors(form, errors) {
  for (const slot of form.querySelectorAll(".field-error")) slot.textContent = "";
  for (const input of form.querySelectorAll("[aria-invalid]")) input.removeAttribute("aria-invalid");
  const unmatched = [];
  for (const error of errors) {
    let slot = null;
    let target = null;
    for (const path of candidates(error.field)) {
      target = form.querySelector(`[data-path="${CSS.escape(path)}"]`);
      slot = target?.querySelector(":scope > .field-error");
      if (slot) break;
    }
    if (slot) {
      slot.textContent = slot.textContent ? `${slot.textContent}; ${error.message}` : error.message;
      target.querySelector(":scope > input, :scope > select, :scope > textarea")?.setAttribute("aria-invalid", "true");
    } else {
      unmatched.push(error);
    }
  }
  const first = form.querySelector("[aria-invalid]");
  if (first) first.focus();
  return unmatched;
}
