// The console's entry point: authentication, the header, and a hash router
// (#/workflows, #/runs/<id>?task=<task>&view=timeline, #/executors). Ids go in the hash, the
// token never does.

import * as api from "./api.js";
import { h, setText } from "./dom.js";
import { ExecutorsPage } from "./pages/executors.js";
import { showLogin } from "./pages/login.js";
import { RunPage } from "./pages/run.js";
import { WorkflowsPage } from "./pages/workflows.js";

const main = document.getElementById("main");
const logoutButton = document.getElementById("logout");
const healthText = document.getElementById("health");
const context = { tracingUi: "", authOff: false };
let page = null;
let route = null;
let signedIn = false;

function parseHash() {
  const hash = location.hash.replace(/^#/, "") || "/workflows";
  const [path, query = ""] = hash.split("?", 2);
  const params = Object.fromEntries(new URLSearchParams(query));
  const parts = path.split("/").filter(Boolean);
  if (parts[0] === "runs" && parts[1]) return { name: "run", params: { ...params, id: decodeURIComponent(parts[1]) } };
  if (parts[0] === "executors") return { name: "executors", params };
  return { name: "workflows", params };
}

function render() {
  if (!signedIn) return;
  const next = parseHash();
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("active", link.dataset.nav === (next.name === "run" ? "workflows" : next.name));
  }
  if (page && route && route.name === next.name && page.update(next.params)) {
    route = next;
    return;
  }
  page?.dispose();
  route = next;
  if (next.name === "run") page = new RunPage(main, next.params, context);
  else if (next.name === "executors") page = new ExecutorsPage(main, next.params);
  else page = new WorkflowsPage(main, next.params);
}

function signOut(message) {
  page?.dispose();
  page = null;
  route = null;
  signedIn = false;
  logoutButton.hidden = true;
  showLogin(main, { message, onLogin: signIn });
}

function signIn() {
  signedIn = true;
  logoutButton.hidden = context.authOff;
  render();
}

async function start() {
  api.authEvents.addEventListener("unauthorized", () => {
    if (!signedIn) return;
    api.clearToken();
    signOut("The gateway asked for a token again (it may have changed): sign in.");
  });
  logoutButton.addEventListener("click", () => {
    api.clearToken();
    signOut("Logged out.");
  });
  window.addEventListener("hashchange", render);
  refreshHealth();
  setInterval(refreshHealth, 10000);
  try {
    if (await api.probe("")) {
      context.authOff = true; // no token configured: nothing to sign in to
      api.clearToken();
      signIn();
      return;
    }
    if (api.token() && (await api.probe(api.token()))) {
      signIn();
      return;
    }
    api.clearToken();
    signOut("");
  } catch (err) {
    main.replaceChildren(h("p", { class: "error" }, `Could not reach the gateway: ${err.message}`));
    setTimeout(start, 3000);
  }
}

async function refreshHealth() {
  try {
    const health = await api.health();
    const ui = health.tracing?.ui_url;
    context.tracingUi = typeof ui === "string" && /^https?:\/\//.test(ui) ? ui.replace(/\/+$/, "") : "";
    const scheduler = health.scheduler?.active ? "scheduler active" : "no active scheduler";
    setText(healthText, health.status === "healthy" ? `healthy · ${scheduler}` : `unhealthy: ${health.nats?.detail || ""}`);
    healthText.dataset.state = health.status === "healthy" ? (health.scheduler?.active ? "ok" : "warn") : "bad";
  } catch {
    setText(healthText, "gateway unreachable");
    healthText.dataset.state = "bad";
  }
}

start();
