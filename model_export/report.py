"""`model_export report`: the manifest as a table, and the accuracy/compute frontier as a PNG."""

from __future__ import annotations

from pathlib import Path

from service.manifest import Manifest, load_manifest


def _pct(value: float | None) -> str:
    return f"{100 * value:.2f}" if value is not None else "-"


def table(manifest: Manifest) -> str:
    header = (f"{'model':<20}{'test acc %':>11}{'log loss':>10}{'ECE':>8}{'ECE raw':>9}{'T':>7}"
              f"{'ms b1':>8}{'ms b8':>8}{'GFLOPs':>8}{'params M':>9}{'max|dp|':>10}")
    rows = [header, "-" * len(header)]
    for name, m in manifest.models.items():
        t = m.test
        rows.append(
            f"{name:<20}{_pct(t.accuracy if t else None):>11}{(f'{t.log_loss:.4f}' if t else '-'):>10}"
            f"{(f'{t.ece:.4f}' if t else '-'):>8}{(f'{t.ece_uncalibrated:.4f}' if t else '-'):>9}"
            f"{m.temperature:>7.3f}{m.latency.p50_ms_batch1:>8.1f}{m.latency.p50_ms_batch8:>8.1f}"
            f"{m.flops / 1e9:>8.2f}{m.parameters / 1e6:>9.2f}{m.parity.max_abs_diff_probability:>10.1e}"
        )
    for c in manifest.cascades:
        rows.append(
            f"cascade {c.small}->{c.large}: threshold {c.threshold:.4f}; val escalation "
            f"{_pct(c.escalation_rate_val)} %, accuracy {_pct(c.accuracy_val)} %; test accuracy "
            f"{_pct(c.test_accuracy)} %, escalation {_pct(c.test_escalation_rate)} %; mean compute "
            f"{_pct(c.expected_cost_ratio)} % of {c.large}"
        )
    some = next(iter(manifest.models.values()))
    rows.append(f"latency: bare onnxruntime p50, {some.latency.intra_op_threads} threads, {some.latency.machine}")
    return "\n".join(rows)


def plot_frontier(manifest: Manifest, path: Path) -> None:
    """Test accuracy against measured batch-1 latency for every model and the cascade."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, m in manifest.models.items():
        if m.test is None:
            continue
        ax.scatter(m.latency.p50_ms_batch1, 100 * m.test.accuracy, s=40,
                   marker="s" if m.precision == "int8" else "o")
        ax.annotate(name, (m.latency.p50_ms_batch1, 100 * m.test.accuracy), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    for c in manifest.cascades:
        if c.test_accuracy is None or c.test_escalation_rate is None:
            continue
        small, large = manifest.models[c.small].latency, manifest.models[c.large].latency
        latency = small.p50_ms_batch1 + c.test_escalation_rate * large.p50_ms_batch1
        ax.scatter(latency, 100 * c.test_accuracy, s=80, marker="*", color="black")
        ax.annotate(f"cascade {c.small}->{c.large}", (latency, 100 * c.test_accuracy),
                    textcoords="offset points", xytext=(5, -10), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("bare onnxruntime latency, batch 1, p50 (ms, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("catdog-serve models: accuracy vs latency (cascade: mean latency)")
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
