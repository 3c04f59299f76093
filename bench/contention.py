"""`make bench-contention`: catdog-serve, a hand-written FastAPI handler and LitServe, on the same
ONNX files, in one sitting, under the conditions production nodes give a pod:

- quiet: nothing else running;
- busy-core: one core taken by a busy process (a spinning Python loop, not pinned);
- quota-1.5 and quota-1: the server process (and any it forks) in a cgroup of its own with a CFS
  quota of 1.5 and 1 CPU (cgroup v1 cpu.cfs_quota_us or v2 cpu.max), the load generator outside.

wrk (closed loop, one thread) at concurrency 1, 8 and 32 on `mobilenet` and `xception` with the
500x375 JPEG. catdog-serve runs with its default settings except the admission cap, raised to 64,
and the queue-wait cap, raised to 60 s, so that concurrency 32 measures admitted work (the other
two servers admit everything).
Reported per point: answered req/s (non-error), p50 and p99; a table per condition and a plot,
and each round's ratios against the plain handler (throughput, p99) with how many rounds met
each aim.

Two ways to run the rounds. By default each server runs alone: started, measured at every point,
stopped, the next one started. With `--paired` every server of a condition is up at once (each on
its own port, each in its own cgroup under a quota), and the servers take turns point by point,
the order alternating: a VM whose speed drifts by a third within minutes then moves both sides of
a comparison alike, where a server measured minutes after the other could read 15 % apart on the
same code.
Every round's figures stay in the JSON with the kinds of its errors (wrk's http, connect, read,
timeouts), and every server run's log in `<out>-server-logs/`, so a bad point can be read later.
Needs root for the cgroups (skipped otherwise, and said so).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.images import write_bench_images
from bench.load import ROOT, IdleMeter, require_wrk, server, stop_on_sigterm, wrk

PORT = 18760  # the first server's port; paired servers take the next ones
URL = f"http://127.0.0.1:{PORT}"
SETTLE_S = (1.0, 15.0)
"""Between two paired points, how long to let the last server finish what wrk left in flight
(bounds): a handler that runs every request it admitted goes on computing for up to concurrency /
throughput seconds after wrk stops, and that CPU would be taken from the next server measured."""
CONDITIONS = ("quiet", "busy-core", "quota-1.5", "quota-1")
MODELS = ("mobilenet", "xception")
MEDIAN_KEYS = ("answered_per_s", "p50_ms", "p99_ms", "errors", "idle_percent", "steal_percent")
PLAIN = "plain FastAPI"
TAIL_AIM = 0.8
"""The tail catdog-serve aims at: at most this fraction of the plain handler's p99."""
MIN_LOG_SPAN = 4.0  # the narrowest a p99 axis gets, as a ratio of its ends


class CpuQuota:
    """A cgroup with a CFS quota; `wrap(command)` starts a command inside it (children included)."""

    created = 0

    def __init__(self, cpus: float) -> None:
        CpuQuota.created += 1
        self.name = f"catdog-bench-{os.getpid()}-{CpuQuota.created}"
        v1 = Path("/sys/fs/cgroup/cpu")
        if (v1 / "cpu.cfs_quota_us").exists():
            self.path = v1 / self.name
            self.path.mkdir()
            (self.path / "cpu.cfs_period_us").write_text("100000")
            (self.path / "cpu.cfs_quota_us").write_text(str(int(cpus * 100000)))
        else:
            self.path = Path("/sys/fs/cgroup") / self.name
            self.path.mkdir()
            (self.path / "cpu.max").write_text(f"{int(cpus * 100000)} 100000")

    def wrap(self, command: list[str]) -> list[str]:
        # The shell joins the cgroup, then becomes the server: nothing runs outside the quota.
        return ["sh", "-c", f'echo $$ > {self.path / "cgroup.procs"} && exec "$@"', "sh", *command]

    def throttled(self) -> dict[str, int]:
        stat = dict(line.split() for line in (self.path / "cpu.stat").read_text().splitlines())
        return {k: int(v) for k, v in stat.items()}

    def remove(self) -> None:
        """Remove the group once its processes (forked workers too) have gone."""
        for _ in range(50):
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.2)


