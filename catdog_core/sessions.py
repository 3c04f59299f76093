"""onnxruntime sessions configured one way: the build measures the manifest's latency with the
options the server runs with, so `auto` and the deadline predictions compare like with like."""

from __future__ import annotations

import functools
import json
import math
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

Spinning = Literal["on", "off", "within-runs"]
DEFAULT_SPINNING: Spinning = "off"  # README, "Performance under contention"

SESSION_PROFILE = f"graph optimisation all, inter-op 1, memory patterns off, CPU spinning {DEFAULT_SPINNING}"
"""What session_options sets by default, as recorded in the manifest beside the latency it measured."""


def session_options(
    threads: int, spinning: Spinning = DEFAULT_SPINNING, shared_arena: bool = False
) -> ort.SessionOptions:
    """shared_arena: allocate from the process's one CPU arena (register_shared_cpu_arena) instead
    of an arena of the session's own."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Memory patterns pre-plan one block per input shape, and the arena keeps each of them: with
    # batch sizes 1..8 on all four models the process reached 1.47 GiB, against 0.85 GiB without
    # patterns, at the same or better speed (docs/performance.md, "Benchmarks"). Batches vary in size
    # here, which is the case patterns do not help.
    options.enable_mem_pattern = False
    # Spinning keeps idle intra-op threads busy-waiting for the next parallel section: lower
    # latency on cores of one's own, CPU taken from everything else (and CFS quota burnt) when
    # not. within-runs spins inside a session.run and stops when it returns (force_spinning_stop).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0" if spinning == "off" else "1")
    if spinning == "within-runs":
        options.add_session_config_entry("session.force_spinning_stop", "1")
    if shared_arena:
        options.add_session_config_entry("session.use_env_allocators", "1")
    return options


@functools.cache
def register_shared_cpu_arena() -> None:
    """One CPU arena for every session that asks for it, instead of one each. Each arena keeps
    the high-water mark of its own session's activations; shared, they keep the mark of what runs
    at once: with the five models loaded and run at batch 1 and 8 on one thread, 594 MiB RSS
    against 765, at the same speed (two threads running MobileNet or Xception batches together:
    the same img/s either way). onnxruntime's documented way for several sessions in a process."""
    ort.create_and_register_allocator(
        ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT), None
    )


CPU = "CPUExecutionProvider"
OPENVINO = "OpenVINOExecutionProvider"
"""Intel's OpenVINO runtime as an onnxruntime provider (the onnxruntime-openvino wheel, which
installs in place of onnxruntime): on a Xeon with AMX it ran xception-int8 5.9x faster than fp32
Xception on one thread, where onnxruntime's own kernels reach 2.8x (README, "OpenVINO")."""


# OpenVINO pins each session's threads to cores of its choosing, and the server runs sessions side
# by side (one per model, a model's second one for lone images): two one-thread MobileNet sessions
# running at once made 47 runs a second between them pinned, 119-125 unpinned (2026-12-06, the
# 2-CPU Xeon VM); Xception 8.0 against 13.5. A session running alone measured level either way
# (30 alternating pairs per model and thread count).
_OPENVINO_CPU_CONFIG = {"ENABLE_CPU_PINNING": "NO"}

OpenVinoPrecision = Literal["fp32", "bf16"]
"""What OpenVINO computes a model's floating-point layers in. fp32: the figures the manifest
measured. bf16: bfloat16 on CPUs that have it in hardware (AMX or AVX-512 BF16), 2.6-4.2x faster
for the fp32 models on the Xeon VM, with answers measured apart from fp32's (README, "OpenVINO")."""


def openvino_options(
    threads: int, concurrent_runs: int = 1, precision: OpenVinoPrecision = "fp32"
) -> dict[str, str]:
    """The OpenVINO provider on the CPU, `threads` inference threads per run, not pinned to cores.

    concurrent_runs: how many threads call the session at once. The provider keeps one inference
    request per stream and runs a session's calls one after another when it has one stream: the
    server's two inference workers sharing a MobileNet session made 55 runs a second between them
    with one stream, 131 with two (2026-12-06, the 2-CPU Xeon VM).

    precision: fp32 is named, so that the plugin's own default (bf16 on CPUs that have it) cannot
    move answers away from the figures the manifest measured. The provider's `precision` option
    takes only FP32 or ACCURACY on the CPU, so bf16 is asked of the plugin itself
    (INFERENCE_PRECISION_HINT in its load_config)."""
    options = {
        "device_type": "CPU",
        "num_streams": str(concurrent_runs),
        "num_of_threads": str(threads * concurrent_runs),
    }
    if precision == "fp32":
        options["precision"] = "FP32"
        plugin = _OPENVINO_CPU_CONFIG
    else:
        plugin = {**_OPENVINO_CPU_CONFIG, "INFERENCE_PRECISION_HINT": "bf16"}
    options["load_config"] = json.dumps({"CPU": plugin})
    return options


def cpu_providers() -> list[str]:
    """The CPU providers this onnxruntime offers: onnxruntime's own, and OpenVINO where installed."""
    return [p for p in (CPU, OPENVINO) if p in ort.get_available_providers()]


