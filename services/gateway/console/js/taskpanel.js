// The task panel: one task's arguments, result, error, attempts (each with its executor) and
// the logs of one attempt at a time, following live while that attempt runs. Everything is
// put on the page as text.

import { ApiError, getTask, taskLogs } from "./api.js";
import { clock, duration, fill, h, parseTime, pretty, setText } from "./dom.js";
import { TERMINAL_TASK, paintBadge } from "./status.js";

const MAX_LOG_LINES = 5000;

export class TaskPanel {
  constructor(host, workflowId, { onClose, onSelect } = {}) {
    this.workflowId = workflowId;
    this.onClose = onClose || (() => {});
    this.onSelect = onSelect || (() => {});
    this.taskId = null;
    this.view = null; // the last GET /tasks/{id} answer
    this.logStream = null;
    this.logAttempt = 0;
    this.followLatest = true;
    this.refetchTimer = 0;
    this.el = h("aside", { class: "task-panel", hidden: true, "aria-label": "Task" });
    host.append(this.el);
  }

  get key() {
    return `${this.workflowId}.${this.taskId}`;
  }

  dispose() {
    this.closeLogs();
    clearTimeout(this.refetchTimer);
    this.el.remove();
  }

  close() {
    this.closeLogs();
    this.taskId = null;
    this.el.hidden = true;
    this.onClose();
  }

  /** Show task `taskId` (its model entry `task` gives the live fields). */
  async open(taskId, task) {
    if (this.taskId === taskId && !this.el.hidden) return;
    this.closeLogs();
    this.taskId = taskId;
    this.view = null;
    this.followLatest = true;
    this.logAttempt = 0;
    this.el.hidden = false;
    this.skeleton();
    this.renderDetails(task);
    this.paintLive(task);
    this.showLogs(task?.attempt ?? 0, task, true);
    await this.refetch(task);
  }

  async refetch(task) {
    const id = this.taskId;
    try {
      const view = await getTask(this.key);
      if (id !== this.taskId) return;
      this.view = view;
      setText(this.notice, "");
    } catch (err) {
      if (id !== this.taskId) return;
      if (!(err instanceof ApiError && err.status === 404)) {
        setText(this.notice, `Could not load the task: ${err.message}`);
        return;
      }
      setText(this.notice, "Not scheduled yet: the scheduler has not taken the workflow.");
    }
    const live = this.liveTask() || task;
    this.renderDetails(live);
    if (live) this.paintLive(live);
    const attempt = live?.attempt ?? this.view?.attempt ?? 0;
    if (this.followLatest && attempt !== this.logAttempt) this.showLogs(attempt, live, true);
    else this.paintTabs(live);
  }

  /** The model says the task changed. */
  update(task) {
    if (!this.taskId || !task || task.id !== this.taskId) return;
    this.paintLive(task);
    const viewStatus = this.view?.status;
    if (viewStatus !== task.status || (this.view?.attempt ?? 0) !== task.attempt) {
      clearTimeout(this.refetchTimer);
      this.refetchTimer = setTimeout(() => this.refetch(task), 250);
    }
    if (this.followLatest && task.attempt > this.logAttempt) this.showLogs(task.attempt, task, true);
  }

  // -- rendering ----------------------------------------------------------------------------

  skeleton() {
    this.badge = h("span", { class: "badge" });
    this.attemptText = h("span", {});
    this.progressBar = h("div", { class: "bar-fill" });
    this.progressText = h("span", { class: "progress-text" });
    this.waitingText = h("div", { class: "waiting", hidden: true });
    this.notice = h("div", { class: "notice" });
    this.details = h("div", { class: "details" });
    this.logTabs = h("div", { class: "tabs", role: "tablist" });
    this.logState = h("span", { class: "log-state" });
    this.logBox = h("div", { class: "log", role: "log", "aria-live": "off" });
    fill(
      this.el,
      h(
        "header",
        { class: "panel-head" },
        h("h2", { class: "task-title", title: this.taskId }, this.taskId),
        h("button", { type: "button", class: "close", title: "Close", onclick: () => this.close() }, "×"),
      ),
      this.notice,
      h("div", { class: "status-line" }, this.badge, h("span", { class: "attempt" }, this.attemptText)),
      h("div", { class: "progress" }, h("div", { class: "bar" }, this.progressBar), this.progressText),
      this.waitingText,
      this.details,
      h("section", { class: "logs" }, h("h3", {}, "Logs ", this.logState), this.logTabs, this.logBox),
    );
  }

  renderDetails(task) {
    const v = this.view || {};
    const deps = (v.depends_on || task?.deps || []).map((d) =>
      h("button", { type: "button", class: "link", onclick: () => this.onSelect(d) }, d),
    );
    const ran = v.duration_seconds;
    const rows = [
      ["Action", v.action ?? task?.action ?? ""],
      ["Executor", v.executor_id ?? task?.executor ?? ""],
      ["Pool", v.pool ?? ""],
      ["Priority", v.priority ?? ""],
      ["Depends on", deps.length ? deps : ""],
      ["Queued", clock(v.queued_at)],
      ["Started", clock(v.started_at)],
      ["Finished", clock(v.finished_at)],
      ["Ran for", ran !== null && ran !== undefined ? duration(ran) : ""],
      ["Next attempt", clock(v.next_attempt_at)],
      ["Exit code", v.exit_code ?? ""],
      ["Reason", v.reason ?? ""],
    ];
    const args = v.args ?? task?.args;
    const error = v.error || task?.error;
    fill(
      this.details,
      h(
        "dl",
        { class: "kv" },
        rows
          .filter(([, value]) => value !== "" && value !== null && value !== undefined)
          .map(([key, value]) => [h("dt", {}, key), h("dd", {}, value)]),
      ),
      section("Arguments", h("pre", { class: "json task-args" }, args === undefined ? "—" : pretty(args))),
      v.output !== undefined && v.output !== null
        ? section("Result", h("pre", { class: "json task-result" }, pretty(v.output)))
        : null,
      error ? section("Error", h("pre", { class: "error task-error" }, error)) : null,
      this.attemptsTable(v.attempts || []),
    );
  }

