"""uvicorn, with the API's own way of shutting down."""

from __future__ import annotations

import socket

import uvicorn
from fastapi import FastAPI

from service.services import ApiServices


class DrainingServer(uvicorn.Server):
    """A uvicorn server that tells the API to drain as it shuts down.

    uvicorn stops accepting connections, then waits for the open ones to finish. An event stream
    finishes only when its job ends, which may be long after a rolling restart wanted the
    process gone. Marking the services as draining first makes streams and `Prefer: wait`
    requests end at their next look (within a second): an EventSource reconnects, with
    Last-Event-ID, to a replica that stays, and a waiting request answers its 202. What still
    runs after `timeout_graceful_shutdown` is cut off by uvicorn.
    """

    def __init__(self, config: uvicorn.Config, services: ApiServices) -> None:
        super().__init__(config)
        self.services = services

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.services.draining = True
        await super().shutdown(sockets)


def serve(app: FastAPI, host: str, port: int, log_level: str) -> None:
    services: ApiServices = app.state.services
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        access_log=False,
        log_config=None,  # keep configure_logging's handler (json or text) for uvicorn too
        timeout_graceful_shutdown=services.settings.shutdown_grace_s,
    )
    DrainingServer(config, services).run()