def configured_providers(
    providers: list[str],
    threads: int,
    concurrent_runs: int = 1,
    precision: OpenVinoPrecision = "fp32",
) -> list[str | tuple[str, dict[str, str]]]:
    """The providers as onnxruntime takes them, OpenVINO with its options (openvino_options)."""
    return [
        (p, openvino_options(threads, concurrent_runs, precision)) if p == OPENVINO else p for p in providers
    ]


def cpu_session(
    path: Path, threads: int, provider: str = CPU, precision: OpenVinoPrecision = "fp32"
) -> ort.InferenceSession:
    """A session on one CPU provider; OpenVINO keeps onnxruntime's CPU provider only for nodes it
    declines (it took every node of these models), and a session it did not start is an error.
    precision: OpenVINO's (openvino_options); onnxruntime's CPU provider computes in fp32."""
    providers = configured_providers(
        [provider, CPU] if provider != CPU else [CPU], threads, precision=precision
    )
    session = ort.InferenceSession(str(path), session_options(threads), providers=providers)
    if session.get_providers()[0] != provider:
        raise RuntimeError(f"{provider} did not start for {path}: {session.get_providers()}")
    return session


def run_batches(
    session: ort.InferenceSession,
    images: np.ndarray,
    batch: int = 16,
    progress: Callable[[range], Iterable[int]] = iter,
) -> np.ndarray:
    """The session's first output on every image, `batch` images per run (progress: wraps the
    batches' start indices, for a progress bar)."""
    name = session.get_inputs()[0].name
    starts = progress(range(0, len(images), batch))
    outputs = [session.run(None, {name: images[i : i + batch]})[0] for i in starts]
    return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)


def random_batch(batch: int, size: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)


@dataclass(frozen=True)
class PairedTimes:
    first_ms: float  # median wall time of one call
    second_ms: float
    ratio: float  # median over pairs of first / second: how many times faster the second is
    second_faster_pairs: int  # pairs in which the second call took less time than the first
    pairs: int

    def could_be_chance(self, significance: float = 0.05) -> bool:
        """Whether a coin could have split the pairs this way: two-sided exact sign test.

        The median ratio says which call is faster in most pairs, but near half of them that
        "most" is noise, and the medians of the two calls' own times can then disagree with it.
        """
        k = max(self.second_faster_pairs, self.pairs - self.second_faster_pairs)
        tail = sum(math.comb(self.pairs, i) for i in range(k, self.pairs + 1)) / (1 << self.pairs)
        return 2 * tail > significance


def paired_times_ms(
    first: Callable[[], object],
    second: Callable[[], object],
    pairs: int = 60,
    warmup: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> PairedTimes:
    """Time two calls alternately, one call of each per pair, the order swapped every pair.

    A shared VM's speed moves within seconds; blocks of 20 runs of one then 20 of the other put a
    neighbour's burst on one side only (MobileNet int8's speed-up read 1.38-1.91x between runs).
    Adjacent calls share the machine's state, so the median of the pairs' ratios cancels it.
    """
    for _ in range(warmup):
        first()
        second()

    def timed(run: Callable[[], object]) -> float:
        start = clock()
        run()
        return (clock() - start) * 1000

    a_times, b_times = [], []
    for index in range(pairs):
        if index % 2:
            b_times.append(timed(second))
            a_times.append(timed(first))
        else:
            a_times.append(timed(first))
            b_times.append(timed(second))
    ratios = [a / b for a, b in zip(a_times, b_times, strict=True)]
    return PairedTimes(
        statistics.median(a_times),
        statistics.median(b_times),
        statistics.median(ratios),
        second_faster_pairs=sum(ratio > 1 for ratio in ratios),
        pairs=pairs,
    )


def run_times_ms(
    run: Callable[[], object], repeats: int = 20, min_seconds: float = 0.0, warmup: int = 3
) -> list[float]:
    """Wall times of `run` after `warmup` calls: at least `repeats` of them and `min_seconds` long."""
    for _ in range(warmup):
        run()
    times: list[float] = []
    end = time.perf_counter() + min_seconds
    while len(times) < repeats or time.perf_counter() < end:
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000)
    return times


def steady_figures(
    session: ort.InferenceSession, size: int, batch: int, repeats: int = 20, min_seconds: float = 0.0
) -> dict[str, float]:
    """p50 and p99 wall time of one session.run at `batch` random images, and the images a second
    the median implies (what `make bench` and `make bench-gpu` report per batch size)."""
    feed = {session.get_inputs()[0].name: random_batch(batch, size)}
    times = run_times_ms(lambda: session.run(None, feed), repeats, min_seconds)
    median = statistics.median(times)
    return {
        "p50_ms": round(median, 3),
        "p99_ms": round(float(np.percentile(times, 99)), 3),
        "images_per_s": round(1000 * batch / median, 1),
    }


def latency_p50_ms(session: ort.InferenceSession, size: int, batch: int, repeats: int = 20) -> float:
    """Median wall time of one session.run on random uint8 input, after warm-up."""
    return steady_figures(session, size, batch, repeats)["p50_ms"]
