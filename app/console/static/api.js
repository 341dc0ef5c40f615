// The public API, called with the key the user signed in with. The key lives in this tab's
// sessionStorage only: never in a URL, a cookie or localStorage, and it leaves with the tab.
const KEY_NAME = "modelpress.api_key";

export const getKey = () => sessionStorage.getItem(KEY_NAME);
export const setKey = (key) => sessionStorage.setItem(KEY_NAME, key);
export const clearKey = () => sessionStorage.removeItem(KEY_NAME);

/** An RFC 9457 problem answered by the API (or a network failure, status 0). */
export class ApiError extends Error {
  constructor(status, problem) {
    super(problem.detail || problem.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem;
    this.errors = Array.isArray(problem.errors) ? problem.errors : [];
  }
}

function authHeaders(extra = {}) {
  return { Authorization: `Bearer ${getKey() || ""}`, ...extra };
}

async function decode(response) {
  if (response.status === 204) return null;
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

/** Call the API; JSON in, JSON out; a non-2xx answer throws ApiError with the problem's detail. */
export async function api(path, { method = "GET", body, headers = {}, signal } = {}) {
  const init = { method, headers: authHeaders({ Accept: "application/json", ...headers }), signal, cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, { title: "Network error", detail: `the API could not be reached (${err.message})` });
  }
  const data = await decode(response);
  if (!response.ok) {
    const problem = data && typeof data === "object" ? data : { title: response.statusText, detail: String(data || "") };
    throw new ApiError(response.status, problem);
  }
  return data;
}

/** `?a=1&b=2` from an object, skipping empty values; arrays repeat the key. */
export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    for (const item of Array.isArray(value) ? value : [value]) {
      if (item !== undefined && item !== null && item !== "") search.append(name, String(item));
    }
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

function parseFrame(frame) {
  const event = { id: null, type: "message", data: "" };
  for (const line of frame.split("\n")) {
    if (!line || line.startsWith(":")) continue; // keep-alive comment
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") event.id = Number(value);
    else if (field === "event") event.type = value;
    else if (field === "data") event.data += value;
  }
  return event.data ? { id: event.id, type: event.type, ...JSON.parse(event.data) } : null;
}

const pause = (ms, signal) =>
  new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
  });

/**
 * Follow a job's server-sent events. EventSource cannot send an Authorization header, so the stream is
 * read with fetch; after a dropped connection it resumes from the last event id (the API's `after`).
 * Resolves when the API ends the stream (the job is finished) or the signal aborts.
 */
export async function followEvents(jobId, { after = 0, onEvent, signal }) {
  let cursor = after;
  while (!signal.aborted) {
    try {
      const response = await fetch(`/v1/jobs/${encodeURIComponent(jobId)}/events/stream${query({ after: cursor })}`, {
        headers: authHeaders({ Accept: "text/event-stream" }),
        signal,
        cache: "no-store",
      });
      if (!response.ok) throw new ApiError(response.status, (await decode(response)) || {});
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) return;
        buffer += value.replace(/\r\n/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = parseFrame(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (event) {
            if (event.id !== null) cursor = event.id;
            onEvent(event);
          }
        }
      }
    } catch (err) {
      if (signal.aborted || err.name === "AbortError") return;
      if (err instanceof ApiError && err.status >= 400 && err.status < 500) throw err;
      await pause(2000, signal); // a dropped connection: resume where it stopped
    }
  }
}
