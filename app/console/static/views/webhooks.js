// Webhook endpoints: list, create (the secret shown once), rotate, disable/enable, delete; the delivery log.
import { api, query } from "../api.js";
import { cardForm, checkboxFieldset, errorBox, fmtDate, h, headRow, replace, secretNotice, statusBadge } from "../dom.js";
import { resolve } from "../schemaform.js";

async function deliveriesPanel(endpoint, signal, notice) {
  const page = await api(`/v1/webhooks/${encodeURIComponent(endpoint.id)}/deliveries${query({ limit: 50 })}`, { signal });
  if (!page.data.length) return h("p", { class: "muted" }, "No deliveries yet.");
  return h(
    "table",
    { class: "deliveries" },
    h("caption", {}, "Deliveries of ", endpoint.url),
    headRow(["Event", "Job", "Status", "Attempts", "Last answer", "Created", ""]),
    h(
      "tbody",
      {},
      page.data.map((d) => {
        const again = h("button", { type: "button", class: "secondary" }, "Redeliver");
        again.addEventListener("click", async () => {
          again.disabled = true;
          try {
            await api(`/v1/webhooks/${encodeURIComponent(endpoint.id)}/deliveries/${encodeURIComponent(d.id)}/redeliver`, { method: "POST", signal });
            replace(notice, h("p", { role: "status" }, `Delivery ${d.id} queued again.`));
          } catch (err) {
            replace(notice, errorBox(err));
          } finally {
            again.disabled = false;
          }
        });
        return h(
          "tr",
          {},
          h("td", {}, d.event_type),
          h("td", {}, d.job_id ? h("a", { href: `#/jobs/${encodeURIComponent(d.job_id)}` }, d.job_id) : "–"),
          h("td", {}, statusBadge(d.status)),
          h("td", { class: "num" }, String(d.attempt_count)),
          h("td", {}, d.last_status_code ? `HTTP ${d.last_status_code}` : d.last_error || "–"),
          h("td", {}, fmtDate(d.created_at)),
          // A pending delivery is retried by the relay on its own; only a finished one can be sent again.
          h("td", {}, d.status === "pending" ? h("span", { class: "muted" }, "next attempt ", fmtDate(d.next_attempt_at)) : again),
        );
      }),
    ),
  );
}

export async function webhooksView(root, { signal }) {
  const [list, doc] = await Promise.all([api("/v1/webhooks", { signal }), api("/openapi.json", { signal })]);
  const create = resolve(doc, doc.components.schemas.EndpointCreate);
  const eventTypes = resolve(doc, create.properties.events.anyOf.find((o) => o.type === "array").items).enum;
  const notice = h("div", { id: "webhook-notice" });
  const deliveries = h("div", { id: "deliveries" });
  const rerender = () => webhooksView(root, { signal }).catch((err) => replace(notice, errorBox(err)));

  const action = (label, run, cls = "secondary") => {
    const button = h("button", { type: "button", class: cls }, label);
    button.addEventListener("click", async () => {
      button.disabled = true;
      try {
        await run();
      } catch (err) {
        replace(notice, errorBox(err));
        button.disabled = false;
      }
    });
    return button;
  };

  const rows = list.data.map((ep) =>
    h(
      "tr",
      {},
      h("td", {}, ep.url, ep.description ? h("div", { class: "muted" }, ep.description) : null),
      h("td", {}, (ep.events || ["all events"]).join(", ")),
      h("td", {}, ep.enabled ? "enabled" : `disabled${ep.disabled_reason ? ` (${ep.disabled_reason})` : ""}`),
      h("td", {}, fmtDate(ep.created_at)),
      h(
        "td",
        { class: "actions" },
        action("Deliveries", async () => replace(deliveries, await deliveriesPanel(ep, signal, notice))),
        action("Rotate secret", async () => {
          if (!window.confirm("Rotate the signing secret? The old one keeps signing for 24 h.")) return;
          const out = await api(`/v1/webhooks/${encodeURIComponent(ep.id)}/rotate-secret`, { method: "POST", body: {}, signal });
          await rerender();
          replace(document.getElementById("webhook-notice"), secretNotice("New signing secret.", out.secret));
        }),
        action(ep.enabled ? "Disable" : "Enable", async () => {
          await api(`/v1/webhooks/${encodeURIComponent(ep.id)}`, { method: "PATCH", body: { enabled: !ep.enabled }, signal });
          await rerender();
        }),
        action("Delete", async () => {
          if (!window.confirm(`Delete the endpoint ${ep.url}?`)) return;
          await api(`/v1/webhooks/${encodeURIComponent(ep.id)}`, { method: "DELETE", signal });
          await rerender();
        }, "danger"),
      ),
    ),
  );

  const url = h("input", { id: "webhook-url", type: "url", required: true, placeholder: "https://hooks.example.com/modelpress" });
  const description = h("input", { id: "webhook-description", type: "text", maxlength: 500 });
  const boxes = eventTypes.map((t) => h("input", { type: "checkbox", id: `ev-${t}`, value: t }));
  const form = cardForm({
    id: "new-webhook",
    title: "New endpoint",
    submitLabel: "Create endpoint",
    fields: [
      h("label", { for: "webhook-url" }, "URL"),
      url,
      h("label", { for: "webhook-description" }, "Description"),
      description,
      checkboxFieldset("Events (none checked: all)", boxes),
    ],
    errors: notice,
    onSubmit: async () => {
      const events = boxes.filter((b) => b.checked).map((b) => b.value);
      const body = { url: url.value.trim(), description: description.value, events: events.length ? events : null };
      const out = await api("/v1/webhooks", { method: "POST", body, signal });
      await rerender();
      replace(document.getElementById("webhook-notice"), secretNotice(`Endpoint ${out.id} created; its signing secret:`, out.secret));
    },
  });

  replace(
    root,
    h("h1", {}, "Webhooks"),
    notice,
    rows.length
      ? h("table", {}, headRow(["URL", "Events", "State", "Created", "Actions"]), h("tbody", {}, rows))
      : h("p", { class: "empty" }, "No endpoints."),
    deliveries,
    form,
  );
}
