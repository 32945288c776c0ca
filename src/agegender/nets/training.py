"""What the features and train stages share: the network as params describe it, the
pretrained weights file, and how a model is compiled, stopped and resumed after a kill."""

import json
import shutil
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from agegender.contracts.errors import PipelineError
from agegender.contracts.files import replace_atomically
from agegender.contracts.layout import WEIGHTS
from agegender.nets.feature_cache import age_sample_weights, gender_sample_weights
from agegender.nets.losses import HeadLoss, age_mae


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
        "face_features": params["model"]["face_features"],
        "age_pull": train["age_pull"],
        "age_correction": train["age_correction"],
    }


def base_weights(weights):
    """The pretrained file: from the download stage for `imagenet`, else the path given."""
    if weights == "none":
        return None
    if weights == "imagenet":
        manifest_path = WEIGHTS / "weights.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        if not manifest.get("file"):
            raise PipelineError(
                f"model.weights is imagenet but {manifest_path} names no weights file; "
                "run `dvc repro download_weights`."
            )
        path = WEIGHTS / manifest["file"]
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
        metrics={"gender": ["accuracy"], "age": ["accuracy", age_mae()]},
        jit_compile=jit_compile,
    )
    return model


def training_callbacks(section, backup_dir, phase, extra, seed=0):
    """Callbacks of one training phase; `fit` with them resumes by itself. A run killed at any
    point and started again ends with the figures of an uninterrupted one: the batches, dropout
    masks and augmentation depend on the epoch alone (ReseedEachEpoch, the stage's data), and
    `TrainingState`, last so that it sees what the others did at the end of an epoch, keeps and
    restores everything else. The epochs logged so far are kept; early stopping restores the
    best epoch's weights, so the model kept is the best one."""
    resume_point(backup_dir, phase)
    log = Path(backup_dir) / f"{phase}.csv"
    callbacks = [ReseedEachEpoch(seed), keras.callbacks.CSVLogger(str(log), append=True), *extra]
    if section["early_stopping"]:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_loss", patience=section["early_stopping"], restore_best_weights=True
            )
        )
    if section["lr_schedule"] == "plateau":
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor="val_loss",
                factor=section["plateau_factor"],
                patience=section["plateau_patience"],
            )
        )
    return [*callbacks, TrainingState(state_path(backup_dir, phase), callbacks)]


def discard_stale_backup(backup_dir, settings):
    """A killed run resumes only with the settings it was killed with: after a change of
    params or of the feature cache the backups are deleted and training starts over."""
    marker = Path(backup_dir) / "settings.json"
    wanted = json.dumps(settings, sort_keys=True, default=str)
    if marker.exists() and marker.read_text() != wanted:
        print(f"train: {backup_dir} holds a killed run of other settings; starting over")
        shutil.rmtree(backup_dir)
    marker.parent.mkdir(parents=True, exist_ok=True)
    replace_atomically(marker, lambda tmp: tmp.write_text(wanted))


def state_path(backup_dir, phase):
    return Path(backup_dir) / f"{phase}.state.npz"


def saved_state(backup_dir, phase):
    """What `TrainingState` saved of `phase` beside the arrays ("epoch": epochs done), or None."""
    path = state_path(backup_dir, phase)
    if not path.exists():
        return None
    with np.load(path) as saved:
        return json.loads(saved["state"].item())


def resume_point(backup_dir, phase):
    """The epoch `phase` resumes at, from its saved state (0: none, a fresh start); its log
    keeps the complete rows of the epochs before it (a kill can land between a row and the
    state of its epoch)."""
    log = Path(backup_dir) / f"{phase}.csv"
    log.parent.mkdir(parents=True, exist_ok=True)
    state = saved_state(backup_dir, phase)
    if state is None:
        log.unlink(missing_ok=True)
        return 0
    lines = log.read_text().splitlines(keepends=True) if log.exists() else []
    if lines:
        kept = [
            row
            for row in lines[1:]
            if row.endswith("\n") and int(row.split(",")[0]) < state["epoch"]
        ]
        replace_atomically(log, lambda tmp: tmp.write_text(lines[0] + "".join(kept)))
    return state["epoch"]


