// The jobs list: status, methods, model, created, duration, headline ratios; filters and cursor paging.
import { api, query } from "../api.js";
import { duration, errorBox, fmtDate, fmtPct, fmtRatio, fmtSeconds, h, headRow, replace, statusBadge } from "../dom.js";

const STATUSES = ["queued", "running", "cancelling", "succeeded", "failed", "cancelled"];
const PAGE = 20;

export function modelLabel(spec) {
  const model = spec?.model || {};
  return model.upload_id || model.uri || "–";
}

export function methodsLabel(spec) {
  return (spec?.steps || []).map((s) => [s.method, s.scheme || s.algorithm].filter(Boolean).join(" ")).join(" → ");
}

function parseMetadata(text) {
  const out = {};
  for (const pair of text.split(",").map((p) => p.trim()).filter(Boolean)) {
    const eq = pair.indexOf("=");
    if (eq > 0) out[`metadata[${pair.slice(0, eq).trim()}]`] = pair.slice(eq + 1).trim();
  }
  return out;
}

function row(job) {
  const s = job.summary || {};
  const running = job.status === "running" || job.status === "cancelling";
  return h(
    "tr",
    { dataset: { jobId: job.id } },
    h("td", {}, h("a", { href: `#/jobs/${encodeURIComponent(job.id)}` }, job.id)),
    h("td", {}, statusBadge(job.status), running ? h("span", { class: "nowrap" }, ` ${Math.round(job.progress.fraction * 100)} %`) : null),
    h("td", {}, methodsLabel(job.spec)),
    h("td", {}, h("code", {}, modelLabel(job.spec))),
    h("td", {}, Object.entries(job.metadata).map(([k, v]) => h("span", { class: "tag" }, `${k}=${v}`))),
    h("td", {}, fmtDate(job.created_at)),
    h("td", { class: "num" }, fmtSeconds(duration(job))),
    h("td", { class: "num" }, fmtRatio(s.size_ratio)),
    h("td", { class: "num" }, fmtPct(s.perplexity_delta_pct)),
    h("td", { class: "num" }, fmtRatio(s.decode_speedup)),
  );
}

/** Render the list; `params` carries the filters and the cursor (kept in the hash so Back works). */
export async function jobsView(root, { signal, params }) {
  const status = params.get("status") || "";
  const metadata = params.get("metadata") || "";
  const after = params.get("after") || "";
  const page = await api(
    `/v1/jobs${query({ status, after, limit: PAGE, ...parseMetadata(metadata) })}`,
    { signal },
  );

  const statusSelect = h(
    "select",
    { id: "filter-status", name: "status" },
    h("option", { value: "" }, "any"),
    STATUSES.map((st) => h("option", { value: st, selected: st === status }, st)),
  );
  const metaInput = h("input", { id: "filter-metadata", name: "metadata", value: metadata, placeholder: "team=search, run=3" });
  const filters = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Filter jobs" },
    h("label", { for: "filter-status" }, "Status"),
    statusSelect,
    h("label", { for: "filter-metadata" }, "Metadata"),
    metaInput,
    h("button", { type: "submit" }, "Filter"),
  );
  filters.addEventListener("submit", (event) => {
    event.preventDefault();
    location.hash = `#/jobs${query({ status: statusSelect.value, metadata: metaInput.value.trim() })}`;
  });

  const table = page.data.length
    ? h(
        "table",
        { class: "jobs" },
        h("caption", { class: "visually-hidden" }, "Jobs, newest first"),
        headRow(["Job", "Status", "Steps", "Model", "Metadata", "Created", "Duration", "Size", "Perplexity", "Decode speed"]),
        h("tbody", {}, page.data.map(row)),
      )
    : h("p", { class: "empty" }, "No jobs yet. ", h("a", { href: "#/new" }, "Submit one"), ".");

  const pager = h(
    "nav",
    { class: "pager", "aria-label": "Pages" },
    after ? h("a", { href: `#/jobs${query({ status, metadata })}` }, "First page") : null,
    page.has_more
      ? h("a", { href: `#/jobs${query({ status, metadata, after: page.data.at(-1).id })}`, rel: "next" }, "Next page")
      : null,
  );
  replace(root, h("h1", {}, "Jobs"), filters, table, pager);

  // While something is in flight, refresh the list in place every few seconds (no reload needed).
  if (page.data.some((j) => !["succeeded", "failed", "cancelled"].includes(j.status))) {
    const refresh = async () => {
      if (signal.aborted) return;
      if (filters.contains(document.activeElement)) {
        timer = setTimeout(refresh, 3000); // the user is typing a filter: do not pull the form away
        return;
      }
      try {
        await jobsView(root, { signal, params });
      } catch (err) {
        if (!signal.aborted) root.append(errorBox(err));
      }
    };
    let timer = setTimeout(refresh, 3000);
    signal.addEventListener("abort", () => clearTimeout(timer), { once: true });
  }
}