@contextlib.contextmanager
def condition(name: str) -> Iterator[CpuQuota | None]:
    """The condition for one server: the busy process, or its quota's cgroup."""
    with machine_load(name), confinement(name) as quota:
        yield quota


@contextlib.contextmanager
def machine_load(name: str) -> Iterator[None]:
    """What the condition runs beside the servers: a busy process taking a core, or nothing."""
    if name != "busy-core":
        yield
        return
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        busy.kill()
        busy.wait()


@contextlib.contextmanager
def confinement(name: str) -> Iterator[CpuQuota | None]:
    """A cgroup with the condition's CPU quota for one server (None without a quota)."""
    if not name.startswith("quota-"):
        yield None
        return
    quota = CpuQuota(float(name.removeprefix("quota-")))
    try:
        yield quota
    finally:
        quota.remove()


def servers(models_dir: Path, image: Path, out: Path) -> dict[str, dict[str, Any]]:
    """How to start each server and what each request carries (LitServe takes base64 JSON)."""
    body = out / "small.json"
    body.write_text(json.dumps({"image": base64.b64encode(image.read_bytes()).decode()}))
    env = {"CATDOG_MODELS_DIR": str(models_dir), "CATDOG_LOG_LEVEL": "warning"}
    python = sys.executable
    chosen: dict[str, dict[str, Any]] = {
        "catdog-serve": {
            "command": lambda model, port: [python, "-m", "service", "--port", str(port)],
            # Admit what the other two admit: no request cap below 32 connections, and no
            # queue-wait cap (Xception's 32 queued images would wait ~3 s and be refused).
            "env": {**env, "CATDOG_MAX_CONCURRENT_REQUESTS": "64", "CATDOG_MAX_QUEUE_WAIT_MS": "60000"},
            "ready": "/readyz",
            "path": "/classify?model={model}",
            "body": image,
            "content_type": "image/jpeg",
        },
        PLAIN: {
            "command": lambda model, port: [
                python,
                "-m",
                "uvicorn",
                "bench.baselines.plain_fastapi:app",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            "env": {**env, "CATDOG_INTRA_OP_THREADS": "2"},
            "ready": "/docs",
            "path": "/classify?model={model}",
            "body": image,
            "content_type": "image/jpeg",
        },
    }
    if importlib.util.find_spec("litserve") is not None:
        chosen["LitServe"] = {
            "command": lambda model, port: [python, "-m", "bench.baselines.litserve_app", str(port)],
            "env": {**env, "CATDOG_INTRA_OP_THREADS": "2"},
            "per_model_env": "CATDOG_BENCH_MODEL",
            "ready": "/health",
            "path": "/predict",
            "body": body,
            "content_type": "application/json",
        }
    return chosen


def run_server_points(
    spec: dict[str, Any], models: list[str], where: str, concurrencies: list[int], seconds: int, log: Path
) -> dict[str, list[dict[str, Any]]]:
    """Start the server under `where`, then wrk each model at each concurrency. `log` names the
    server's output file (a model's name is added when each model has a server of its own)."""
    results: dict[str, list[dict[str, Any]]] = {}
    groups = model_groups(spec, models)
    for group in groups:
        with condition(where) as quota:
            # Names like quota-1.5 hold a dot: the file name is built, not given a suffix.
            name = f"{log.name}-{group[0]}.log" if len(groups) > 1 else f"{log.name}.log"
            with start(spec, group, PORT, quota, log.parent / name):
                for model in group:
                    url = URL + spec["path"].format(model=model)
                    wrk(url, spec["body"], 2, 2, spec["content_type"])  # warm the path
                    results[model] = [
                        _point_with_idle(url, spec["body"], c, seconds, spec["content_type"])
                        for c in concurrencies
                    ]
                    if quota:
                        for point in results[model]:
                            point["cgroup"] = str(quota.path)
    return results


def model_groups(spec: dict[str, Any], models: list[str]) -> list[list[str]]:
    """The models each server process serves: all of them, or one each (LitServe serves one)."""
    return [[m] for m in models] if "per_model_env" in spec else [models]


def start(
    spec: dict[str, Any], group: list[str], port: int, quota: CpuQuota | None, log: Path
) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """A server for `group`'s models on `port`, inside `quota`'s cgroup if there is one."""
    env = dict(spec["env"])
    if "per_model_env" in spec:
        env[spec["per_model_env"]] = group[0]
    command = spec["command"](group[0], port)
    command = quota.wrap(command) if quota else command
    return server(command, env, f"http://127.0.0.1:{port}{spec['ready']}", log)


def run_paired_points(
    specs: dict[str, dict[str, Any]],
    names: list[str],
    models: list[str],
    where: str,
    concurrencies: list[int],
    seconds: int,
    rounds: int,
    logs: Path,
) -> list[dict[str, dict[str, list[dict[str, Any]]]]]:
    """Every server up at once under `where`, then point by point each server in turn, the order
    alternating; one {server: {model: points}} per round."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(machine_load(where))
        urls: dict[tuple[str, str], str] = {}
        port = PORT - 1
        for name in names:
            spec = specs[name]
            for group in model_groups(spec, models):
                port += 1
                quota = stack.enter_context(confinement(where))
                log = logs / f"paired-{where}-{name.replace(' ', '-')}-{group[0]}.log"
                stack.enter_context(start(spec, group, port, quota, log))
                for model in group:
                    urls[name, model] = f"http://127.0.0.1:{port}" + spec["path"].format(model=model)
        for (name, _), url in urls.items():
            wrk(url, specs[name]["body"], 2, 2, specs[name]["content_type"])  # warm the path
        measured: list[dict[str, dict[str, list[dict[str, Any]]]]] = []
        for round_index in range(rounds):
            measured.append({name: {model: [] for model in models} for name in names})
            for model in models:
                for index, concurrency in enumerate(concurrencies):
                    for name in turns(names, round_index + index):
                        spec = specs[name]
                        point = _point_with_idle(
                            urls[name, model], spec["body"], concurrency, seconds, spec["content_type"]
                        )
                        measured[-1][name][model].append(point)
                        time.sleep(settle_seconds(point))
            print_round(where, round_index, rounds, measured[-1])
        return measured


def turns(names: list[str], index: int) -> list[str]:
    """The order servers take a paired point in: as given, then reversed, alternating, so that
    neither side always follows the other (ABBA)."""
    return names if index % 2 == 0 else names[::-1]


def settle_seconds(point: dict[str, Any]) -> float:
    """How long the work wrk left in flight may still run: its concurrency at the point's rate
    (Little's law), within SETTLE_S."""
    low, high = SETTLE_S
    rate = float(point["answered_per_s"])
    if rate <= 0:
        return high
    return min(high, max(low, int(point["concurrency"]) / rate))


def print_round(
    where: str, round_index: int, rounds: int, by_server: dict[str, dict[str, list[dict[str, Any]]]]
) -> None:
    print(f"paired round {round_index + 1}/{rounds}, {where}:", flush=True)
    for name, by_model in by_server.items():
        for model, points in by_model.items():
            print(f"  {name}, {model}: {summary_line(points)}", flush=True)


def summary_line(points: list[dict[str, Any]]) -> str:
    return ", ".join(
        f"c={p['concurrency']} {p['answered_per_s']}/s p99 {p['p99_ms']:.0f} ms "
        f"idle {p['idle_percent']:.1f} % steal {p['steal_percent']:.1f} %"
        for p in points
    )


def _point_with_idle(
    url: str, body: Path, concurrency: int, seconds: int, content_type: str
) -> dict[str, Any]:
    """A wrk point, with the share of the machine's CPU left idle during it (load generator
    included): the CPU a server did not turn into answers; and the share a VM's hypervisor gave
    to others (steal): a point taken while the host was busy reads slow whatever the server."""
    meter = IdleMeter()
    point = wrk(url, body, concurrency, seconds, content_type)
    return {**point, "idle_percent": meter.percent(), "steal_percent": meter.steal_percent()}


def server_names(chosen: list[str] | None, known: list[str], variants: list[str]) -> list[str]:
    """The servers to run: those chosen (default: all), and every --variant, named or not."""
    names = chosen or known
    return names + [label for label in variants if label not in names]


def median_of_rounds(
    rounds: list[dict[str, dict[str, dict[str, list[dict[str, Any]]]]]],
) -> dict[str, dict[str, dict[str, list[dict[str, Any]]]]]:
    """Each point's median over the rounds (answered req/s, p50, p99), the rounds' own figures kept."""
    results: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {}
    for where, by_server in rounds[0].items():
        results[where] = {}
        for name, by_model in by_server.items():
            results[where][name] = {}
            for model, points in by_model.items():
                merged = []
                for i, point in enumerate(points):
                    runs = [r[where][name][model][i] for r in rounds]
                    merged.append(
                        {
                            **point,
                            **{k: statistics.median(run[k] for run in runs) for k in MEDIAN_KEYS},
                            "rounds": [_round_figures(run) for run in runs],
                        }
                    )
                results[where][name][model] = merged
    return results


def _round_figures(run: dict[str, Any]) -> dict[str, Any]:
    return {**{k: run[k] for k in MEDIAN_KEYS}, "error_kinds": run.get("error_kinds", {})}


def markdown(results: dict[str, dict[str, dict[str, list[dict[str, Any]]]]], concurrencies: list[int]) -> str:
    lines = []
    for where, by_server in results.items():
        lines += [
            f"**{where}**",
            "",
            "| model | server | " + " | ".join(f"c={c} req/s, p50 / p99 ms" for c in concurrencies) + " |",
            "|---|---|" + "---|" * len(concurrencies),
        ]
        for model in measured_models(results):
            for name, by_model in by_server.items():
                if model not in by_model:
                    continue
                cells = [_cell(p) for p in by_model[model]]
                lines.append(f"| {model} | {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def _cell(point: dict[str, Any]) -> str:
    """Answered req/s, p50 / p99 ms; the errors (timeouts, error statuses) said, since wrk's
    percentiles cover only the answered requests."""
    errors = f"{point.get('errors', 0):g}"  # a median of rounds may be a half
    has_errors = errors != "0"
    if point["answered_per_s"] == 0:
        # A server that runs every request at once can finish none within the point's seconds.
        return f"none answered ({errors} errors)" if has_errors else "none finished in the run"
    text = f"{point['answered_per_s']:.1f}, {point['p50_ms']:.0f} / {point['p99_ms']:.0f}"
    return f"{text} ({errors} errors)" if has_errors else text


def versus_plain(results: dict[str, dict[str, dict[str, list[dict[str, Any]]]]]) -> list[dict[str, Any]]:
    """Each server's rounds against the plain handler's rounds of the same point: throughput and
    p99 as ratios, round by round, and how many rounds met each aim (throughput at least the plain
    handler's, p99 at most TAIL_AIM of its). A ratio is nan where a side answered nothing."""
    rows = []
    for where, by_server in results.items():
        plain = by_server.get(PLAIN, {})
        for name, by_model in by_server.items():
            if name == PLAIN:
                continue
            for model, points in by_model.items():
                for point, plain_point in zip(points, plain.get(model, []), strict=False):
                    pairs = list(zip(point["rounds"], plain_point["rounds"], strict=True))
                    throughput = [_ratio(a["answered_per_s"], b["answered_per_s"]) for a, b in pairs]
                    tail = [
                        _ratio(a["p99_ms"], b["p99_ms"]) if a["answered_per_s"] else math.nan
                        for a, b in pairs
                    ]
                    rows.append(
                        {
                            "condition": where,
                            "server": name,
                            "model": model,
                            "concurrency": point["concurrency"],
                            "throughput_ratios": throughput,
                            "p99_ratios": tail,
                            "rounds_ahead": sum(r >= 1 for r in throughput),
                            "rounds_within_tail_aim": sum(r <= TAIL_AIM for r in tail),
                        }
                    )
    return rows


def _ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs > 0 else math.nan


def versus_plain_markdown(results: dict[str, dict[str, dict[str, list[dict[str, Any]]]]]) -> str:
    """The rounds against the plain handler as a table (empty without the plain handler)."""
    rows = versus_plain(results)
    if not rows:
        return ""
    lines = [
        f"**against {PLAIN}, round by round** (throughput ratio, rounds >= 1x; p99 ratio, rounds "
        f"<= {TAIL_AIM:g}x; then every round's ratios)",
        "",
        "| condition | model | server | c | throughput | p99 | rounds: throughput / p99 |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        count = len(row["throughput_ratios"])
        each = ", ".join(
            f"{t:.2f}/{r:.2f}" for t, r in zip(row["throughput_ratios"], row["p99_ratios"], strict=True)
        )
        lines.append(
            f"| {row['condition']} | {row['model']} | {row['server']} | {row['concurrency']} "
            f"| {_median(row['throughput_ratios']):.2f}x ({row['rounds_ahead']} of {count}) "
            f"| {_median(row['p99_ratios']):.2f}x ({row['rounds_within_tail_aim']} of {count}) | {each} |"
        )
    return "\n".join(lines) + "\n"


def _median(values: list[float]) -> float:
    """The median of the values that are numbers (nan if none is)."""
    numbers = [v for v in values if not math.isnan(v)]
    return statistics.median(numbers) if numbers else math.nan


def versus_plain_path(plot_path: Path) -> Path:
    """Where the round-by-round plot goes: beside the main plot."""
    return plot_path.with_name(f"{plot_path.stem}-versus-plain{plot_path.suffix}")


def plot_versus_plain(rows: list[dict[str, Any]], path: Path) -> None:
    """Every round's throughput and p99 as ratios of the plain handler's, one dot per round, one
    column per point (condition, model, concurrency), with the two aims drawn: what a table of
    medians hides is how many rounds fell on each side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({row["server"] for row in rows})
    points = list(dict.fromkeys((row["condition"], row["model"], row["concurrency"]) for row in rows))
    fig, axes = plt.subplots(2, 1, figsize=(max(6.0, 0.9 * len(points) + 2), 7), sharex=True)
    for row in rows:
        offset = names.index(row["server"])
        point = points.index((row["condition"], row["model"], row["concurrency"]))
        x = point + (offset - (len(names) - 1) / 2) * 0.15  # servers side by side within a point
        for axis, ratios in zip(axes, (row["throughput_ratios"], row["p99_ratios"]), strict=True):
            axis.plot([x] * len(ratios), ratios, "o", color=f"C{offset}", alpha=0.7, ms=5)
    for offset, name in enumerate(names):
        axes[0].plot([], [], "o", color=f"C{offset}", label=name)
    axes[0].axhline(1.0, color="black", linestyle="--", label=f"aim: at least {PLAIN}'s")
    axes[1].axhline(TAIL_AIM, color="black", linestyle="--", label=f"aim: at most {TAIL_AIM:g}x")
    axes[0].set(ylabel=f"throughput / {PLAIN}'s", title="each round against the plain handler's same round")
    axes[1].set(ylabel=f"p99 / {PLAIN}'s")
    labels = [f"{where}\n{model} c={c}" for where, model, c in points]
    axes[1].set_xticks(range(len(points)), labels, rotation=60, ha="right", fontsize=8)
    for axis in axes:
        axis.legend(fontsize=8)
        axis.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def measured_models(results: dict[str, dict[str, dict[str, list[dict[str, Any]]]]]) -> list[str]:
    """The models with points in any condition: the table's and the plot's rows, MODELS first in
    their order, then any other model asked for (--models takes every model of the manifest)."""
    seen = [model for by_server in results.values() for by_model in by_server.values() for model in by_model]
    others = [model for model in dict.fromkeys(seen) if model not in MODELS]
    return [model for model in MODELS if model in seen] + others


def p99s(points: list[dict[str, Any]]) -> list[float]:
    """Each point's p99; nan where nothing was answered (a gap in a plot, not a zero)."""
    return [p["p99_ms"] if p["answered_per_s"] > 0 else math.nan for p in points]


def tail_aim(plain_points: list[dict[str, Any]]) -> list[float]:
    """The p99 catdog-serve aims at, point by point: TAIL_AIM of the plain handler's (nan where it
    answered nothing, so there is no aim to draw)."""
    return [TAIL_AIM * p99 for p99 in p99s(plain_points)]


def legible_log_range(low: float, high: float) -> tuple[float, float]:
    """A log axis at least MIN_LOG_SPAN wide around [low, high]: matplotlib fits the axis to the
    data, and two p99s 16 % apart then fill the panel as if they were worlds apart."""
    if high / low >= MIN_LOG_SPAN:
        return low, high
    centre = math.sqrt(low * high)
    half = math.sqrt(MIN_LOG_SPAN)
    return centre / half, centre * half


def plot(results: dict[str, dict[str, dict[str, list[dict[str, Any]]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    conditions = list(results)
    concurrencies = sorted(
        {
            p["concurrency"]
            for by_server in results.values()
            for m in by_server.values()
            for ps in m.values()
            for p in ps
        }
    )
    # One colour per server in every panel, whatever order a condition ran them in.
    names = sorted({name for by_server in results.values() for name in by_server})
    colour = {name: f"C{i}" for i, name in enumerate(names)}
    models = measured_models(results)
    fig, axes = plt.subplots(
        2 * len(models), len(conditions), figsize=(4 * len(conditions), 5.5 * len(models)), squeeze=False
    )
    for col, where in enumerate(conditions):
        for row, model in enumerate(models):
            for name in names:
                points = results[where].get(name, {}).get(model)
                if not points:
                    continue
                c = [p["concurrency"] for p in points]
                style = {"color": colour[name], "label": name, "marker": "o"}
                axes[row][col].plot(c, [p["answered_per_s"] for p in points], **style)
                axes[row + len(models)][col].plot(c, p99s(points), **style)
                if name == PLAIN:
                    aim = {"color": "black", "linestyle": "--", "marker": "_", "markersize": 14}
                    label = f"aim: {TAIL_AIM:g}x {PLAIN}"
                    axes[row + len(models)][col].plot(c, tail_aim(points), label=label, **aim)
            axes[row][col].set(
                title=f"{where}: {model}", xscale="log", ylabel="answered req/s", ylim=(0, None)
            )
            tail_axis = axes[row + len(models)][col]
            tail_axis.set(
                title=f"{where}: {model}", xscale="log", yscale="log", ylabel="p99 ms", xlabel="concurrency"
            )
            tail_axis.set_ylim(*legible_log_range(*tail_axis.get_ylim()))
            for axis in (axes[row][col], axes[row + len(models)][col]):
                axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
                # Under a decade apart, a log axis labels its minor ticks too (over the majors).
                axis.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    axes[0][0].legend()
    axes[len(models)][0].legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def run_one_at_a_time(
    specs: dict[str, dict[str, Any]],
    names: list[str],
    args: argparse.Namespace,
    conditions: list[str],
    logs: Path,
) -> list[dict[str, dict[str, dict[str, list[dict[str, Any]]]]]]:
    """Each server alone, started, measured at every point and stopped in turn; every round of
    every condition, the server order alternating."""
    rounds: list[dict[str, dict[str, dict[str, list[dict[str, Any]]]]]] = []
    for round_index in range(args.rounds):
        rounds.append({})
        for index, where in enumerate(conditions):
            rounds[-1][where] = {}
            # The machine drifts within a sitting: alternate the order, so no server always goes first.
            for name in names if (index + round_index) % 2 == 0 else names[::-1]:
                print(f"round {round_index + 1}/{args.rounds}, {where}: {name}", flush=True)
                log = logs / f"round{round_index + 1}-{where}-{name.replace(' ', '-')}"
                by_model = run_server_points(
                    specs[name], args.models, where, args.concurrency, args.seconds, log
                )
                rounds[-1][where][name] = by_model
                args.out.write_text(json.dumps(rounds, indent=2) + "\n")  # partial results survive
                for model, points in by_model.items():
                    print(f"  {model}: {summary_line(points)}", flush=True)
    return rounds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models-dir", type=Path, default=ROOT / "models")
    parser.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    parser.add_argument("--servers", nargs="+", default=None, help="default: all three")
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat every condition this many times, the server order alternating, and report "
        "the median of each point (single points on a shared machine can flip a comparison)",
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="start every server of a condition at once and let them take turns point by point "
        "(the order alternating), so that a machine's drift falls on both sides of a comparison",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:KEY=VALUE,...",
        help="also run catdog-serve with these settings, under this name (to compare configurations)",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "contention.json")
    parser.add_argument("--plot", type=Path, default=ROOT / "docs" / "contention.png")
    args = parser.parse_args(argv)
    stop_on_sigterm()  # a stopped run still stops what it started
    require_wrk()
    conditions = [c for c in args.conditions if not c.startswith("quota-") or os.geteuid() == 0]
    if conditions != args.conditions:
        print("not root: the CPU-quota conditions are skipped", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    image = write_bench_images(args.out.parent)["small"]
    specs = servers(args.models_dir, image, args.out.parent)
    variants = [variant.partition(":") for variant in args.variant]
    for label, _, assignments in variants:
        extra = dict(item.split("=", 1) for item in assignments.split(",") if item)
        specs[label] = {**specs["catdog-serve"], "env": {**specs["catdog-serve"]["env"], **extra}}
    names = server_names(args.servers, list(specs), [label for label, _, _ in variants])
    if unknown := [name for name in names if name not in specs]:
        parser.error(f"unknown server {unknown[0]!r}; known: {', '.join(map(repr, specs))} and any --variant")
    rounds: list[dict[str, dict[str, dict[str, list[dict[str, Any]]]]]]
    logs = args.out.with_name(f"{args.out.stem}-server-logs")  # one per server run, kept
    logs.mkdir(parents=True, exist_ok=True)
    if args.paired:
        rounds = [{} for _ in range(args.rounds)]
        for where in conditions:
            print(f"{where}: {', '.join(names)} side by side", flush=True)
            by_round = run_paired_points(
                specs, names, args.models, where, args.concurrency, args.seconds, args.rounds, logs
            )
            for measured, by_server in zip(rounds, by_round, strict=True):
                measured[where] = by_server
            args.out.write_text(json.dumps(rounds, indent=2) + "\n")  # partial results survive
    else:
        rounds = run_one_at_a_time(specs, names, args, conditions, logs)
    results = median_of_rounds(rounds)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results, args.concurrency) + "\n" + versus_plain_markdown(results)
    args.out.with_suffix(".md").write_text(table)
    print(table)
    plot(results, args.plot)
    written = [str(args.out), str(args.out.with_suffix(".md")), str(args.plot)]
    if rows := versus_plain(results):
        plot_versus_plain(rows, versus_plain_path(args.plot))
        written.append(str(versus_plain_path(args.plot)))
    print(f"written to {', '.join(written)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
