"""An open-loop arrival schedule on Locust's HTTP client: requests start at fixed times,
1/rate apart, whether or not earlier ones have been answered (one greenlet each).

Locust's users are closed loops: a user waits for its answer before its next request, and even
paced users synchronised into bursts here (0 to 500 requests in a second at a target of 200) as
soon as the server slowed down. So one user only schedules; every request runs in a greenlet of
its own, over a connection pool large enough that none waits for a connection. Each answer's
send time, status, latency and Retry-After go to a JSON file when Locust quits.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, constant, events, task

IMAGE = Path(os.environ["OVERLOAD_IMAGE"]).read_bytes()
MODEL = os.environ["OVERLOAD_MODEL"]
RATE = float(os.environ["OVERLOAD_RATE"])
# Unique uploads: a suffix after the JPEG's end marker (decoders ignore it) gives every request a
# new sha256, so a server with its response cache on still runs the model for each.
UNIQUE = os.environ.get("OVERLOAD_UNIQUE") == "1"
SERIALS = itertools.count()
RECORDS: list[tuple[float, int, float, bool]] = []  # (sent at, status, ms, Retry-After present)


class ArrivalSchedule(FastHttpUser):
    wait_time = constant(0)
    concurrency = 4000  # connections: a request never waits for one (that would close the loop)
    network_timeout = 30.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        self.next_at = time.monotonic()

    @task
    def send_next(self) -> None:
        delay = self.next_at - time.monotonic()
        if delay > 0:
            gevent.sleep(delay)
        gevent.spawn(self.classify)
        self.next_at += 1.0 / RATE

    def classify(self) -> None:
        sent = time.time()
        with self.client.post(
            f"/classify?model={MODEL}",
            data=IMAGE + b"unique-%d" % next(SERIALS) if UNIQUE else IMAGE,
            name="classify",
            catch_response=True,
            headers={"Content-Type": "image/jpeg"},
        ) as response:
            RECORDS.append(
                (
                    sent,
                    response.status_code or 0,
                    response.request_meta["response_time"],
                    "retry-after" in {k.lower() for k in (response.headers or {})},
                )
            )
            response.success()  # every status is recorded; the report judges them


@events.quitting.add_listener
def _dump(environment: Any, **_: Any) -> None:
    Path(os.environ["OVERLOAD_OUT"]).write_text(json.dumps(RECORDS))
