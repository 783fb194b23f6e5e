// The login form: the token is checked against the API, then kept in sessionStorage only.

import * as api from "../api.js";
import { fill, h, setText } from "../dom.js";

export function showLogin(main, { message = "", onLogin }) {
  const input = h("input", {
    type: "password",
    name: "token",
    id: "token",
    autocomplete: "current-password",
    required: true,
    "aria-label": "Token",
  });
  const error = h("p", { class: "error login-error", role: "alert" }, message);
  const form = h(
    "form",
    { class: "login", method: "post", action: "#" },
    h("h1", {}, "Sign in"),
    h(
      "p",
      {},
      "This gateway needs its bearer token ([gateway] auth_token). It is kept in this tab only, " +
        "until you log out or close the tab.",
    ),
    h("label", { for: "token" }, "Token"),
    input,
    h("button", { type: "submit" }, "Sign in"),
    error,
  );
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const value = input.value.trim();
    if (!value) return;
    setText(error, "");
    try {
      if (await api.probe(value)) {
        api.setToken(value);
        input.value = "";
        onLogin();
      } else {
        setText(error, "The gateway refused this token.");
      }
    } catch (err) {
      setText(error, `Could not reach the gateway: ${err.message}`);
    }
  });
  fill(main, h("section", { class: "login-page" }, form));
  document.title = "Sign in · provisioning";
  input.focus();
}
