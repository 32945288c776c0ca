"""Other labelled face sets (UTKFace, a CSV such as FairFace's) read into one table, scored
with a predictor, and the figures the evaluate_external stage and `agegender evaluate` report
for them: the own test split comes from the same photos as training, so only another set shows
how the model travels and whom it fails."""

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from agegender.contracts.errors import PipelineError
from agegender.contracts.labels import GENDERS, age_bin, bin_labels, expected_age
from agegender.evaluation.metrics import age_metrics, gender_metrics, range_hits, rounded
from agegender.facedata.images import ImageSkip, load_rgb

FORMATS = ("utkface", "csv")
KEYS = ("name", "format", "path", "face_margin")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # names figure files and MLflow metrics
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MAX_AGE = 116  # the oldest UTKFace age
UTK_RACES = ("White", "Black", "Asian", "Indian", "Others")
GENDER_WORDS = {"female": 0, "f": 0, "0": 0, "male": 1, "m": 1, "1": 1}
FIRST_BAD = 20
COLUMNS = ["path", "file", "age", "age_min", "age_max", "gender", "ethnicity"]


def check_sets(sets, where="params.yaml"):
    """Every entry usable, or one paragraph naming `external.sets[i].key` and what to do."""
    seen = {}
    for index, entry in enumerate(sets):
        at = f"{where}: external.sets[{index}]"
        if not isinstance(entry, dict):
            raise PipelineError(
                f"{at} must be a mapping such as {{name: utkface, format: utkface, path: "
                f"../shared/data/utkface/images}}; fix the entry."
            )
        for key in entry:
            if key not in KEYS:
                raise PipelineError(
                    f"{at}.{key} is not a known key; allowed: {', '.join(KEYS)}. "
                    f"Fix the spelling or remove it."
                )
        name = entry.get("name")
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise PipelineError(
                f"{at}.name is {name!r}; give every set a name of letters, digits, '_', '.' "
                f"or '-' (it names the set's figures and metrics)."
            )
        if name in seen:
            raise PipelineError(
                f"{at}.name '{name}' repeats external.sets[{seen[name]}].name; give each set "
                f"its own name."
            )
        seen[name] = index
        form = entry.get("format")
        if form not in FORMATS:
            raise PipelineError(
                f"{at}.format is {form!r}; use utkface (a folder of UTKFace-named images) or csv "
                f"(a CSV file with columns path,age,gender)."
            )
        path = entry.get("path")
        if not isinstance(path, str) or not path.strip():
            raise PipelineError(
                f"{at}.path is missing; give the set's "
                f"{'image folder' if form == 'utkface' else 'CSV file'}."
            )
        wanted = Path(path).is_dir() if form == "utkface" else Path(path).is_file()
        if not wanted:
            kind = "folder" if form == "utkface" else "file"
            raise PipelineError(
                f"{at}.path {path} is not an existing {kind} (paths are relative to the "
                f"repository root); fix the path, or remove the set."
            )
        margin = entry.get("face_margin", 0.0)
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin <= 5:
            raise PipelineError(
                f"{at}.face_margin is {margin!r}; give the share of the face box the images "
                f"carry on each side, a number from 0 (tight faces) to 5, or leave it out."
            )


def face_margin(entry, crop_margin):
    """UTKFace's aligned faces are tight; a CSV set is taken to be framed like the training
    crops."""
    return float(entry.get("face_margin", 0.0 if entry["format"] == "utkface" else crop_margin))


def parse_utkface_name(name):
    """{"age", "gender" (project coding), "ethnicity"} from `[age]_[gender]_[race]_[date&time].jpg`;
    ValueError says why not."""
    fields = name.split("_")
    if len(fields) != 4:
        raise ValueError(f"{len(fields)} fields, not 4")
    try:
        age, gender, race = (int(field) for field in fields[:3])
    except ValueError:
        raise ValueError("age, gender or race is not an integer") from None
    if not 0 <= age <= MAX_AGE:
        raise ValueError(f"age {age} outside 0..{MAX_AGE}")
    if gender not in (0, 1):
        raise ValueError(f"gender {gender} not 0 or 1")
    if not 0 <= race < len(UTK_RACES):
        raise ValueError(f"race {race} not 0-{len(UTK_RACES) - 1}")
    # UTKFace: 0 male, 1 female
    return {"age": float(age), "gender": 1 - gender, "ethnicity": UTK_RACES[race]}


def utkface_records(folder):
    """(table, bad) for the images under `folder`: one row per parsed name (COLUMNS), and
    "name: why" for each name that does not parse, in path order."""
    folder = Path(folder)
    files = sorted(
        (p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)),
        key=lambda p: p.relative_to(folder).as_posix(),
    )
    rows, bad = [], []
    for path in files:
        file = path.relative_to(folder).as_posix()
        try:
            labels = parse_utkface_name(path.name)
        except ValueError as error:
            bad.append(f"{file}: {error}")
            continue
        rows.append(
            {"path": str(path), "file": file, "age_min": math.nan, "age_max": math.nan, **labels}
        )
    return pd.DataFrame(rows, columns=COLUMNS), bad


