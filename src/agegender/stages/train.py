"""Stage train: transfer learning from VGG16 with a gender head and a 101-way age head."""
import json
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import pandas as pd
import tensorflow as tf

from agegender.data import image_dataset
from agegender.errors import PipelineError, exits_cleanly
from agegender.files import write_json
from agegender.model import build_model, compile_model
from agegender.params import load_params
from agegender.tracking import stage_run

SPLIT_DIR = Path("data/split")
IMAGE_DIR = Path("data/crops/images")
WEIGHTS_DIR = Path("data/weights")
MODEL = Path("models/model.keras")
HISTORY = Path("metrics/train_history.csv")
METRICS = Path("metrics/train.json")


def base_weights(weights):
    """The pretrained file: from the download stage for `imagenet`, else the path given."""
    if weights == "none":
        return None
    if weights == "imagenet":
        manifest = json.loads((WEIGHTS_DIR / "weights.json").read_text())
        path = WEIGHTS_DIR / manifest["file"]
    else:
        path = Path(weights)
    if not path.exists():
        raise PipelineError(f"model.weights: file {path} not found; run `dvc repro download_weights` or fix the path.")
    return path


def use_gpu_if_present():
    gpus = tf.config.list_physical_devices("GPU")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    return len(gpus)


@exits_cleanly
def main():
    params = load_params()
    section, seed = params["train"], params["seed"]
    keras.utils.set_random_seed(seed)
    gpus = use_gpu_if_present()
    if not gpus:
        tf.config.experimental.enable_op_determinism()
    train = pd.read_csv(SPLIT_DIR / "train.csv", keep_default_na=False, na_values=[""])
    val = pd.read_csv(SPLIT_DIR / "val.csv", keep_default_na=False, na_values=[""])
    size, batch = section["input_size"], section["batch_size"]
    model = build_model(
        size,
        weights_file=base_weights(params["model"]["weights"]),
        use_top=size == 224 and params["model"]["weights"] != "none",
        trainable_layers=section["trainable_layers"],
        head_units=section["head_units"],
        dropout=section["dropout"],
        flip=section["augment"]["flip"],
        brightness=section["augment"]["brightness"],
        seed=seed,
    )
    compile_model(model, section["lr"], section["loss_weights"])
    HISTORY.parent.mkdir(parents=True, exist_ok=True)
    with stage_run("train", {**section, **params["model"], "seed": seed, "gpus": gpus}, params["mlflow"]["experiment"]) as run:
        started = time.perf_counter()
        history = model.fit(
            image_dataset(train, IMAGE_DIR, size, batch, shuffle_seed=seed),
            validation_data=image_dataset(val, IMAGE_DIR, size, batch),
            epochs=section["epochs"],
            callbacks=[keras.callbacks.CSVLogger(str(HISTORY)), run.keras_callback()],
            verbose=2,
        )
        seconds = time.perf_counter() - started
        MODEL.parent.mkdir(parents=True, exist_ok=True)
        model.save(MODEL)
        final = {name: round(float(values[-1]), 6) for name, values in history.history.items()}
        metrics = {**final, "train_images": len(train), "images_per_second": round(len(train) * section["epochs"] / seconds, 2)}
        write_json(METRICS, metrics)
        run.log_metrics(metrics)
        run.log_keras_model(model)
    print(f"train: {section['epochs']} epochs on {len(train)} images, val gender accuracy {final.get('val_gender_accuracy')}")


if __name__ == "__main__":
    main()
