// The public HTTP API, as the CLI uses it. The bearer token lives in sessionStorage only (gone
// when the tab closes), travels in the Authorization header only, and never in a URL. Any 401
// is announced on `authEvents` so that the app shows the login form again.

import { openStream } from "./sse.js";

const TOKEN_KEY = "provisioning.console.token";

// The API is served beside /ui/ (same origin, same prefix when behind a proxy).
export const BASE = location.pathname.replace(/\/ui(\/.*)?$/, "");

export const authEvents = new EventTarget();

export class ApiError extends Error {
  constructor(status, code, message) {
    super(message || `HTTP ${status}`);
    this.status = status;
    this.code = code || "";
  }
}

export function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  sessionStorage.setItem(TOKEN_KEY, value);
}

export function clearToken() {
  sessionStorage.removeItem(TOKEN_KEY);
}

export function authHeaders(extra = {}) {
  const headers = { ...extra };
  const t = token();
  if (t) headers.Authorization = `Bearer ${t}`;
  return headers;
}

export function unauthorized() {
  authEvents.dispatchEvent(new Event("unauthorized"));
}

async function request(method, path, { body, signal } = {}) {
  const headers = authHeaders({ Accept: "application/json" });
  const init = { method, headers, signal, cache: "no-store", credentials: "omit" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(BASE + path, init);
  let data = null;
  try {
    data = await response.json();
  } catch {
    data = null;
  }
  if (response.status === 401) {
    unauthorized();
    throw new ApiError(401, "unauthorized", "missing or invalid token");
  }
  if (!response.ok) {
    const error = (data && data.error) || {};
    throw new ApiError(response.status, error.code, error.message || response.statusText);
  }
  return data;
}

const enc = encodeURIComponent;

/** Is the API open without a token? (auth off) Answers 401 silently otherwise. */
export async function probe(withToken) {
  const headers = { Accept: "application/json" };
  if (withToken) headers.Authorization = `Bearer ${withToken}`;
  const response = await fetch(`${BASE}/workflows?limit=1`, {
    headers, cache: "no-store", credentials: "omit",
  });
  if (response.status === 401) return false;
  if (!response.ok) throw new ApiError(response.status, "", response.statusText);
  return true;
}

export function health() {
  return fetch(`${BASE}/health`, { cache: "no-store", credentials: "omit" }).then(
    (r) => r.json().catch(() => ({ status: "unhealthy" })),
  );
}

export function listWorkflows({ status = "", name = "", limit = 25, offset = 0 } = {}, signal) {
  const query = new URLSearchParams({ limit: String(limit), offset: String(offset) });
  if (status) query.set("status", status);
  if (name) query.set("name", name);
  return request("GET", `/workflows?${query}`, { signal });
}

export function getWorkflow(id, { tasks = true, signal } = {}) {
  return request("GET", `/workflows/${enc(id)}${tasks ? "" : "?tasks=false"}`, { signal });
}

export function getTask(key, signal) {
  return request("GET", `/tasks/${enc(key)}`, { signal });
}

export function listExecutors(signal) {
  return request("GET", "/executors", { signal });
}

export function cancelWorkflow(id) {
  return request("POST", `/workflows/${enc(id)}/cancel`, { body: {} });
}

export function retryWorkflow(id) {
  return request("POST", `/workflows/${enc(id)}/retry`, { body: {} });
}

export function approveWorkflow(id) {
  return request("POST", `/workflows/${enc(id)}/approve`, { body: {} });
}

export function rejectWorkflow(id, reason) {
  return request("POST", `/workflows/${enc(id)}/reject`, { body: { reason } });
}

/** The live events of a workflow (SSE, replayed from the start). See sse.js. */
const LOG_PAGE = 5000;
const LOG_PAGES_MAX = 200; // 1,000,000 lines: more than one attempt can store

async function allLogPages(key, only, signal) {
  const lines = [];
  let cursor = "";
  for (let page = 0; page < LOG_PAGES_MAX; page += 1) {
    const body = await request(
      "GET", `/tasks/${enc(key)}/logs?limit=${LOG_PAGE}${only}${cursor}`, { signal },
    );
    lines.push(...(body.lines || []));
    if (!body.next_cursor || !(body.lines || []).length) break;
    cursor = `&cursor=${enc(body.next_cursor)}`;
  }
  return lines;
}

export function workflowEvents(id, handlers) {
  return openStream(`${BASE}/workflows/${enc(id)}/events`, handlers);
}

/**
 * Every log line of one attempt of a task: the one place that knows how logs are fetched.
 * `follow: true` streams them live (calling `onLines(lines)` as they come, until the task
 * ends) and returns the stream (with close()); otherwise resolves to the lines, read page by
 * page (`limit`, `next_cursor`) so that no answer is larger than a page.
 */
export function taskLogs(key, attempt, { follow = false, onLines, onEnd, signal } = {}) {
  const only = attempt ? `&attempt=${enc(String(attempt))}` : "";
  if (!follow) return allLogPages(key, only, signal);
  return openStream(`${BASE}/tasks/${enc(key)}/logs?follow=true${only}`, {
    onEvent(kind, data) {
      if (kind !== "log" || !data || !Array.isArray(data.lines)) return;
      if (attempt && data.attempt !== attempt) return;
      onLines(
        data.lines.map((line) => ({
          attempt: data.attempt, stream: data.stream, line: String(line), at: data.at,
        })),
      );
    },
    onEnd,
    // the server ends the stream when the task has ended: do not reconnect (a reconnect
    // would replay every line again)
    reconnectOnEnd: () => false,
  });
}