def parse_gender(value):
    try:
        return GENDER_WORDS[str(value).strip().lower()]
    except KeyError:
        raise ValueError(f"gender {value!r} is not male/female, m/f or 1/0") from None


def parse_age(value, column):
    """A number in 0..MAX_AGE, NaN for an empty cell."""
    text = str(value).strip()
    if not text:
        return math.nan
    try:
        age = float(text)
    except ValueError:
        raise ValueError(f"{column} {text!r} is not a number") from None
    if not 0 <= age <= MAX_AGE:
        raise ValueError(f"{column} {text} outside 0..{MAX_AGE}")
    return age


def parse_row(row):
    """A CSV row's labels; an empty age_max with an age_min is an open group (FairFace's "more
    than 70")."""
    if not str(row["path"]).strip():
        raise ValueError("no path")
    age, age_min, age_max = (
        parse_age(row.get(column, ""), column) for column in ("age", "age_min", "age_max")
    )
    if math.isnan(age_min) and not math.isnan(age_max):
        raise ValueError("age_max without age_min")
    if not math.isnan(age_min) and not math.isnan(age_max) and age_min > age_max:
        raise ValueError(f"age_min {age_min:g} above age_max {age_max:g}")
    if math.isnan(age) and math.isnan(age_min):
        raise ValueError("neither age nor age_min")
    return {
        "age": age,
        "age_min": age_min,
        "age_max": math.inf if math.isnan(age_max) and not math.isnan(age_min) else age_max,
        "gender": parse_gender(row["gender"]),
        "ethnicity": str(row.get("ethnicity", "")).strip(),
    }


def csv_records(csv_path):
    """(table, bad) for a CSV with columns path,age,gender[,age_min,age_max][,ethnicity]; image
    paths are relative to the CSV's folder; bad rows as "row N (path): why", N counting the header
    as row 1."""
    csv_path = Path(csv_path)
    try:
        table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise PipelineError(
            f"{csv_path} is not a readable CSV ({str(error).strip()}); fix the file."
        ) from None
    missing = [column for column in ("path", "age", "gender") if column not in table.columns]
    if missing:
        raise PipelineError(
            f"{csv_path} lacks the column(s) {', '.join(missing)}; "
            f"a set's CSV needs path,age,gender "
            f"(age may be empty where age_min,age_max give the age group) and may add ethnicity."
        )
    rows, bad = [], []
    for number, row in enumerate(table.to_dict("records"), start=2):
        try:
            labels = parse_row(row)
        except ValueError as error:
            bad.append(f"row {number} ({row['path']}): {error}")
            continue
        file = str(row["path"]).strip()
        rows.append({"path": str(csv_path.parent / file), "file": file, **labels})
    return pd.DataFrame(rows, columns=COLUMNS), bad


def records(entry):
    """(table, bad) of one checked set."""
    return (
        utkface_records(entry["path"])
        if entry["format"] == "utkface"
        else csv_records(entry["path"])
    )


def _group(hit, error, in_group, members, cs_years, with_groups, ranges=None):
    """The figures of one slice; None where the slice has no image with that label. `ranges`:
    (covered, width) per image, where the predictor gives age ranges."""
    aged, grouped = members & ~np.isnan(error), members & ~np.isnan(in_group)

    def share(values, mask):
        return float(values[mask].mean()) if mask.any() else None

    row = {
        "count": int(members.sum()),
        "gender_accuracy": share(hit, members),
        "mae": share(error, aged),
        f"cs{cs_years}": share(error <= cs_years, aged),
    }
    if with_groups:
        row["group_accuracy"] = share(in_group, grouped)
    if ranges is not None:
        row["range_coverage"] = share(ranges[0], aged)
        row["range_mean_width"] = share(ranges[1], aged)
    return row


