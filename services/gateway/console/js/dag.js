// The DAG on a <canvas>: pan (drag), zoom (wheel, buttons), click to select, hover for a tip.
//
// Why a canvas: 10,000 tasks as DOM or SVG nodes make every live update a layout of the whole
// page; on a canvas a redraw costs only what is visible. Draws are coalesced: whatever number
// of events arrived, the view redraws at most once per animation frame. Level of detail:
// close up, a task is a card with its id, status, attempt and progress; further out, a
// coloured box; a group is a grid of one cell per task, or, when cells would be under two
// pixels, one bar of its tasks' statuses. Nodes and edges outside the view are not drawn.
// Text on a canvas is pixels: nothing from a workflow can become markup here.
//
// The canvas's fallback content (for screen readers, and for tests) lists each task as a
// button with its status, up to FALLBACK_LIMIT tasks.

import { h, setText } from "./dom.js";
import { CELL, GROUP_HEAD, cellAt, cellRect } from "./layout.js";
import { colour, textColour } from "./status.js";

const MIN_SCALE = 0.01;
const MAX_SCALE = 3;
const DETAIL_SCALE = 0.45; // cards with text from here
const FALLBACK_LIMIT = 1500;

export class DagView {
  constructor(host, model, { onSelect } = {}) {
    this.model = model;
    this.onSelect = onSelect || (() => {});
    this.layout = null;
    this.scale = 1;
    this.tx = 20;
    this.ty = 20;
    this.selected = null;
    this.pending = false;
    this.fitted = false;
    this.fallbackItems = new Map();

    this.canvas = h("canvas", { class: "dag-canvas", tabindex: "0", "aria-label": "Workflow graph" });
    this.fallback = h("ul", { class: "dag-fallback" });
    this.canvas.append(this.fallback);
    this.tip = h("div", { class: "tip", hidden: true });
    this.zoomLabel = h("span", { class: "zoom-label" });
    const button = (label, title, fn) =>
      h("button", { type: "button", title, onclick: fn }, label);
    this.controls = h(
      "div",
      { class: "dag-controls" },
      button("−", "Zoom out", () => this.zoomBy(1 / 1.4)),
      this.zoomLabel,
      button("+", "Zoom in", () => this.zoomBy(1.4)),
      button("Fit", "Show the whole graph", () => this.fit()),
    );
    this.el = h("div", { class: "dag" }, this.canvas, this.controls, this.tip);
    host.append(this.el);
    this.ctx = this.canvas.getContext("2d");
    this.bind();
    this.resizeObserver = new ResizeObserver(() => this.resize());
    this.resizeObserver.observe(this.el);
  }

  dispose() {
    this.resizeObserver.disconnect();
    this.el.remove();
  }

  // -- data -------------------------------------------------------------------------------

  setLayout(layout) {
    const first = !this.layout;
    this.layout = layout;
    this.rebuildFallback();
    if (first || !this.fitted) this.fit();
    this.schedule();
  }

  rebuildFallback() {
    this.fallbackItems.clear();
    const items = [];
    const tasks = this.model.tasks;
    if (tasks.size > FALLBACK_LIMIT) {
      items.push(h("li", {}, `${tasks.size} tasks: use "Find task" to open one.`));
    } else {
      for (const task of tasks.values()) {
        const button = h("button", {
          type: "button",
          dataset: { task: task.id, status: task.status },
          onclick: () => this.onSelect(task.id),
        });
        setText(button, `${task.id}: ${task.status}`);
        this.fallbackItems.set(task.id, button);
        items.push(h("li", {}, button));
      }
    }
    this.fallback.replaceChildren(...items);
  }

  /** Tasks whose state changed: refresh their fallback entries and redraw. */
  update(changedIds) {
    for (const id of changedIds) {
      const button = this.fallbackItems.get(id);
      const task = this.model.tasks.get(id);
      if (!button || !task) continue;
      if (button.dataset.status !== task.status) button.dataset.status = task.status;
      setText(button, `${task.id}: ${task.status}`);
    }
    this.schedule();
  }

  select(taskId, { focus = false } = {}) {
    this.selected = taskId;
    if (focus) this.focusTask(taskId);
    this.schedule();
  }

  // -- view -------------------------------------------------------------------------------

  resize() {
    const dpr = window.devicePixelRatio || 1;
    const rect = this.el.getBoundingClientRect();
    this.width = Math.max(1, rect.width);
    this.height = Math.max(1, rect.height);
    this.canvas.width = Math.round(this.width * dpr);
    this.canvas.height = Math.round(this.height * dpr);
    this.dpr = dpr;
    if (this.layout && !this.fitted) this.fit();
    if (this.pendingFocus) {
      this.focusTask(this.pendingFocus);
      this.pendingFocus = null;
    }
    this.draw();
  }

