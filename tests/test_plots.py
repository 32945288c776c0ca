"""agegender.evaluation.plots: PNG figures of a fixed size from tiny tables; the offline template of
`dvc plots show`, rendered in a scratch git copy and drawn in a headless Chromium."""

import os
import re
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, commit, run

from agegender.contracts.labels import bin_labels
from agegender.evaluation import plots
from agegender.evaluation.metrics import per_age_bin

EDGES = [0, 10, 20, 30, 40, 50, 60]
LABELS = bin_labels(EDGES)


def png_size(path):
    """(width, height) from the PNG header."""
    data = Path(path).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def predictions(count=40, seed=0):
    rng = np.random.default_rng(seed)
    age_true = rng.integers(0, 100, count)
    age_pred = np.clip(age_true + rng.normal(0, 8, count), 0, 100).round(2)
    bins = np.array(LABELS)
    return pd.DataFrame(
        {
            "full_path": [f"{i:02d}/{i}.jpg" for i in range(count)],
            "gender_true": rng.choice(["female", "male"], count),
            "gender_pred": rng.choice(["female", "male"], count),
            "gender_confidence": rng.uniform(0.5, 1, count).round(4),
            "age_true": age_true,
            "age_pred": age_pred,
            "age_bin_true": bins[np.searchsorted(EDGES, age_true, side="right") - 1],
            "age_bin_pred": bins[np.searchsorted(EDGES, age_pred, side="right") - 1],
        }
    )


def history(epochs=4):
    epoch = np.arange(epochs)
    return pd.DataFrame(
        {
            "epoch": epoch,
            "age_accuracy": 0.02 + 0.01 * epoch,
            "age_loss": 13 - 0.8 * epoch,
            "gender_accuracy": 0.7 + 0.02 * epoch,
            "gender_loss": 0.2 - 0.02 * epoch,
            "loss": 1.5 - 0.1 * epoch,
            "val_age_accuracy": 0.02 + 0.005 * epoch,
            "val_age_loss": 12 - 0.4 * epoch,
            "val_gender_accuracy": 0.7 + 0.01 * epoch,
            "val_gender_loss": 0.15 - 0.01 * epoch,
            "val_loss": 1.4 - 0.05 * epoch,
        }
    )


def by_bin(table):
    probs = np.zeros((len(table), 101))
    probs[np.arange(len(table)), np.round(table["age_pred"]).astype(int)] = 1
    return per_age_bin(table["age_true"], probs, EDGES)


def mean_baseline(table, mean_age=33.9):
    """Per bin, the MAE of always answering `mean_age`: the baseline evaluate draws."""
    true_bin = np.searchsorted(EDGES, table["age_true"], side="right") - 1
    error = np.abs(np.asarray(table["age_true"], float) - mean_age)
    return [
        error[true_bin == index].mean() if (true_bin == index).any() else np.nan
        for index in range(len(EDGES))
    ]


def figures(folder, table, curves):
    """Every figure the evaluate stage draws, by file name."""
    folder = Path(folder)
    return {
        "gender_confusion.png": plots.confusion_png(
            table,
            "gender_true",
            "gender_pred",
            ["female", "male"],
            folder / "gender_confusion.png",
            "Gender",
        ),
        "age_bin_confusion.png": plots.confusion_png(
            table,
            "age_bin_true",
            "age_bin_pred",
            LABELS,
            folder / "age_bin_confusion.png",
            "Age bin",
        ),
        "age_scatter.png": plots.age_scatter_png(table, folder / "age_scatter.png"),
        "age_bin_mae.png": plots.bin_mae_png(
            by_bin(table), folder / "age_bin_mae.png", mean_baseline(table), "train mean, 33.9"
        ),
        "training_curves.png": plots.training_curves_png(curves, folder / "training_curves.png"),
    }


def test_each_figure_is_a_png_of_its_size(tmp_path):
    written = figures(tmp_path / "figures", predictions(), history())
    for name, path in written.items():
        assert path.stat().st_size > 5000, name
        expected = plots.CURVES_SIZE if name == "training_curves.png" else plots.SIZE
        assert png_size(path) == expected, name
    # no temporary files left
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == sorted(written)


def test_figures_are_deterministic(tmp_path):
    first = figures(tmp_path / "a", predictions(), history())
    second = figures(tmp_path / "b", predictions(), history())
    for name in first:
        assert first[name].read_bytes() == second[name].read_bytes(), name
    assert b"Matplotlib version" not in first["age_scatter.png"].read_bytes()


def test_edge_cases_still_draw(tmp_path):
    one = predictions(count=1)
    figures(tmp_path, one, history(epochs=1))
    empty_bins = by_bin(one)
    assert empty_bins["count"].sum() == 1 and empty_bins["mae"].isna().sum() == len(EDGES) - 1
    assert png_size(plots.bin_mae_png(empty_bins, tmp_path / "mae.png")) == plots.SIZE
    assert (
        png_size(plots.training_curves_png(pd.DataFrame(), tmp_path / "none.png"))
        == plots.CURVES_SIZE
    )


