"""Stage train: the heads (and the backbone's trainable tail) on cached features, then an
optional fine-tuning phase on augmented images with more of the backbone unfrozen."""
import os
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import pandas as pd

from agegender import devices
from agegender.data import image_dataset
from agegender.labels import one_hot
from agegender.errors import exits_cleanly
from agegender.features import EpochSync, FeatureBatches, kept_rows, load_features, read_manifest
from agegender.files import write_csv, write_json
from agegender.model import TASKS, build_networks, set_trainable_tail
from agegender.params import load_params
from agegender.tracking import StageRun, stage_run
from agegender.training import (ImageRows, compile_for_training, network_settings, phase_history,
                                resume_point, sample_weights, training_callbacks)

SPLIT_DIR = Path("data/split")
IMAGE_DIR = Path("data/crops/images")
FEATURES = Path("data/features")
MODEL = Path("models/model.keras")
HISTORY = Path("metrics/train_history.csv")
METRICS = Path("metrics/train.json")
BACKUP = Path("data/train_backup")  # not a DVC output, so it survives a killed run


def train_head(networks, section, seed, train, val, setup, callbacks, first_epoch):
    """Phase 1: every epoch reads the cached features, never an image."""
    manifest = read_manifest(FEATURES)
    flipped = load_features(FEATURES, "train_flipped") if "train_flipped" in manifest["versions"] else None
    weights = sample_weights(train, section["gender_weighting"])
    batch = section["batch_size"] * setup["replicas"]
    features = load_features(FEATURES, "train")
    if networks.normalizer is not None:
        networks.normalizer.adapt(features)
    batches = FeatureBatches(features, one_hot(train), weights, batch, seed, flipped, first_epoch)
    lr = section["lr"] * setup["replicas"]
    with setup["strategy"].scope():
        compile_for_training(networks.head_model, section, lr, len(batches), section["epochs"], setup["jit_compile"])
    networks.head_model.fit(batches, validation_data=(load_features(FEATURES, "val"), one_hot(val)),
                            epochs=section["epochs"], callbacks=[*callbacks, EpochSync(batches)], shuffle=False, verbose=2)


def finetune(networks, section, seed, train, val, setup, callbacks, first_epoch):
    """Phase 2: the last `finetune_layers` of the backbone learn too, on augmented images, in
    batches drawn as the head phase draws them (from the seed and the epoch)."""
    set_trainable_tail(networks.base, max(section["finetune_layers"], section["trainable_layers"]))
    size, batch = section["input_size"], section["batch_size"] * setup["replicas"]
    images = ImageRows(train, IMAGE_DIR, size, in_memory=section["cache_images"])
    weights = sample_weights(train, section["gender_weighting"])
    batches = FeatureBatches(images, one_hot(train), weights, batch, seed, epoch=first_epoch)
    with setup["strategy"].scope():
        compile_for_training(networks.image_model, section, section["finetune_lr"] * setup["replicas"],
                             len(batches), section["finetune_epochs"], setup["jit_compile"])
    networks.image_model.fit(batches, validation_data=image_dataset(val, IMAGE_DIR, size, batch),
                             initial_epoch=first_epoch, epochs=first_epoch + section["finetune_epochs"],
                             callbacks=[*callbacks, EpochSync(batches)], shuffle=False, verbose=2)


@exits_cleanly
def main():
    params = load_params()
    section, seed = params["train"], params["seed"]
    setup = devices.configure(section["mixed_precision"], section["jit_compile"], deterministic=True)
    keras.utils.set_random_seed(seed)
    manifest = read_manifest(FEATURES)
    train, val = (kept_rows(pd.read_csv(SPLIT_DIR / f"{name}.csv", keep_default_na=False, na_values=[""]), manifest, name)
                  for name in ("train", "val"))
    with setup["strategy"].scope():
        networks = build_networks(**network_settings(params))
        if networks.base is not None:
            networks.base.load_weights(FEATURES / "base.weights.h5")
    root = Path(".") if setup["chief"] else Path(tempfile.mkdtemp(prefix="agegender-worker-"))
    backup = root / BACKUP
    logged = {**section, **params["model"], "seed": seed, **{k: v for k, v in setup.items() if k != "strategy"}}
    tracking = stage_run("train", logged, params["mlflow"]["experiment"]) if setup["chief"] else nullcontext(StageRun(None))
    with tracking as run:
        started = time.perf_counter()
        callbacks = training_callbacks(section, backup, "head", [run.keras_callback()], seed)
        train_head(networks, section, seed, train, val, setup, callbacks, resume_point(backup, "head"))
        head_seconds = time.perf_counter() - started
        phases = ["head"] + (["finetune"] if section["finetune_epochs"] else [])
        head_epochs = len(phase_history(backup, ["head"]))
        if section["finetune_epochs"]:
            callbacks = training_callbacks(section, backup, "finetune", [run.keras_callback()], seed)
            finetune(networks, section, seed, train, val, setup, callbacks, head_epochs)
        history = phase_history(backup, phases)
        last_phase = history.iloc[head_epochs:] if section["finetune_epochs"] else history
        best = int(last_phase["val_loss"].idxmin())
        metrics = {
            **{name: round(float(value), 6) for name, value in history.iloc[best].items() if name not in ("epoch", "learning_rate")},
            "best_epoch": best + 1, "epochs_run": len(history), "train_images": len(train),
            "head_epoch_seconds": round(head_seconds / head_epochs, 3),
        }
        (root / MODEL).parent.mkdir(parents=True, exist_ok=True)
        networks.image_model.save(root / MODEL)
        write_csv(root / HISTORY, history)
        write_json(root / METRICS, metrics)
        shutil.rmtree(backup, ignore_errors=True)
        run.log_metrics(metrics)
    print(f"train: best epoch {metrics['best_epoch']} of {metrics['epochs_run']}, val gender accuracy "
          f"{metrics['val_gender_accuracy']:.4f}, val age accuracy {metrics['val_age_accuracy']:.4f}")


if __name__ == "__main__":
    main()
