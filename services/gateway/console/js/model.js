// The run model: the workflow and its tasks as the page shows them, built once from
// GET /workflows/{id} and then kept current by the workflow's events.
//
// The event stream replays the whole history before going live, so events older than the
// snapshot arrive first. They are fenced out two ways: by run (a workflow retry starts a new
// run; the snapshot knows how many there have been, the stream says when each begins) and,
// within a run, by (attempt, rank of the status): an event that would move a task backwards
// is history the snapshot already holds. Every event still adds its timestamp to the task's
// per-attempt timings (the timeline needs the queued times only events carry).

import { parseTime, } from "./dom.js";
import { TERMINAL_TASK, taskRank, workflowRank } from "./status.js";

const FANOUT_RE = /^(.*)\[(\d+)\]$/;
const RETRY_RE = /\brun (\d+)\b/;

export class Task {
  constructor(id) {
    this.id = id;
    this.action = "";
    this.args = undefined;
    this.status = "pending";
    this.attempt = 0;
    this.maxAttempts = 1;
    this.progress = 0;
    this.message = "";
    this.executor = null;
    this.deps = [];
    this.waitingFor = "";
    this.error = null;
    this.reason = null;
    this.parent = null; // fan-out: the task this one was made from
    this.index = -1; // position in the definition (or creation order)
    // attempt -> {queued, started, finished, outcome, executor} in ms since the epoch
    this.timing = new Map();
  }

  time(attempt) {
    let t = this.timing.get(attempt);
    if (!t) {
      t = { queued: null, started: null, finished: null, outcome: null, executor: null };
      this.timing.set(attempt, t);
    }
    return t;
  }
}

export class RunModel {
  constructor(workflowId) {
    this.id = workflowId;
    this.workflow = { workflow_id: workflowId, status: "queued", name: "" };
    this.tasks = new Map();
    this.runs = 1; // runs the snapshot knows of
    this.replayRun = 1; // the run the event stream is in
    this.structure = 0; // bumped when tasks are added (the layout must be redone)
    this.changed = new Set(); // task ids changed since the last takeChanges()
    this.workflowChanged = false;
    this.counts = {};
    this.countsDirty = true;
  }

  /** Load a full GET /workflows/{id} answer (tasks included). */
  loadSnapshot(view) {
    this.workflow = view;
    this.runs = view.runs || 1;
    let added = false;
    (view.tasks || []).forEach((t, i) => {
      let task = this.tasks.get(t.id);
      if (!task) {
        task = new Task(t.id);
        this.tasks.set(t.id, task);
        added = true;
      }
      task.index = i;
      this.applyTaskView(task, t);
    });
    if (added) this.structure++;
    this.workflowChanged = true;
    this.countsDirty = true;
  }

  /** A task as GET /tasks/{id} or the workflow view describes it. */
  applyTaskView(task, t) {
    task.action = t.action ?? task.action;
    if ("args" in t) task.args = t.args;
    task.status = t.status ?? task.status;
    task.attempt = t.attempt ?? task.attempt;
    task.maxAttempts = t.max_attempts ?? task.maxAttempts;
    task.progress = t.progress ?? task.progress;
    task.message = t.progress_message ?? task.message;
    task.executor = t.executor_id ?? task.executor;
    task.deps = Array.isArray(t.depends_on) ? t.depends_on.map(String) : task.deps;
    task.waitingFor = t.waiting_for ?? "";
    task.error = t.error ?? null;
    task.reason = t.reason ?? null;
    const fan = FANOUT_RE.exec(task.id);
    if (fan) task.parent = fan[1];
    for (const a of t.attempts || []) {
      const time = task.time(a.attempt);
      time.started = parseTime(a.started_at) ?? time.started;
      time.finished = parseTime(a.finished_at) ?? time.finished;
      time.outcome = a.outcome ?? time.outcome;
      time.executor = a.executor_id ?? time.executor;
    }
    if (task.attempt > 0) {
      const time = task.time(task.attempt);
      time.queued = parseTime(t.queued_at) ?? time.queued;
      time.started = parseTime(t.started_at) ?? time.started;
      time.finished = parseTime(t.finished_at) ?? time.finished;
      time.executor = t.executor_id ?? time.executor;
      if (TERMINAL_TASK.has(task.status) || task.status === "retrying") {
        time.outcome = time.outcome ?? task.status;
      }
    }
    this.changed.add(task.id);
    this.countsDirty = true;
  }

  /** One Server-Sent Event of GET /workflows/{id}/events. */
  applyEvent(kind, data) {
    if (kind === "workflow") this.applyWorkflowEvent(data);
    else if (kind === "task") this.applyTaskEvent(data);
    else if (kind === "progress") this.applyProgressEvent(data);
  }

