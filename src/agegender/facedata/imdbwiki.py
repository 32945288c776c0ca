"""IMDB-WIKI metadata: the MATLAB .mat file as a table, and the rules that clean it."""

from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io

from agegender.contracts.errors import PipelineError

REQUIRED_FIELDS = (
    "dob",
    "photo_taken",
    "full_path",
    "gender",
    "face_location",
    "face_score",
    "second_face_score",
)


def read_mat(path):
    """Load `wiki.mat`/`imdb.mat` into one row per image with ages and 0-based face boxes."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(
            f"metadata file {path} not found: "
            "run the download stage first (dvc repro download_data)."
        )
    try:
        mat = scipy.io.loadmat(path, simplify_cells=True)
    except NotImplementedError:
        raise PipelineError(
            f"{path} is a MATLAB v7.3 (HDF5) file; save it as a v5 .mat "
            "(MATLAB: save(..., '-v7')) or use the official file."
        ) from None
    except (ValueError, TypeError, OSError) as error:
        raise PipelineError(
            f"{path} is not a readable MATLAB .mat file ({error}); download it again."
        ) from None
    structs = [key for key in mat if not key.startswith("__")]
    if len(structs) != 1 or not isinstance(mat[structs[0]], dict):
        raise PipelineError(f"{path} should hold one struct (wiki or imdb); it holds {structs}.")
    fields = mat[structs[0]]
    if np.ndim(fields.get("dob")) == 0:  # simplify_cells squeezes a one-record file to scalars
        fields = {key: [value] for key, value in fields.items()}
    missing = [field for field in REQUIRED_FIELDS if field not in fields]
    if missing:
        raise PipelineError(
            f"{path} lacks the field(s) {', '.join(missing)} of the IMDB-WIKI format; "
            "use the official file."
        )
    return records_table(fields)


def records_table(fields):
    dob = np.asarray(fields["dob"], dtype=float)
    photo_taken = np.asarray(fields["photo_taken"], dtype=float)
    birth = [birth_date(d) for d in dob]
    boxes = np.array([box_of(location) for location in fields["face_location"]], dtype=float)
    names = fields.get("name", np.full(len(dob), "", dtype=object))
    table = pd.DataFrame(
        {
            "full_path": [str(p) for p in fields["full_path"]],
            "name": [name if isinstance(name, str) else "" for name in names],
            "gender": np.asarray(fields["gender"], dtype=float),
            "dob": [b.isoformat() if b else "" for b in birth],
            "photo_taken": photo_taken,
            "age": [age_at_photo(b, year) for b, year in zip(birth, photo_taken)],
            "face_score": np.asarray(fields["face_score"], dtype=float),
            "second_face_score": np.asarray(fields["second_face_score"], dtype=float),
            "x1": boxes[:, 0],
            "y1": boxes[:, 1],
            "x2": boxes[:, 2],
            "y2": boxes[:, 3],
        }
    )
    if "celeb_id" in fields:
        table["identity"] = [f"celeb:{int(c)}" for c in fields["celeb_id"]]
    else:
        table["identity"] = [
            f"name:{n}" if n else f"path:{p}" for n, p in zip(table["name"], table["full_path"])
        ]
    return table


def birth_date(datenum):
    """MATLAB datenum day 1 is 0000-01-01, which Python's ordinals cannot hold."""
    if not np.isfinite(datenum) or datenum < 367:
        return None
    try:
        return date.fromordinal(int(datenum)) - timedelta(days=366)
    except (ValueError, OverflowError):
        return None


def age_at_photo(birth, photo_year):
    """Photos are assumed taken mid-year: one less year for people born in July or later."""
    if birth is None or not np.isfinite(photo_year):
        return np.nan
    return int(photo_year) - birth.year - (1 if birth.month >= 7 else 0)


def box_of(location):
    """MATLAB's 1-based inclusive [x1 y1 x2 y2] as 0-based half-open pixel coordinates."""
    values = np.ravel(np.asarray(location, dtype=float))
    if values.size != 4:
        return (np.nan,) * 4
    x1, y1, x2, y2 = values
    return x1 - 1, y1 - 1, x2, y2


def filter_rules(params):
    """(rule name, predicate that marks the records to drop), applied in this order."""
    max_second = params["max_second_face_score"]
    return [
        ("no_face", lambda t: ~(t["face_score"] >= params["min_face_score"])),
        (
            "second_face",
            (lambda t: t["second_face_score"].notna())
            if max_second is None
            else (lambda t: t["second_face_score"] > max_second),
        ),
        ("unknown_gender", lambda t: ~t["gender"].isin([0.0, 1.0])),  # gender is a training target
        # dob before year 1, NaN or inf, or no photo year
        ("invalid_date", lambda t: t["age"].isna()),
        ("age_out_of_range", lambda t: ~t["age"].between(params["min_age"], params["max_age"])),
    ]


def apply_filter(table, params):
    """Return the kept records and the count removed by each rule."""
    removed = {}
    for rule, drops in filter_rules(params):
        mask = drops(table).fillna(True).astype(bool)
        removed[rule] = int(mask.sum())
        table = table[~mask]
    if params["limit"] and len(table) > params["limit"]:
        removed["limit"] = len(table) - params["limit"]
        table = table.head(params["limit"])
    kept = table.astype({"gender": int, "age": int}).reset_index(drop=True)
    return kept, removed
