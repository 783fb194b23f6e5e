// A layered layout of a workflow's DAG, computed here (no library): group, layer, order, place.
//
// 1. Group. Tasks with exactly the same dependencies and the same dependents are
//    interchangeable in the drawing; when there are GROUP_MIN or more of them they become one
//    group node drawn as a grid of cells, one cell per task (a fan-out of 9,800 tasks is 100
//    nodes, not 9,800). Fan-out children (`task[3]`) always form a group beside their parent.
// 2. Layer. Longest path from the sources (Kahn's order): every edge points to a later column.
// 3. Order. Barycentre sweeps down and up the columns reduce crossings.
// 4. Place. Columns left to right; in each column a node sits as near as it can to the mean
//    height of its predecessors without overlapping the one above; a column far taller than
//    the graph is wide wraps into sub-columns.
// Linear in tasks and edges but for the sorts; it runs again only when tasks are added.

export const NODE_W = 200;
export const NODE_H = 48;
export const GAP_X = 80;
export const GAP_Y = 16;
export const CELL = 10;
export const CELL_GAP = 2;
export const GROUP_COLS = 16;
export const GROUP_HEAD = 24;
export const GROUP_PAD = 6;
export const GROUP_MIN = 6;
const GAP_SUB = 28; // between the sub-columns of a wrapped column
const WRAP_MIN = 1200;
const SWEEPS = 4;

export function groupHeight(count) {
  const rows = Math.max(1, Math.ceil(count / GROUP_COLS));
  return GROUP_HEAD + rows * (CELL + CELL_GAP) - CELL_GAP + GROUP_PAD;
}

/** The cell of member `i` of a group node, in world coordinates. */
export function cellRect(node, i) {
  const col = i % GROUP_COLS;
  const row = Math.floor(i / GROUP_COLS);
  return [
    node.x + GROUP_PAD + col * (CELL + CELL_GAP),
    node.y + GROUP_HEAD + row * (CELL + CELL_GAP),
  ];
}

/** Which member of a group node is at (x, y), or -1. */
export function cellAt(node, x, y) {
  const col = Math.floor((x - node.x - GROUP_PAD) / (CELL + CELL_GAP));
  const row = Math.floor((y - node.y - GROUP_HEAD) / (CELL + CELL_GAP));
  if (col < 0 || col >= GROUP_COLS || row < 0) return -1;
  const i = row * GROUP_COLS + col;
  return i < node.members.length ? i : -1;
}

function commonPrefix(ids) {
  let prefix = ids[0] || "";
  for (const id of ids) {
    let i = 0;
    while (i < prefix.length && i < id.length && prefix[i] === id[i]) i++;
    prefix = prefix.slice(0, i);
    if (!prefix) break;
  }
  return prefix;
}

/**
 * tasks: [{id, deps: [ids], parent: id|null}] in definition order.
 * Returns {nodes, edges, where: Map(taskId -> [nodeIndex, cellIndex]), width, height}.
 * A node: {key, kind: "task"|"group"|"fanout", label, members, x, y, w, h, layer}.
 */
