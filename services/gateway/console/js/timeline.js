// The timeline (Gantt) of a run on a <canvas>: one row per task that has had an attempt, in
// the order they were first queued; per attempt a pale bar for the time it waited in the
// queue and a solid one, in the attempt's outcome colour, for the time it ran. Retries show as
// several attempts on one row, with the backoff between them empty.
// Rows outside the view are not drawn (10,000 rows scroll smoothly); wheel scrolls, Ctrl+wheel
// zooms the time axis around the pointer, drag pans it; a click opens the task.

import { duration, h, setText } from "./dom.js";
import { colour } from "./status.js";

const ROW_H = 18;
const AXIS_H = 24;
const GUTTER = 190;
const QUEUE_COLOUR = "#c9d3de";

export class TimelineView {
  constructor(host, model, { onSelect } = {}) {
    this.model = model;
    this.onSelect = onSelect || (() => {});
    this.rows = [];
    this.scroll = 0;
    this.zoom = 1; // 1: the whole run fits the width
    this.pan = 0; // ms from the start at the left edge (when zoomed)
    this.selected = null;
    this.dirty = true;
    this.pending = false;
    this.lastSort = 0;
    this.canvas = h("canvas", { class: "timeline-canvas", tabindex: "0", "aria-label": "Timeline" });
    this.tip = h("div", { class: "tip", hidden: true });
    this.legend = h(
      "div",
      { class: "timeline-legend" },
      legendItem(QUEUE_COLOUR, "waiting in the queue"),
      legendItem(colour("running"), "running"),
      legendItem(colour("completed"), "completed"),
      legendItem(colour("retrying"), "failed, retried"),
      legendItem(colour("failed"), "failed"),
      h("span", { class: "hint" }, "wheel: scroll · Ctrl+wheel: zoom · drag: pan"),
    );
    this.el = h("div", { class: "timeline" }, this.legend, this.canvas, this.tip);
    host.append(this.el);
    this.ctx = this.canvas.getContext("2d");
    this.bind();
    this.resizeObserver = new ResizeObserver(() => this.resize());
    this.resizeObserver.observe(this.el);
    this.ticker = setInterval(() => this.hasRunning() && this.schedule(), 1000);
  }

  dispose() {
    clearInterval(this.ticker);
    this.resizeObserver.disconnect();
    this.el.remove();
  }

  set visible(on) {
    this.el.hidden = !on;
    if (on) this.resize();
  }

  hasRunning() {
    if (this.el.hidden) return false;
    const counts = this.model.countByStatus();
    return Boolean(counts.running || counts.queued);
  }

  /** Something changed: rows are recomputed (at most every half second) and redrawn. */
  invalidate() {
    this.dirty = true;
    this.schedule();
  }

  select(taskId) {
    this.selected = taskId;
    this.schedule();
  }

