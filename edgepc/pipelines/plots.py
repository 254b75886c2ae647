"""Pictures of a stage's work, saved as PNG next to its other files."""

from __future__ import annotations

from pathlib import Path

from edgepc.files import save_figure


def plot_history(history: list[dict[str, float]], path: Path, title: str) -> Path:
    """Per-epoch loss terms (log scale) and throughput of a training run."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = range(1, len(history) + 1)
    fig, (losses, speed) = plt.subplots(1, 2, figsize=(10, 3.6))
    for key in sorted(k for k in (history[0] if history else {}) if k.startswith("loss")):
        losses.plot(epochs, [h[key] for h in history], marker="o", label=key)
    losses.set(xlabel="epoch", ylabel="loss", yscale="log", title=title)
    if history:  # no epochs trained: empty axes
        losses.legend()
    speed.plot(epochs, [h["images_per_s"] for h in history], marker="o", color="gray")
    speed.set(xlabel="epoch", ylabel="images / s", title="throughput")
    for axis in (losses, speed):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return save_figure(fig, path)


def plot_qat(
    curves: dict[str, list[dict[str, float]]],
    references: dict[str, dict[str, float]],
    path: Path,
    title: str,
) -> Path:
    """Validation triplet agreement (vs the teacher) and top-1 through QAT fine-tuning, one line
    per variant, with the fp32 student and PTQ as horizontal references."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for axis, key, label in zip(
        axes,
        ("pc_triplet_agreement", "top1"),
        ("triplet agreement vs teacher", "top-1"),
        strict=True,
    ):
        for name, history in curves.items():
            epochs = range(1, len(history) + 1)
            axis.plot(epochs, [h[f"val_{key}"] for h in history], marker="o", label=name)
        for (name, row), style in zip(references.items(), ("--", ":"), strict=False):
            axis.axhline(row[key], linestyle=style, color="gray", label=name)
        axis.set(xlabel="QAT epoch", ylabel=f"val {label}", title=f"{title}: {label}")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def plot_validation(
    rows: dict[str, dict[str, float]], threads: list[int], path: Path, title: str
) -> Path:
    """Per artifact: batch-1 latency p50 (bar) to p99 (whisker) per thread count, and top-1
    against size on disk."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = list(rows)
    fig, (speed, accuracy) = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(threads)
    for i, count in enumerate(threads):
        p50 = [rows[n][f"p50_ms_{count}t"] for n in names]
        p99 = [rows[n][f"p99_ms_{count}t"] for n in names]
        where = [j + i * width for j in range(len(names))]
        speed.bar(where, p50, width, label=f"{count} thread{'s' * (count > 1)}")
        speed.errorbar(where, p50, yerr=[[0] * len(names), [b - a for a, b in zip(p50, p99,
                       strict=True)]], fmt="none", ecolor="black", capsize=3)  # fmt: skip
    speed.set_xticks([j + width * (len(threads) - 1) / 2 for j in range(len(names))], names)
    speed.set(ylabel="ms per image (p50, whisker p99)", title=title)
    speed.legend()
    for name in names:
        accuracy.scatter(rows[name]["size_mb"], rows[name]["test_top1"], s=40)
        accuracy.annotate(name, (rows[name]["size_mb"], rows[name]["test_top1"]), fontsize=8,
                          xytext=(4, 4), textcoords="offset points")  # fmt: skip
    accuracy.set(xlabel="size on disk (MB)", ylabel="top-1 (test)", title="accuracy vs size")
    fig.tight_layout()
    return save_figure(fig, path)
