"""What the features and train stages share: the network as params describe it, the
pretrained weights file, and how a model is compiled and stopped."""
import json
from pathlib import Path

import keras

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
        "use_top": train["input_size"] == 224 and params["model"]["weights"] != "none" and params["model"]["backbone"] == "vgg16",
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
            raise PipelineError(f"model.weights is imagenet but {manifest_path} names no weights file; run `dvc repro download_weights`.")
        path = WEIGHTS_DIR / manifest["file"]
    else:
        path = Path(weights)
    if not path.exists():
        raise PipelineError(f"model.weights: file {path} not found; run `dvc repro download_weights` or fix the path.")
    return path


def compile_for_training(model, section, lr, steps_per_epoch, epochs, jit_compile):
    if section["lr_schedule"] == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, steps_per_epoch * epochs))
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=lr),
        loss={"gender": HeadLoss("cross_entropy", section["label_smoothing"]),
              "age": HeadLoss(section["age_loss"], section["label_smoothing"])},
        loss_weights=dict(section["loss_weights"]),
        metrics={task: ["accuracy"] for task in TASKS},
        jit_compile=jit_compile,
    )
    return model


def training_callbacks(section, history_path, extra):
    """Early stopping restores the best epoch's weights, so the model kept is the best one."""
    callbacks = [keras.callbacks.CSVLogger(str(history_path), append=True), *extra]
    if section["early_stopping"]:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=section["early_stopping"], restore_best_weights=True))
    if section["lr_schedule"] == "plateau":
        callbacks.append(keras.callbacks.ReduceLROnPlateau(monitor="val_loss", factor=0.5, patience=2))
    return callbacks
