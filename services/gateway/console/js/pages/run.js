// The run page: the whole planned DAG (or the timeline), live; the task panel; the actions.
//
// Start-up: one GET /workflows/{id} (every task, pending ones included), the layout, the
// first draw; then the event stream (replayed from the start, then live) is applied to the
// model and the views redraw at most once per animation frame.

import * as api from "../api.js";
import { DagView } from "../dag.js";
import { age, duration, fill, h, parseTime, setText } from "../dom.js";
import { layoutDag } from "../layout.js";
import { RunModel } from "../model.js";
import { TERMINAL_WORKFLOW, TASK_STATUSES, colour, paintBadge } from "../status.js";
import { TaskPanel } from "../taskpanel.js";
import { TimelineView } from "../timeline.js";
import { toast } from "../toast.js";

const RELAYOUT_MS = 1000; // at most one relayout a second while tasks are being added
const IDLE_POLL_MS = 3000; // a finished run is polled (cheaply) to notice a retry made elsewhere

export class RunPage {
  constructor(main, params, context) {
    this.main = main;
    this.context = context;
    this.id = params.id;
    this.model = new RunModel(this.id);
    this.stream = null;
    this.flushPending = false;
    this.disposed = false;
    this.lastLayout = 0;
    this.layoutStructure = -1;
    this.selected = params.task || null;
    this.view = params.view === "timeline" ? "timeline" : "graph";
    this.timers = [];
    this.el = h("section", { class: "run-page", dataset: { ready: "false" } });
    fill(main, this.el);
    this.el.append(h("p", { class: "loading" }, "Loading the workflow…"));
    this.start();
  }

  dispose() {
    this.disposed = true;
    this.stream?.close();
    for (const t of this.timers) clearInterval(t);
    clearTimeout(this.relayoutTimer);
    this.dag?.dispose();
    this.timeline?.dispose();
    this.panel?.dispose();
  }

  /** The hash changed within this page (a task or the view chosen): no reload. */
  update(params) {
    if (params.id !== this.id) return false;
    if ((params.task || null) !== this.selected && params.task) this.selectTask(params.task, false);
    if ((params.view || "graph") !== this.view) this.showView(params.view || "graph", false);
    return true;
  }

  async start() {
    const t0 = performance.now();
    let view;
    try {
      view = await api.getWorkflow(this.id);
    } catch (err) {
      if (this.disposed) return;
      fill(
        this.el,
        h("h1", {}, "Workflow"),
        h("p", { class: "error" }, err.status === 404 ? `No workflow ${this.id}.` : `Could not load it: ${err.message}`),
        h("a", { href: "#/workflows" }, "All workflows"),
      );
      return;
    }
    if (this.disposed) return;
    const fetched = performance.now();
    this.model.loadSnapshot(view);
    this.build();
    this.relayout();
    this.paintHeader();
    if (this.selected) this.selectTask(this.selected, false, true);
    this.showView(this.view, false);
    this.model.takeChanges();
    // interactive: the graph is drawn and answers input
    requestAnimationFrame(() => {
      if (this.disposed) return;
      const ready = performance.now();
      this.el.dataset.ready = "true";
      this.el.dataset.loadMs = String(Math.round(ready - t0));
      this.el.dataset.fetchMs = String(Math.round(fetched - t0));
      performance.mark("console-run-interactive");
    });
    this.openStream();
    this.timers.push(setInterval(() => this.tick(), 1000));
  }

