"""metrics/report.md: the evaluation in one page, from the metrics dict and the predictions table.

Deterministic (no dates, fixed number formats, ties broken by path), so that DVC sees an
unchanged report as unchanged and `git diff` shows only what moved.
"""

import numpy as np

# The reference design's test figures (17,186 random-split IMDB-WIKI test images).
REFERENCE = {"gender_accuracy": 0.9143, "exact_accuracy": 0.09}
WORST = 10


def percent(value):
    return "–" if value is None or np.isnan(value) else f"{value:.2%}"


def number(value, digits=2):
    return "–" if value is None or np.isnan(value) else f"{value:.{digits}f}"


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def headline(metrics, cs_years):
    gender, age = metrics["gender"], metrics["age"]
    cs = f"cs{cs_years}"
    rows = [
        (
            "Gender accuracy",
            percent(gender["accuracy"]),
            f"{percent(gender['majority_baseline'])} (always the majority gender of training)",
            percent(REFERENCE["gender_accuracy"]),
        ),
        (
            "Exact age accuracy (101 classes)",
            percent(age["exact_accuracy"]),
            f"{percent(age.get('mode_baseline_exact'))} (always the most common training age)",
            f"more than {REFERENCE['exact_accuracy']:.0%}",
        ),
        (
            "Age MAE, expected value (years)",
            number(age["mae"]),
            f"{number(age.get('mean_baseline_mae'))} (always the training mean age)",
            "–",
        ),
        (
            f"Age CS@{cs_years} (share within {cs_years} years)",
            percent(age.get(cs)),
            f"{percent(age.get(f'mean_baseline_{cs}'))} (always the training mean age)",
            "–",
        ),
        (
            "Age-bin accuracy",
            percent(age["bin_accuracy"]),
            f"{percent(age.get('majority_bin_baseline'))} (always the most common training bin)",
            "–",
        ),
        ("Age bin within one bin", percent(age["bin_within_one"]), "–", "–"),
    ]
    if "range_coverage" in age:
        rows.append(range_row(age))
    return table(("figure", "this model", "baseline", "reference design"), rows)


def worst_age(predictions, count=WORST):
    """The `count` images with the largest age error, largest first, ties by path."""
    ranked = predictions.assign(error=(predictions["age_pred"] - predictions["age_true"]).abs())
    return ranked.sort_values(
        ["error", "full_path"], ascending=[False, True], kind="mergesort"
    ).head(count)


def worst_gender(predictions, count=WORST):
    """Wrong gender predictions the model was surest of, surest first, ties by path."""
    wrong = predictions[predictions["gender_pred"] != predictions["gender_true"]]
    return wrong.sort_values(
        ["gender_confidence", "full_path"], ascending=[False, True], kind="mergesort"
    ).head(count)


def build_report(metrics, predictions, by_bin, by_gender, figures, cs_years=5):
    """Markdown text. `by_bin`/`by_gender`: the tables of metrics.per_age_bin/per_gender;
    `figures`: {title: path relative to the report}."""
    lines = [
        "# Evaluation report",
        "",
        f"Test split: {metrics['test_images']} images, split by identity (no person is in both "
        "training and test). The reference design split 17,186 test images at random, which lets "
        "one person's photos land on both sides; its figures are not directly comparable.",
        "",
        "## Headline",
        "",
    ]
    lines += headline(metrics, cs_years)
    if "pretrained_alone" in metrics:
        lines += pretrained_comparison(metrics, metrics["pretrained_alone"], cs_years)
    lines += [
        "",
        "Age is the expected value over the 101 age outputs (DEX); exact accuracy takes the most "
        "probable age; bins sum the probabilities within each bin.",
        "",
        "## Per age bin",
        "",
    ]
    baseline = "baseline_mae" in by_bin.columns
    ranges = "range_coverage" in by_bin.columns
    lines += table(
        ("true age bin", "images", "MAE (years)", "bin accuracy")
        + ("MAE of the training mean age",) * baseline
        + ("age range coverage", "age range width (years)") * ranges,
        [
            (row.bin, row.count, number(row.mae), percent(row.bin_accuracy))
            + ((number(row.baseline_mae),) if baseline else ())
            + ((percent(row.range_coverage), number(row.range_mean_width, 1)) if ranges else ())
            for row in by_bin.itertuples()
        ],
    )
    lines += ["", "## Per gender", ""]
    lines += table(
        ("true gender", "images", "accuracy"),
        [(row.gender, row.count, percent(row.accuracy)) for row in by_gender.itertuples()],
    )
    lines += ["", f"## Largest age errors ({WORST} worst)", ""]
    lines += ["Images under `data/crops/images/`.", ""]
    lines += table(
        ("image", "true age", "predicted age", "error"),
        [
            (f"`{row.full_path}`", row.age_true, number(row.age_pred), number(row.error))
            for row in worst_age(predictions).itertuples()
        ],
    )
    lines += ["", f"## Most confident gender errors ({WORST} worst)", ""]
    errors = worst_gender(predictions)
    if len(errors):
        lines += table(
            ("image", "true gender", "predicted gender", "confidence"),
            [
                (
                    f"`{row.full_path}`",
                    row.gender_true,
                    row.gender_pred,
                    percent(row.gender_confidence),
                )
                for row in errors.itertuples()
            ],
        )
    else:
        lines.append("No gender errors.")
    lines += ["", "## Figures", ""]
    for title, path in figures.items():
        lines += [f"- [{title}]({path})"]
    lines.append("")
    for title, path in figures.items():
        lines += [f"![{title}]({path})", ""]
    return "\n".join(lines)


