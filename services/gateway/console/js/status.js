// Statuses and their colours: one table for the canvas and the DOM (badges read the colour
// from a CSS variable set here). An unknown status gets the neutral colour.

export const NEUTRAL = "#9aa0a6";

export const COLOURS = {
  // tasks
  pending: "#b8c0c8",
  waiting: "#a07fd0",
  awaiting_approval: "#e3a21a",
  queued: "#86b3e8",
  running: "#2a78d6",
  cancelling: "#c9773a",
  retrying: "#f08c00",
  completed: "#2f9e5b",
  failed: "#d64040",
  cancelled: "#6e7479",
  skipped: "#d5d9dd",
  // workflows (besides the above)
  compensating: "#c45ca2",
  compensation_failed: "#8b1e3f",
};

export const TASK_STATUSES = [
  "pending", "waiting", "awaiting_approval", "queued", "running", "cancelling", "retrying",
  "completed", "failed", "cancelled", "skipped",
];
export const WORKFLOW_STATUSES = [
  "queued", "running", "awaiting_approval", "compensating", "completed", "failed",
  "compensation_failed", "cancelled",
];
export const TERMINAL_WORKFLOW = new Set(["completed", "failed", "cancelled", "compensation_failed"]);
export const TERMINAL_TASK = new Set(["completed", "failed", "cancelled", "skipped"]);

export function colour(status) {
  return Object.hasOwn(COLOURS, status) ? COLOURS[status] : NEUTRAL;
}

/** Dark text reads better on these light fills. */
const LIGHT = new Set(["pending", "queued", "skipped", "awaiting_approval", "retrying"]);
export function textColour(status) {
  return LIGHT.has(status) || !Object.hasOwn(COLOURS, status) ? "#1d2328" : "#ffffff";
}

/** A status badge: the status as text, coloured from the table. */
export function paintBadge(el, status) {
  el.textContent = String(status ?? "");
  el.dataset.status = String(status ?? "");
  el.style.setProperty("--c", colour(status));
  el.style.setProperty("--fg", textColour(status));
  return el;
}

/**
 * Order of a task's statuses within one attempt: an event for the same attempt with a lower
 * rank than what is shown is older (a replay) and is not applied.
 */
const RANK = {
  pending: 0,
  waiting: 1,
  awaiting_approval: 1,
  queued: 2,
  running: 3,
  cancelling: 4,
};
export function taskRank(status) {
  return Object.hasOwn(RANK, status) ? RANK[status] : 5; // ends and retrying
}

const WF_RANK = { queued: 0, running: 1, awaiting_approval: 1, compensating: 2 };
export function workflowRank(status) {
  return Object.hasOwn(WF_RANK, status) ? WF_RANK[status] : 3;
}