  fit() {
    if (!this.layout || !this.width) return;
    const pad = 24;
    const sx = (this.width - 2 * pad) / this.layout.width;
    const sy = (this.height - 2 * pad) / this.layout.height;
    this.scale = clamp(Math.min(sx, sy, 1), MIN_SCALE, MAX_SCALE);
    this.tx = (this.width - this.layout.width * this.scale) / 2;
    this.ty = Math.max(pad, (this.height - this.layout.height * this.scale) / 2);
    this.fitted = true;
    this.schedule();
  }

  zoomBy(factor, cx = this.width / 2, cy = this.height / 2) {
    const scale = clamp(this.scale * factor, MIN_SCALE, MAX_SCALE);
    const k = scale / this.scale;
    this.tx = cx - (cx - this.tx) * k;
    this.ty = cy - (cy - this.ty) * k;
    this.scale = scale;
    this.schedule();
  }

  focusTask(taskId) {
    const found = this.layout?.where.get(taskId);
    if (!found) return;
    if (!this.width) {
      this.pendingFocus = taskId; // not measured yet: once it is
      return;
    }
    const node = this.layout.nodes[found[0]];
    let [x, y, w, hh] = [node.x, node.y, node.w, node.h];
    if (found[1] >= 0) {
      [x, y] = cellRect(node, found[1]);
      w = hh = CELL;
    }
    if (this.scale < DETAIL_SCALE) this.scale = 1;
    this.tx = this.width / 2 - (x + w / 2) * this.scale;
    this.ty = this.height / 2 - (y + hh / 2) * this.scale;
    this.schedule();
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw();
    });
  }

  // -- input ------------------------------------------------------------------------------

  bind() {
    const c = this.canvas;
    let drag = null;
    c.addEventListener("pointerdown", (e) => {
      drag = { x: e.clientX, y: e.clientY, tx: this.tx, ty: this.ty, moved: false };
      c.setPointerCapture(e.pointerId);
    });
    c.addEventListener("pointermove", (e) => {
      if (drag) {
        const dx = e.clientX - drag.x;
        const dy = e.clientY - drag.y;
        if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
        if (drag.moved) {
          this.tx = drag.tx + dx;
          this.ty = drag.ty + dy;
          this.tip.hidden = true;
          this.schedule();
        }
        return;
      }
      this.hover(e);
    });
    c.addEventListener("pointerup", (e) => {
      const wasClick = drag && !drag.moved;
      drag = null;
      if (!wasClick) return;
      const hit = this.hitAt(e.offsetX, e.offsetY);
      if (hit) this.onSelect(hit);
    });
    c.addEventListener("pointerleave", () => {
      this.tip.hidden = true;
    });
    c.addEventListener(
      "wheel",
      (e) => {
        e.preventDefault();
        if (e.ctrlKey || e.metaKey || Math.abs(e.deltaY) >= Math.abs(e.deltaX)) {
          this.zoomBy(Math.exp(-e.deltaY * 0.0015), e.offsetX, e.offsetY);
        } else {
          this.tx -= e.deltaX;
          this.schedule();
        }
      },
      { passive: false },
    );
    c.addEventListener("keydown", (e) => {
      const step = 60;
      const keys = {
        "+": () => this.zoomBy(1.25),
        "=": () => this.zoomBy(1.25),
        "-": () => this.zoomBy(0.8),
        "0": () => this.fit(),
        ArrowLeft: () => (this.tx += step),
        ArrowRight: () => (this.tx -= step),
        ArrowUp: () => (this.ty += step),
        ArrowDown: () => (this.ty -= step),
      };
      if (keys[e.key]) {
        e.preventDefault();
        keys[e.key]();
        this.schedule();
      }
    });
  }

  /** The task id at a point of the canvas (CSS pixels), or null. */
  hitAt(sx, sy) {
    if (!this.layout) return null;
    const x = (sx - this.tx) / this.scale;
    const y = (sy - this.ty) / this.scale;
    const nodes = this.layout.nodes;
    for (let i = 0; i < nodes.length; i++) {
      const n = nodes[i];
      if (x < n.x || x > n.x + n.w || y < n.y || y > n.y + n.h) continue;
      if (n.kind === "task") return n.members[0];
      const cell = cellAt(n, x, y);
      return cell >= 0 ? n.members[cell] : null;
    }
    return null;
  }

  hover(e) {
    const id = this.hitAt(e.offsetX, e.offsetY);
    const task = id && this.model.tasks.get(id);
    if (!task) {
      this.tip.hidden = true;
      return;
    }
    const parts = [`${task.id}`, `${task.status}`];
    if (task.attempt) parts.push(`attempt ${task.attempt}`);
    if (task.status === "running") parts.push(`${task.progress}%`);
    if (task.waitingFor) parts.push(`waiting for ${task.waitingFor}`);
    setText(this.tip, parts.join(" · "));
    this.tip.hidden = false;
    this.tip.style.left = `${Math.min(e.offsetX + 14, this.width - 260)}px`;
    this.tip.style.top = `${e.offsetY + 14}px`;
  }

  // -- drawing ----------------------------------------------------------------------------

  draw() {
    const ctx = this.ctx;
    if (!ctx || !this.width) return;
    ctx.setTransform(this.dpr, 0, 0, this.dpr, 0, 0);
    ctx.clearRect(0, 0, this.width, this.height);
    setText(this.zoomLabel, `${Math.round(this.scale * 100)}%`);
    if (!this.layout) return;
    const { nodes, edges } = this.layout;
    const s = this.scale;
    ctx.setTransform(this.dpr * s, 0, 0, this.dpr * s, this.dpr * this.tx, this.dpr * this.ty);
    // the visible part of the world
    const vx0 = -this.tx / s;
    const vy0 = -this.ty / s;
    const vx1 = vx0 + this.width / s;
    const vy1 = vy0 + this.height / s;
    const visible = (x0, y0, x1, y1) => x1 >= vx0 && x0 <= vx1 && y1 >= vy0 && y0 <= vy1;

    // edges
    ctx.lineWidth = Math.max(1, 1.2 / s);
    ctx.strokeStyle = s < DETAIL_SCALE ? "rgba(90,100,115,0.35)" : "rgba(90,100,115,0.7)";
    ctx.beginPath();
    const dashed = [];
    for (const [a, b, kind] of edges) {
      const na = nodes[a];
      const nb = nodes[b];
      const x0 = na.x + na.w;
      const y0 = na.y + na.h / 2;
      const x1 = nb.x;
      const y1 = nb.y + Math.min(nb.h / 2, GROUP_HEAD);
      if (!visible(Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1))) continue;
      if (kind === "fanout") {
        dashed.push([x0, y0, x1, y1]);
        continue;
      }
      const mx = (x0 + x1) / 2;
      ctx.moveTo(x0, y0);
      ctx.bezierCurveTo(mx, y0, mx, y1, x1, y1);
    }
    ctx.stroke();
    if (dashed.length) {
      ctx.setLineDash([6, 4]);
      ctx.beginPath();
      for (const [x0, y0, x1, y1] of dashed) {
        ctx.moveTo(x0, y0);
        ctx.lineTo(x1, y1);
      }
      ctx.stroke();
      ctx.setLineDash([]);
    }

    // nodes
    const detail = s >= DETAIL_SCALE;
    const cells = new Map(); // colour -> [x, y] pairs, filled in one path per colour
    for (const node of nodes) {
      if (!visible(node.x, node.y, node.x + node.w, node.y + node.h)) continue;
      if (node.kind === "task") this.drawTask(node, detail);
      else this.drawGroup(node, detail, cells, visible);
    }
    const size = CELL;
    for (const [fill, points] of cells) {
      ctx.fillStyle = fill;
      ctx.beginPath();
      for (let i = 0; i < points.length; i += 2) ctx.rect(points[i], points[i + 1], size, size);
      ctx.fill();
    }
    this.drawSelection();
  }

  drawTask(node, detail) {
    const ctx = this.ctx;
    const task = this.model.tasks.get(node.members[0]);
    const status = task ? task.status : "pending";
    const fill = colour(status);
    if (!detail) {
      ctx.fillStyle = fill;
      ctx.fillRect(node.x, node.y, node.w, node.h);
      return;
    }
    ctx.fillStyle = "#ffffff";
    ctx.strokeStyle = fill;
    ctx.lineWidth = 2;
    roundRect(ctx, node.x, node.y, node.w, node.h, 6);
    ctx.fill();
    ctx.stroke();
    ctx.fillStyle = fill;
    ctx.fillRect(node.x, node.y + 3, 6, node.h - 6);
    ctx.fillStyle = "#1d2328";
    ctx.font = "600 13px system-ui, sans-serif";
    ctx.textBaseline = "alphabetic";
    ctx.fillText(ellipsis(ctx, node.label, node.w - 20), node.x + 12, node.y + 18);
    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#4a545e";
    let line = status;
    if (task) {
      if (task.attempt > 1 || task.maxAttempts > 1) line += ` · attempt ${task.attempt}`;
      if (status === "running") line += ` · ${task.progress}%`;
      if (task.waitingFor) line += ` · ${task.waitingFor}`;
      else if (task.message && status === "running") line += ` · ${task.message}`;
    }
    ctx.fillText(ellipsis(ctx, line, node.w - 20), node.x + 12, node.y + 33);
    // progress bar
    const progress = task ? task.progress : 0;
    ctx.fillStyle = "#e6e9ec";
    ctx.fillRect(node.x + 12, node.y + node.h - 9, node.w - 24, 4);
    ctx.fillStyle = fill;
    ctx.fillRect(node.x + 12, node.y + node.h - 9, ((node.w - 24) * progress) / 100, 4);
  }

  drawGroup(node, detail, cells, visible) {
    const ctx = this.ctx;
    const tasks = this.model.tasks;
    ctx.fillStyle = "#f6f7f9";
    ctx.strokeStyle = "#8a95a1";
    ctx.lineWidth = Math.max(1, 1 / this.scale);
    if (node.kind === "fanout") ctx.setLineDash([6, 4]);
    roundRect(ctx, node.x, node.y, node.w, node.h, 6);
    ctx.fill();
    ctx.stroke();
    ctx.setLineDash([]);
    if (detail) {
      ctx.fillStyle = "#1d2328";
      ctx.font = "600 12px system-ui, sans-serif";
      ctx.textBaseline = "alphabetic";
      ctx.fillText(ellipsis(ctx, node.label, node.w - 12), node.x + 6, node.y + 16);
    }
    if (CELL * this.scale >= 2) {
      // one cell per task, batched by colour
      for (let i = 0; i < node.members.length; i++) {
        const [x, y] = cellRect(node, i);
        if (!visible(x, y, x + CELL, y + CELL)) continue;
        const task = tasks.get(node.members[i]);
        const fill = colour(task ? task.status : "pending");
        let list = cells.get(fill);
        if (!list) cells.set(fill, (list = []));
        list.push(x, y);
      }
      return;
    }
    // too small for cells: one bar of the group's statuses
    const counts = new Map();
    for (const id of node.members) {
      const status = tasks.get(id)?.status || "pending";
      counts.set(status, (counts.get(status) || 0) + 1);
    }
    let x = node.x + 3;
    const width = node.w - 6;
    for (const [status, count] of counts) {
      const w = (width * count) / node.members.length;
      ctx.fillStyle = colour(status);
      ctx.fillRect(x, node.y + 3, w, node.h - 6);
      x += w;
    }
  }

  drawSelection() {
    if (!this.selected || !this.layout) return;
    const found = this.layout.where.get(this.selected);
    if (!found) return;
    const ctx = this.ctx;
    const node = this.layout.nodes[found[0]];
    ctx.strokeStyle = "#111820";
    ctx.lineWidth = Math.max(2, 2.5 / this.scale);
    if (found[1] < 0) {
      roundRect(ctx, node.x - 3, node.y - 3, node.w + 6, node.h + 6, 8);
      ctx.stroke();
    } else {
      const [x, y] = cellRect(node, found[1]);
      ctx.strokeRect(x - 2, y - 2, CELL + 4, CELL + 4);
    }
  }
}

function clamp(v, lo, hi) {
  return Math.max(lo, Math.min(hi, v));
}

function roundRect(ctx, x, y, w, hh, r) {
  ctx.beginPath();
  ctx.moveTo(x + r, y);
  ctx.arcTo(x + w, y, x + w, y + hh, r);
  ctx.arcTo(x + w, y + hh, x, y + hh, r);
  ctx.arcTo(x, y + hh, x, y, r);
  ctx.arcTo(x, y, x + w, y, r);
  ctx.closePath();
}

const ellipsisCache = new Map();
/** `text` cut to fit `max` pixels with an ellipsis (measurements cached per font and text). */
function ellipsis(ctx, text, max) {
  const key = `${ctx.font}\u0000${max}\u0000${text}`;
  const cached = ellipsisCache.get(key);
  if (cached !== undefined) return cached;
  let out = text;
  if (ctx.measureText(text).width > max) {
    let lo = 0;
    let hi = text.length;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (ctx.measureText(`${text.slice(0, mid)}…`).width <= max) lo = mid;
      else hi = mid - 1;
    }
    out = `${text.slice(0, lo)}…`;
  }
  if (ellipsisCache.size > 5000) ellipsisCache.clear();
  ellipsisCache.set(key, out);
  return out;
}