def range_row(age):
    """The headline row of the age ranges: how often they held the true age, how wide."""
    return (
        "Age range coverage (share of true ages inside `age_range`)",
        f"{percent(age['range_coverage'])}, {number(age['range_mean_width'], 1)} years wide "
        "on average",
        "–",
        "–",
    )


def _cs_key(row):
    return next((key for key in row if key.startswith("cs") and key[2:].isdigit()), "cs5")


def _slice_rows(by_slice, cs, with_groups):
    header = ["images", "gender accuracy", "age MAE (years)", f"CS@{cs[2:]}"]
    header += ["age-group accuracy"] if with_groups else []
    ranges = "range_coverage" in next(iter(by_slice.values()), {})
    header += ["age range coverage", "age range width"] if ranges else []
    rows = [
        [row["count"], percent(row["gender_accuracy"]), number(row["mae"]), percent(row[cs])]
        + ([percent(row.get("group_accuracy"))] if with_groups else [])
        + ([percent(row["range_coverage"]), number(row["range_mean_width"], 1)] if ranges else [])
        for row in by_slice.values()
    ]
    return header, [[f"{name}", *row] for name, row in zip(by_slice, rows)]


def pretrained_comparison(metrics, alone, cs_years):
    """The trained model (`metrics`: its gender and age figures) beside Cydral's networks alone,
    zero training, on the same chips (`alone`: {gender_accuracy, age_mae, age_cs<N>}): what the
    training adds."""
    cs = f"age_cs{cs_years}"
    trained = {"gender_accuracy": metrics["gender"]["accuracy"], "age_mae": metrics["age"]["mae"]}
    trained[cs] = metrics["age"][f"cs{cs_years}"]
    rows = [
        (
            name,
            percent(figures["gender_accuracy"]),
            number(figures["age_mae"]),
            percent(figures[cs]),
        )
        for name, figures in (
            ("this model", trained),
            ("pretrained networks alone, zero training", alone),
        )
    ]
    header = ("model", "gender accuracy", "age MAE (years)", f"age CS@{cs_years}")
    return [
        "",
        "Against Cydral's age and gender networks as they are (the pretrained networks this "
        "model adapts), on the same chips:",
        "",
        *table(header, rows),
    ]


def external_section(metrics_by_set, figure_links):
    """Markdown for the evaluate_external stage: per set its counts, a headline against the set's
    own majority gender, and the figures by gender, age bin and ethnicity. `metrics_by_set`: {name:
    the set's metrics}; `figure_links`: {name: {title: path relative to the report}}."""
    if not metrics_by_set:
        return (
            "No external sets are configured. To score the model on another labelled face set, "
            "add an entry to `external.sets` in params.yaml, e.g. "
            "`{name: utkface, format: utkface, path: ../shared/data/utkface/images}`, "
            "and run `dvc repro evaluate_external` "
            "(docs/external-evaluation.md).\n"
        )
    lines = []
    for name, metrics in metrics_by_set.items():
        gender, age, group = metrics["gender"], metrics["age"], metrics.get("age_group")
        cs = _cs_key(next(iter(metrics["by_gender"].values())))
        skipped = (
            ", ".join(f"{reason} {count}" for reason, count in sorted(metrics["skipped"].items()))
            or "none"
        )
        lines += [
            f"## External set: {name}",
            "",
            f"{metrics['format']} set `{metrics['path']}` "
            f"(face margin {metrics['face_margin']:g}, re-framed "
            f"like the training crops): {metrics['images']} images, "
            f"{metrics['scored']} scored; skipped: {skipped}; labels not parsed: "
            f"{metrics['unparseable']['count']}.",
        ]
        if metrics["unparseable"]["first"]:
            lines += [
                "",
                "Not parsed (first ones): "
                + "; ".join(f"`{bad}`" for bad in metrics["unparseable"]["first"])
                + ".",
            ]
        rows = [
            (
                "Gender accuracy",
                percent(gender["accuracy"]),
                f"{percent(gender['majority_baseline'])} "
                f"(always the set's majority gender, {gender['majority']})",
            )
        ]
        if age["count"]:
            rows += [
                ("Age MAE, expected value (years)", number(age["mae"]), "–"),
                (f"Age CS@{cs[2:]} (share within {cs[2:]} years)", percent(age[cs]), "–"),
                ("Age-bin accuracy", percent(age["bin_accuracy"]), "–"),
            ]
            if "range_coverage" in age:
                rows.append(range_row(age)[:3])
        if group:
            rows.append(
                (
                    "Age-group accuracy (expected age inside the labelled group)",
                    percent(group["accuracy"]),
                    "–",
                )
            )
        lines += ["", *table(("figure", "this model", "baseline"), rows)]
        if "pretrained_alone" in metrics:
            lines += pretrained_comparison(metrics, metrics["pretrained_alone"], int(cs[2:]))
        for title, key in (
            ("By gender", "by_gender"),
            ("By age bin", "by_age_bin"),
            ("By ethnicity", "by_ethnicity"),
        ):
            if key in metrics:
                header, body = _slice_rows(metrics[key], cs, group is not None)
                lines += ["", f"### {title}", "", *table((title[3:], *header), body)]
        links = figure_links.get(name, {})
        if links:
            lines += ["", "### Figures", ""]
            for title, path in links.items():
                lines += [f"![{title}]({path})", ""]
        else:
            lines.append("")
    return "\n".join(lines)
