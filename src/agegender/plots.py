"""The evaluation's figures as PNG files, and the offline HTML template for `dvc plots show`.

Each figure function takes a table and writes one PNG of a fixed size in pixels (so `dvc plots
diff` shows images side by side at the same scale). Figures are drawn on the Agg canvas
directly, without pyplot: no display, no global state. PNGs carry no timestamp or version, so
the same table gives the same file.

`python -m agegender.plots` rebuilds dvc_plots/template.html from the vega builds in
dvc_plots/vendor (see dvc_plots/README.md).
"""

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pandas.api.types import is_numeric_dtype

from agegender.files import replace_atomically

SIZE = (640, 480)  # pixels of every figure but the training curves
CURVES_SIZE = (960, 640)
DPI = 100
TRAIN_COLOR, VAL_COLOR = "#1f77b4", "#ff7f0e"


def _figure(size):
    figure = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path):
    replace_atomically(
        path, lambda tmp: figure.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    )
    return Path(path)


def confusion_png(table, true_column, predicted_column, labels, path, title, size=SIZE):
    """Counts of (true, predicted) pairs; cells coloured by the share of their true row."""
    labels = list(labels)
    counts = np.zeros((len(labels), len(labels)), dtype=int)
    index = {label: i for i, label in enumerate(labels)}
    for true, predicted in zip(table[true_column], table[predicted_column]):
        counts[index[true], index[predicted]] += 1
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    figure = _figure(size)
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (row, column), count in np.ndenumerate(counts):
        axes.text(
            column,
            row,
            f"{count}\n{shares[row, column]:.0%}",
            ha="center",
            va="center",
            fontsize=8,
            color="white" if shares[row, column] > 0.6 else "black",
        )
    axes.set_xticks(range(len(labels)), labels, rotation=45 if len(labels) > 3 else 0)
    axes.set_yticks(range(len(labels)), labels)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(
        f"{title} (accuracy {np.trace(counts) / max(counts.sum(), 1):.1%}, {counts.sum()} images)"
    )
    figure.colorbar(image, ax=axes, label="share of the true row")
    return _save(figure, path)


def age_scatter_png(table, path, size=SIZE, max_age=100):
    """Predicted (expected-value) age against true age, with the diagonal of perfect predictions."""
    true, predicted = np.asarray(table["age_true"], float), np.asarray(table["age_pred"], float)
    figure = _figure(size)
    axes = figure.add_subplot()
    axes.scatter(
        true, predicted, s=8, alpha=0.4 if len(true) > 200 else 0.7, color=TRAIN_COLOR, linewidths=0
    )
    axes.plot(
        [0, max_age],
        [0, max_age],
        color="black",
        linewidth=1,
        linestyle="--",
        label="predicted = true",
    )
    axes.set_xlim(0, max_age)
    axes.set_ylim(0, max_age)
    axes.set_aspect("equal")
    axes.set_xlabel("true age")
    axes.set_ylabel("predicted age (expected value)")
    mae = np.abs(predicted - true).mean() if len(true) else float("nan")
    axes.set_title(f"Predicted vs true age (MAE {mae:.2f} years, {len(true)} images)")
    axes.legend(loc="upper left")
    axes.grid(alpha=0.3)
    return _save(figure, path)