  build() {
    const wf = this.model.workflow;
    this.title = h("h1", { class: "run-title" });
    this.badge = h("span", { class: "badge big" });
    this.idText = h("code", { class: "run-id" }, this.id);
    this.traceLink = h("span", { class: "trace" });
    this.description = h("p", { class: "description" });
    this.progressBar = h("div", { class: "bar-fill" });
    this.progressText = h("span", { class: "progress-text" });
    this.counts = h("div", { class: "counts" });
    this.times = h("div", { class: "times" });
    this.liveState = h("span", { class: "live-state" });
    this.errorText = h("p", { class: "error run-error", hidden: true });
    this.actions = h("div", { class: "actions" });
    this.findInput = h("input", {
      type: "search",
      placeholder: "Find task by id",
      "aria-label": "Find task",
      class: "find-task",
      list: "",
    });
    this.findInput.addEventListener("keydown", (e) => {
      if (e.key === "Enter") this.find(this.findInput.value.trim());
    });
    this.graphTab = h("button", { type: "button", class: "tab", onclick: () => this.showView("graph") }, "Graph");
    this.timelineTab = h("button", { type: "button", class: "tab", onclick: () => this.showView("timeline") }, "Timeline");
    this.viewHost = h("div", { class: "run-view" });
    this.body = h("div", { class: "run-body" }, this.viewHost);
    fill(
      this.el,
      h(
        "div",
        { class: "run-head" },
        h("div", { class: "run-head-line" }, this.badge, this.title, this.liveState),
        h("div", { class: "run-meta" }, h("span", {}, "id "), this.idText, this.traceLink),
        this.description,
        this.errorText,
        h("div", { class: "progress wide" }, h("div", { class: "bar" }, this.progressBar), this.progressText),
        h("div", { class: "run-facts" }, this.counts, this.times),
        this.actions,
      ),
      h(
        "div",
        { class: "run-tools" },
        h("div", { class: "tabs", role: "tablist" }, this.graphTab, this.timelineTab),
        this.findInput,
      ),
      this.body,
    );
    this.dag = new DagView(this.viewHost, this.model, { onSelect: (id) => this.selectTask(id) });
    this.timeline = new TimelineView(this.viewHost, this.model, { onSelect: (id) => this.selectTask(id) });
    this.timeline.visible = false;
    this.panel = new TaskPanel(this.body, this.id, {
      onClose: () => {
        this.selected = null;
        this.dag.select(null);
        this.timeline.select(null);
        this.writeHash();
      },
      onSelect: (id) => this.selectTask(id, true, true),
    });
    this.panel.liveLookup = (id) => this.model.tasks.get(id) || null;
    setText(this.title, wf.name || this.id);
  }

  showView(which, write = true) {
    this.view = which === "timeline" ? "timeline" : "graph";
    const timeline = this.view === "timeline";
    this.dag.el.hidden = timeline;
    this.timeline.visible = timeline;
    this.graphTab.classList.toggle("active", !timeline);
    this.timelineTab.classList.toggle("active", timeline);
    if (timeline) this.timeline.invalidate();
    else this.dag.resize();
    if (write) this.writeHash();
  }

  find(text) {
    if (!text) return;
    let id = this.model.tasks.has(text) ? text : null;
    if (!id) {
      for (const task of this.model.tasks.values()) {
        if (task.id.includes(text)) {
          id = task.id;
          break;
        }
      }
    }
    if (id) this.selectTask(id, true, true);
    else toast(`No task matches "${text}".`);
  }

  selectTask(id, write = true, focus = false) {
    const task = this.model.tasks.get(id);
    if (!task) return;
    this.selected = id;
    this.dag.select(id, { focus });
    this.timeline.select(id);
    this.panel.open(id, task);
    if (write) this.writeHash();
  }

  writeHash() {
    const query = new URLSearchParams();
    if (this.selected) query.set("task", this.selected);
    if (this.view === "timeline") query.set("view", "timeline");
    const hash = `#/runs/${encodeURIComponent(this.id)}${query.size ? `?${query}` : ""}`;
    if (location.hash !== hash) history.replaceState(null, "", hash);
  }

  // -- live ---------------------------------------------------------------------------------