  schedule() {
    if (this.pending || this.el.hidden) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  resize() {
    const dpr = window.devicePixelRatio || 1;
    const rect = this.canvas.getBoundingClientRect();
    this.width = Math.max(1, rect.width);
    this.height = Math.max(1, rect.height);
    this.canvas.width = Math.round(this.width * dpr);
    this.canvas.height = Math.round(this.height * dpr);
    this.dpr = dpr;
    this.draw();
  }

  computeRows() {
    const rows = [];
    let t0 = Infinity;
    let t1 = -Infinity;
    for (const task of this.model.tasks.values()) {
      if (!task.timing.size) continue;
      let first = Infinity;
      for (const t of task.timing.values()) {
        for (const v of [t.queued, t.started, t.finished]) {
          if (v === null) continue;
          first = Math.min(first, v);
          t0 = Math.min(t0, v);
          t1 = Math.max(t1, v);
        }
      }
      if (first === Infinity) continue;
      rows.push({ task, first });
    }
    rows.sort((a, b) => a.first - b.first || a.task.index - b.task.index);
    this.rows = rows;
    this.t0 = t0;
    this.t1 = t1;
    this.dirty = false;
    this.lastSort = performance.now();
  }

  // -- input ------------------------------------------------------------------------------

  bind() {
    const c = this.canvas;
    let drag = null;
    c.addEventListener(
      "wheel",
      (e) => {
        e.preventDefault();
        if (e.ctrlKey || e.metaKey) {
          const before = this.timeAt(e.offsetX);
          this.zoom = Math.max(1, Math.min(10000, this.zoom * Math.exp(-e.deltaY * 0.002)));
          this.pan = before - (e.offsetX - GUTTER) / this.pxPerMs();
          this.clampPan();
        } else {
          this.scroll += e.deltaY;
          this.clampScroll();
        }
        this.schedule();
      },
      { passive: false },
    );
    c.addEventListener("pointerdown", (e) => {
      drag = { x: e.clientX, y: e.clientY, pan: this.pan, scroll: this.scroll, moved: false };
      c.setPointerCapture(e.pointerId);
    });
    c.addEventListener("pointermove", (e) => {
      if (drag) {
        const dx = e.clientX - drag.x;
        const dy = e.clientY - drag.y;
        if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
        if (drag.moved) {
          this.pan = drag.pan - dx / this.pxPerMs();
          this.scroll = drag.scroll - dy;
          this.clampPan();
          this.clampScroll();
          this.schedule();
        }
        return;
      }
      this.hover(e);
    });
    c.addEventListener("pointerup", (e) => {
      const click = drag && !drag.moved;
      drag = null;
      if (!click) return;
      const row = this.rowAt(e.offsetY);
      if (row) this.onSelect(row.task.id);
    });
    c.addEventListener("pointerleave", () => {
      this.tip.hidden = true;
    });
  }

  span() {
    const end = this.hasRunningTasks() ? Math.max(this.t1, Date.now()) : this.t1;
    return Math.max(1, end - this.t0);
  }

  hasRunningTasks() {
    const counts = this.model.countByStatus();
    return Boolean(counts.running || counts.queued || counts.retrying);
  }

  pxPerMs() {
    return ((this.width - GUTTER - 16) * this.zoom) / this.span();
  }

  timeAt(x) {
    return this.pan + (x - GUTTER) / this.pxPerMs();
  }

  xOf(ms) {
    return GUTTER + (ms - this.t0 - this.pan) * this.pxPerMs();
  }

  clampPan() {
    const visibleMs = (this.width - GUTTER - 16) / this.pxPerMs();
    this.pan = Math.max(0, Math.min(this.pan, this.span() - visibleMs));
  }

  clampScroll() {
    const max = Math.max(0, this.rows.length * ROW_H - (this.height - AXIS_H));
    this.scroll = Math.max(0, Math.min(this.scroll, max));
  }

  rowAt(y) {
    if (y < AXIS_H) return null;
    return this.rows[Math.floor((y - AXIS_H + this.scroll) / ROW_H)] || null;
  }

  hover(e) {
    const row = this.rowAt(e.offsetY);
    if (!row) {
      this.tip.hidden = true;
      return;
    }
    const t = this.timeAt(e.offsetX) + this.t0;
    const task = row.task;
    let text = `${task.id} · ${task.status}`;
    for (const [attempt, a] of task.timing) {
      const start = a.queued ?? a.started;
      const end = a.finished ?? Date.now();
      if (start !== null && t >= start - 200 && t <= end + 200) {
        const waited = a.queued !== null && a.started !== null ? (a.started - a.queued) / 1000 : null;
        const ran = a.started !== null ? ((a.finished ?? Date.now()) - a.started) / 1000 : null;
        text = `${task.id} · attempt ${attempt}`;
        if (a.executor) text += ` · ${a.executor}`;
        if (waited !== null) text += ` · queued ${duration(waited)}`;
        if (ran !== null) text += ` · ran ${duration(ran)}`;
        text += ` · ${a.outcome || (a.started !== null ? "running" : "queued")}`;
      }
    }
    setText(this.tip, text);
    this.tip.hidden = false;
    this.tip.style.left = `${Math.min(e.offsetX + 14, this.width - 320)}px`;
    this.tip.style.top = `${e.offsetY + this.legend.offsetHeight + 14}px`;
  }

  // -- drawing ----------------------------------------------------------------------------

  draw() {
    const ctx = this.ctx;
    if (!ctx || !this.width || this.el.hidden) return;
    if (this.dirty && (performance.now() - this.lastSort > 500 || !this.rows.length)) {
      this.computeRows();
    } else if (this.dirty) {
      setTimeout(() => this.schedule(), 500);
    }
    ctx.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
    ctx.clearRect(0, 0, this.width, this.height);
    ctx.font = "11px system-ui, sans-serif";
    ctx.textBaseline = "middle";
    if (!this.rows.length) {
      ctx.fillStyle = "#5b6670";
      ctx.fillText("No attempt has started yet.", 12, 40);
      return;
    }
    this.clampScroll();
    const now = Date.now();
    const first = Math.floor(this.scroll / ROW_H);
    const last = Math.min(this.rows.length, first + Math.ceil((this.height - AXIS_H) / ROW_H) + 1);
    ctx.save();
    ctx.beginPath();
    ctx.rect(0, AXIS_H, this.width, this.height - AXIS_H);
    ctx.clip();
    for (let i = first; i < last; i++) {
      const { task } = this.rows[i];
      const y = AXIS_H + i * ROW_H - this.scroll;
      if (task.id === this.selected) {
        ctx.fillStyle = "#e3edf9";
        ctx.fillRect(0, y, this.width, ROW_H);
      } else if (i % 2) {
        ctx.fillStyle = "#f7f8fa";
        ctx.fillRect(0, y, this.width, ROW_H);
      }
      ctx.save();
      ctx.beginPath();
      ctx.rect(GUTTER, y, this.width - GUTTER, ROW_H);
      ctx.clip();
      for (const [attempt, a] of task.timing) {
        const start = a.queued ?? a.started;
        if (start === null) continue;
        const running = a.finished === null && a.outcome === null;
        const end = a.finished ?? (running && task.attempt === attempt ? now : a.started ?? start);
        if (a.queued !== null) {
          const qx0 = this.xOf(a.queued);
          const qx1 = this.xOf(a.started ?? (running ? now : end));
          ctx.fillStyle = QUEUE_COLOUR;
          ctx.fillRect(qx0, y + 6, Math.max(1, qx1 - qx0), ROW_H - 12);
        }
        if (a.started !== null) {
          const rx0 = this.xOf(a.started);
          const rx1 = this.xOf(end);
          const outcome = a.outcome || (running ? "running" : task.status);
          ctx.fillStyle = colour(outcome);
          ctx.fillRect(rx0, y + 3, Math.max(2, rx1 - rx0), ROW_H - 6);
          if (rx1 - rx0 > 28) {
            ctx.fillStyle = "#ffffff";
            ctx.fillText(`a${attempt}`, rx0 + 4, y + ROW_H / 2);
          }
        }
      }
      ctx.restore();
      ctx.fillStyle = "#1d2328";
      ctx.fillText(clip(ctx, task.id, GUTTER - 12), 8, y + ROW_H / 2);
    }
    ctx.restore();
    this.drawAxis();
  }

  drawAxis() {
    const ctx = this.ctx;
    ctx.fillStyle = "#ffffff";
    ctx.fillRect(0, 0, this.width, AXIS_H);
    ctx.strokeStyle = "#c4ccd4";
    ctx.beginPath();
    ctx.moveTo(0, AXIS_H - 0.5);
    ctx.lineTo(this.width, AXIS_H - 0.5);
    ctx.stroke();
    const pxPerMs = this.pxPerMs();
    const steps = [10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 3e4, 6e4, 12e4, 3e5, 6e5, 18e5, 36e5];
    const step = steps.find((s) => s * pxPerMs >= 80) || 72e5;
    ctx.fillStyle = "#4a545e";
    ctx.textBaseline = "middle";
    const startMs = Math.ceil(this.pan / step) * step;
    for (let ms = startMs; this.xOf(this.t0 + ms) < this.width; ms += step) {
      const x = this.xOf(this.t0 + ms);
      ctx.fillRect(x, AXIS_H - 6, 1, 6);
      ctx.fillText(`+${duration(ms / 1000)}`, x + 3, AXIS_H / 2);
    }
    ctx.fillStyle = "#1d2328";
    ctx.fillText(`${this.rows.length} tasks`, 8, AXIS_H / 2);
  }
}

function legendItem(fill, label) {
  const swatch = h("span", { class: "swatch" });
  swatch.style.background = fill;
  return h("span", { class: "legend-item" }, swatch, label);
}

function clip(ctx, text, max) {
  if (ctx.measureText(text).width <= max) return text;
  let n = text.length;
  while (n > 1 && ctx.measureText(`${text.slice(0, n)}…`).width > max) n = Math.max(1, n - 4);
  return `${text.slice(0, n)}…`;
}
