"""Dependency aliases: a route declares the services it needs by type (`services: Services`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.services import ApiServices


def get_services(request: Request) -> ApiServices:
    services: ApiServices = request.app.state.services
    return services


Services = Annotated[ApiServices, Depends(get_services)]
