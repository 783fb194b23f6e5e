// Short messages at the bottom of the page (text only).

import { h } from "./dom.js";

let host = null;

export function toast(message, kind = "info") {
  if (!host) {
    host = h("div", { class: "toasts", role: "status", "aria-live": "polite" });
    document.body.append(host);
  }
  const item = h("div", { class: `toast ${kind}` }, message);
  host.append(item);
  setTimeout(() => item.remove(), kind === "error" ? 8000 : 4000);
}
