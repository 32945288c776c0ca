"""Stage train: the heads (and the backbone's trainable tail) on cached features, then an
optional fine-tuning phase on augmented images with more of the backbone unfrozen. A killed
run resumes from its last finished epoch and ends with the figures of an uninterrupted one."""

import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np

from agegender.contracts.files import read_csv, write_csv
from agegender.contracts.labels import one_hot
from agegender.contracts.layout import (
    CROP_IMAGES,
    FEATURES,
    HISTORY,
    MODEL,
    TRAIN_BACKUP,
    WEIGHTS,
    split_table,
)
from agegender.contracts.stage import stage
from agegender.facedata.face_chips import CHIP_SIZE, chip_batches, crop_face_margin
from agegender.facedata.input_pipeline import image_dataset
from agegender.nets import devices
from agegender.nets.cydral_networks import network_files
from agegender.nets.data_parallel import local_batches, validation_copies
from agegender.nets.feature_cache import (
    EpochSync,
    FeatureBatches,
    adapt_in_chunks,
    kept_rows,
    load_features,
    read_manifest,
)
from agegender.nets.model import build_networks, save_model, set_trainable_tail
from agegender.nets.training import (
    ImageRows,
    compile_for_training,
    discard_stale_backup,
    network_settings,
    phase_history,
    refuse_diverged,
    resume_point,
    sample_weights,
    training_callbacks,
)


def train_head(networks, section, seed, train, val, setup, callbacks, first_epoch):
    """Phase 1: every epoch reads the cached features from disk, a batch at a time, never an
    image."""
    manifest = read_manifest(FEATURES)
    has_flipped = "train_flipped" in manifest["versions"]
    flipped = load_features(FEATURES, "train_flipped") if has_flipped else None
    weights = sample_weights(train, section["gender_weighting"], section["age_balance"])
    batch = section["batch_size"] * setup["replicas"]
    features = load_features(FEATURES, "train")
    if networks.normalizer is not None:
        adapt_in_chunks(networks.normalizer, features)
    batches = FeatureBatches(features, one_hot(train), weights, batch, seed, flipped, first_epoch)
    val_batches = FeatureBatches(load_features(FEATURES, "val"), one_hot(val), None, batch)
    lr = section["lr"] * setup["replicas"]
    with setup["strategy"].scope():
        compile_for_training(
            networks.head_model, section, lr, len(batches), section["epochs"], setup["jit_compile"]
        )
    networks.head_model.fit(
        local_batches(batches, setup),
        validation_data=validation_copies(val_batches, setup),
        epochs=section["epochs"],
        callbacks=[*callbacks, EpochSync(batches)],
        shuffle=False,
        verbose=2,
    )


def finetune_data(networks, params, train, val, batch):
    """The images phase 2 trains and validates on: crops for a Keras backbone (decoded by
    batch, or kept with train.cache_images), aligned chips for dlib's face network (cut once,
    kept: 67 KB a face)."""
    section = params["train"]
    if networks.train_model is None:
        size = section["input_size"]
        images = ImageRows(train, CROP_IMAGES, size, in_memory=section["cache_images"])
        return images, image_dataset(val, CROP_IMAGES, size, batch)
    margin = crop_face_margin(params["crop"])
    train_chips, val_chips = (chips_of(table, margin) for table in (train, val))
    return train_chips, FeatureBatches(val_chips, one_hot(val), None, batch)


def chips_of(table, margin):
    chunks = list(chip_batches([CROP_IMAGES / p for p in table["full_path"]], WEIGHTS, margin))
    empty = np.zeros((0, CHIP_SIZE, CHIP_SIZE, 3), np.uint8)
    return np.concatenate([chips for chips, _ in chunks]) if chunks else empty


