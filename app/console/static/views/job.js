// One job: live status and progress over the SSE stream, steps, error, cancel, event log, report, artifacts.
import { api, ApiError, followEvents } from "../api.js";
import {
  announce, duration, errorBox, fmtBytes, fmtDate, fmtNumber, fmtPct, fmtRatio, fmtSeconds, h, headRow, replace,
  statusBadge,
} from "../dom.js";
import { methodsLabel, modelLabel } from "./jobs.js";

const TERMINAL = ["succeeded", "failed", "cancelled"];

function progressBlock(job) {
  const pct = Math.round(job.progress.fraction * 100);
  return h(
    "div",
    { class: "progress-block" },
    h("label", { for: "job-progress" }, "Progress"),
    h("progress", { id: "job-progress", max: 100, value: pct, "aria-valuetext": `${pct} %` }, `${pct} %`),
    h("span", { id: "progress-pct", class: "num" }, `${pct} %`),
    h("p", { id: "progress-message", class: "muted" }, job.progress.message || ""),
  );
}

function stepsTable(job) {
  return h(
    "table",
    { id: "steps" },
    h("caption", {}, "Steps"),
    headRow(["#", "Method", "Options", "State", "Duration"]),
    h(
      "tbody",
      {},
      job.steps.map((step) => {
        const { method: _method, ...options } = job.spec.steps?.[step.index] || {};
        return h(
          "tr",
          {},
          h("td", {}, String(step.index + 1)),
          h("td", {}, step.method),
          h("td", {}, h("code", {}, JSON.stringify(options))),
          h("td", {}, statusBadge(step.status)),
          h("td", { class: "num" }, fmtSeconds(step.duration_s)),
        );
      }),
    ),
  );
}

function facts(job) {
  const dl = h("dl", { class: "facts" });
  const add = (term, value) => dl.append(h("dt", {}, term), h("dd", {}, value));
  add("Model", h("code", {}, modelLabel(job.spec)));
  add("Steps", methodsLabel(job.spec));
  add("Created", fmtDate(job.created_at));
  add("Started", fmtDate(job.started_at));
  add("Finished", fmtDate(job.finished_at));
  add("Duration", fmtSeconds(duration(job)));
  add("Attempts", String(job.attempts));
  const meta = Object.entries(job.metadata);
  add("Metadata", meta.length ? h("ul", { id: "metadata", class: "plain" }, meta.map(([k, v]) => h("li", {}, h("code", {}, k), " = ", v))) : "–");
  return dl;
}

function errorSection(job) {
  if (!job.error) return null;
  return h(
    "section",
    { class: "problem", id: "job-error", role: "alert", "aria-labelledby": "job-error-title" },
    h("h2", { id: "job-error-title" }, "Error: ", job.error.type),
    h("p", { id: "job-error-message" }, job.error.message),
  );
}

function eventLine(event) {
  const data = { ...event.data };
  let text = "";
  if (event.type === "job.progress") {
    text = `${Math.round((data.progress || 0) * 100)} % ${data.message || ""}`;
  } else if (Object.keys(data).length) {
    text = JSON.stringify(data);
  }
  return h("li", {}, fmtDate(event.created_at), " ", h("strong", {}, event.type), " ", text);
}

const METRICS = [
  ["perplexity", "Perplexity", (x) => fmtNumber(x, 5)],
  ["size_bytes", "Size", fmtBytes],
  ["parameters", "Parameters", (x) => fmtNumber(x)],
  ["prefill_tokens_per_s", "Prefill tokens/s", (x) => fmtNumber(x, 4)],
  ["decode_tokens_per_s", "Decode tokens/s", (x) => fmtNumber(x, 4)],
  ["peak_memory_bytes", "Peak memory", fmtBytes],
  ["zero_fraction", "Zero fraction", (x) => fmtNumber(x, 3)],
  ["eval_tokens", "Evaluation tokens", (x) => fmtNumber(x)],
  ["duration_s", "Measured in", fmtSeconds],
];

const SUMMARY = [
  ["size_ratio", "Size", fmtRatio],
  ["perplexity_delta_pct", "Perplexity change", fmtPct],
  ["decode_speedup", "Decode speed", fmtRatio],
  ["prefill_speedup", "Prefill speed", fmtRatio],
  ["parameters_ratio", "Parameters", fmtRatio],
  ["memory_ratio", "Peak memory", fmtRatio],
];

