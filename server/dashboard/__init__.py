"""The dashboard: static pages served by the API app, fed by its REST API and event stream."""

import mimetypes
import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"
INDEX_HTML = STATIC_DIR / "index.html"


class _RevalidatingStaticFiles(StaticFiles):
    """Static files that the browser must revalidate before reuse.

    The asset names carry no content hash (there is no build step), so without this an upgraded
    server could meet a browser still running yesterday's cached JavaScript.
    """

    def file_response(
        self,
        full_path: str | os.PathLike[str],
        stat_result: os.stat_result,
        scope: Scope,
        status_code: int = 200,
    ) -> Response:
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers["Cache-Control"] = "no-cache"
        return response


async def _dashboard_page() -> FileResponse:
    # Every page URL gets the same document; the page reads the experiment id from the URL.
    return FileResponse(INDEX_HTML, media_type="text/html", headers={"Cache-Control": "no-cache"})


def mount_dashboard(app: FastAPI) -> None:
    """Serve the dashboard's pages and its assets under ``/static``.

    The pages are ``/`` (experiments and the submit form), ``/experiments/{id}`` (one experiment,
    live), ``/compare?ids=1,2`` and ``/nodes``; they are one document that picks its page from the
    URL.

    Parameters
    ----------
    app : FastAPI
        The application that also serves the REST API under ``/api/v1``; the page calls it with
        same-origin requests, so nothing else needs to be configured.
    """
    # Browsers refuse module scripts served as text/plain, which some OS MIME tables map .js to.
    mimetypes.add_type("text/javascript", ".js")
    app.add_api_route("/", _dashboard_page, methods=["GET"], include_in_schema=False)
    # The id stays a string: a malformed id should reach the page and read "not found", not a 422.
    app.add_api_route(
        "/experiments/{experiment_id}", _dashboard_page, methods=["GET"], include_in_schema=False
    )
    for path in ("/compare", "/nodes"):
        app.add_api_route(path, _dashboard_page, methods=["GET"], include_in_schema=False)
    app.mount("/static", _RevalidatingStaticFiles(directory=STATIC_DIR), name="dashboard-static")