def finetune(networks, params, train, val, setup, callbacks, first_epoch):
    """Phase 2: the last `finetune_layers` of the backbone learn too, on augmented images, in
    batches drawn as the head phase draws them (from the seed and the epoch)."""
    section, seed = params["train"], params["seed"]
    frozen_in_phase_1 = networks.train_model is not None  # dlib_resnet's trainable_layers: 0
    tail = section["finetune_layers"]
    set_trainable_tail(
        networks.base, tail if frozen_in_phase_1 else max(tail, section["trainable_layers"])
    )
    batch = section["batch_size"] * setup["replicas"]
    images, val_data = finetune_data(networks, params, train, val, batch)
    weights = sample_weights(train, section["gender_weighting"], section["age_balance"])
    batches = FeatureBatches(images, one_hot(train), weights, batch, seed, epoch=first_epoch)
    lr, epochs = section["finetune_lr"] * setup["replicas"], section["finetune_epochs"]
    model = networks.finetune_model
    with setup["strategy"].scope():
        compile_for_training(model, section, lr, len(batches), epochs, setup["jit_compile"])
    model.fit(
        local_batches(batches, setup),
        validation_data=validation_copies(val_data, setup),
        initial_epoch=first_epoch,
        epochs=first_epoch + epochs,
        callbacks=[*callbacks, EpochSync(batches)],
        shuffle=False,
        verbose=2,
    )


def summary(history, head_epochs, finetuned, train_images):
    """The figures of the epoch kept: the best validation loss of the last phase."""
    last_phase = history.iloc[head_epochs:] if finetuned else history
    best = int(last_phase["val_loss"].idxmin())
    figures = history.iloc[best].drop(["epoch", "learning_rate"], errors="ignore")
    return {
        **{name: round(float(value), 6) for name, value in figures.items()},
        "best_epoch": best + 1,
        "epochs_run": len(history),
        "train_images": train_images,
    }


@stage("train", tracked=devices.is_chief)
def main(params, run):
    section, seed = params["train"], params["seed"]
    setup = devices.configure(section["mixed_precision"], section["jit_compile"], True)
    keras.utils.set_random_seed(seed)
    manifest = read_manifest(FEATURES)
    train, val = (
        kept_rows(read_csv(split_table(name)), manifest, name) for name in ("train", "val")
    )
    with setup["strategy"].scope():
        networks = build_networks(
            **network_settings(params), **network_files(FEATURES, params["model"]["backbone"])
        )
        if networks.base is not None:
            networks.base.load_weights(FEATURES / "base.weights.h5")
    root = Path(".") if setup["chief"] else Path(tempfile.mkdtemp(prefix="agegender-worker-"))
    backup = root / TRAIN_BACKUP
    if setup["processes"] > 1:
        # the other processes keep no backup to resume from, so process 0 must not either
        shutil.rmtree(backup, ignore_errors=True)
    settings = {"train": section, "model": params["model"], "seed": seed, "features": manifest}
    discard_stale_backup(backup, {**settings, "replicas": setup["replicas"]})
    run.log_metrics({"gpus": setup["gpus"], "replicas": setup["replicas"]})

    started = time.perf_counter()
    callbacks = training_callbacks(section, backup, "head", [run.keras_callback()], seed)
    train_head(networks, section, seed, train, val, setup, callbacks, resume_point(backup, "head"))
    head_epochs = len(phase_history(backup, ["head"]))
    run.log_metrics({"head_epoch_seconds": (time.perf_counter() - started) / head_epochs})
    finetuned = section["finetune_epochs"] > 0
    if finetuned:
        callbacks = training_callbacks(section, backup, "finetune", [run.keras_callback()], seed)
        finetune(networks, params, train, val, setup, callbacks, head_epochs)
    history = phase_history(backup, ["head", "finetune"] if finetuned else ["head"])
    refuse_diverged(history, setup["replicas"], backup)
    metrics = summary(history, head_epochs, finetuned, len(train))

    (root / MODEL).parent.mkdir(parents=True, exist_ok=True)
    save_model(networks.image_model, root / MODEL)
    write_csv(root / HISTORY, history)
    shutil.rmtree(backup if setup["chief"] else root, ignore_errors=True)
    print(
        f"train: best epoch {metrics['best_epoch']} of {metrics['epochs_run']}, val gender "
        f"accuracy {metrics['val_gender_accuracy']:.4f}, val age accuracy "
        f"{metrics['val_age_accuracy']:.4f}"
    )
    return metrics if setup["chief"] else None


if __name__ == "__main__":
    main()
