"""`model_export report`: the manifest as tables (overall and per source), int8 speed-ups measured
afresh, and the accuracy/latency frontier as a PNG."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

from catdog_core.machine import machine_description, native_bf16
from catdog_core.sessions import (
    CPU,
    OPENVINO,
    OpenVinoPrecision,
    PairedTimes,
    cpu_providers,
    cpu_session,
    paired_times_ms,
    random_batch,
)
from service.manifest import Manifest, ModelEntry, QualityFigures, SourceQuality, load_manifest


def _num(value: float | None, fmt: str) -> str:
    return format(value, fmt) if value is not None else "-"


def _row(
    name: str,
    px: str,
    test: QualityFigures | None,
    gflops: float,
    escalation: float | None,
    ms_b1: float | None,
    ms_b8: float | None,
) -> str:
    return (
        f"{name:<26}{px:>5}{_num(test and 100 * test.accuracy, '.2f'):>9}"
        f"{_num(test and 100 * test.hardest_source[1], '.2f'):>10}{_num(test and test.log_loss, '.4f'):>10}"
        f"{_num(test and test.ece, '.4f'):>8}{_num(test and test.ece_if_calibrated_p95, '.4f'):>8}"
        f"{_num(test and test.ece_uncalibrated, '.4f'):>9}{gflops:>9.2f}"
        f"{_num(escalation and 100 * escalation, '.1f'):>8}{_num(ms_b1, '.1f'):>8}{_num(ms_b8, '.1f'):>8}"
    )


def table(manifest: Manifest) -> str:
    header = (
        f"{'model':<26}{'px':>5}{'acc %':>9}{'worst %':>10}{'logloss':>10}{'ECE':>8}{'p95':>8}{'ECE raw':>9}"
        f"{'GFLOPs':>9}{'esc %':>8}{'ms b1':>8}{'ms b8':>8}"
    )
    rows = [header, "-" * len(header)]
    for name, m in manifest.models.items():
        rows.append(
            _row(
                name,
                str(m.input.width),
                m.test,
                m.flops / 1e9,
                None,
                m.latency.p50_ms_batch1,
                m.latency.p50_ms_batch8,
            )
        )
    for c in manifest.cascades:
        small, large = manifest.models[c.small], manifest.models[c.large]
        rate = c.test_escalation_rate
        mean_flops = small.flops + (rate or 0.0) * large.flops
        ms = small.latency.p50_ms_batch1 + (rate or 0.0) * large.latency.p50_ms_batch1
        rows.append(_row(f"cascade {c.small}->{c.large}", "-", c.test, mean_flops / 1e9, rate, ms, None))
    some = next(iter(manifest.models.values()))
    rows.append("")
    rows.append(
        f"figures on the test split ({some.test.n_images if some.test else 0} photos); 'px': the "
        f"resolution served at (chosen on val, may exceed the training one); 'worst': the "
        f"lowest per-source accuracy, which model=auto's min_accuracy compares with; 'p95': the ECE a "
        f"perfectly calibrated model with the same confidences stays under in 95 % of simulated label "
        f"sets of this many photos ('-': not recorded); GFLOPs per image "
        f"(cascade: mean); latency: bare onnxruntime p50 ms per call, {some.latency.intra_op_threads} "
        f"threads, {some.latency.machine} (cascade: small + escalation x large)"
    )
    for c in manifest.cascades:
        budget = (
            f"within a {100 * c.compute_budget:.0f} % compute budget, the accuracy rule alone "
            f"asking {c.rule_threshold:.4f}; "
            if c.compute_budget is not None and c.rule_threshold is not None
            else ""
        )
        rows.append(
            f"cascade threshold {c.threshold:.4f} "
            f"(chosen on val {budget}escalation {100 * c.escalation_rate_val:.1f} %, "
            f"accuracy {100 * c.accuracy_val:.2f} %); mean compute on test "
            f"{100 * (c.test_cost_ratio or 0):.1f} % of {c.large}"
        )
    return "\n".join(rows)


def source_table(manifest: Manifest) -> str:
    """Test accuracy and ECE per source, for every model and cascade, with the ECE's noise floor."""
    some = next((m.test for m in manifest.models.values() if m.test is not None), None)
    if some is None or not some.by_source:
        return "no per-source figures (built without the dataset and without a recorded evaluation)"
    sources = sorted(some.by_source)
    header = f"{'test acc % / ECE % (p95)':<26}" + "".join(f"{s:>26}" for s in sources)
    rows = [header, "-" * len(header)]
    for name, m in manifest.models.items():
        if m.test is not None:
            rows.append(f"{name:<26}" + "".join(_source_cell(m.test.by_source[s]) for s in sources))
    for c in manifest.cascades:
        figures = c.test_by_source
        if figures:
            rows.append(
                f"{'cascade (esc %, cost %)':<26}"
                + "".join(
                    f"{100 * figures[s].accuracy:>12.2f} ({100 * figures[s].escalation_rate:.1f}, "
                    f"{100 * figures[s].cost_ratio:.1f})".ljust(26)
                    for s in sources
                )
            )
    counts = {s: some.by_source[s].n_images for s in sources}
    rows.append(f"test photos per source: {counts}")
    rows.append(
        "(p95): the ECE a perfectly calibrated model with the same confidences stays under in 95 % of "
        "simulated label sets of that many photos; an ECE above it is miscalibration the photos show"
    )
    return "\n".join(rows)


