"""The train stage's refusal to write a diverged model."""

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("keras")

from agegender.errors import PipelineError  # noqa: E402
from agegender.stages.train import refuse_diverged  # noqa: E402


def history(losses):
    return pd.DataFrame({"epoch": range(len(losses)), "loss": losses, "val_loss": 1.0})


def test_a_finite_history_passes_and_keeps_the_backup(tmp_path):
    refuse_diverged(history([2.0, 1.5, 1.2]), 1, tmp_path)
    assert tmp_path.exists()


def test_nan_on_several_replicas_names_the_reports_and_drops_the_backup(tmp_path):
    backup = tmp_path / "train_backup"
    backup.mkdir()
    with pytest.raises(PipelineError, match=r"from epoch 2 on 2 replicas.*#87432, #62915"):
        refuse_diverged(history([2.0, np.nan, np.nan]), 2, backup)
    assert not backup.exists()


def test_an_infinite_loss_on_one_device_suggests_a_lower_rate(tmp_path):
    with pytest.raises(PipelineError, match=r"from epoch 1; lower train.lr"):
        refuse_diverged(history([np.inf, 1.0]), 1, tmp_path)