def test_confusion_counts_every_pair():
    table = pd.DataFrame({"t": ["a", "a", "b"], "p": ["a", "b", "b"]})
    with tempfile.TemporaryDirectory() as folder:
        assert (
            png_size(plots.confusion_png(table, "t", "p", ["a", "b"], Path(folder) / "c.png", "x"))
            == plots.SIZE
        )
    with pytest.raises(KeyError):
        plots.confusion_png(table, "t", "p", ["a"], Path("unused.png"), "x")


# --- what the figures show ------------------------------------------------------------------


def panel(figure, title):
    """The axes titled `title`, then its twins (the axes drawn over it)."""
    (axes,) = [axes for axes in figure.axes if axes.get_title() == title]
    where = axes.get_position().bounds
    twins = [other for other in figure.axes if other is not axes and not other.get_title()]
    return [axes] + [other for other in twins if other.get_position().bounds == where]


def panels(figure):
    """{title: y labels of its axes and of their twins}."""
    return {
        axes.get_title(): [each.get_ylabel() for each in panel(figure, axes.get_title())]
        for axes in figure.axes
        if axes.get_title()
    }


def line(figure, label, title=None):
    """The one line labelled `label`, in the panel titled `title` when given."""
    where = panel(figure, title) if title else figure.axes
    (found,) = [
        artist for axes in where for artist in axes.get_lines() if artist.get_label() == label
    ]
    return found


def test_training_curves_give_each_task_its_own_axes():
    table = history(epochs=6)
    figure = plots.training_curves_figure(table)
    figure.canvas.draw()
    assert panels(figure) == {
        "Gender": ["loss", "accuracy"],
        "Age": ["loss", "accuracy (exact year)"],
        "Total loss (the weighted sum trained on)": ["total loss"],
    }
    gender = line(figure, "accuracy, validation", "Gender")
    age = line(figure, "accuracy (exact year), validation", "Age")
    assert gender.axes is not age.axes
    np.testing.assert_allclose(age.get_ydata(), table["val_age_accuracy"])
    np.testing.assert_allclose(
        line(figure, "loss, train", "Gender").get_ydata(), table["gender_loss"]
    )
    np.testing.assert_allclose(
        line(figure, "loss, validation", "Age").get_ydata(), table["val_age_loss"]
    )
    # each scale fits its own lines: age accuracy (2-7%) fills its axis instead of lying flat
    low, high = age.axes.get_ylim()
    spread = table[["age_accuracy", "val_age_accuracy"]].to_numpy()
    assert high - low < 1.5 * (spread.max() - spread.min())
    assert line(figure, "accuracy, train").get_linestyle() == "-" and gender.get_linestyle() == "--"
    (best,) = [
        a for a in figure.axes for a in a.get_lines() if a.get_label() == "lowest validation loss"
    ]
    assert best.get_xdata()[0] == table["epoch"].iloc[table["val_loss"].argmin()]


def test_training_curves_show_the_rate_and_the_fine_tuning_phase():
    table = pd.concat([history(epochs=3), history(epochs=2)], ignore_index=True)
    table["epoch"] = range(len(table))
    table["phase"] = ["head"] * 3 + ["finetune"] * 2
    table["learning_rate"] = [1e-3, 1e-3, 5e-4, 1e-4, 1e-4]
    figure = plots.training_curves_figure(table)
    total = panels(figure)["Total loss (the weighted sum trained on)"]
    assert total == ["total loss", "learning rate"]
    rate = line(figure, "learning rate")
    assert rate.axes.get_yscale() == "log"
    marks = [
        text.get_text()
        for axes in figure.axes
        for text in axes.texts
        if text.get_text() == "finetune"
    ]
    assert len(marks) == 3  # one per panel, at the change only


def test_training_curves_draw_what_a_history_has():
    table = history()[["epoch", "gender_accuracy", "age_loss", "val_age_loss"]].copy()
    assert panels(plots.training_curves_figure(table)) == {"Gender": ["accuracy"], "Age": ["loss"]}
    table["phase"] = "head"  # a text column is no curve, and one phase draws no phase change
    figure = plots.training_curves_figure(table)
    assert panels(figure) == {"Gender": ["accuracy"], "Age": ["loss"]}
    assert not [text for axes in figure.axes for text in axes.texts]
    empty = plots.training_curves_figure(pd.DataFrame())
    assert "no training history" in [text.get_text() for text in empty.texts]
    assert not empty.axes


def test_bin_mae_draws_the_baseline_of_each_bin():
    table = predictions(count=60)
    per_bin, baseline = by_bin(table), mean_baseline(table)
    figure = plots.bin_mae_figure(per_bin, baseline, "always the train mean age, 33.9")
    drawn = line(figure, "always the train mean age, 33.9")
    values = np.asarray(drawn.get_ydata(), float)
    np.testing.assert_allclose(
        values[np.isfinite(values)][::2], np.asarray(baseline)[np.isfinite(baseline)]
    )
    (axes,) = figure.axes
    assert [text.get_text() for text in axes.get_legend().get_texts()] == [
        "model",
        "always the train mean age, 33.9",
    ]
    assert axes.get_ylim()[1] > np.nanmax(baseline)
    heights = [bar.get_height() for bar in axes.patches]
    np.testing.assert_allclose(heights, np.nan_to_num(per_bin["mae"]))
    ticks = [tick.get_text() for tick in axes.get_xticklabels()]
    assert ticks == [f"{b}\nn={n}" for b, n in zip(per_bin["bin"], per_bin["count"])]
    assert axes.get_ylabel() == "mean absolute error (years)"
    with pytest.raises(ValueError, match="baseline values"):
        plots.bin_mae_figure(per_bin, baseline[:-1])
    without = plots.bin_mae_figure(per_bin)
    assert [t.get_text() for t in without.axes[0].get_legend().get_texts()] == ["model"]


