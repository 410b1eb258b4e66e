// The login page: an API token exchanged for a session cookie (POST /api/v1/session).

import { getSession, logIn } from "./api.js";

/** Where to go after logging in: a path of this site only (never another site's URL). */
function nextPage() {
  const next = new URLSearchParams(window.location.search).get("next") ?? "/";
  return next.startsWith("/") && !next.startsWith("//") && !next.startsWith("/login") ? next : "/";
}

const form = document.getElementById("login-form");
const error = document.getElementById("login-error");

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  error.hidden = true;
  try {
    await logIn(document.getElementById("login-token").value.trim());
    window.location.assign(nextPage());
  } catch (err) {
    error.textContent = `Could not log in: ${err.message}`;
    error.hidden = false;
  }
});

try {
  const session = await getSession();
  if (session.mode === "open") document.getElementById("login-open").hidden = false;
  else if (session.authenticated) window.location.assign(nextPage());
} catch {
  // The form still works; its own request will say what is wrong.
}
