// New job: upload a model folder (and optional text files), then build the spec with forms generated from
// the API's JSON Schema and submit it with an Idempotency-Key.
import { api, ApiError } from "../api.js";
import { errorBox, fmtBytes, h, replace } from "../dom.js";
import { field, objectFieldset, resolve, showFieldErrors } from "../schemaform.js";
import { uploadFiles } from "../upload.js";

/** A random Idempotency-Key (crypto.randomUUID exists only in secure contexts; getRandomValues everywhere). */
function newKey() {
  return Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
}

let openapi = null; // the schema is read once per page load, at run time: the API is the only source

async function loadSchema(signal) {
  openapi ??= await api("/openapi.json", { signal });
  return openapi;
}

function uploader({ id, title, hint, directory, onDone, signal }) {
  const input = h("input", { id, type: "file", multiple: true, webkitdirectory: directory || null });
  const list = h("ul", { class: "files", "aria-live": "polite" });
  const status = h("div");
  const button = h("button", { type: "button", class: "secondary" }, "Upload");
  const rows = new Map();
  const report = (path, phase, fraction) => {
    let row = rows.get(path);
    if (!row) {
      const bar = h("progress", { max: 100, value: 0, "aria-label": `Upload of ${path}` });
      const text = h("span", { class: "muted" });
      row = { bar, text, li: h("li", { dataset: { path } }, h("code", {}, path), " ", bar, " ", text) };
      rows.set(path, row);
      list.append(row.li);
    }
    row.bar.value = Math.round(fraction * 100);
    row.text.textContent = phase === "uploading" ? `${Math.round(fraction * 100)} %` : phase;
  };
  button.addEventListener("click", async () => {
    const files = Array.from(input.files || []);
    if (!files.length) {
      replace(status, errorBox({ message: "Choose files first." }));
      return;
    }
    button.disabled = true;
    replace(status, h("p", { class: "muted" }, `${files.length} files, ${fmtBytes(files.reduce((n, f) => n + f.size, 0))}`));
    rows.clear();
    list.replaceChildren();
    try {
      const upload = await uploadFiles(files, report, signal);
      replace(status, h("p", { class: "ok", role: "status" }, "Upload ", h("code", { class: "upload-id" }, upload.id), " is complete."));
      onDone(upload);
    } catch (err) {
      if (signal.aborted) return;
      replace(status, errorBox(err), h("p", { class: "muted" }, "Press Upload again to resume: files already sent are not sent twice."));
    } finally {
      button.disabled = false;
    }
  });
  return h(
    "section",
    { class: "card", "aria-labelledby": `${id}-title` },
    h("h2", { id: `${id}-title` }, title),
    h("p", { class: "hint" }, hint),
    h("label", { for: id }, directory ? "Folder" : "Files"),
    input,
    button,
    list,
    status,
  );
}

function metadataField() {
  const area = h("textarea", { id: "metadata", name: "metadata", rows: 2, "aria-describedby": "metadata-hint metadata-error", placeholder: "team=search\nrun=3" });
  return {
    element: h(
      "div",
      { class: "field", dataset: { path: "metadata" } },
      h("label", { for: "metadata" }, "Metadata"),
      area,
      h("small", { id: "metadata-hint", class: "hint" }, "key=value, one per line; filterable in the jobs list"),
      h("small", { id: "metadata-error", class: "field-error" }),
    ),
    read: () => {
      const out = {};
      for (const line of area.value.split("\n").map((l) => l.trim()).filter(Boolean)) {
        const eq = line.indexOf("=");
        if (eq < 1) throw Object.assign(new Error(`metadata: "${line}" is not key=value`), { field: "metadata" });
        out[line.slice(0, eq).trim()] = line.slice(eq + 1).trim();
      }
      return Object.keys(out).length ? out : undefined;
    },
  };
}

