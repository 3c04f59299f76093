"""`catdog-serve` / `python -m service`: run the app under uvicorn with draining on SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.app import create_app
from service.http_protocol import bounded_httptools_protocol
from service.logging_setup import configure_logging
from service.settings import Settings

log = logging.getLogger("service")


class DrainingServer(uvicorn.Server):
    """Flips readiness the moment SIGTERM arrives; uvicorn then finishes in-flight requests."""

    def __init__(self, config: uvicorn.Config, on_signal: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_signal = on_signal

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        log.info(
            "signal %d: readiness off, draining for up to %ss", sig, self.config.timeout_graceful_shutdown
        )
        self._on_signal()
        super().handle_exit(sig, frame)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    sys.exit(0)


def uvicorn_config(
    app: FastAPI, settings: Settings, host: str, port: int, http: str = "auto", loop: str = "auto"
) -> uvicorn.Config:
    # The drain timeout goes through as given: int() turned 0.5 s into 0 (no drain at all).
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=_protocol(app, settings, http),
        h11_max_incomplete_event_size=settings.max_head_bytes,
        loop=loop,
        log_config=None,
        lifespan="on",
        timeout_graceful_shutdown=settings.drain_timeout_s,  # type: ignore[arg-type]  # a float works; uvicorn hints int
        access_log=False,
    )


def _protocol(app: FastAPI, settings: Settings, http: str) -> str | type[asyncio.Protocol]:
    """httptools (the default) with each connection bounded in bytes and time (service/http_protocol.py);
    h11, kept for comparisons, bounds only the head's bytes (h11_max_incomplete_event_size)."""
    if http == "h11":
        log.warning(
            "--http h11: no connection cap (CATDOG_MAX_CONNECTIONS), no head or body timeouts; "
            "for comparisons, not for serving untrusted clients"
        )
        return http
    closed_early = app.state.catdog.metrics.connections_closed_early
    return bounded_httptools_protocol(
        settings.max_connections,
        settings.max_head_bytes,
        settings.head_timeout_s,
        settings.max_body_bytes,
        settings.body_timeout_s,
        lambda reason: closed_early.labels(reason).inc(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="catdog-serve", description="Serve the cat/dog classifier.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    # auto: httptools (bounded: service/http_protocol.py) and uvloop; h11 and asyncio to compare.
    parser.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto")
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    args = parser.parse_args(argv)
    settings = Settings()
    configure_logging(settings.log_level, settings.log_json)
    app = create_app(settings, metrics_host=args.host)
    server = DrainingServer(
        uvicorn_config(app, settings, args.host, args.port, args.http, args.loop),
        app.state.catdog.begin_draining,
    )
    # uvicorn restores the previous handler after its graceful shutdown and re-raises the signal
    # through it. With this handler a completed drain ends in exit status 0, which is what process
    # supervisors expect; a SIGTERM before uvicorn starts also exits cleanly (nothing in flight).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    server.run()
    return 0 if server.started else 1


if __name__ == "__main__":
    raise SystemExit(main())
