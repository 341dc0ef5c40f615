// Upload files the way the API wants: declare (path, size, sha256) → PUT each file (or its parts) to the
// URLs it hands out → complete. Hashing uses WebCrypto in the browser. Which files and parts are already
// PUT is remembered in this tab's sessionStorage under the upload id, so a retry after a failure (or a
// reload) sends only what is missing, with fresh URLs from POST /v1/uploads/{id}/urls.
import { api, ApiError } from "./api.js";

const STATE = "modelpress.upload.";

/** Path inside the upload: relative to the chosen folder (its top directory dropped) or the file name. */
export function uploadPath(file) {
  const rel = file.webkitRelativePath || "";
  return rel.includes("/") ? rel.slice(rel.indexOf("/") + 1) : file.name;
}

async function sha256Hex(blob) {
  if (!crypto.subtle) {
    // Browsers offer WebCrypto only in secure contexts: https, or http on localhost.
    throw new ApiError(0, { title: "Cannot hash files", detail: "open the console over https (or on localhost) to upload" });
  }
  // WebCrypto has no incremental digest, so the file is read whole once; fine for the model sizes a browser
  // upload is for (the API and CLI take anything larger).
  const digest = await crypto.subtle.digest("SHA-256", await blob.arrayBuffer());
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}

function put(url, body, onProgress, signal) {
  // XMLHttpRequest, not fetch: only it reports upload progress. No Authorization header: the URL is signed.
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("PUT", url);
    xhr.upload.onprogress = (e) => e.lengthComputable && onProgress(e.loaded);
    xhr.onload = () => (xhr.status >= 200 && xhr.status < 300 ? resolve(xhr.getResponseHeader("ETag")) : reject(new ApiError(xhr.status, { title: "Upload failed", detail: `PUT answered HTTP ${xhr.status}` })));
    xhr.onerror = () => reject(new ApiError(0, { title: "Upload failed", detail: "the storage URL could not be reached" }));
    xhr.onabort = () => reject(new DOMException("aborted", "AbortError"));
    signal?.addEventListener("abort", () => xhr.abort(), { once: true });
    xhr.send(body);
  });
}

function fingerprint(entries) {
  return entries.map((e) => `${e.path}:${e.size}:${e.sha256}`).join("|");
}

function loadState(fp) {
  for (let i = 0; i < sessionStorage.length; i++) {
    const name = sessionStorage.key(i);
    if (!name.startsWith(STATE)) continue;
    const state = JSON.parse(sessionStorage.getItem(name));
    if (state.fingerprint === fp) return state;
  }
  return null;
}

const saveState = (state) => sessionStorage.setItem(STATE + state.id, JSON.stringify(state));

/**
 * Upload `files` (File objects); `report(path, phase, fraction)` is called as each file hashes and uploads.
 * Resolves to the completed upload.
 */
export async function uploadFiles(files, report, signal) {
  const entries = [];
  for (const file of files) {
    const path = uploadPath(file);
    report(path, "hashing", 0);
    entries.push({ path, size: file.size, sha256: await sha256Hex(file), file });
    report(path, "hashed", 0);
  }
  const declared = entries.map(({ path, size, sha256 }) => ({ path, size, sha256 }));
  const fp = fingerprint(declared);
  let state = loadState(fp);
  let upload = null;
  if (state) {
    try {
      upload = await api(`/v1/uploads/${encodeURIComponent(state.id)}/urls`, { method: "POST", signal });
    } catch (err) {
      if (!(err instanceof ApiError) || err.status >= 500 || err.status === 0) throw err;
      sessionStorage.removeItem(STATE + state.id); // expired, completed or gone: start again
      state = null;
    }
  }
  if (!state) {
    upload = await api("/v1/uploads", { method: "POST", body: { files: declared }, signal });
    state = { id: upload.id, fingerprint: fp, done: {} };
    saveState(state);
  }
  if (upload.status === "complete") return upload;

  const byPath = Object.fromEntries(entries.map((e) => [e.path, e]));
  for (const target of upload.targets || []) {
    const entry = byPath[target.path];
    if (state.done[target.path] === true) {
      report(target.path, "uploaded", 1);
      continue;
    }
    if (target.url) {
      await put(target.url, entry.file, (n) => report(target.path, "uploading", entry.size ? n / entry.size : 1), signal);
      state.done[target.path] = true;
    } else {
      const doneParts = new Set(state.done[target.path] || []);
      let sent = 0;
      for (const part of target.parts || []) {
        const start = (part.part_number - 1) * target.part_size;
        const blob = entry.file.slice(start, Math.min(start + target.part_size, entry.size));
        if (!doneParts.has(part.part_number)) {
          await put(part.url, blob, (n) => report(target.path, "uploading", (sent + n) / entry.size), signal);
          doneParts.add(part.part_number);
          state.done[target.path] = [...doneParts];
          saveState(state);
        }
        sent += blob.size;
      }
      state.done[target.path] = true;
    }
    saveState(state);
    report(target.path, "uploaded", 1);
  }
  const done = await api(`/v1/uploads/${encodeURIComponent(upload.id)}/complete`, { method: "POST", signal });
  sessionStorage.removeItem(STATE + upload.id);
  return done;
}
