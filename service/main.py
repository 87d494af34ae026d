"""`selfcascade-api`: one API process under uvicorn, configured from SELFCASCADE_* env."""

from __future__ import annotations

import argparse

from contract.log_format import configure_logging
from contract.settings import ModelsFileError, settings_from_env
from service.app import create_app
from service.serving import serve


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="selfcascade REST API")
    parser.add_argument("--host", help="bind address (default: settings, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: settings, 8000)")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    settings = settings_from_env()
    configure_logging(settings.log_format, args.log_level)
    try:
        app = create_app(settings)
    except ModelsFileError as exc:  # its one line is the whole story; a traceback would bury it
        raise SystemExit(str(exc)) from None
    serve(
        app,
        host=args.host or settings.host,
        port=args.port or settings.port,
        log_level=args.log_level,
    )


if __name__ == "__main__":
    main()
