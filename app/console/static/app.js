// The console's entry point: sign-in, and a hash router (#/jobs, #/jobs/<id>, #/new, #/webhooks, #/keys).
// Hash routes keep everything one static page, so the server needs no route per screen.
import { api, ApiError, clearKey, getKey, setKey } from "./api.js";
import { announce, errorBox, h, replace } from "./dom.js";
import { jobsView } from "./views/jobs.js";
import { jobView } from "./views/job.js";
import { newJobView } from "./views/newjob.js";
import { webhooksView } from "./views/webhooks.js";
import { keysView } from "./views/keys.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
let current = null; // AbortController of the view on screen: streams and timers stop when it goes

function signInView(root, message) {
  const input = h("input", { id: "api-key", name: "api-key", type: "password", autocomplete: "off", required: true, spellcheck: "false" });
  const status = h("div", { id: "sign-in-status" });
  const form = h(
    "form",
    { class: "card narrow", "aria-labelledby": "sign-in-title" },
    h("h1", { id: "sign-in-title" }, "Sign in"),
    h("p", {}, "Use an API key of your tenant. It stays in this browser tab (session storage) and is sent only as the Authorization header."),
    h("label", { for: "api-key" }, "API key"),
    input,
    h("button", { type: "submit" }, "Sign in"),
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    setKey(input.value.trim());
    try {
      await api("/v1/limits");
      if (!location.hash || location.hash === "#/" || location.hash === "#/sign-in") location.hash = "#/jobs";
      else route();
    } catch (err) {
      clearKey();
      replace(status, errorBox(err));
    }
  });
  replace(root, message ? errorBox(message) : null, form);
  input.focus();
}

function notFound(root) {
  replace(root, h("h1", {}, "Not found"), h("p", {}, h("a", { href: "#/jobs" }, "Back to the jobs")));
}

async function route() {
  current?.abort();
  current = new AbortController();
  const { signal } = current;
  if (!getKey()) {
    nav.hidden = true;
    signInView(main);
    return;
  }
  nav.hidden = false;
  const [path, search] = (location.hash.slice(1) || "/jobs").split("?");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  for (const link of nav.querySelectorAll("a")) {
    const active = link.getAttribute("href") === `#/${parts[0] || "jobs"}` && parts.length === 1;
    if (active) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const params = new URLSearchParams(search || "");
  try {
    if (parts[0] === "jobs" && parts.length === 1) await jobsView(main, { signal, params });
    else if (parts[0] === "jobs" && parts.length === 2) await jobView(main, parts[1], { signal });
    else if (parts[0] === "new") await newJobView(main, { signal });
    else if (parts[0] === "webhooks") await webhooksView(main, { signal });
    else if (parts[0] === "keys") await keysView(main, { signal });
    else notFound(main);
  } catch (err) {
    if (err.name === "AbortError" || signal.aborted) return;
    if (err instanceof ApiError && err.status === 401) {
      clearKey();
      nav.hidden = true;
      signInView(main, err);
      return;
    }
    const titles = { jobs: parts.length === 2 ? "Job" : "Jobs", new: "New job", webhooks: "Webhooks", keys: "API keys" };
    replace(main, h("h1", {}, titles[parts[0]] || "Error"), errorBox(err));
  }
  const heading = main.querySelector("h1");
  if (heading) announce(heading.textContent);
}

document.getElementById("sign-out").addEventListener("click", () => {
  clearKey();
  location.hash = "#/sign-in";
  route();
});
window.addEventListener("hashchange", route);
route();
