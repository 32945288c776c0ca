"""The evaluation's figures as PNG files, and the offline HTML template for `dvc plots show`.

Each figure function takes a table and writes one PNG of a fixed size in pixels (so `dvc plots
diff` shows images side by side at the same scale). Figures are drawn on the Agg canvas
directly, without pyplot: no display, no global state. PNGs carry no timestamp or version, so
the same table gives the same file. The figures with several axes are built by a `*_figure`
function that the PNG writer wraps, so a test can read what was drawn on which axis.

`python -m agegender.evaluation.plots` rebuilds dvc_plots/template.html from the vega builds in
dvc_plots/vendor (see dvc_plots/README.md).
"""

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator
from pandas.api.types import is_numeric_dtype

from agegender.contracts.files import replace_atomically

SIZE = (640, 480)  # pixels of every figure but the training curves
CURVES_SIZE = (960, 640)
DPI = 100
TRAIN_COLOR, VAL_COLOR = "#1f77b4", "#ff7f0e"
LOSS_COLOR, METRIC_COLOR, RATE_COLOR = "#1f77b4", "#d95f02", "#7570b3"
BASELINE_COLOR = "#222222"


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


def bin_mae_figure(per_bin, baseline=None, baseline_label=None, size=SIZE):
    """The model's MAE per true age bin beside what always answering one age scores in the same
    bin: an overall MAE hides that the old and the very young are where both fail, and only the
    gap to the baseline says how much of a bin's error the image removed."""
    figure = _figure(size)
    axes = figure.add_subplot()
    positions = np.arange(len(per_bin))
    counts = np.asarray(per_bin["count"], int)
    mae = np.asarray(per_bin["mae"], float)
    axes.bar(positions, np.nan_to_num(mae), width=0.7, color=LOSS_COLOR, label="model")
    tops = [np.nan_to_num(mae)]
    if baseline is not None:
        baseline = np.asarray(baseline, float)
        if baseline.shape != (len(per_bin),):
            raise ValueError(f"{len(baseline)} baseline values for {len(per_bin)} age bins")
        # one flat segment over each bar, broken where a bin has no value
        xs = np.column_stack([positions - 0.42, positions + 0.42, positions * np.nan]).ravel()
        ys = np.column_stack([baseline, baseline, baseline * np.nan]).ravel()
        axes.plot(
            xs,
            ys,
            color=BASELINE_COLOR,
            linewidth=3,
            solid_capstyle="butt",
            label=baseline_label or "baseline",
        )
        tops.append(np.nan_to_num(baseline))
    top = max(float(np.max(tops, initial=0)), 1.0) * 1.12
    for position, value in zip(positions, mae):
        # at the foot of the bar, where a baseline segment seldom crosses it
        axes.annotate(
            f"{value:.1f}" if np.isfinite(value) else "no images",
            (position, 0),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=8,
            color="white" if np.isfinite(value) and value > 0.06 * top else "dimgrey",
        )
    axes.set_xticks(
        positions, [f"{label}\nn={count}" for label, count in zip(per_bin["bin"], counts)]
    )
    axes.tick_params(axis="x", labelsize=8)
    axes.set_xlabel("true age bin (n: test images)")
    axes.set_ylabel("mean absolute error (years)")
    axes.set_ylim(0, top)
    seen = np.isfinite(mae) & (counts > 0)
    overall = (mae[seen] * counts[seen]).sum() / max(counts[seen].sum(), 1)
    axes.set_title(f"Age error per true age bin (MAE {overall:.2f} years, {counts.sum()} images)")
    handles, labels = axes.get_legend_handles_labels()
    axes.legend(handles[::-1], labels[::-1], loc="best", fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    return figure


def bin_mae_png(per_bin, path, baseline=None, baseline_label=None, size=SIZE):
    """`bin_mae_figure` as a PNG. `per_bin`: the table of `metrics.per_age_bin`; `baseline`: one
    MAE per bin of always answering one age (the training mean), named by `baseline_label`."""
    return _save(bin_mae_figure(per_bin, baseline, baseline_label, size), path)


TASK_METRICS = ("loss", "accuracy", "mae")
METRIC_LABELS = {
    ("age", "accuracy"): "accuracy (exact year)",
    "accuracy": "accuracy",
    "mae": "MAE (years)",
}


def _logged(history):
    """The figures a history has values of, named without `val_`: a phase or a run that did not
    log one (no validation, no learning rate) leaves its column out or empty."""
    return {
        column.removeprefix("val_")
        for column in history.columns
        if column != "epoch" and is_numeric_dtype(history[column]) and history[column].notna().any()
    }


def _curves(axes, epochs, history, name, color, label, markers):
    """Train solid and validation dashed, in one colour per quantity, so the two scales of a
    panel stay apart by colour and the two splits by line style."""
    lines = []
    present = [
        (column, split, style)
        for column, split, style in ((name, "train", "-"), (f"val_{name}", "validation", "--"))
        if column in history.columns and is_numeric_dtype(history[column])
    ]
    for column, split, style in present:
        lines += axes.plot(
            epochs,
            history[column],
            linestyle=style,
            marker="o" if markers else None,
            markersize=3,
            color=color,
            label=f"{label}, {split}" if len(present) > 1 else label,
        )
    axes.set_ylabel(label, color=color)
    axes.tick_params(axis="y", colors=color, labelsize=8)
    return lines


def _task_panel(axes, epochs, history, task, logged, markers):
    """One task: its loss on the left axis, on the right what tells its progress on a scale of
    its own (MAE in years when logged, else accuracy), so neither is squashed by the other."""
    metric = next((m for m in ("mae", "accuracy") if f"{task}_{m}" in logged), None)
    lines, right = [], axes
    if f"{task}_loss" in logged:
        lines += _curves(axes, epochs, history, f"{task}_loss", LOSS_COLOR, "loss", markers)
        right = axes.twinx() if metric else None
    if metric:
        label = METRIC_LABELS.get((task, metric), METRIC_LABELS[metric])
        lines += _curves(right, epochs, history, f"{task}_{metric}", METRIC_COLOR, label, markers)
        if metric == "accuracy":
            right.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{round(v * 100, 6):g}%"))
    axes.set_title(task.replace("_", " ").capitalize(), fontsize=11)
    return lines


def training_curves_figure(history, size=CURVES_SIZE):
    """One panel per task (gender, age), each with its loss and its accuracy on axes of their
    own, and the total loss the optimizer minimized (with the learning rate when logged): age's
    exact-year accuracy (a few percent) and gender's (over 90%) are unreadable on one axis."""
    logged = _logged(history)
    tasks = sorted(
        {
            name.rsplit("_", 1)[0]
            for name in logged
            if "_" in name and name.rsplit("_", 1)[1] in TASK_METRICS
        },
        key=lambda task: ({"gender": 0, "age": 1}.get(task, 2), task),
    )
    rate = next((name for name in ("learning_rate", "lr") if name in logged), None)
    total = "loss" in logged or rate is not None
    figure = _figure(size)
    if not tasks and not total:
        figure.text(0.5, 0.5, "no training history", ha="center", va="center")
        figure.suptitle("Training curves")
        return figure
    epochs = (
        np.asarray(history["epoch"])
        if "epoch" in history.columns and is_numeric_dtype(history["epoch"])
        else np.arange(len(history))
    )
    markers = len(history) <= 40
    rows = [3] * bool(tasks) + [2] * total
    grid = figure.add_gridspec(len(rows), max(len(tasks), 1), height_ratios=rows)
    panels = []
    for index, task in enumerate(tasks):
        axes = figure.add_subplot(grid[0, index])
        panels.append((axes, _task_panel(axes, epochs, history, task, logged, markers), 2))
    if total:
        axes = figure.add_subplot(grid[-1, :])
        lines = []
        if "loss" in logged:
            lines += _curves(axes, epochs, history, "loss", LOSS_COLOR, "total loss", markers)
            if "val_loss" in history.columns and history["val_loss"].notna().any():
                best = int(np.nanargmin(np.asarray(history["val_loss"], float)))
                lines.append(
                    axes.axvline(
                        epochs[best],
                        color="grey",
                        linestyle=":",
                        label="lowest validation loss",
                    )
                )
        if rate:
            twin = axes.twinx() if "loss" in logged else axes
            lines += _curves(twin, epochs, history, rate, RATE_COLOR, "learning rate", markers)
            twin.set_yscale("log")
        axes.set_title("Total loss (the weighted sum trained on)", fontsize=11)
        panels.append((axes, lines, 4))
    _phase_marks([axes for axes, _, _ in panels], history, epochs)
    for axes, lines, columns in panels:
        axes.set_xlabel("epoch (from 0)", fontsize=9)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.tick_params(axis="x", labelsize=8)
        axes.grid(alpha=0.3)
        axes.legend(
            handles=lines,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.2),
            ncol=max(1, min(len(lines), columns)),
            fontsize=8,
            frameon=False,
        )
    figure.suptitle("Training curves (solid: training set, dashed: validation set)")
    return figure


def _phase_marks(panels, history, epochs):
    """A line where a `phase` column (when a history carries one) changes, so a jump at the
    start of fine-tuning reads as the phase change it is."""
    if "phase" not in history.columns:
        return
    phase = history["phase"].astype(str).to_numpy()
    for index in np.flatnonzero(phase[1:] != phase[:-1]) + 1:
        at = epochs[index] - 0.5
        for axes in panels:
            axes.axvline(at, color="black", linewidth=0.8, alpha=0.5)
            axes.annotate(
                phase[index],
                (at, 1),
                xycoords=("data", "axes fraction"),
                xytext=(3, -3),
                textcoords="offset points",
                va="top",
                fontsize=7,
            )


def training_curves_png(history, path, size=CURVES_SIZE):
    """`training_curves_figure` as a PNG; an empty history still gives a figure that says so."""
    return _save(training_curves_figure(history, size), path)


# The offline template of `dvc plots show`. DVC fills the placeholders `{plot_divs}` and
# `{refresh_tag}`; this template has no scripts placeholder, so the CDN <script> tags DVC would
# put there are left out and the vega builds below, inlined, draw the charts without a network.
VENDOR_DIR = Path(__file__).resolve().parents[3] / "dvc_plots" / "vendor"
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
