"""Dependency aliases: routes declare what they need, tests override `get_settings`."""

from __future__ import annotations

from functools import lru_cache
from typing import Annotated

from fastapi import Depends, Request

from contract.settings import Settings
from service.services import ApiServices


@lru_cache
def get_settings() -> Settings:
    """The process's settings, read from the environment on first use (never at import)."""
    return Settings()


def get_services(request: Request) -> ApiServices:
    services: ApiServices = request.app.state.services
    return services


Services = Annotated[ApiServices, Depends(get_services)]
