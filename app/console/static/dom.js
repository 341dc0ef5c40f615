// DOM helpers. Text always goes in as text nodes and attributes through setAttribute, never as HTML:
// a model name, metadata value or error reason that contains markup is displayed, not parsed.

/** Create an element: h("a", {href: "#/jobs", class: "x", onclick: fn}, "text", child, [more]). */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name === "value") el.value = value;
    else if (name === "checked") el.checked = Boolean(value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

/** Append children (strings become text nodes; null/false are skipped; arrays are flattened). */
export function append(el, children) {
  for (const child of [children].flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Replace an element's content. */
export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

/** A table's header row: one column header per title. */
export function headRow(titles) {
  return h("thead", {}, h("tr", {}, titles.map((t) => h("th", { scope: "col" }, t))));
}

/** A card form headed `title` (its heading's id is `${id}-title`): its `fields` and one submit button that
 * runs `onSubmit()`; a failure is shown in `errors`. */
export function cardForm({ id, title, submitLabel, fields, onSubmit, errors }) {
  const form = h(
    "form",
    { class: "card", "aria-labelledby": `${id}-title` },
    h("h2", { id: `${id}-title` }, title),
    fields,
    h("button", { type: "submit" }, submitLabel),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await onSubmit();
    } catch (err) {
      replace(errors, errorBox(err));
    }
  });
  return form;
}

/** A fieldset of checkboxes under `legend`, each labelled with its value. */
export function checkboxFieldset(legend, boxes) {
  return h("fieldset", {}, h("legend", {}, legend), boxes.map((b) => h("div", { class: "field inline" }, b, h("label", { for: b.id }, b.value))));
}

/** A secret shown once (a new key, a webhook's signing secret), announced to screen readers. */
export function secretNotice(what, secret) {
  return h("div", { class: "secret", role: "status" }, h("p", {}, `${what} Copy it now: it is not shown again.`), h("code", { class: "secret-value" }, secret));
}

/** Tell screen readers about something that changed without moving focus. */
export function announce(text) {
  const region = document.getElementById("announcer");
  if (region) region.textContent = text;
}

/** A problem box for an error (ApiError or anything thrown). */
export function errorBox(err) {
  const items = (err.errors || []).map((e) => h("li", {}, h("code", {}, e.field || "body"), ": ", e.message));
  return h(
    "div",
    { class: "problem", role: "alert" },
    h("strong", {}, err.problem?.title || "Error"),
    " ",
    err.message,
    items.length ? h("ul", {}, items) : null,
  );
}

export function fmtBytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = Number(n);
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${unit ? value.toFixed(1) : value} ${units[unit]}`;
}

export function fmtDate(iso) {
  if (!iso) return "–";
  const date = new Date(iso);
  return h("time", { datetime: iso }, date.toLocaleString());
}

export function fmtSeconds(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${Math.round(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

export function duration(job) {
  if (!job.started_at) return null;
  const end = job.finished_at ? new Date(job.finished_at) : new Date();
  return (end - new Date(job.started_at)) / 1000;
}

export function fmtNumber(x, digits = 3) {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number") return String(x);
  return Number.isInteger(x) ? x.toLocaleString() : x.toPrecision(digits);
}

export function fmtRatio(x, suffix = "×") {
  return x === null || x === undefined ? "–" : `${x.toFixed(2)}${suffix}`;
}

export function fmtPct(x) {
  return x === null || x === undefined ? "–" : `${x > 0 ? "+" : ""}${x.toFixed(2)} %`;
}

export function statusBadge(status) {
  return h("span", { class: `badge status-${status}` }, status);
}
