"""The web playground: static files under /static and its page at /.

Plain files shipped as package data, no build step; the page talks to the public API only.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"


def mount_playground(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def playground() -> FileResponse:
        # no-cache: a redeployed API serves its new page at once (the browser still revalidates).
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})
