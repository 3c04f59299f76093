"""One logging configuration for the service and uvicorn's own loggers."""

from __future__ import annotations

import json
import logging
import logging.config
import threading
import time
from collections import OrderedDict
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload)


class RepeatedWarnings(logging.Filter):
    """Lets through one of each warning per `interval_s`, and says how many it held back. uvicorn
    logs a warning per request it cannot parse or upgrade it does not support: a client could
    otherwise grow the logs, and bury everything else in them, at its own request rate (the
    requests are counted in the metrics either way). It remembers at most `max_messages` messages
    (the most recently seen): uvicorn's are fixed templates today, and a future one carrying client
    text must not grow this filter without bound."""

    def __init__(self, interval_s: float = 10.0, max_messages: int = 256) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.max_messages = max_messages
        self._lock = threading.Lock()
        # message -> (last let through, held back since), least recently seen first
        self._last: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        now, key = time.monotonic(), str(record.msg)
        with self._lock:
            last, held = self._last.get(key, (-self.interval_s, 0))
            suppressed = now - last < self.interval_s
            self._last[key] = (last, held + 1) if suppressed else (now, 0)
            self._last.move_to_end(key)
            if len(self._last) > self.max_messages:
                self._last.popitem(last=False)
        if suppressed:
            return False
        if held:
            record.msg = f"{record.msg} ({held} more like it in the last {now - last:.1f} s not logged)"
        return True


def configure_logging(level: str = "info", as_json: bool = False) -> None:
    formatter = (
        {"()": JsonFormatter} if as_json else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    )
    logging.config.dictConfig(
        {
            "version": 1,
            "disable_existing_loggers": False,
            "formatters": {"default": formatter},
            "filters": {"repeated_warnings": {"()": RepeatedWarnings}},
            "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "default"}},
            "loggers": {
                name: {
                    "handlers": ["stderr"],
                    "level": level.upper(),
                    "propagate": False,
                    # uvicorn's per-connection warnings come through uvicorn.error.
                    "filters": ["repeated_warnings"] if name == "uvicorn.error" else [],
                }
                for name in ("service", "uvicorn", "uvicorn.error", "uvicorn.access")
            },
        }
    )