def _source_cell(figures: SourceQuality) -> str:
    p95 = figures.ece_if_calibrated_p95
    floor = f"({100 * p95:.2f})" if p95 is not None else "(-)"
    return f"{100 * figures.accuracy:>12.2f} / {100 * figures.ece:.2f} {floor:<6}"


def _batch1_call(
    path: Path, size: int, threads: int, provider: str, precision: OpenVinoPrecision = "fp32"
) -> Callable[[], object]:
    session = cpu_session(path, threads, provider, precision)
    return functools.partial(session.run, None, {session.get_inputs()[0].name: random_batch(1, size)})


def speed_verdict(times: PairedTimes) -> str:
    """How the second call's speed reads against the first's, with the pairs it won.

    Faster or slower only when the printed ratio is not 1.00x and a sign test says the pairs did not
    split as a coin would; otherwise level (within the run's noise)."""
    won = f"in {times.second_faster_pairs} of {times.pairs} pairs"
    if round(times.ratio, 2) == 1.0:
        return f"the speed: level with fp32 (faster {won})"
    if times.could_be_chance():
        return f"the speed: level with fp32 within this run's noise (faster {won})"
    return (
        f"faster ({won})" if times.ratio > 1.0 else f"the speed: slower than fp32 on this CPU (faster {won})"
    )


def _speedup_line(
    folder: Path, int8: ModelEntry, fp32: ModelEntry, threads: int, pairs: int, provider: str = CPU
) -> str:
    times = paired_times_ms(
        _batch1_call(folder / fp32.file, int8.input.width, threads, provider),
        _batch1_call(folder / int8.file, int8.input.width, threads, provider),
        pairs,
    )
    on = "OpenVINO, " if provider == OPENVINO else ""
    how = f"({on}{threads} threads, {pairs} alternating pairs, measured now)"
    return (
        f"{int8.name}: {times.second_ms:.2f} ms vs {fp32.name} {times.first_ms:.2f} ms at batch 1 -> "
        f"{times.ratio:.2f}x {speed_verdict(times)} {how}"
    )


# Two threads: the build's latency figures; one: what each inference worker of the service has on
# CPU (one thread per worker), where int8's speed-up measured higher (Xception 2.86x against 2.61x
# on the Xeon VM, docs/models.md, "int8 on different CPUs").
SPEEDUP_THREADS = (2, 1)


def int8_speedups(
    manifest: Manifest,
    folder: Path,
    threads: Sequence[int] = SPEEDUP_THREADS,
    pairs: int = 60,
    providers: Sequence[str] | None = None,
) -> str:
    """Each int8 variant's batch-1 speed-up over its fp32 model at each thread count, both measured
    now, one call of each in turn (catdog_core.sessions.paired_times_ms), so that a noisy neighbour
    slows both alike; on every CPU provider this onnxruntime offers (OpenVINO too where installed)."""
    variants = [(e, manifest.models[e.derived_from]) for e in manifest.models.values() if e.derived_from]
    rows = [
        _speedup_line(folder, int8, fp32, count, pairs, provider)
        for provider in (providers if providers is not None else cpu_providers())
        for count in threads
        for int8, fp32 in variants
    ]
    if not rows:
        return "no int8 variants in the manifest"
    # The speed-up is mostly the CPU's: at 2 threads about 2.4-2.6x (Xception) and 2.0-2.2x
    # (MobileNet) on a Xeon with VNNI and AMX, 1.7x and 1.4-1.7x on an AVX2 EPYC (docs/models.md,
    # "int8 on different CPUs").
    return "\n".join([*rows, f"measured on {machine_description()}"])


