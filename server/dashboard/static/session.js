// Who the dashboard is logged in as: the open-mode banner, the user and logout, the role.

import { getSession, logOut, loginUrl } from "./api.js";

/**
 * Read GET /session. Not logged in while the API wants a login: go to the login page and
 * return null. Otherwise mark the page with the role (auth.css hides what it may not use).
 */
export async function mountSession() {
  let session;
  try {
    session = await getSession();
  } catch {
    return { mode: "unknown", role: "reader" }; // the pages show the API error themselves
  }
  if (session.mode === "on" && !session.authenticated) {
    window.location.assign(loginUrl());
    return null;
  }
  document.body.dataset.role = session.role;
  document.body.dataset.authMode = session.mode;
  if (session.mode === "open") {
    const banner = document.getElementById("auth-banner");
    banner.textContent =
      "Open mode: no login. Anyone who can reach this API may submit and cancel experiments " +
      "(FLORIST_AUTH=on requires tokens).";
    banner.hidden = false;
  } else {
    const who = document.getElementById("auth-user");
    who.textContent = `${session.name} (${session.role})`;
    who.hidden = false;
    const button = document.getElementById("logout-button");
    button.hidden = false;
    button.addEventListener("click", async () => {
      try {
        await logOut();
      } finally {
        window.location.assign("/login");
      }
    });
  }
  return session;
}