async function fetchArtifact(item, as, signal) {
  // Signed URLs carry their own authorisation; the API key is not sent to storage.
  const response = await fetch(item.url, { signal, cache: "no-store" });
  if (!response.ok) throw new ApiError(response.status, { title: "Download failed", detail: `${item.path}: HTTP ${response.status}` });
  return as === "json" ? response.json() : response.text();
}

/** Scalar details inline; nested ones (per-layer errors, lists of modules) folded away. */
function detailsCell(details) {
  const entries = Object.entries(details);
  const scalar = entries.filter(([, v]) => v === null || typeof v !== "object");
  const nested = entries.filter(([, v]) => v !== null && typeof v === "object");
  return [
    h("ul", { class: "plain" }, scalar.map(([k, v]) => h("li", {}, h("code", {}, k), " ", String(v)))),
    nested.map(([k, v]) => h("details", {}, h("summary", {}, k), h("pre", {}, JSON.stringify(v, null, 1)))),
  ];
}

function reportSection(report, chart) {
  const summary = report.summary || {};
  const before = report.baseline || {};
  const after = report.result || {};
  return h(
    "section",
    { id: "report", "aria-labelledby": "report-title" },
    h("h2", { id: "report-title" }, "Report"),
    h(
      "ul",
      { class: "headline", id: "summary" },
      SUMMARY.filter(([k]) => summary[k] !== undefined && summary[k] !== null).map(([k, label, fmt]) =>
        h("li", {}, h("span", { class: "label" }, label), h("span", { class: "value" }, fmt(summary[k]))),
      ),
    ),
    chart ? h("img", { src: chart.url, alt: "Before/after chart: size, perplexity, prefill and decode speed", class: "chart", width: 1300, height: 460 }) : null,
    h(
      "table",
      { id: "before-after" },
      h("caption", {}, "Before and after"),
      headRow(["Metric", "Before", "After"]),
      h(
        "tbody",
        {},
        METRICS.filter(([k]) => k in before || k in after).map(([k, label, fmt]) =>
          h("tr", {}, h("th", { scope: "row" }, label), h("td", { class: "num" }, fmt(before[k])), h("td", { class: "num" }, fmt(after[k]))),
        ),
      ),
    ),
    h(
      "table",
      { id: "report-steps" },
      h("caption", {}, "Steps as run"),
      headRow(["Method", "Parameters", "Duration", "Details"]),
      h(
        "tbody",
        {},
        (report.steps || []).map((s) =>
          h("tr", {}, h("td", {}, s.method), h("td", {}, detailsCell(s.params || {})), h("td", { class: "num" }, fmtSeconds(s.duration_s)), h("td", {}, detailsCell(s.details || {}))),
        ),
      ),
    ),
    h(
      "dl",
      { class: "facts" },
      h("dt", {}, "Total time"), h("dd", {}, fmtSeconds(report.duration_s)),
      h("dt", {}, "Evaluated on"), h("dd", {}, report.evaluation ? `${report.evaluation.source}: ${fmtNumber(report.evaluation.tokens)} tokens, seq_len ${report.evaluation.seq_len}` : "–"),
      h("dt", {}, "Environment"), h("dd", {}, Object.entries(report.environment || {}).map(([k, v]) => `${k} ${v}`).join(" · ")),
    ),
    (report.warnings || []).length
      ? h("div", { class: "warnings", id: "warnings" }, h("h3", {}, "Warnings"), h("ul", {}, report.warnings.map((w) => h("li", {}, w))))
      : null,
  );
}

function artifactsTable(listing) {
  return h(
    "section",
    { id: "artifacts", "aria-labelledby": "artifacts-title" },
    h("h2", { id: "artifacts-title" }, "Artifacts"),
    h(
      "table",
      {},
      headRow(["File", "Size", "sha256"]),
      h(
        "tbody",
        {},
        listing.data.map((item) =>
          h(
            "tr",
            { dataset: { path: item.path } },
            h("td", {}, h("a", { href: item.url, download: item.path.split("/").pop(), class: "download" }, item.path)),
            h("td", { class: "num" }, fmtBytes(item.size)),
            h("td", {}, h("code", { class: "sha256" }, item.sha256)),
          ),
        ),
      ),
    ),
    h("p", { class: "muted" }, "Download links expire after a few minutes; reload the page for fresh ones. manifest.json sha256: ", h("code", {}, listing.manifest_sha256)),
  );
}