def bf16_speedups(manifest: Manifest, folder: Path, threads: int = 1, pairs: int = 30) -> str:
    """Each fp32 model computed in bf16 on OpenVINO (CATDOG_OPENVINO_PRECISION=bf16) against the
    same file on onnxruntime's CPU provider, batch 1, one call of each in turn; empty where OpenVINO
    is not installed or the CPU has no bf16 instructions (the server refuses bf16 there)."""
    if OPENVINO not in cpu_providers() or not native_bf16():
        return ""
    rows = []
    for entry in [e for e in manifest.models.values() if e.precision == "fp32"]:
        path, size = folder / entry.file, entry.input.width
        times = paired_times_ms(
            _batch1_call(path, size, threads, CPU), _batch1_call(path, size, threads, OPENVINO, "bf16"), pairs
        )
        rows.append(
            f"{entry.name} in bf16 on OpenVINO: {times.second_ms:.2f} ms vs fp32 on onnxruntime's CPU "
            f"provider {times.first_ms:.2f} ms at batch 1 -> {times.ratio:.2f}x {speed_verdict(times)} "
            f"({threads} threads, {pairs} alternating pairs, measured now)"
        )
    return "\n".join(rows)


def plot_frontier(manifest: Manifest, path: Path) -> None:
    """Test accuracy against measured batch-1 latency for every model and the cascade: the overall
    figure as a large marker, each source's as a small one on a vertical line (the line's foot is
    what model=auto's min_accuracy reads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    source_markers = dict(
        zip(
            sorted({s for m in manifest.models.values() if m.test for s in m.test.by_source}),
            "v^<>dp",
            strict=False,
        )
    )

    def point(
        x: float,
        test: QualityFigures,
        by_source: dict[str, float],
        label: str,
        style: dict[str, object],
        offset: tuple[int, int] = (6, 4),
    ) -> None:
        ys = [100 * a for a in by_source.values()]
        if ys:
            ax.vlines(x, min(ys), max(ys), color="grey", lw=0.8, alpha=0.7)
            for source, accuracy in by_source.items():
                ax.scatter(x, 100 * accuracy, s=16, marker=source_markers.get(source, "."), color="grey")
        ax.scatter(x, 100 * test.accuracy, **style)
        ax.annotate(
            label,
            (x, 100 * test.accuracy),
            textcoords="offset points",
            xytext=offset,
            fontsize=8,
            ha="left" if offset[0] >= 0 else "right",
        )

    for name, m in manifest.models.items():
        if m.test is not None:
            int8 = m.precision == "int8"
            point(
                m.latency.p50_ms_batch1,
                m.test,
                {s: v.accuracy for s, v in m.test.by_source.items()},
                name,
                {"s": 45, "marker": "s" if int8 else "o", "color": "tab:orange" if int8 else "tab:blue"},
                # below its marker: an int8 variant's name would run into its fp32 model's
                (6, -12) if int8 else (6, 4),
            )
    for c in manifest.cascades:
        if c.test is None or c.test_escalation_rate is None:
            continue
        small, large = manifest.models[c.small].latency, manifest.models[c.large].latency
        x = small.p50_ms_batch1 + c.test_escalation_rate * large.p50_ms_batch1
        point(
            x,
            c.test,
            {s: f.accuracy for s, f in c.test_by_source.items()},
            f"cascade {c.small}->{c.large}",
            {"s": 110, "marker": "*", "color": "black"},
            offset=(-8, -14),
        )
    for source, marker in source_markers.items():
        ax.scatter([], [], marker=marker, color="grey", s=16, label=source)
    if source_markers:
        ax.legend(title="per source", fontsize=7, title_fontsize=8, loc="lower right")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks([t for t in (1, 2, 5, 10, 20, 50, 100, 200) if t <= ax.get_xlim()[1] * 1.5])
    ax.set_xlabel("bare onnxruntime latency, batch 1, p50 (ms, log scale; cascade: expected)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(
        "catdog-serve: accuracy vs latency (circles fp32, squares int8, star cascade;\n"
        "grey: each photo source)",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


PROVIDER_CHOICES = {"all": None, "cpu": [CPU], "openvino": [OPENVINO]}
"""report --provider: the providers whose int8 speed-ups it measures (None: every CPU one offered)."""


def print_report(out: Path, plot: Path | None, speedups_only: bool = False, provider: str = "all") -> None:
    manifest = load_manifest(out / "manifest.json")
    if not speedups_only:
        print(table(manifest))
        print()
        print(source_table(manifest))
        print()
    print(int8_speedups(manifest, out, providers=PROVIDER_CHOICES[provider]))
    if provider != "cpu" and (bf16 := bf16_speedups(manifest, out)):
        print(bf16)
    if plot is not None:
        plot_frontier(manifest, plot)
        print(f"frontier plot written to {plot}")
