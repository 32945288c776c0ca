"""What the features and train stages share: the network as params describe it, the
pretrained weights file, and how a model is compiled and stopped."""

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from agegender.errors import PipelineError
from agegender.losses import HeadLoss
from agegender.model import TASKS

WEIGHTS_DIR = Path("data/weights")


def network_settings(params):
    """Keyword arguments of build_networks, from the model and train sections."""
    train = params["train"]
    return {
        "input_size": train["input_size"],
        "backbone": params["model"]["backbone"],
        "use_top": train["input_size"] == 224
        and params["model"]["weights"] != "none"
        and params["model"]["backbone"] == "vgg16",
        "trainable_layers": train["trainable_layers"],
        "pooling": train["pooling"],
        "head_units": train["head_units"],
        "dropout": train["dropout"],
        "flip": train["augment"]["flip"],
        "brightness": train["augment"]["brightness"],
        "seed": params["seed"],
    }


def base_weights(weights):
    """The pretrained file: from the download stage for `imagenet`, else the path given."""
    if weights == "none":
        return None
    if weights == "imagenet":
        manifest_path = WEIGHTS_DIR / "weights.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        if not manifest.get("file"):
            raise PipelineError(
                f"model.weights is imagenet but {manifest_path} names no weights file; "
                "run `dvc repro download_weights`."
            )
        path = WEIGHTS_DIR / manifest["file"]
    else:
        path = Path(weights)
    if not path.exists():
        raise PipelineError(
            f"model.weights: file {path} not found; run `dvc repro download_weights` "
            "or fix the path."
        )
    return path


def compile_for_training(model, section, lr, steps_per_epoch, epochs, jit_compile):
    if section["lr_schedule"] == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(
            lr, decay_steps=max(1, steps_per_epoch * epochs)
        )
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=lr),
        loss={
            "gender": HeadLoss("cross_entropy", section["label_smoothing"]),
            "age": HeadLoss(section["age_loss"], section["label_smoothing"]),
        },
        loss_weights=dict(section["loss_weights"]),
        metrics={task: ["accuracy"] for task in TASKS},
        jit_compile=jit_compile,
    )
    return model


def training_callbacks(section, backup_dir, phase, extra, seed=0):
    """Callbacks of one training phase. A killed run restarts from the last finished epoch
    (weights, optimizer and random state from `backup_dir`, the epochs logged so far kept);
    early stopping restores the best epoch's weights, so the model kept is the best one."""
    resume_point(backup_dir, phase)
    checkpoint, log = Path(backup_dir) / phase, Path(backup_dir) / f"{phase}.csv"
    log.parent.mkdir(parents=True, exist_ok=True)
    callbacks = [
        keras.callbacks.BackupAndRestore(str(checkpoint), double_checkpoint=True),
        ReseedEachEpoch(seed),
        keras.callbacks.CSVLogger(str(log), append=True),
        *extra,
    ]
    if section["early_stopping"]:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=section["early_stopping"], restore_best_weights=True
            )
        )
    if section["lr_schedule"] == "plateau":
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2)
        )
    return callbacks


def resume_point(backup_dir, phase):
    """Epochs of `phase` finished before a kill (0 for a fresh start); the log is cut to them."""
    metadata = Path(backup_dir) / phase / "training_metadata.json"
    log = Path(backup_dir) / f"{phase}.csv"
    epochs = json.loads(metadata.read_text())["epoch"] if metadata.exists() else 0
    if not epochs:
        log.unlink(missing_ok=True)
    elif log.exists():
        rows = log.read_text().splitlines(keepends=True)
        log.write_text("".join(rows[: epochs + 1]))
    return epochs


def phase_history(backup_dir, phases):
    """All epochs of the phases that ran, numbered on, as CSVLogger wrote them."""
    logs = [
        pd.read_csv(Path(backup_dir) / f"{phase}.csv")
        for phase in phases
        if (Path(backup_dir) / f"{phase}.csv").exists()
    ]
    history = pd.concat(logs, ignore_index=True)
    history["epoch"] = range(len(history))
    return history


def seed_generators(layer):
    """The random state of dropout and augmentation layers, also inside nested models."""
    found = [layer.seed_generator] if getattr(layer, "seed_generator", None) is not None else []
    for inner in getattr(layer, "layers", []):
        found += seed_generators(inner)
    return found


class ReseedEachEpoch(keras.callbacks.Callback):
    """Dropout and augmentation draw from a state that depends on the epoch alone: saved
    weights do not hold that state, so this is what lets a resumed run repeat the masks."""

    def __init__(self, seed):
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch, logs=None):
        for index, generator in enumerate(seed_generators(self.model)):
            state = np.random.default_rng([self.seed, epoch, index]).integers(0, 2**31, size=2)
            generator.state.assign(np.asarray(state, dtype=generator.state.dtype))
