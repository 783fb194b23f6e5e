// The executors page: pools, their executors, slots in use, heartbeats and running tasks;
// polled every two seconds.

import * as api from "../api.js";
import { clock, fill, h, setText } from "../dom.js";

const POLL_MS = 2000;

export class ExecutorsPage {
  constructor(main) {
    this.disposed = false;
    this.state = h("span", { class: "live-state" });
    this.body = h("div", { class: "pools" });
    this.el = h(
      "section",
      { class: "executors-page" },
      h("div", { class: "page-head" }, h("h1", {}, "Executors"), this.state),
      this.body,
    );
    fill(main, this.el);
    document.title = "Executors · provisioning";
    this.load();
    this.timer = setInterval(() => !document.hidden && this.load(), POLL_MS);
  }

  dispose() {
    this.disposed = true;
    clearInterval(this.timer);
  }

  update() {
    return true;
  }

  async load() {
    let answer;
    try {
      answer = await api.listExecutors();
    } catch (err) {
      if (!this.disposed) setText(this.state, `could not refresh: ${err.message}`);
      return;
    }
    if (this.disposed) return;
    setText(this.state, `updated ${new Date().toLocaleTimeString()}`);
    const pools = new Map();
    for (const ex of answer.executors || []) {
      const pool = String(ex.pool || "default");
      if (!pools.has(pool)) pools.set(pool, []);
      pools.get(pool).push(ex);
    }
    if (!pools.size) {
      fill(this.body, h("p", { class: "empty" }, "No executor has sent a heartbeat recently."));
      return;
    }
    fill(this.body, [...pools.entries()].sort().map(([pool, list]) => this.pool(pool, list)));
  }

  pool(name, executors) {
    const alive = executors.filter((e) => e.alive);
    const slots = alive.reduce((n, e) => n + (e.slots || 0), 0);
    const used = alive.reduce((n, e) => n + (e.running || 0), 0);
    return h(
      "section",
      { class: "pool", dataset: { pool: name } },
      h(
        "h2",
        {},
        `pool ${name}`,
        h("span", { class: "pool-facts" }, ` · ${alive.length} of ${executors.length} alive · ${used} of ${slots} slots in use`),
      ),
      h(
        "table",
        { class: "executors" },
        h(
          "thead",
          {},
          h("tr", {}, ["Executor", "Host", "Slots", "Heartbeat", "State", "Running tasks", "Started", "Version"].map((t) => h("th", {}, t))),
        ),
        h("tbody", {}, executors.map((e) => this.row(e))),
      ),
    );
  }

  row(e) {
    const bar = h("div", { class: "bar-fill" });
    bar.style.width = `${e.slots ? (100 * (e.running || 0)) / e.slots : 0}%`;
    const state = h("span", { class: "badge" });
    const label = !e.alive ? "stale" : e.draining ? "draining" : "alive";
    state.textContent = label;
    state.dataset.state = label;
    const tasks = (e.running_tasks || []).map((key) => {
      const text = String(key);
      const dot = text.indexOf(".");
      const wf = dot > 0 ? text.slice(0, dot) : text;
      const task = dot > 0 ? text.slice(dot + 1) : "";
      const href = `#/runs/${encodeURIComponent(wf)}${task ? `?task=${encodeURIComponent(task)}` : ""}`;
      return h("li", {}, h("a", { href, class: "mono" }, text));
    });
    return h(
      "tr",
      { dataset: { executor: String(e.id) } },
      h("td", { class: "mono" }, e.id),
      h("td", {}, `${e.hostname || ""}${e.pid ? ` (pid ${e.pid})` : ""}`),
      h("td", { class: "progress-cell" }, h("div", { class: "bar" }, bar), h("span", {}, `${e.running || 0}/${e.slots || 0}`)),
      h("td", {}, `${e.last_beat_age_seconds ?? "?"}s ago`),
      h("td", {}, state),
      h("td", {}, tasks.length ? h("ul", { class: "running-tasks" }, tasks) : "—"),
      h("td", {}, clock(e.started_at)),
      h("td", {}, e.version || ""),
    );
  }
}
