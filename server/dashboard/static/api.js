// Thin fetch wrappers for the Florist REST API (same origin, /api/v1).

const BASE = "/api/v1";

/** An HTTP error from the API, carrying its status, the server's `detail` text and, for 422, its list. */
export class ApiError extends Error {
  constructor(status, message, details = []) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.details = details; // FastAPI's validation errors: [{loc, msg, type}, ...]
  }
}

/** The CSRF value of this login (the readable cookie the API set beside its HttpOnly session). */
function csrfToken() {
  const match = document.cookie.match(/(?:^|;\s*)florist_csrf=([^;]*)/);
  return match ? decodeURIComponent(match[1]) : null;
}

/** The login page, coming back here afterwards. */
export function loginUrl() {
  return `/login?next=${encodeURIComponent(window.location.pathname + window.location.search)}`;
}

async function request(path, options = {}) {
  let response;
  const method = (options.method ?? "GET").toUpperCase();
  // A write with the session cookie must echo its CSRF value (docs/security.md).
  const csrf = method === "GET" || method === "HEAD" ? null : csrfToken();
  try {
    // no-store: every refresh must see the server's current state, never a cached answer.
    response = await fetch(BASE + path, {
      cache: "no-store",
      ...options,
      headers: {
        Accept: "application/json",
        ...(csrf ? { "X-CSRF-Token": csrf } : {}),
        ...(options.headers ?? {}),
      },
    });
  } catch (err) {
    throw new ApiError(0, `cannot reach the server (${err.message})`);
  }
  // Logged out, expired or revoked: log in again, then come back to this page.
  if (response.status === 401 && !path.startsWith("/session")) window.location.assign(loginUrl());
  if (response.status === 204) return null;
  if (!response.ok) {
    let message = `HTTP ${response.status} ${response.statusText}`.trim();
    let details = [];
    try {
      const body = await response.json();
      if (typeof body.detail === "string") message = body.detail;
      else if (Array.isArray(body.detail)) {
        details = body.detail;
        message = body.detail.map((d) => d.msg).join("; ");
      }
    } catch {
      // Not JSON (a proxy's error page, say): the status line is all there is to show.
    }
    throw new ApiError(response.status, message, details);
  }
  return response.json();
}

const experimentPath = (id) => `/experiments/${encodeURIComponent(id)}`;

/**
 * Every page of a paginated listing ({data, count, next_cursor}) as one {data, count}: the
 * callers below draw whole experiments, so they follow `next_cursor` to the last page.
 */
async function requestAll(path, query = new URLSearchParams()) {
  const data = [];
  let page;
  let cursor = null;
  do {
    const params = new URLSearchParams(query);
    if (cursor !== null) params.set("cursor", String(cursor));
    const text = params.toString();
    page = await request(`${path}${text ? `?${text}` : ""}`);
    data.push(...page.data);
    cursor = page.next_cursor ?? null;
  } while (cursor !== null);
  const { next_cursor: _last, ...rest } = page;
  return { ...rest, data };
}

// The experiments page shows the newest page (100), as it always has.
export const listExperiments = () => request("/experiments");
export const getExperiment = (id) => request(experimentPath(id));
export const listRounds = (id) => requestAll(`${experimentPath(id)}/rounds`);
export const listUpdates = (id) => requestAll(`${experimentPath(id)}/updates`);
/** The experiment's event log (GET …/log): events of `kinds` (all when empty) with an id above `after`. */
export function listLog(id, { kinds = [], after = 0 } = {}) {
  const query = new URLSearchParams(kinds.map((kind) => ["kind", kind]));
  if (after) query.set("after", String(after));
  return requestAll(`${experimentPath(id)}/log`, query);
}
export const cancelExperiment = (id) => request(`${experimentPath(id)}/cancel`, { method: "POST" });
export const resumeExperiment = (id) => request(`${experimentPath(id)}/resume`, { method: "POST" });
export const listStrategies = () => request("/strategies");
export const listWorkloads = () => request("/workloads");
export const listNodes = () => requestAll("/nodes");
export const createExperiment = (body) =>
  request("/experiments", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });

/** The URL of the experiment's server-sent event stream (see GET …/events in the OpenAPI). */
export const eventsUrl = (id) => `${BASE}${experimentPath(id)}/events`;

/** The API's auth mode and who this page is logged in as (GET /session). */
export const getSession = () => request("/session");
export const logIn = (token) =>
  request("/session", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ token }),
  });
export const logOut = () => request("/session", { method: "DELETE" });
