// The workflows page: every workflow, newest first, filtered by status and name, paged;
// polled every two seconds (there is no global event stream).

import * as api from "../api.js";
import { age, debounce, duration, fill, h, parseTime, setText } from "../dom.js";
import { TASK_STATUSES, WORKFLOW_STATUSES, colour, paintBadge } from "../status.js";

const PAGE = 25;
const POLL_MS = 2000;

export class WorkflowsPage {
  constructor(main, params) {
    this.params = { status: params.status || "", name: params.name || "", offset: Number(params.offset) || 0 };
    this.disposed = false;
    this.controller = null;
    const statusSelect = h(
      "select",
      { "aria-label": "Status", class: "filter-status" },
      h("option", { value: "" }, "any status"),
      WORKFLOW_STATUSES.map((s) => h("option", { value: s }, s)),
    );
    statusSelect.value = this.params.status;
    statusSelect.addEventListener("change", () => this.setFilter({ status: statusSelect.value }));
    const nameInput = h("input", {
      type: "search",
      class: "filter-name",
      placeholder: "Name contains…",
      "aria-label": "Name",
      value: this.params.name,
    });
    nameInput.addEventListener("input", debounce(() => this.setFilter({ name: nameInput.value }), 300));
    this.prev = h("button", { type: "button", class: "prev", onclick: () => this.page(-1) }, "← Newer");
    this.next = h("button", { type: "button", class: "next", onclick: () => this.page(1) }, "Older →");
    this.pageText = h("span", { class: "page-text" });
    this.state = h("span", { class: "live-state" });
    this.tbody = h("tbody", {});
    this.empty = h("p", { class: "empty", hidden: true }, "No workflow matches.");
    this.el = h(
      "section",
      { class: "workflows-page" },
      h("div", { class: "page-head" }, h("h1", {}, "Workflows"), this.state),
      h("div", { class: "filters" }, statusSelect, nameInput, this.prev, this.pageText, this.next),
      h(
        "table",
        { class: "workflows" },
        h(
          "thead",
          {},
          h("tr", {}, ["Status", "Name", "Workflow", "Progress", "Tasks", "Age", "Duration"].map((t) => h("th", {}, t))),
        ),
        this.tbody,
      ),
      this.empty,
    );
    fill(main, this.el);
    document.title = "Workflows · provisioning";
    this.load();
    this.timer = setInterval(() => !document.hidden && this.load(), POLL_MS);
  }

  dispose() {
    this.disposed = true;
    clearInterval(this.timer);
    this.controller?.abort();
  }

  update() {
    return false; // filters live in the hash: a change there rebuilds the page
  }

  setFilter(change) {
    this.params = { ...this.params, ...change, offset: 0 };
    this.writeHash();
    this.load();
  }

  page(direction) {
    const offset = Math.max(0, this.params.offset + direction * PAGE);
    if (direction > 0 && this.nextOffset === null) return;
    this.params = { ...this.params, offset };
    this.writeHash();
    this.load();
  }

  writeHash() {
    const query = new URLSearchParams();
    for (const [k, v] of Object.entries(this.params)) if (v) query.set(k, String(v));
    const hash = `#/workflows${query.size ? `?${query}` : ""}`;
    if (location.hash !== hash) history.replaceState(null, "", hash);
  }

  async load() {
    this.controller?.abort();
    const controller = new AbortController();
    this.controller = controller;
    let page;
    try {
      page = await api.listWorkflows({ ...this.params, limit: PAGE }, controller.signal);
    } catch (err) {
      if (!this.disposed && err.name !== "AbortError") setText(this.state, `could not refresh: ${err.message}`);
      return;
    }
    if (this.disposed || controller !== this.controller) return;
    setText(this.state, `updated ${new Date().toLocaleTimeString()}`);
    this.nextOffset = page.next_offset;
    this.prev.disabled = this.params.offset === 0;
    this.next.disabled = page.next_offset === null;
    const first = this.params.offset + 1;
    setText(this.pageText, page.workflows.length ? `${first}–${first + page.workflows.length - 1}` : "");
    this.empty.hidden = page.workflows.length > 0;
    fill(this.tbody, page.workflows.map((wf) => this.row(wf)));
  }

  row(wf) {
    const href = `#/runs/${encodeURIComponent(wf.workflow_id)}`;
    const counts = wf.counts || {};
    const total = wf.tasks_total || 0;
    const progress = wf.progress ?? 0;
    const bar = h("div", { class: "bar-fill" });
    bar.style.width = `${progress}%`;
    const statuses = [...TASK_STATUSES.filter((s) => counts[s]), ...Object.keys(counts).filter((s) => !TASK_STATUSES.includes(s))];
    const chips = statuses.map((status) => {
      const dot = h("span", { class: "dot" });
      dot.style.background = colour(status);
      return h("span", { class: "count", dataset: { status }, title: status }, dot, String(counts[status]));
    });
    const started = parseTime(wf.started_at) ?? parseTime(wf.created_at);
    let took = wf.duration_seconds;
    if ((took === null || took === undefined) && started !== null && !wf.finished_at && wf.status === "running") {
      took = (Date.now() - started) / 1000;
    }
    const row = h(
      "tr",
      { class: "workflow-row", dataset: { id: wf.workflow_id, status: wf.status } },
      h("td", {}, paintBadge(h("span", { class: "badge" }), wf.status)),
      h("td", { class: "name" }, h("a", { href }, wf.name || "(no name)")),
      h("td", {}, h("a", { href, class: "mono", title: wf.workflow_id }, wf.workflow_id.slice(0, 12))),
      h("td", { class: "progress-cell" }, h("div", { class: "bar" }, bar), h("span", {}, `${progress}%`)),
      h("td", { class: "counts" }, chips, h("span", { class: "total" }, ` of ${total}`)),
      h("td", {}, age(wf.created_at)),
      h("td", {}, took !== null && took !== undefined ? duration(took) : ""),
    );
    row.addEventListener("click", (e) => {
      if (e.target.closest("a")) return;
      location.hash = href;
    });
    return row;
  }
}