async function finishedSections(job, signal) {
  if (job.status !== "succeeded") return [];
  const listing = await api(`/v1/jobs/${encodeURIComponent(job.id)}/artifacts`, { signal });
  const byPath = Object.fromEntries(listing.data.map((item) => [item.path, item]));
  const out = [];
  try {
    if (byPath["report.json"]) out.push(reportSection(await fetchArtifact(byPath["report.json"], "json", signal), byPath["report.png"]));
    if (byPath["README.md"]) {
      // The model card is shown as its Markdown source: rendering Markdown would mean parsing HTML.
      const card = await fetchArtifact(byPath["README.md"], "text", signal);
      out.push(h("section", { id: "model-card", "aria-labelledby": "card-title" }, h("h2", { id: "card-title" }, "Model card"), h("pre", { class: "card-text" }, card)));
    }
  } catch (err) {
    if (signal.aborted) throw err;
    out.push(errorBox(err));
  }
  out.push(artifactsTable(listing));
  return out;
}

/** Render one job and keep it live until it finishes or the view goes away. */
export async function jobView(root, jobId, { signal }) {
  const path = `/v1/jobs/${encodeURIComponent(jobId)}`;
  let job = await api(path, { signal });
  const live = h("div", { id: "job-live" });
  const log = h("ol", { id: "event-log", class: "log", role: "log", "aria-label": "Event log" });
  const finished = h("div", { id: "job-finished" });
  const notice = h("div");

  const cancel = h("button", { type: "button", id: "cancel", class: "danger" }, "Cancel job");
  cancel.addEventListener("click", async () => {
    if (!window.confirm(`Cancel job ${job.id}?`)) return;
    cancel.disabled = true;
    try {
      job = await api(`${path}/cancel`, { method: "POST", signal });
      renderLive();
    } catch (err) {
      replace(notice, errorBox(err));
      cancel.disabled = false;
    }
  });

  function renderLive() {
    cancel.hidden = !["queued", "running"].includes(job.status);
    replace(
      live,
      h("p", {}, "Status ", h("span", { id: "job-status" }, statusBadge(job.status))),
      progressBlock(job),
      errorSection(job),
      stepsTable(job),
      facts(job),
    );
  }

  replace(
    root,
    h("p", {}, h("a", { href: "#/jobs" }, "← Jobs")),
    h("h1", {}, "Job ", h("code", {}, job.id)),
    h("div", { class: "actions" }, cancel),
    notice,
    live,
    finished,
    h("section", { "aria-labelledby": "log-title" }, h("h2", { id: "log-title" }, "Event log"), log),
    h("details", {}, h("summary", {}, "Spec as stored"), h("pre", {}, JSON.stringify(job.spec, null, 2))),
  );
  renderLive();
  append(finished, await finishedSections(job, signal));

  // Each event refreshes the job (coalesced), so status, steps and progress always come from the API.
  let refreshing = null;
  const refresh = () => {
    refreshing ??= (async () => {
      try {
        const previous = job.status;
        job = await api(path, { signal });
        renderLive();
        if (previous !== job.status) announce(`Job ${job.status}`);
        if (!TERMINAL.includes(previous) && job.status === "succeeded") replace(finished, await finishedSections(job, signal));
      } catch (err) {
        if (!signal.aborted) replace(notice, errorBox(err));
      } finally {
        refreshing = null;
      }
    })();
  };
  followEvents(job.id, {
    signal,
    onEvent: (event) => {
      log.append(eventLine(event));
      while (log.childElementCount > 500) log.firstElementChild.remove(); // a long distillation logs thousands
      if (event.type === "job.progress" && !TERMINAL.includes(job.status)) {
        // Show the fraction at once; the coalesced refresh brings the steps along.
        job = { ...job, progress: { fraction: event.data.progress ?? job.progress.fraction, message: event.data.message || "" } };
        renderLive();
      }
      refresh();
    },
  })
    .then(() => refresh())
    .catch((err) => {
      if (!signal.aborted) replace(notice, errorBox(err));
    });
}

function append(el, children) {
  for (const child of children) el.append(child);
}
