"""API keys: bearer tokens, kept only as SHA-256 digests, checked in constant time.

SHA-256 (not a slow password hash) is enough because tokens are long random strings, not
passwords a person chose. In open mode every caller is the same anonymous principal.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from contract.jobs import ErrorCode
from contract.settings import Settings
from service.errors import ApiError

OPEN_PRINCIPAL = "open"  # the rate-limit and concurrency bucket of open mode
# "generate": create jobs (both POST routes); "read": see and cancel its own jobs, list models.
SCOPES = frozenset({"generate", "read"})


@dataclass(frozen=True)
class Principal:
    key_id: str | None  # None in open mode
    scopes: frozenset[str] = SCOPES

    @property
    def bucket(self) -> str:
        return self.key_id or OPEN_PRINCIPAL

    def require(self, scope: str, why: str = "") -> None:
        """403 unless the key holds `scope`; `why` says what needs it, when not the route."""
        if scope not in self.scopes:
            raise ApiError(
                403, ErrorCode.FORBIDDEN,
                f"this API key lacks the {scope!r} scope{f' ({why})' if why else ''}",
                "Authorization",
            )


class Keyring:
    def __init__(
        self,
        required: bool,
        digests: dict[str, str],
        scopes: dict[str, frozenset[str]] | None = None,
    ) -> None:
        self.required = required
        self._digests = digests  # key id -> sha256 hex of the token
        self._scopes = scopes or {}

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        digests: dict[str, str] = {}
        scopes: dict[str, frozenset[str]] = {}
        if settings.api_keys is not None:
            for pair in settings.api_keys.get_secret_value().split(","):
                key_id, sep, token = pair.strip().partition(":")
                if not sep or not key_id or not token:
                    raise ValueError("SELFCASCADE_API_KEYS must be 'id:token[,id:token...]'")
                digests[key_id] = token_digest(token)
        if settings.api_keys_file is not None:
            for entry in json.loads(settings.api_keys_file.read_text()):
                digest = entry.get("sha256") or token_digest(entry["token"])
                digests[str(entry["id"])] = str(digest).lower()
                granted = frozenset(entry.get("scopes", SCOPES))
                if not granted <= SCOPES:
                    raise ValueError(f"API key {entry['id']}: unknown scopes {granted - SCOPES}")
                scopes[str(entry["id"])] = granted
        if settings.auth_mode == "keys" and not digests:
            raise ValueError(
                "auth_mode=keys needs SELFCASCADE_API_KEYS or SELFCASCADE_API_KEYS_FILE"
            )
        return cls(settings.auth_mode == "keys", digests, scopes)

    def identify(self, authorization: str | None) -> Principal:
        if not self.required:
            return Principal(None)
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _unauthorized("missing bearer token (Authorization: Bearer <api key>)")
        presented = token_digest(token.strip())
        found = None
        # Compare against every key so the time taken does not say which prefix matched.
        for key_id, digest in self._digests.items():
            if hmac.compare_digest(presented, digest):
                found = key_id
        if found is None:
            raise _unauthorized("invalid API key")
        return Principal(found, self._scopes.get(found, SCOPES))


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _unauthorized(message: str) -> ApiError:
    return ApiError(
        401, ErrorCode.UNAUTHORIZED, message, "Authorization", {"WWW-Authenticate": "Bearer"}
    )


def authenticate(request: Request) -> Principal:
    keyring: Keyring = request.app.state.keyring
    return keyring.identify(request.headers.get("authorization"))


Caller = Annotated[Principal, Depends(authenticate)]
