"""Every path of the pipeline, relative to the repository root, in one place: the stages,
predict and the tests read them here, and dvc.yaml names the same (tests/test_layout.py)."""

from pathlib import Path

PARAMS = Path("params.yaml")
DVC_FILE = Path("dvc.yaml")

SAMPLE_ARCHIVE = Path("data/sample/wiki_crop_sample.tar.gz")
DOWNLOADS = Path("data/downloads")  # downloaded archives, kept so a re-run does not fetch again
RAW = Path("data/raw")
WEIGHTS = Path("data/weights")
RECORDS = Path("data/filtered/records.csv")
CROPS = Path("data/crops")
CROP_IMAGES = CROPS / "images"
CROP_INDEX = CROPS / "index.csv"
SPLIT = Path("data/split")
SPLITS = ("train", "val", "test")
FEATURES = Path("data/features")
TRAIN_BACKUP = Path("data/train_backup")  # not a DVC output, so it survives a killed run

MODEL = Path("models/model.keras")
AGE_RANGE = Path("models/age_range.json")  # beside the model: the calibration of its age ranges
SAVED_MODEL = Path("models/saved_model")
TFLITE = Path("models/model.tflite")
ONNX = Path("models/model.onnx")

HISTORY = Path("metrics/train_history.csv")
PREDICTIONS = Path("metrics/predictions.csv")
REPORT = Path("metrics/report.md")
FIGURES = Path("metrics/figures")
EXTERNAL_REPORT = Path("metrics/external_report.md")
EXTERNAL_FIGURES = Path("metrics/external_figures")

STAGE_METRICS = {
    "download_data": Path("metrics/download.json"),
    "filter": Path("metrics/filter.json"),
    "crop": Path("metrics/crop.json"),
    "split": Path("metrics/split.json"),
    "features": Path("metrics/features.json"),
    "train": Path("metrics/train.json"),
    "calibrate": Path("metrics/calibrate.json"),
    "evaluate_external": Path("metrics/external.json"),
    "evaluate": Path("metrics/evaluate.json"),
    "export": Path("metrics/export.json"),
}


def split_table(name):
    """The table of one split (train, val or test) as the split stage writes it."""
    return SPLIT / f"{name}.csv"