  openStream() {
    this.stream?.close();
    const lastEventId = this.stream?.lastEventId || "";
    setText(this.liveState, "connecting…");
    this.stream = api.workflowEvents(this.id, {
      lastEventId,
      onOpen: () => setText(this.liveState, "live"),
      onEvent: (kind, data) => {
        this.model.applyEvent(kind, data);
        this.scheduleFlush();
      },
      onError: () => setText(this.liveState, "reconnecting…"),
      onEnd: () => {
        setText(this.liveState, "");
        this.scheduleFlush();
      },
      // the server ends the stream when the workflow ends; any other end is a drop
      reconnectOnEnd: () => !TERMINAL_WORKFLOW.has(this.model.workflow.status),
    });
  }

  scheduleFlush() {
    if (this.flushPending) return;
    this.flushPending = true;
    requestAnimationFrame(() => {
      this.flushPending = false;
      if (!this.disposed) this.flush();
    });
  }

  /** Apply what the events changed to the views: once per animation frame at most. */
  flush() {
    const { tasks, workflow } = this.model.takeChanges();
    if (this.model.structure !== this.layoutStructure) this.relayout();
    if (tasks.size) {
      this.dag.update(tasks);
      this.timeline.invalidate();
      if (this.selected && tasks.has(this.selected)) {
        this.panel.update(this.model.tasks.get(this.selected));
      }
    }
    if (tasks.size || workflow) this.paintHeader();
  }

  relayout() {
    const now = performance.now();
    const wait = this.lastLayout + RELAYOUT_MS - now;
    if (this.layoutStructure >= 0 && wait > 0 && this.model.tasks.size > 500) {
      clearTimeout(this.relayoutTimer);
      this.relayoutTimer = setTimeout(() => this.relayout(), wait);
      return;
    }
    this.layoutStructure = this.model.structure;
    this.lastLayout = now;
    const tasks = [...this.model.tasks.values()].sort((a, b) => a.index - b.index);
    this.layout = layoutDag(tasks);
    this.dag.setLayout(this.layout);
  }

  tick() {
    const wf = this.model.workflow;
    if (!TERMINAL_WORKFLOW.has(wf.status)) this.paintTimes();
    else if (this.stream?.closed) this.pollIdle();
  }

  /** A finished run: has it been retried (from the CLI, another page)? */
  async pollIdle() {
    const now = Date.now();
    if (this.polling || now - (this.lastIdlePoll || 0) < IDLE_POLL_MS) return;
    this.polling = true;
    this.lastIdlePoll = now;
    try {
      const summary = await api.getWorkflow(this.id, { tasks: false });
      if ((summary.runs || 1) > this.model.runs || !TERMINAL_WORKFLOW.has(summary.status)) {
        this.openStream();
      }
    } catch {
      // the next tick tries again
    } finally {
      this.polling = false;
    }
  }

  // -- header -------------------------------------------------------------------------------

  paintHeader() {
    const wf = this.model.workflow;
    paintBadge(this.badge, wf.status);
    setText(this.title, wf.name || this.id);
    document.title = `${wf.name || this.id} · ${wf.status} · provisioning`;
    setText(this.description, wf.description || "");
    this.description.hidden = !wf.description;
    this.errorText.hidden = !wf.error;
    setText(this.errorText, wf.error || "");
    const progress = this.model.progress();
    this.progressBar.style.width = `${progress}%`;
    setText(this.progressText, `${progress}% · ${this.model.tasks.size} tasks`);
    this.paintCounts();
    this.paintTimes();
    this.paintTrace();
    this.paintActions();
  }

  paintCounts() {
    const counts = this.model.countByStatus();
    const known = TASK_STATUSES.filter((s) => counts[s]);
    const other = Object.keys(counts).filter((s) => !TASK_STATUSES.includes(s));
    const key = [...known, ...other].map((s) => `${s}:${counts[s]}`).join(",");
    if (this.counts.dataset.key === key) return;
    this.counts.dataset.key = key;
    fill(
      this.counts,
      [...known, ...other].map((status) => {
        const chip = h("span", { class: "count", dataset: { status } });
        const dot = h("span", { class: "dot" });
        dot.style.background = colour(status);
        chip.append(dot, `${counts[status]} ${status}`);
        return chip;
      }),
    );
  }