def score(table, outputs, edges, cs_years):
    """The set's figures from its scored rows (`table`, COLUMNS) and their model outputs. Age is
    the expected value over the 101 outputs; a group such as 20-29 holds every expected age from 20
    up to 30, as ages counted in whole years do; a row with only a group is binned by its lower
    bound."""
    gender = table["gender"].to_numpy(int)
    age = table["age"].to_numpy(float)
    low, high = table["age_min"].to_numpy(float), table["age_max"].to_numpy(float)
    expected = expected_age(outputs["age"])
    hit = outputs["gender"].argmax(axis=1) == gender
    error = np.abs(expected - age)
    grouped = ~np.isnan(low)
    in_group = np.where(grouped, (expected >= low) & (expected < high + 1), np.nan)
    with_groups = bool(grouped.any())
    aged = ~np.isnan(age)
    age_ranges = outputs.get("age_range")
    ranges = None
    if age_ranges is not None:
        ranges = (range_hits(age, age_ranges), age_ranges[:, 1] - age_ranges[:, 0])

    result = {
        "gender": {
            **gender_metrics(gender, outputs["gender"], gender.mean()),
            "majority": GENDERS[int(gender.mean() >= 0.5)],
        },
        "age": {
            "count": int(aged.sum()),
            **(
                age_metrics(
                    age[aged],
                    outputs["age"][aged],
                    edges,
                    cs_years,
                    None if age_ranges is None else age_ranges[aged],
                )
                if aged.any()
                else {}
            ),
        },
    }
    if with_groups:
        result["age_group"] = {
            "count": int(grouped.sum()),
            "accuracy": float(in_group[grouped].mean()),
        }
    result["by_gender"] = {
        name: _group(hit, error, in_group, gender == index, cs_years, with_groups, ranges)
        for index, name in enumerate(GENDERS)
    }
    bins = age_bin(np.where(aged, age, low), edges)
    result["by_age_bin"] = {
        label: _group(hit, error, in_group, bins == index, cs_years, with_groups, ranges)
        for index, label in enumerate(bin_labels(edges))
    }
    ethnicity = table["ethnicity"].fillna("").astype(str).to_numpy()
    if (ethnicity != "").any():
        names = sorted(set(ethnicity), key=lambda name: (not name, name))  # unlabelled last
        result["by_ethnicity"] = {
            name or "unlabelled": _group(
                hit, error, in_group, ethnicity == name, cs_years, with_groups, ranges
            )
            for name in names
        }
    return result


def slice_table(by_slice):
    """A by_* dict of `score` as a table (one row per slice), for the figures."""
    return pd.DataFrame([{"group": name, **row} for name, row in by_slice.items()])


def headline(metrics, cs_years):
    """The few numbers MLflow tracks per set (slice labels such as '60+' are no valid metric
    names)."""
    age, group = metrics.get("age", {}), metrics.get("age_group", {})
    figures = {
        "images": metrics["images"],
        "scored": metrics["scored"],
        "gender_accuracy": metrics["gender"]["accuracy"],
        "gender_majority_baseline": metrics["gender"]["majority_baseline"],
        "age_mae": age.get("mae"),
        f"age_cs{cs_years}": age.get(f"cs{cs_years}"),
        "age_group_accuracy": group.get("accuracy"),
        "age_range_coverage": age.get("range_coverage"),
        "age_range_mean_width": age.get("range_mean_width"),
    }
    return {key: value for key, value in figures.items() if value is not None}


def outputs_of_images(predictor, paths, face_margin, batch_size):
    """(rows of `paths` scored, their outputs, skips per reason), one batch of images in memory at
    a time."""
    kept, skipped = [], Counter()
    parts = [predictor.outputs([])]
    for start in range(0, len(paths), batch_size):
        crops, rows = [], []
        for row in range(start, min(start + batch_size, len(paths))):
            try:
                image = load_rgb(paths[row])
            except ImageSkip as skip:
                skipped[skip.reason] += 1
                continue
            crops.append(predictor.framed(image, face_margin))
            rows.append(row)
        outputs = predictor.outputs(crops)
        usable = ~np.isnan(outputs["gender"]).any(axis=1)
        if not usable.all():
            skipped["no_landmarks"] += int((~usable).sum())
        kept += [row for row, ok in zip(rows, usable) if ok]
        parts.append({task: values[usable] for task, values in outputs.items()})
    outputs = {task: np.concatenate([part[task] for part in parts]) for task in parts[0]}
    return np.array(kept, dtype=int), outputs, dict(skipped)


def evaluate_set(predictor, entry, params):
    """The metrics of one set under `predictor` (an agegender.inference Predictor), as the
    evaluate_external stage and `agegender evaluate` report them; a set with no usable image is
    an error, not a row of empty figures."""
    section, crop = params["evaluate"], params["crop"]
    table, bad = records(entry)
    margin = face_margin(entry, crop["margin"])
    rows, outputs, skipped = outputs_of_images(
        predictor, table["path"].tolist(), margin, section["batch_size"]
    )
    found = len(table) + len(bad)
    if not len(rows):
        raise PipelineError(
            f"external set '{entry['name']}' ({entry['path']}) has no usable image: "
            f"{found} found, {len(bad)} with "
            f"labels that do not parse (e.g. {bad[0] if bad else 'none'}), "
            f"skipped: {skipped or 'none'}. Check "
            f"the path and its format ({entry['format']}), or remove the set from external.sets."
        )
    metrics = score(
        table.iloc[rows].reset_index(drop=True), outputs, section["age_bins"], section["cs_years"]
    )
    return rounded(
        {
            "format": entry["format"],
            "path": entry["path"],
            "face_margin": margin,
            "images": found,
            "scored": len(rows),
            "skipped": skipped,
            "unparseable": {"count": len(bad), "first": bad[:FIRST_BAD]},
            **metrics,
        }
    )
