"""Locust users that each fire at a fixed pace (`constant_pacing`), each at a random phase.

While every answer takes less than the pace, the offered rate is users / pace whatever the
answers: an open loop, as production traffic is. bench/overload.py sizes the users for a pace
well above the longest answer it accepts and reports the rate that was really offered.
Each answer's status, latency and Retry-After go to a JSON file when Locust quits.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import gevent
from locust import FastHttpUser, constant_pacing, events, task

IMAGE = Path(os.environ["OVERLOAD_IMAGE"]).read_bytes()
MODEL = os.environ["OVERLOAD_MODEL"]
RECORDS: list[tuple[float, int, float, bool]] = []  # (sent at, status, ms, Retry-After present)


PACE_S = float(os.environ["OVERLOAD_PACING_S"])


class PacedClient(FastHttpUser):
    wait_time = constant_pacing(PACE_S)
    network_timeout = 30.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        # Locust starts each second's users together: without a random phase the arrivals came
        # in bursts of a second's worth every pace, not evenly.
        gevent.sleep(random.uniform(0, PACE_S))

    @task
    def classify(self) -> None:
        with self.client.post(f"/classify?model={MODEL}", data=IMAGE, name="classify", catch_response=True,
                              headers={"Content-Type": "image/jpeg"}) as response:
            meta = response.request_meta
            RECORDS.append((meta["start_time"], response.status_code or 0, meta["response_time"],
                            "retry-after" in {k.lower() for k in (response.headers or {})}))
            response.success()  # every status is recorded; the report judges them


@events.quitting.add_listener
def _dump(environment: Any, **_: Any) -> None:
    Path(os.environ["OVERLOAD_OUT"]).write_text(json.dumps(RECORDS))