  paintTimes() {
    const wf = this.model.workflow;
    const created = wf.created_at;
    const started = parseTime(wf.started_at) ?? parseTime(created);
    const finished = parseTime(wf.finished_at);
    const parts = [];
    if (created) parts.push(`created ${age(created)}`);
    if (started !== null) {
      const end = finished ?? (TERMINAL_WORKFLOW.has(wf.status) ? started : Date.now());
      parts.push(`${finished !== null ? "took" : "running for"} ${duration((end - started) / 1000)}`);
    }
    if ((wf.runs || 1) > 1) parts.push(`run ${wf.runs}`);
    setText(this.times, parts.join(" · "));
  }

  paintTrace() {
    const traceId = this.model.workflow.trace_id;
    const ui = this.context.tracingUi;
    const key = `${traceId}|${ui}`;
    if (this.traceLink.dataset.key === key) return;
    this.traceLink.dataset.key = key;
    if (!traceId || !/^[0-9a-f]{32}$/.test(traceId)) {
      this.traceLink.replaceChildren();
      return;
    }
    const label = h("span", {}, " · trace ");
    if (ui) {
      const link = h(
        "a",
        { href: `${ui}/trace/${traceId}`, target: "_blank", rel: "noopener noreferrer", class: "trace-link" },
        traceId,
      );
      fill(this.traceLink, label, link);
    } else {
      fill(this.traceLink, label, h("code", {}, traceId));
    }
  }

  paintActions() {
    const status = this.model.workflow.status;
    const key = `${status}|${this.model.workflow.cancel_requested}`;
    if (this.actions.dataset.key === key) return;
    this.actions.dataset.key = key;
    const buttons = [];
    const action = (label, cls, fn) =>
      h("button", { type: "button", class: `action ${cls}`, dataset: { action: cls }, onclick: fn }, label);
    if (!TERMINAL_WORKFLOW.has(status)) buttons.push(action("Cancel", "cancel", () => this.cancel()));
    if (status === "failed" || status === "cancelled") {
      buttons.push(action("Retry failed tasks", "retry", () => this.retry()));
    }
    if (status === "awaiting_approval") {
      buttons.push(action("Approve", "approve", () => this.approve()));
      buttons.push(action("Reject", "reject", () => this.reject()));
    }
    fill(this.actions, buttons);
  }

  // -- actions (each asks first) ------------------------------------------------------------

  name() {
    return this.model.workflow.name || this.id;
  }

  async act(question, call, done) {
    if (!window.confirm(question)) return;
    try {
      await call();
      toast(done);
    } catch (err) {
      toast(`Refused: ${err.message}`, "error");
    }
  }

  cancel() {
    return this.act(
      `Cancel workflow "${this.name()}"? Running tasks are stopped.`,
      () => api.cancelWorkflow(this.id),
      "Cancelling…",
    );
  }

  retry() {
    return this.act(
      `Retry workflow "${this.name()}"? Failed, cancelled and skipped tasks run again; completed ones keep their results.`,
      async () => {
        await api.retryWorkflow(this.id);
        this.lastIdlePoll = 0; // the stream ended with the run: the next tick finds the new one
      },
      "Retrying…",
    );
  }

  approve() {
    return this.act(`Approve workflow "${this.name()}"?`, () => api.approveWorkflow(this.id), "Approved.");
  }

  async reject() {
    const reason = window.prompt(`Reject workflow "${this.name()}"? Reason:`, "");
    if (reason === null) return;
    try {
      await api.rejectWorkflow(this.id, reason);
      toast("Rejected.");
    } catch (err) {
      toast(`Refused: ${err.message}`, "error");
    }
  }
}

