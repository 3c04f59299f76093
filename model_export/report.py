"""`model_export report`: the manifest as a table, and the accuracy/latency frontier as a PNG."""

from __future__ import annotations

from pathlib import Path

from service.manifest import Manifest, Metrics, load_manifest


def _row(name: str, test: Metrics | None, gflops: float, escalation: float | None, ms_b1: float | None,
         ms_b8: float | None) -> str:
    def num(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value is not None else "-"

    return (f"{name:<26}{num(test and 100 * test.accuracy, '.2f'):>9}{num(test and test.log_loss, '.4f'):>10}"
            f"{num(test and test.ece, '.4f'):>8}{num(test and test.ece_uncalibrated, '.4f'):>9}{gflops:>9.2f}"
            f"{num(escalation and 100 * escalation, '.1f'):>8}{num(ms_b1, '.1f'):>8}{num(ms_b8, '.1f'):>8}")


def table(manifest: Manifest) -> str:
    header = (f"{'model':<26}{'acc %':>9}{'logloss':>10}{'ECE':>8}{'ECE raw':>9}{'GFLOPs':>9}{'esc %':>8}"
              f"{'ms b1':>8}{'ms b8':>8}")
    rows = [header, "-" * len(header)]
    for name, m in manifest.models.items():
        rows.append(_row(name, m.test, m.flops / 1e9, None, m.latency.p50_ms_batch1, m.latency.p50_ms_batch8))
    for c in manifest.cascades:
        small, large = manifest.models[c.small], manifest.models[c.large]
        rate = c.test_escalation_rate
        mean_flops = small.flops + (rate or 0.0) * large.flops
        ms = small.latency.p50_ms_batch1 + (rate or 0.0) * large.latency.p50_ms_batch1
        rows.append(_row(f"cascade {c.small}->{c.large}", c.test, mean_flops / 1e9, rate, ms, None))
    some = next(iter(manifest.models.values()))
    rows.append("")
    rows.append(f"figures on the test split ({some.test.n_images if some.test else 0} photos); GFLOPs per image "
                f"(cascade: mean); latency: bare onnxruntime p50 ms per call, {some.latency.intra_op_threads} "
                f"threads, {some.latency.machine} (cascade: small + escalation x large)")
    for c in manifest.cascades:
        rows.append(f"cascade threshold {c.threshold:.4f} (chosen on val: escalation {100 * c.escalation_rate_val:.1f} %, "
                    f"accuracy {100 * c.accuracy_val:.2f} %); mean compute on test "
                    f"{100 * (c.test_cost_ratio or 0):.1f} % of {c.large}")
    return "\n".join(rows)


def plot_frontier(manifest: Manifest, path: Path) -> None:
    """Test accuracy against measured batch-1 latency for every model and the cascade."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    for name, m in manifest.models.items():
        if m.test is None:
            continue
        x, y = m.latency.p50_ms_batch1, 100 * m.test.accuracy
        ax.scatter(x, y, s=45, marker="s" if m.precision == "int8" else "o",
                   color="tab:orange" if m.precision == "int8" else "tab:blue")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)
    for c in manifest.cascades:
        if c.test is None or c.test_escalation_rate is None:
            continue
        small, large = manifest.models[c.small].latency, manifest.models[c.large].latency
        x = small.p50_ms_batch1 + c.test_escalation_rate * large.p50_ms_batch1
        ax.scatter(x, 100 * c.test.accuracy, s=110, marker="*", color="black")
        ax.annotate(f"cascade {c.small}->{c.large}", (x, 100 * c.test.accuracy), textcoords="offset points",
                    xytext=(6, -12), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("bare onnxruntime latency, batch 1, p50 (ms, log scale; cascade: expected)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("catdog-serve: accuracy vs latency (circles fp32, squares int8, star cascade)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def print_report(out: Path, plot: Path | None) -> None:
    manifest = load_manifest(out / "manifest.json")
    print(table(manifest))
    if plot is not None:
        plot_frontier(manifest, plot)
        print(f"frontier plot written to {plot}")