/** The steps list: one generated fieldset per step, of the method chosen when it was added. */
function stepsEditor(doc, stepsSchema) {
  const mapping = stepsSchema.items.discriminator.mapping;
  const methods = Object.keys(mapping);
  const holder = h("div", { id: "steps-list", dataset: { path: "steps" } });
  const steps = [];
  const choose = h("select", { id: "add-step-method", "aria-label": "Method of the step to add" }, methods.map((m) => h("option", { value: m }, m)));
  const renumber = () => steps.forEach((s, i) => {
    s.legend.textContent = `Step ${i + 1}: ${s.method}`;
    s.fieldset.dataset.path = `steps.${i}`;
  });
  const add = (method) => {
    const schema = resolve(doc, { $ref: mapping[method] });
    const index = steps.length;
    const form = objectFieldset(doc, method, schema, `steps.${index}`);
    const legend = form.element.querySelector("legend");
    const remove = h("button", { type: "button", class: "link" }, "Remove step");
    const step = { method, fieldset: form.element, legend, read: form.read };
    remove.addEventListener("click", () => {
      steps.splice(steps.indexOf(step), 1);
      form.element.remove();
      renumber();
    });
    form.element.classList.add("step");
    form.element.append(remove);
    steps.push(step);
    holder.append(form.element);
    renumber();
    form.element.querySelector("select, input")?.focus();
  };
  const addButton = h("button", { type: "button", id: "add-step", class: "secondary" }, "Add step");
  addButton.addEventListener("click", () => add(choose.value));
  return {
    element: h(
      "section",
      { "aria-labelledby": "steps-title" },
      h("h2", { id: "steps-title" }, "Steps"),
      h("p", { class: "hint" }, stepsSchema.description || "Run in order, e.g. prune → distill → quantize."),
      holder,
      h("div", { class: "inline-controls" }, h("label", { for: "add-step-method" }, "Method"), choose, addButton),
      h("small", { class: "field-error", id: "steps-error" }),
    ),
    add,
    read: () => steps.map((s) => s.read()),
  };
}

export async function newJobView(root, { signal }) {
  const doc = await loadSchema(signal);
  const spec = resolve(doc, doc.components.schemas.JobSpec);
  const top = Object.fromEntries(
    Object.entries(spec.properties)
      .filter(([name]) => !["steps", "metadata"].includes(name))
      .map(([name, schema]) => [name, field(doc, name, schema, name, (spec.required || []).includes(name))]),
  );
  const steps = stepsEditor(doc, spec.properties.steps);
  const metadata = metadataField();
  const result = h("div", { id: "submit-result" });
  const submit = h("button", { type: "submit", id: "submit-job" }, "Submit job");
  // One key per form: pressing Submit again after a lost answer cannot create the job twice.
  let idempotencyKey = newKey();

  const form = h(
    "form",
    { id: "job-form", novalidate: true, "aria-labelledby": "spec-title" },
    h("h2", { id: "spec-title" }, "Spec"),
    Object.values(top).map((f) => f.element),
    metadata.element,
    steps.element,
    submit,
    result,
  );
  form.addEventListener("input", () => {
    idempotencyKey = newKey(); // a changed spec is a new request
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    replace(result);
    let body;
    try {
      body = {};
      for (const [name, f] of Object.entries(top)) {
        const value = f.read();
        if (value !== undefined) body[name] = value;
      }
      const meta = metadata.read();
      if (meta) body.metadata = meta;
      body.steps = steps.read();
    } catch (err) {
      showFieldErrors(form, [{ field: err.field, message: err.message }]);
      return;
    }
    submit.disabled = true;
    try {
      const job = await api("/v1/jobs", { method: "POST", body, headers: { "Idempotency-Key": idempotencyKey }, signal });
      if (job.webhook_secret) {
        replace(result, h("div", { class: "secret", role: "status" }, "Webhook secret for this job (shown once): ", h("code", {}, job.webhook_secret), " ", h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, "Open the job")));
      } else {
        location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
      }
    } catch (err) {
      if (signal.aborted) return;
      const unmatched = err instanceof ApiError ? showFieldErrors(form, err.errors) : [];
      replace(result, errorBox(err.errors?.length && !unmatched.length ? Object.assign(err, { errors: [] }) : err));
    } finally {
      submit.disabled = false;
    }
  });

  const fill = (path, value) => {
    const input = form.querySelector(`[data-path="${CSS.escape(path)}"] input`);
    if (input) {
      input.value = value;
      input.dispatchEvent(new Event("input", { bubbles: true }));
    }
  };
  replace(
    root,
    h("h1", {}, "New job"),
    h(
      "div",
      { class: "uploads" },
      uploader({ id: "model-files", title: "1. Model", hint: "A Hugging Face model folder: config.json, *.safetensors, tokenizer files.", directory: true, signal, onDone: (u) => fill("model.upload_id", u.id) }),
      uploader({ id: "text-files", title: "Texts (optional)", hint: "Calibration, evaluation or training text (.txt, or .jsonl with a text field); paste its upload id below.", directory: false, signal, onDone: () => {} }),
    ),
    form,
  );
  steps.add("quantize");
}