def bin_mae_png(per_bin, path, size=SIZE):
    """MAE per age bin (the table of `metrics.per_age_bin`), each bar labelled with its image
    count."""
    figure = _figure(size)
    axes = figure.add_subplot()
    positions = np.arange(len(per_bin))
    mae = np.nan_to_num(np.asarray(per_bin["mae"], float))
    bars = axes.bar(positions, mae, color=TRAIN_COLOR)
    axes.bar_label(bars, [f"n={count}" for count in per_bin["count"]], fontsize=8, padding=2)
    axes.set_xticks(positions, list(per_bin["bin"]))
    axes.set_xlabel("true age bin")
    axes.set_ylabel("MAE of the expected age (years)")
    axes.set_ylim(0, max(float(mae.max(initial=0)), 1.0) * 1.15)
    axes.set_title("Age error per age bin")
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def training_curves_png(history, path, size=CURVES_SIZE):
    """One panel per figure Keras logged (loss, accuracies, ...), training and validation
    together."""
    names = [
        name
        for name in history.columns
        if name != "epoch" and not name.startswith("val_") and is_numeric_dtype(history[name])
    ]
    names = sorted(names, key=lambda name: (name != "loss", name))
    figure = _figure(size)
    epochs = history["epoch"] if "epoch" in history.columns else np.arange(len(history))
    columns = min(3, max(len(names), 1))
    rows = max(1, -(-len(names) // columns))
    for index, name in enumerate(names):
        axes = figure.add_subplot(rows, columns, index + 1)
        axes.plot(epochs, history[name], marker="o", markersize=3, color=TRAIN_COLOR, label="train")
        if f"val_{name}" in history.columns:
            axes.plot(
                epochs,
                history[f"val_{name}"],
                marker="o",
                markersize=3,
                color=VAL_COLOR,
                label="validation",
            )
        axes.set_title(name, fontsize=10)
        axes.set_xlabel("epoch", fontsize=8)
        axes.tick_params(labelsize=8)
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    if not names:
        figure.text(0.5, 0.5, "no training history", ha="center", va="center")
    figure.suptitle("Training curves")
    return _save(figure, path)


# The offline template of `dvc plots show`. DVC fills the placeholders `{plot_divs}` and
# `{refresh_tag}`; this template has no scripts placeholder, so the CDN <script> tags DVC would
# put there are left out and the vega builds below, inlined, draw the charts without a network.
VENDOR_DIR = Path(__file__).resolve().parents[2] / "dvc_plots" / "vendor"
TEMPLATE = VENDOR_DIR.parent / "template.html"
VENDOR_SCRIPTS = ("vega.min.js", "vega-lite.min.js", "vega-embed.min.js")
PAGE = (
    """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC Plot</title>
<!-- vega, vega-lite and vega-embed inlined from dvc_plots/vendor """
    """(BSD-3-Clause, see dvc_plots/README.md) -->
%s
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""
)


def offline_template(vendor_dir=VENDOR_DIR):
    """The HTML template for DVC with the three vendored scripts inlined (no network needed)."""
    blocks = []
    for name in VENDOR_SCRIPTS:
        code = (Path(vendor_dir) / name).read_text(encoding="utf8")
        code = "\n".join(
            line for line in code.splitlines() if not line.startswith("//# sourceMappingURL=")
        )
        if "</script" in code.lower() or any(
            f"{{{key}}}" in code for key in ("plot_divs", "refresh_tag", "scripts")
        ):
            raise ValueError(f"{name} holds text that would break the inlined template")
        blocks.append(f"<!-- {name} -->\n<script>\n{code}\n</script>")
    return PAGE % "\n".join(blocks)


if __name__ == "__main__":
    TEMPLATE.write_text(offline_template(), encoding="utf8")
    print(f"wrote {TEMPLATE}")


def external_slices_png(table, path, title, size=SIZE):
    """One panel per figure of an external set's slices (gender accuracy, age MAE, age-group
    accuracy, those the set has labels for), one bar per slice labelled with its image count, so a
    slice the model fails stands out."""
    panels = [
        (column, label)
        for column, label in (
            ("gender_accuracy", "gender accuracy"),
            ("mae", "age MAE (years)"),
            ("group_accuracy", "age-group accuracy"),
        )
        if column in table.columns and table[column].notna().any()
    ]
    figure = _figure(size)
    positions = np.arange(len(table))
    for index, (column, label) in enumerate(panels):
        axes = figure.add_subplot(len(panels), 1, index + 1)
        values = np.nan_to_num(np.asarray(table[column], float))
        bars = axes.bar(positions, values, color=TRAIN_COLOR if column == "mae" else VAL_COLOR)
        axes.bar_label(bars, [f"n={count}" for count in table["count"]], fontsize=7, padding=1)
        axes.set_xticks(
            positions, list(table["group"]), fontsize=8, rotation=30 if len(table) > 6 else 0
        )
        axes.set_ylabel(label, fontsize=8)
        top = max(float(values.max(initial=0)), 1.0) if column == "mae" else 1.0
        axes.set_ylim(0, top * 1.2)
        axes.tick_params(axis="y", labelsize=7)
        axes.grid(axis="y", alpha=0.3)
    if not panels:
        figure.text(0.5, 0.5, "no labelled images", ha="center", va="center")
    figure.suptitle(title)
    return _save(figure, path)