class TrainingState(keras.callbacks.Callback):
    """After every epoch, everything the rest of a `fit` depends on, in one file replaced in
    one step; put back before the first epoch of a `fit` started again:

    - the weights, and the optimizer's variables: its step, its moments and its learning rate
      as the plateau schedule left it;
    - the counters of the callbacks that decide from past epochs (`KEPT`: early stopping's
      patience used, best loss, best epoch and that epoch's weights; the plateau schedule's
      patience used, best loss and cooldown), and whether early stopping ended the phase.

    keras.callbacks.BackupAndRestore keeps the first only, saved before the other callbacks'
    end of epoch (so before a plateau lowers the learning rate), in two files written one after
    the other, and deletes it when `fit` ends. This one is kept after `fit`: a phase that ended
    is not trained again when a later phase is killed (its `fit` restores the end and runs no
    epoch). The stage deletes the backups once its outputs are written.
    """

    KEPT = {
        keras.callbacks.EarlyStopping: ("wait", "best", "best_epoch", "stopped_epoch"),
        keras.callbacks.ReduceLROnPlateau: ("wait", "best", "cooldown_counter"),
    }

    def __init__(self, path, callbacks):
        super().__init__()
        self.path = Path(path)
        self.stateful = [callback for callback in callbacks if type(callback) in self.KEPT]

    def on_train_begin(self, logs=None):
        if not self.path.exists():
            return
        optimizer = self.model.optimizer
        if not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        with np.load(self.path) as saved:
            state = json.loads(saved["state"].item())
            try:
                self.model.set_weights(numbered_arrays(saved, "weights"))
                values = numbered_arrays(saved, "optimizer")
                for variable, value in zip(optimizer.variables, values, strict=True):
                    variable.assign(value)
            except ValueError as error:
                raise PipelineError(
                    f"{self.path} was saved by a training of another network ({error}); delete "
                    f"{self.path.parent} to train from the start."
                ) from None
            for index, callback in enumerate(self.stateful):
                for name, value in state["callbacks"][index].items():
                    setattr(callback, name, value)
                if getattr(callback, "restore_best_weights", False):
                    callback.best_weights = numbered_arrays(saved, f"best{index}") or None
        # where the next `fit` starts: after the saved epoch, or at its end if it had stopped
        self.model._initial_epoch = self.params["epochs"] if state["stopped"] else state["epoch"]

    def on_epoch_end(self, epoch, logs=None):
        counters = [
            {name: plain(getattr(callback, name)) for name in self.KEPT[type(callback)]}
            for callback in self.stateful
        ]
        state = {
            "epoch": epoch + 1,
            "stopped": bool(self.model.stop_training),
            "callbacks": counters,
        }
        arrays = {
            "state": np.array(json.dumps(state)),
            **numbered("weights", self.model.get_weights()),
            **numbered("optimizer", [v.numpy() for v in self.model.optimizer.variables]),
        }
        for index, callback in enumerate(self.stateful):
            arrays.update(numbered(f"best{index}", getattr(callback, "best_weights", None) or []))

        def write(tmp):
            with open(tmp, "wb") as file:
                np.savez(file, **arrays)

        replace_atomically(self.path, write)


def numbered(prefix, arrays):
    return {f"{prefix}_{index}": np.asarray(array) for index, array in enumerate(arrays)}


def numbered_arrays(saved, prefix):
    count = sum(name.startswith(f"{prefix}_") for name in saved.files)
    return [saved[f"{prefix}_{index}"] for index in range(count)]


def plain(value):
    """A callback's counter as JSON keeps it: NumPy scalars as Python numbers (exact)."""
    return value.item() if isinstance(value, np.generic) else value


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


def sample_weights(train, gender_weighting, age_balance=0.0):
    """Per-sample loss weights of a phase's batches (FeatureBatches' `sample_weights`)."""
    return {
        "gender": gender_sample_weights(train["gender"], gender_weighting),
        "age": age_sample_weights(train["age"], age_balance),
    }


class ImageRows:
    """The training images where FeatureBatches reads features (`len`, rows by index), so that
    fine-tuning draws its batches as the head phase does, from the seed and the epoch alone:
    tf.data's reshuffling draws each epoch's order from the passes made so far in the process,
    which a resumed run starts again at 0. `in_memory` (train.cache_images): decoded once and
    kept; else decoded when a batch asks for them."""

    def __init__(self, table, image_dir, size, in_memory):
        from agegender.facedata.input_pipeline import image_dataset  # TensorFlow, for images only

        def decode(rows):
            return next(iter(image_dataset(rows, image_dir, size, max(1, len(rows)))))[0].numpy()

        self.table, self.decode = table.reset_index(drop=True), decode
        self.kept = decode(self.table) if in_memory else None

    def __len__(self):
        return len(self.table)

    def __getitem__(self, rows):
        return self.kept[rows] if self.kept is not None else self.decode(self.table.iloc[rows])


def seed_generators(layer):
    """The random state of dropout and augmentation layers (`seed_generator` of Dropout,
    `generator` of RandomFlip, ...), also inside nested models, each once, in layer order."""
    found = [v for v in vars(layer).values() if isinstance(v, keras.random.SeedGenerator)]
    for inner in getattr(layer, "layers", []):
        found += [generator for generator in seed_generators(inner) if generator not in found]
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


def refuse_diverged(history, replicas, backup):
    """A loss that turned NaN or infinite leaves a model of NaN weights: stop with the epoch and
    what to check instead of writing it, and drop the backup, whose state is NaN too, so that a
    re-run starts over. Several GPUs under MirroredStrategy have such reports that one GPU does
    not (tensorflow/tensorflow#87432, #62915)."""
    finite = np.isfinite(history[["loss", "val_loss"]].to_numpy(dtype=float)).all(axis=1)
    if finite.all():
        return
    shutil.rmtree(backup, ignore_errors=True)
    hint = (
        f" on {replicas} replicas: compare with one GPU (CUDA_VISIBLE_DEVICES=0) or the JAX "
        "backend (KERAS_BACKEND=jax), as MirroredStrategy has NaN reports "
        "(tensorflow/tensorflow#87432, #62915); if one device diverges too, lower train.lr"
        if replicas > 1
        else "; lower train.lr"
    )
    raise PipelineError(
        f"training diverged: the loss is not finite from epoch {np.argmin(finite) + 1}{hint}."
    )
