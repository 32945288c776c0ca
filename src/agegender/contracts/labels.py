"""What the model's two outputs mean: the classes of each task and how a label becomes a
target or an answer. Everything that reads or writes labels takes them from here."""

import numpy as np

AGES = np.arange(101)  # the age head's classes: 0 to 100 years
GENDERS = ("female", "male")  # the gender head's classes 0 and 1, as IMDB-WIKI codes gender
TASKS = {"gender": len(GENDERS), "age": len(AGES)}


def label_indices(table):
    """The class index of each row for each task (ages above 100 count as 100)."""
    return {
        "gender": np.asarray(table["gender"], dtype=np.int32),
        "age": np.clip(np.asarray(table["age"], dtype=np.int32), 0, AGES[-1]),
    }


def one_hot(table):
    """Targets for training: one float32 one-hot row per face and task."""
    return {
        task: np.eye(TASKS[task], dtype=np.float32)[indices]
        for task, indices in label_indices(table).items()
    }


def expected_age(age_probabilities):
    """The age answer (DEX): the expected value over the 101 age classes."""
    return np.asarray(age_probabilities) @ AGES


def bin_labels(edges):
    """The names of the age bins that start at `edges`, the last one open: "0-14", ..., "65+"."""
    return [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-1], edges[1:])] + [f"{edges[-1]}+"]


def age_bin(ages, edges):
    return np.searchsorted(np.asarray(edges), np.asarray(ages), side="right") - 1


def bin_probabilities(age_probs, edges):
    """Sum the 101 age probabilities over each bin."""
    bins = age_bin(AGES, edges)
    return np.stack([age_probs[:, bins == b].sum(axis=1) for b in range(len(edges))], axis=1)
