"""Writing outputs so that a crash never leaves a half-written file that looks complete."""

import json
import os
from pathlib import Path

import pandas as pd


def replace_atomically(path, write):
    """Call `write(tmp_path)`, then move the result into place in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path, data):
    replace_atomically(
        path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    )


def read_csv(path):
    """A table the pipeline wrote: empty cells are missing values, text such as 'NA' is not."""
    return pd.read_csv(path, keep_default_na=False, na_values=[""])


def write_csv(path, table):
    replace_atomically(path, lambda tmp: table.to_csv(tmp, index=False, lineterminator="\n"))
