// The Florist dashboard: one document, a page per path, chosen here.

import { mountComparePage } from "./pages/compare.js";
import { mountExperimentPage } from "./pages/experiment.js";
import { mountExperimentsPage } from "./pages/experiments.js";
import { mountNodesPage } from "./pages/nodes.js";
import { mountSession } from "./session.js";

function route(pathname) {
  const experiment = pathname.match(/^\/experiments\/([^/]+)\/?$/);
  if (experiment) return { page: "experiment", id: decodeURIComponent(experiment[1]) };
  if (/^\/compare\/?$/.test(pathname)) return { page: "compare" };
  if (/^\/nodes\/?$/.test(pathname)) return { page: "nodes" };
  return { page: "experiments" };
}

const current = route(window.location.pathname);
for (const link of document.querySelectorAll("nav a[data-page]")) {
  if (link.dataset.page === current.page || (current.page === "experiment" && link.dataset.page === "experiments")) {
    link.setAttribute("aria-current", "page");
  }
}
// Logged in (or open mode) first: the pages' requests need the session, and the role hides
// the buttons a reader may not use.
if (await mountSession()) {
  if (current.page === "experiment") mountExperimentPage(current.id);
  else if (current.page === "compare") mountComparePage();
  else if (current.page === "nodes") mountNodesPage();
  else mountExperimentsPage();
}