  applyWorkflowEvent(ev) {
    const status = String(ev.status || "");
    const retry = status === "queued" && RETRY_RE.exec(String(ev.message || ""));
    if (retry) {
      const run = Number(retry[1]);
      this.replayRun = run;
      if (run > this.runs) {
        // a retry seen live: the scheduler puts failed, cancelled and skipped tasks back
        this.runs = run;
        for (const task of this.tasks.values()) {
          if (task.status === "failed" || task.status === "cancelled" || task.status === "skipped") {
            task.status = "pending";
            task.progress = 0;
            task.message = "";
            task.error = task.reason = null;
            this.changed.add(task.id);
          }
        }
        this.countsDirty = true;
        this.workflow = { ...this.workflow, status, finished_at: null, error: null, runs: run };
        this.workflowChanged = true;
      }
      return;
    }
    if (this.replayRun < this.runs) return;
    if (workflowRank(status) < workflowRank(this.workflow.status)) return;
    const next = { ...this.workflow, status };
    if (status === "running" && !next.started_at) next.started_at = ev.at;
    if (workflowRank(status) >= 3) {
      next.finished_at = next.finished_at || ev.at;
      if (ev.message) next.error = ev.message;
    }
    this.workflow = next;
    this.workflowChanged = true;
  }

  ensureTask(id) {
    let task = this.tasks.get(id);
    if (!task) {
      // a task the snapshot did not have: a fan-out child made at run time
      task = new Task(id);
      task.index = this.tasks.size;
      const fan = FANOUT_RE.exec(id);
      if (fan) {
        task.parent = fan[1];
        const parent = this.tasks.get(fan[1]);
        if (parent) {
          task.deps = parent.deps.slice();
          task.action = parent.action;
        }
      }
      this.tasks.set(id, task);
      this.structure++;
    }
    return task;
  }

  applyTaskEvent(ev) {
    const id = String(ev.task_id || "");
    if (!id) return;
    const task = this.ensureTask(id);
    const status = String(ev.status || "");
    const attempt = Number(ev.attempt || 0);
    const at = parseTime(ev.at);
    if (attempt > 0 && at !== null) {
      const time = task.time(attempt);
      if (status === "queued") time.queued = time.queued ?? at;
      else if (status === "running") {
        time.started = time.started ?? at;
        if (ev.executor_id) time.executor = String(ev.executor_id);
      } else if (taskRank(status) >= 5) {
        time.finished = time.finished ?? at;
        time.outcome = status;
      }
    }
    if (this.replayRun < this.runs) return; // an earlier run's history
    const rank = taskRank(status);
    const current = taskRank(task.status);
    if (attempt < task.attempt || (attempt === task.attempt && rank < current)) return;
    task.status = status;
    task.attempt = Math.max(task.attempt, attempt);
    if (ev.executor_id) task.executor = String(ev.executor_id);
    if (ev.waiting_for !== undefined) task.waitingFor = String(ev.waiting_for || "");
    else if (status !== "waiting") task.waitingFor = "";
    if (ev.error) task.error = String(ev.error);
    if (ev.reason) task.reason = String(ev.reason);
    if (status === "queued") {
      task.progress = 0;
      task.message = "";
      task.error = task.reason = null;
    } else if (status === "completed") task.progress = 100;
    this.changed.add(id);
    this.countsDirty = true;
  }

  applyProgressEvent(ev) {
    const task = this.tasks.get(String(ev.task_id || ""));
    if (!task || this.replayRun < this.runs) return;
    const attempt = Number(ev.attempt || 0);
    if (attempt && attempt < task.attempt) return;
    if (TERMINAL_TASK.has(task.status)) return;
    task.progress = Math.max(0, Math.min(100, Number(ev.percent) || 0));
    task.message = String(ev.message || "");
    this.changed.add(task.id);
  }

  /** Tasks per status (recounted only when something changed). */
  countByStatus() {
    if (this.countsDirty) {
      const counts = {};
      for (const task of this.tasks.values()) counts[task.status] = (counts[task.status] || 0) + 1;
      this.counts = counts;
      this.countsDirty = false;
    }
    return this.counts;
  }

  progress() {
    const total = this.tasks.size || this.workflow.tasks_total || 0;
    return total ? Math.round((100 * (this.countByStatus().completed || 0)) / total) : 0;
  }

  takeChanges() {
    const changed = this.changed;
    this.changed = new Set();
    const workflow = this.workflowChanged;
    this.workflowChanged = false;
    return { tasks: changed, workflow };
  }
}