export function layoutDag(tasks) {
  const byId = new Map();
  for (const t of tasks) byId.set(t.id, t);
  const isChild = (t) => t.parent !== null && t.parent !== undefined && byId.has(t.parent);

  // dependents, among the tasks drawn on their own or in structural groups
  const dependents = new Map();
  for (const t of tasks) {
    if (isChild(t)) continue;
    for (const d of t.deps) {
      if (!byId.has(d)) continue;
      let list = dependents.get(d);
      if (!list) dependents.set(d, (list = []));
      list.push(t.id);
    }
  }

  // 1. group
  const buckets = new Map(); // signature -> [task ids]
  const fanouts = new Map(); // parent -> [child ids]
  for (const t of tasks) {
    if (isChild(t)) {
      let list = fanouts.get(t.parent);
      if (!list) fanouts.set(t.parent, (list = []));
      list.push(t.id);
      continue;
    }
    const ins = t.deps.filter((d) => byId.has(d)).sort().join("\u0001");
    const outs = (dependents.get(t.id) || []).slice().sort().join("\u0001");
    const sig = `${ins}\u0002${outs}`;
    let list = buckets.get(sig);
    if (!list) buckets.set(sig, (list = []));
    list.push(t.id);
  }
  const nodes = [];
  const nodeOf = new Map(); // task id -> node index
  const where = new Map();
  const addNode = (kind, members, label) => {
    const index = nodes.length;
    const group = kind !== "task";
    nodes.push({
      key: kind === "task" ? members[0] : `${kind}:${members[0]}`,
      kind,
      label,
      members,
      x: 0,
      y: 0,
      w: NODE_W,
      h: group ? groupHeight(members.length) : NODE_H,
      layer: 0,
      order: byId.get(members[0])?.index ?? index,
    });
    members.forEach((id, i) => {
      nodeOf.set(id, index);
      where.set(id, [index, group ? i : -1]);
    });
    return index;
  };
  for (const members of buckets.values()) {
    if (members.length >= GROUP_MIN) {
      const prefix = commonPrefix(members);
      addNode("group", members, `${prefix || members[0]}… ×${members.length}`);
    } else {
      for (const id of members) addNode("task", [id], id);
    }
  }
  for (const [parent, members] of fanouts) {
    addNode("fanout", members, `${parent}[…] ×${members.length}`);
  }

  // edges between nodes, once each
  const preds = nodes.map(() => []);
  const succs = nodes.map(() => []);
  const edges = [];
  const seen = new Set();
  const link = (a, b, kind) => {
    if (a === undefined || b === undefined || a === b) return;
    const key = a * 1048576 + b;
    if (seen.has(key)) return;
    seen.add(key);
    preds[b].push(a);
    succs[a].push(b);
    edges.push([a, b, kind]);
  };
  for (const t of tasks) {
    if (isChild(t)) continue;
    for (const d of t.deps) link(nodeOf.get(d), nodeOf.get(t.id), "dep");
  }
  for (const [parent, members] of fanouts) link(nodeOf.get(parent), nodeOf.get(members[0]), "fanout");

  // 2. layer: longest path, in Kahn's order
  const indegree = preds.map((p) => p.length);
  const queue = [];
  nodes.forEach((_, i) => indegree[i] === 0 && queue.push(i));
  for (let head = 0; head < queue.length; head++) {
    const n = queue[head];
    for (const s of succs[n]) {
      nodes[s].layer = Math.max(nodes[s].layer, nodes[n].layer + 1);
      if (--indegree[s] === 0) queue.push(s);
    }
  }
  const layers = [];
  const byOrder = nodes.map((_, i) => i).sort((a, b) => nodes[a].order - nodes[b].order);
  for (const i of byOrder) {
    const l = nodes[i].layer;
    (layers[l] || (layers[l] = [])).push(i);
  }
  for (let l = 0; l < layers.length; l++) if (!layers[l]) layers[l] = [];

  // 3. order: barycentre sweeps (positions normalised to 0..1 within each column)
  const pos = new Float64Array(nodes.length);
  const setPositions = (layer) =>
    layer.forEach((n, i) => {
      pos[n] = (i + 0.5) / layer.length;
    });
  layers.forEach(setPositions);
  const sweep = (layer, neighbours) => {
    const bc = new Map();
    for (const n of layer) {
      const list = neighbours[n];
      if (!list.length) {
        bc.set(n, pos[n]);
        continue;
      }
      let sum = 0;
      for (const m of list) sum += pos[m];
      bc.set(n, sum / list.length);
    }
    layer.sort((a, b) => bc.get(a) - bc.get(b));
    setPositions(layer);
  };
  for (let s = 0; s < SWEEPS; s++) {
    for (let l = 1; l < layers.length; l++) sweep(layers[l], preds);
    for (let l = layers.length - 2; l >= 0; l--) sweep(layers[l], succs);
  }

  // 4. place: columns; each node near the mean centre of its predecessors. A column much
  // taller than the graph is wide (a fan-out of a hundred groups) wraps into sub-columns, so
  // that the whole graph keeps a shape a screen can show.
  let area = 0;
  for (const node of nodes) area += (node.w + GAP_X) * (node.h + GAP_Y);
  const wrapAt = Math.max(WRAP_MIN, Math.sqrt(area) * 1.2);
  let height = 0;
  let x = 0;
  layers.forEach((layer) => {
    let total = 0;
    for (const n of layer) total += nodes[n].h + GAP_Y;
    if (total > wrapAt * 1.5) {
      let top = 0;
      let column = 0;
      for (const n of layer) {
        const node = nodes[n];
        if (top > 0 && top + node.h > wrapAt) {
          column++;
          top = 0;
        }
        node.x = x + column * (NODE_W + GAP_SUB);
        node.y = top;
        top += node.h + GAP_Y;
        height = Math.max(height, node.y + node.h);
      }
      x += (column + 1) * (NODE_W + GAP_SUB) - GAP_SUB + GAP_X;
      return;
    }
    let bottom = -GAP_Y;
    for (const n of layer) {
      const node = nodes[n];
      node.x = x;
      let want = bottom + GAP_Y;
      if (preds[n].length) {
        let sum = 0;
        for (const p of preds[n]) sum += nodes[p].y + nodes[p].h / 2;
        want = Math.max(want, sum / preds[n].length - node.h / 2);
      }
      node.y = want;
      bottom = node.y + node.h;
    }
    height = Math.max(height, bottom);
    x += NODE_W + GAP_X;
  });
  const width = x - GAP_X;
  return { nodes, edges, where, width: Math.max(width, NODE_W), height: Math.max(height, NODE_H) };
}
