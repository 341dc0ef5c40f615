// This tenant's API keys: list (prefix only), create with a subset of the scopes (the key shown once), revoke.
import { api } from "../api.js";
import { cardForm, checkboxFieldset, errorBox, fmtDate, h, headRow, replace, secretNotice } from "../dom.js";
import { resolve } from "../schemaform.js";

export async function keysView(root, { signal }) {
  const [list, doc] = await Promise.all([api("/v1/keys?include_revoked=true", { signal }), api("/openapi.json", { signal })]);
  const create = resolve(doc, doc.components.schemas.KeyCreate);
  const scopes = resolve(doc, create.properties.scopes.items).enum;
  const notice = h("div", { id: "key-notice" });
  const rerender = () => keysView(root, { signal }).catch((err) => replace(notice, errorBox(err)));

  const rows = list.data.map((key) => {
    const revoke = h("button", { type: "button", class: "danger", disabled: Boolean(key.revoked_at) }, "Revoke");
    revoke.addEventListener("click", async () => {
      if (!window.confirm(`Revoke the key ${key.prefix}…? Requests with it fail at once.`)) return;
      try {
        await api(`/v1/keys/${encodeURIComponent(key.id)}`, { method: "DELETE", signal });
        await rerender();
      } catch (err) {
        replace(notice, errorBox(err));
      }
    });
    return h(
      "tr",
      {},
      h("td", {}, key.name),
      h("td", {}, h("code", {}, `${key.prefix}…`)),
      h("td", {}, key.scopes.join(", ")),
      h("td", {}, fmtDate(key.created_at)),
      h("td", {}, fmtDate(key.last_used_at)),
      h("td", {}, key.revoked_at ? h("span", {}, "revoked ", fmtDate(key.revoked_at)) : revoke),
    );
  });

  const name = h("input", { id: "key-name", type: "text", required: true, maxlength: 200, value: "console" });
  const boxes = scopes.map((s) => h("input", { type: "checkbox", id: `scope-${s.replace(":", "-")}`, value: s, checked: s.startsWith("jobs:") }));
  const form = cardForm({
    id: "new-key",
    title: "New key",
    submitLabel: "Create key",
    fields: [h("label", { for: "key-name" }, "Name"), name, checkboxFieldset("Scopes (at most those of the key you signed in with)", boxes)],
    errors: notice,
    onSubmit: async () => {
      const scopes = boxes.filter((b) => b.checked).map((b) => b.value);
      const out = await api("/v1/keys", { method: "POST", body: { name: name.value.trim(), scopes }, signal });
      await rerender();
      replace(document.getElementById("key-notice"), secretNotice(`Key ${out.prefix}… created.`, out.key));
    },
  });

  replace(
    root,
    h("h1", {}, "API keys"),
    notice,
    h("table", {}, headRow(["Name", "Prefix", "Scopes", "Created", "Last used", ""]), h("tbody", {}, rows)),
    form,
  );
}