  paintLive(task) {
    paintBadge(this.badge, task.status);
    const budget = task.maxAttempts > 1 ? ` (up to ${task.maxAttempts} a run)` : "";
    setText(this.attemptText, task.attempt ? `attempt ${task.attempt}${budget}` : "not started");
    this.progressBar.style.width = `${task.progress}%`;
    this.progressBar.style.background = this.badge.style.getPropertyValue("--c");
    setText(this.progressText, `${task.progress}%${task.message ? ` · ${task.message}` : ""}`);
    this.waitingText.hidden = !task.waitingFor;
    setText(this.waitingText, task.waitingFor ? `Waiting for ${task.waitingFor}` : "");
  }

  attemptsTable(attempts) {
    if (!attempts.length) return null;
    const head = h("tr", {}, ["#", "Executor", "Started", "Ran", "Outcome", "Exit", "Error"].map((t) => h("th", {}, t)));
    const body = attempts.map((a) => {
      const started = parseTime(a.started_at);
      const finished = parseTime(a.finished_at);
      const ran = started !== null && finished !== null ? duration((finished - started) / 1000) : "";
      const outcome = h("span", { class: "badge small" });
      paintBadge(outcome, a.outcome || (started !== null ? "running" : "queued"));
      return h(
        "tr",
        {},
        h("td", {}, a.attempt),
        h("td", {}, a.executor_id || "—"),
        h("td", {}, clock(a.started_at)),
        h("td", {}, ran),
        h("td", {}, outcome),
        h("td", {}, a.exit_code ?? ""),
        h("td", { class: "error" }, a.error || ""),
      );
    });
    return section("Attempts", h("table", { class: "attempts" }, h("thead", {}, head), h("tbody", {}, body)));
  }

  // -- logs -----------------------------------------------------------------------------------

  closeLogs() {
    if (this.logStream) this.logStream.close();
    this.logStream = null;
  }

  /** Show the logs of `attempt`: fetched once if it has ended, followed live if it runs. */
  showLogs(attempt, task, force = false) {
    if (!force && attempt === this.logAttempt && this.logStream) return;
    this.closeLogs();
    this.logAttempt = attempt;
    this.paintTabs(task);
    this.logBox.replaceChildren();
    if (!attempt) {
      setText(this.logState, "(no attempt yet)");
      return;
    }
    const status = task?.status ?? this.view?.status ?? "";
    const live = attempt === (task?.attempt ?? this.view?.attempt) && !TERMINAL_TASK.has(status) && status !== "retrying";
    const taskId = this.taskId;
    if (live) {
      setText(this.logState, "(following live)");
      this.logBox.dataset.following = "true";
      this.logStream = taskLogs(this.key, attempt, {
        follow: true,
        onLines: (lines) => this.appendLines(lines),
        onEnd: () => {
          if (this.taskId !== taskId || this.logAttempt !== attempt) return;
          this.logBox.dataset.following = "false";
          setText(this.logState, "(attempt ended)");
        },
      });
      return;
    }
    this.logBox.dataset.following = "false";
    setText(this.logState, "(loading)");
    taskLogs(this.key, attempt)
      .then((lines) => {
        if (this.taskId !== taskId || this.logAttempt !== attempt) return;
        this.appendLines(lines);
        setText(this.logState, `(${lines.length} lines)`);
      })
      .catch((err) => {
        if (this.taskId === taskId) setText(this.logState, `(could not load: ${err.message})`);
      });
  }

  paintTabs(task) {
    const attempt = this.logAttempt;
    const latest = Math.max(attempt, task?.attempt ?? 0, this.view?.attempt ?? 0);
    if (this.logTabs.childElementCount === latest && this.logTabs.dataset.active === String(attempt)) {
      return;
    }
    this.logTabs.dataset.active = String(attempt);
    fill(
      this.logTabs,
      Array.from({ length: latest }, (_, i) => i + 1).map((n) =>
        h(
          "button",
          {
            type: "button",
            role: "tab",
            class: n === attempt ? "tab active" : "tab",
            "aria-selected": n === attempt ? "true" : "false",
            onclick: () => {
              const live = this.liveTask();
              this.followLatest = n >= (live?.attempt ?? latest);
              this.showLogs(n, live, true);
            },
          },
          `attempt ${n}`,
        ),
      ),
    );
  }

  liveTask() {
    return this.liveLookup ? this.liveLookup(this.taskId) : null;
  }

  appendLines(lines) {
    const box = this.logBox;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 24;
    const fragment = document.createDocumentFragment();
    for (const entry of lines) {
      const line = h("div", { class: "log-line", dataset: { stream: String(entry.stream || "stdout") } });
      line.textContent = String(entry.line);
      fragment.append(line);
    }
    box.append(fragment);
    while (box.childElementCount > MAX_LOG_LINES) box.firstElementChild.remove();
    if (atBottom) box.scrollTop = box.scrollHeight;
  }
}

function section(title, body) {
  return h("section", { class: "panel-section" }, h("h3", {}, title), body);
}