# --- the offline template -------------------------------------------------------------------


def test_template_is_built_from_the_vendored_scripts():
    assert plots.TEMPLATE.read_text(encoding="utf8") == plots.offline_template(), (
        "dvc_plots/template.html is stale: run `python -m agegender.evaluation.plots`"
    )


def test_template_loads_nothing_from_the_network():
    template = plots.TEMPLATE.read_text(encoding="utf8")
    # no slot for DVC's CDN <script> tags
    assert "{plot_divs}" in template and "{scripts}" not in template
    assert not re.search(r"<script[^>]*\bsrc=", template)
    assert template.count("<script>") == 3
    assert 't.version="5.33.1"' in template  # vega
    size = sum((plots.VENDOR_DIR / name).stat().st_size for name in plots.VENDOR_SCRIPTS)
    assert size < 1_500_000


def test_repository_config_points_dvc_at_the_template():
    from dvc.repo import Repo

    with Repo(str(REPO)) as repo:
        configured = repo.config["plots"]["html_template"]
        assert (Path(repo.dvc_dir) / configured).resolve() == plots.TEMPLATE


# --- `dvc plots show` in a scratch git copy -------------------------------------------------


def write_plot_inputs(repo, seed):
    (repo / "metrics").mkdir(exist_ok=True)
    table = predictions(seed=seed)
    table.to_csv(repo / "metrics/predictions.csv", index=False)
    history().to_csv(repo / "metrics/train_history.csv", index=False)
    return figures(repo / "metrics/figures", table, history())


def vega_plot_count(repo):
    import yaml

    return len(yaml.safe_load((repo / "dvc.yaml").read_text())["plots"])


@pytest.fixture
def shown(repo):
    """`dvc plots show` and `dvc plots diff HEAD` over hand-written metrics in a scratch copy."""
    repo, env = repo
    pngs = write_plot_inputs(repo, seed=0)
    commit(repo, env, "metrics")
    write_plot_inputs(repo, seed=1)
    run(["dvc", "plots", "show"], repo, env)
    show = (repo / "dvc_plots/index.html").read_text(encoding="utf8")
    run(["dvc", "plots", "diff", "HEAD", "-o", "diff_plots"], repo, env)
    diff = (repo / "diff_plots/index.html").read_text(encoding="utf8")
    return repo, pngs, {"show": show, "diff": diff}


def test_dvc_plots_html_uses_only_local_scripts(shown):
    repo, pngs, pages = shown
    for name, html in pages.items():
        assert "cdn.jsdelivr" not in html, name
        assert not re.search(r"""<script[^>]*\bsrc\s*=""", html), name
        assert not re.search(r"""\bsrc\s*=\s*["']https?://""", html), name
        assert html.count("vegaEmbed(") == vega_plot_count(repo), name
        for png in pngs:
            assert png in html, f"{name}: image plot {png} missing"
    # diff shows both revisions of each image side by side
    assert pages["diff"].count("training_curves.png") >= 2


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def rendered_dom(browser, page, profile):
    """The DOM after the page's scripts ran, and the browser's console log."""
    args = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",
        "--v=0",
        "--virtual-time-budget=5000",
        "--dump-dom",
        page.as_uri(),
    ]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    return result.stdout, console


@pytest.mark.skipif(
    chromium() is None and os.environ.get("CI") != "true",
    reason="no chromium binary on PATH (apt-get install chromium) for the browser check; "
    "in CI (CI=true) it fails instead: .ci/run installs Chromium",
)
def test_vega_draws_every_chart_in_headless_chromium(shown, tmp_path):
    assert chromium(), "CI=true but no Chromium on PATH: .ci/run should have installed it"
    repo, _, _ = shown
    for page in (repo / "dvc_plots/index.html", repo / "diff_plots/index.html"):
        dom, console = rendered_dom(chromium(), page, tmp_path / f"profile-{page.parent.name}")
        canvases = re.findall(r'<canvas width="(\d+)" height="(\d+)"', dom) + re.findall(
            r'<svg[^>]*class="marks"', dom
        )
        assert len(canvases) == vega_plot_count(repo), (
            f"{page}: {len(canvases)} charts of {vega_plot_count(repo)}"
        )
        assert all(int(width) > 100 and int(height) > 100 for width, height in canvases), (
            f"{page}: empty chart {canvases}"
        )
        problems = [line for line in console if "Uncaught" in line or "ERROR" in line]
        assert not problems, f"{page}: {problems}"
