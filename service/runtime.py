"""onnxruntime sessions: execution provider choice and CPU thread counts."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import onnxruntime as ort

from catdog_core.machine import BF16_INSTRUCTIONS, native_bf16
from catdog_core.sessions import (
    CPU,
    DEFAULT_SPINNING,
    OPENVINO,
    OpenVinoPrecision,
    Spinning,
    configured_providers,
    register_shared_cpu_arena,
    run_times_ms,
    session_options,
)

log = logging.getLogger(__name__)


class ProviderUnavailable(RuntimeError):
    """The configured execution provider cannot run here: a start-up failure, never a fallback."""


class CpuQuota(NamedTuple):
    """A CFS quota: CPUs per period, and the period (the quota refills once per period)."""

    cpus: float
    period_s: float


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup"), membership: str | None = None) -> CpuQuota | None:
    """The tightest CFS quota on this process's cgroup and its parents (cgroup v2 cpu.max or v1
    cpu.cfs_quota_us), if any. Inside a container the process's cgroup is the root; a process
    placed in a nested group (a systemd slice, a bench's cgroup) is not."""
    if membership is None:
        try:
            membership = Path("/proc/self/cgroup").read_text()
        except OSError:
            membership = ""
    quotas = [
        q for directory in _own_cgroup_dirs(root, membership) if (q := _quota_at(directory)) is not None
    ]
    return min(quotas, default=None, key=lambda quota: quota.cpus)


def _own_cgroup_dirs(root: Path, membership: str) -> list[Path]:
    """The process's cpu cgroup directory and each parent up to the root (which is always tried)."""
    relative = ""
    for line in membership.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "" or "cpu" in controllers.split(","):
            relative = path.strip("/")
            base = root if controllers == "" else root / "cpu"
            break
    else:
        return [root, root / "cpu"]
    parts = [p for p in relative.split("/") if p]
    return [base.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _quota_at(directory: Path) -> CpuQuota | None:
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else CpuQuota(int(quota) / int(period), int(period) / 1e6)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((directory / "cpu.cfs_quota_us").read_text())
        period_us = int((directory / "cpu.cfs_period_us").read_text())
        return CpuQuota(quota_us / period_us, period_us / 1e6) if quota_us > 0 else None
    except (OSError, ValueError):
        return None


def default_threads(quota: CpuQuota | None) -> int:
    """Threads matching the CPUs this process may really use: quota, then affinity, then count."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(available, math.ceil(quota.cpus))) if quota else max(1, available)


# Decoding a photo for MobileNet-160 costs about a seventh of its inference on one thread
# (MobileNet at 288 px: a twelfth), so a quarter of the CPUs keeps up with the cheapest model.
# More threads than that only decode bursts of arrivals side by side, each taking a core from an
# inference worker mid-batch: on 2 CPUs, one decode thread against two gave 0-7 % more MobileNet
# throughput at c=8 and 32 in every condition, and the shorter p99 in 7 of those 8 points (README,
# "Performance under contention").
CPUS_PER_DECODE_THREAD = 4


def decode_threads_for(cpus: int) -> int:
    return max(1, math.ceil(cpus / CPUS_PER_DECODE_THREAD))


def decode_threads(setting: int | None, quota: CpuQuota | None) -> int:
    """Image decoding threads: as set, else one per four CPUs this process may use (at least one)."""
    return setting or decode_threads_for(default_threads(quota))


class InferenceLayout(NamedTuple):
    workers: int  # batches at once, each on its own thread
    threads: int  # intra-op threads per batch
    spare: int  # workers beyond one per CPU (only models of short runs use them: registry)


def inference_layout(
    workers: int | None,
    threads: int | None,
    providers: list[str],
    quota: CpuQuota | None,
    spare_workers: int = 0,
) -> InferenceLayout:
    """Inference workers (batches at once) and intra-op threads per batch: what the settings say,
    else on CPU one worker of one thread per CPU, plus `spare_workers` where no CPU quota applies,
    and on CUDA one worker with every CPU (the GPU runs one batch at a time; the threads only serve
    the nodes it leaves to the CPU).

    Spare workers: under MobileNet load on a quiet machine two workers on two CPUs left 3.8-6.2 %
    of the CPU idle, a third 0.9-1.4 %, for about 5 % more throughput at c=32 in paired runs; under
    a CPU quota, which leaves no idle CPU to fill, the third measured slower (README, "Performance
    under contention")."""
    cpus = default_threads(quota)
    spare = 0
    if workers is None:
        if providers[0] == "CUDAExecutionProvider" or threads is not None:
            workers = 1
        else:
            spare = spare_workers if quota is None else 0
            workers = cpus + spare
    return InferenceLayout(workers, threads or max(1, cpus // workers), spare)


def balance_batches(setting: bool, workers: int, cpu_limit: float | None) -> bool:
    """Whether freed workers take a share of the queue (not all of it): when set, and the CPU
    quota leaves a whole CPU per worker. Under a smaller quota the workers cannot run side by side
    anyway; there sharing measured slower than one worker taking the queue. Off by default: under
    open-loop overload it measured less goodput (README, "Performance under contention")."""
    return setting and (cpu_limit is None or cpu_limit >= workers)


@dataclass(frozen=True)
class BatchingInForce:
    """The batching rules on this node: the settings, adjusted for a CPU quota.

    min_gain: settings.min_batching_gain, or 0 (batches run regardless) under a CPU quota, where
    batches of several MobileNet images gave 5-10 % more throughput than single images although
    the warm-up, one run after another, saw no gain; without a quota single images gave the
    shorter tail at the same throughput.
    max_batch_s: settings.max_batch_ms, or under a CPU quota at most one quota period: a batch
    longer than a period is throttled while it runs, and every image in it waits for each
    throttle (MobileNet at concurrency 8 under a 1.5-CPU quota: p99 0.77-0.86x that of batches
    of up to 8 at the same throughput, two sittings). README, "Performance under contention"."""

    min_gain: float
    max_batch_s: float


def batching_in_force(min_gain: float, max_batch_ms: float, quota: CpuQuota | None) -> BatchingInForce:
    if quota is None:
        return BatchingInForce(min_gain, max_batch_ms / 1000)
    return BatchingInForce(0.0, min(max_batch_ms / 1000, quota.period_s))


def resolve_providers(choice: str) -> list[str]:
    """The providers a session is created with, first choice first. auto: CUDA where present,
    else OpenVINO where the installed onnxruntime is onnxruntime-openvino (installing it is the
    choice), else onnxruntime's CPU provider. A provider asked for by name and absent stops the start."""
    available = ort.get_available_providers()
    has_cuda = "CUDAExecutionProvider" in available
    if choice == "cuda" and not has_cuda:
        raise ProviderUnavailable(
            "providers=cuda but onnxruntime offers only "
            f"{available}: install onnxruntime-gpu and run on a node with an NVIDIA GPU, "
            "or set CATDOG_PROVIDERS=cpu"
        )
    if choice == "openvino" and OPENVINO not in available:
        raise ProviderUnavailable(
            f"providers=openvino but onnxruntime offers only {available}: install onnxruntime-openvino "
            'in place of onnxruntime (README, "OpenVINO"), or set CATDOG_PROVIDERS=cpu'
        )
    if choice == "cuda" or (choice == "auto" and has_cuda):
        load_cuda_libraries()
        return ["CUDAExecutionProvider", CPU]
    if choice == "openvino" or (choice == "auto" and OPENVINO in available):
        return [OPENVINO, CPU]
    return [CPU]


def check_precision(precision: OpenVinoPrecision, providers: list[str], cpuinfo: str | None = None) -> None:
    """bf16 only where OpenVINO runs the models on a CPU that computes bf16 in hardware: elsewhere
    it would be ignored (another provider) or emulated, several times slower than fp32."""
    if precision == "fp32":
        return
    if providers[0] != OPENVINO:
        raise ProviderUnavailable(
            "openvino_precision=bf16 applies to the OpenVINO provider, and the models would run on "
            f'{providers[0]}: install onnxruntime-openvino (README, "OpenVINO"), '
            "or set CATDOG_OPENVINO_PRECISION=fp32"
        )
    if not native_bf16(cpuinfo):
        raise ProviderUnavailable(
            f"openvino_precision=bf16 needs a CPU with {' or '.join(BF16_INSTRUCTIONS)} (this one has "
            "neither, and OpenVINO would emulate bf16, slower than fp32): set CATDOG_OPENVINO_PRECISION=fp32"
        )


def load_cuda_libraries() -> None:
    """Load CUDA and cuDNN before the first CUDA session. onnxruntime-gpu does not search the
    nvidia-* wheels that its `cuda` and `cudnn` extras install (the gpu image's layout):
    `preload_dlls` loads them from there, else from the system's library path (a CUDA base image).
    It prints what it could not load; that goes to the log, and create_session then refuses the
    CPU fallback that follows."""
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is None:
        return
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        preload()
    for line in printed.getvalue().splitlines():
        log.warning("loading CUDA libraries: %s", line)


def create_session(
    path: Path,
    providers: list[str],
    threads: int,
    spinning: Spinning = DEFAULT_SPINNING,
    concurrent_runs: int = 1,
    precision: OpenVinoPrecision = "fp32",
) -> ort.InferenceSession:
    """concurrent_runs: the inference workers that call this session at once (OpenVINO needs a
    stream for each, catdog_core.sessions.openvino_options; onnxruntime's own providers do not).
    precision: OpenVINO's for floating-point layers (check_precision has allowed it)."""
    # On CPU every session draws from one arena (register_shared_cpu_arena); CUDA sessions keep
    # onnxruntime's own allocators, the layout their provider was tested with.
    on_cpu = providers == [CPU]
    if on_cpu:
        register_shared_cpu_arena()
    options = session_options(threads, spinning, shared_arena=on_cpu)
    # OpenVINO runs a model on threads of its own, `threads` for each of its concurrent runs;
    # onnxruntime's spinning setting applies only to the nodes left to its CPU provider (none here).
    configured = configured_providers(providers, threads, concurrent_runs, precision)
    session = ort.InferenceSession(str(path), options, providers=configured)
    if providers[0] != CPU and session.get_providers()[0] != providers[0]:
        # onnxruntime silently falls back to CPU when a provider's libraries fail to load.
        raise ProviderUnavailable(f"{providers[0]} failed to initialise for {path}; see onnxruntime's log")
    return session


def device_of(session: ort.InferenceSession) -> str:
    return "cuda" if session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"


def check_tensor_names(session: ort.InferenceSession, path: Path, input_name: str, output_name: str) -> None:
    """The file must have the tensors the manifest names: they are the ones fed and read."""
    inputs = [i.name for i in session.get_inputs()]
    outputs = [o.name for o in session.get_outputs()]
    if input_name not in inputs or output_name not in outputs:
        raise ValueError(
            f"{path.name}: the manifest names input {input_name!r} and output {output_name!r}, "
            f"the file has inputs {inputs} and outputs {outputs}; rebuild the models (make models)"
        )


def warm(
    session: ort.InferenceSession, input_name: str, height: int, width: int, batch_sizes: list[int]
) -> float:
    """Run each batch size once so the first real request does not pay for allocation/tuning;
    return the median seconds of three batches of one after that: this server's own estimate
    with its own thread layout, until requests measure it (the manifest's was taken at build
    time, possibly with more intra-op threads per batch)."""
    for batch in batch_sizes:
        session.run(None, {input_name: np.zeros((batch, height, width, 3), dtype=np.uint8)})
    one = {input_name: np.zeros((1, height, width, 3), dtype=np.uint8)}
    return statistics.median(run_times_ms(lambda: session.run(None, one), repeats=3, warmup=0)) / 1000


def costs_alone_and_in_batch(
    session: ort.InferenceSession, input_name: str, height: int, width: int, batch: int, rounds: int = 2
) -> tuple[float, float]:
    """Seconds per image alone and in a batch of `batch`: the fastest of `rounds` rounds, each a
    batch then three single images. Alternating, a neighbour that slows one round slows it for
    both kinds, and the other round stands; a single comparison flipped with such noise (this
    VM: MobileNet 28.1 ms alone against 25.9 in a batch one start, 24.2 against 24.7 the next)."""
    one = {input_name: np.zeros((1, height, width, 3), dtype=np.uint8)}
    many = {input_name: np.zeros((batch, height, width, 3), dtype=np.uint8)}
    alone: list[float] = []
    batched: list[float] = []
    for _ in range(rounds):
        batched.extend(ms / 1000 / batch for ms in run_times_ms(lambda: session.run(None, many), 1, warmup=0))
        alone.extend(ms / 1000 for ms in run_times_ms(lambda: session.run(None, one), 3, warmup=0))
    return min(alone), min(batched)


def warm_at(session: ort.InferenceSession, input_name: str, height: int, width: int, batch: int) -> None:
    """Run one batch size twice (as measured on the H200), and nothing else: for a session that
    only ever sees that shape."""
    blank = {input_name: np.zeros((batch, height, width, 3), dtype=np.uint8)}
    for _ in range(2):
        session.run(None, blank)
