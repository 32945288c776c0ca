"""agegender.contracts.params: params.yaml is checked before any stage does work."""

import pytest
import yaml
from conftest import REPO

from agegender.contracts.errors import PipelineError
from agegender.contracts.params import load_params


@pytest.fixture
def write_params(tmp_path):
    """Write an edited copy of the repository's params.yaml; returns its path."""

    def write(edit):
        params = yaml.safe_load((REPO / "params.yaml").read_text())
        edit(params)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(params))
        return path

    return write


def test_repository_params_load():
    params = load_params(REPO / "params.yaml")
    assert params["seed"] == 42
    assert params["crop"]["method"] in ("metadata", "mtcnn", "none")
    assert sum(params["split"][k] for k in ("train", "val", "test")) == pytest.approx(1)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        load_params(tmp_path / "params.yaml")


def test_invalid_yaml_is_an_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: [1, 2\n")
    with pytest.raises(PipelineError, match="not valid YAML"):
        load_params(path)


def test_unknown_key_is_named(write_params):
    path = write_params(lambda p: p["train"].update(lrr=0.1))
    with pytest.raises(PipelineError, match=r"unknown key 'train\.lrr'"):
        load_params(path)


def test_unknown_top_level_section_is_named(write_params):
    path = write_params(lambda p: p.update(trian={"lr": 0.1}))
    with pytest.raises(PipelineError, match="unknown key 'trian'"):
        load_params(path)


def test_missing_key_is_named(write_params):
    path = write_params(lambda p: p["crop"].pop("margin"))
    with pytest.raises(PipelineError, match=r"'crop\.margin' is missing"):
        load_params(path)


def test_missing_nested_key_is_named(write_params):
    path = write_params(lambda p: p["train"]["loss_weights"].pop("age"))
    with pytest.raises(PipelineError, match=r"'train\.loss_weights\.age' is missing"):
        load_params(path)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("")
    with pytest.raises(PipelineError, match="must be a mapping"):
        load_params(path)


def test_section_not_a_mapping(write_params):
    path = write_params(lambda p: p.update(split=0.8))
    with pytest.raises(PipelineError, match="'split' must be a mapping"):
        load_params(path)


def test_string_for_an_integer(write_params):
    path = write_params(lambda p: p["train"].update(epochs="3"))
    with pytest.raises(PipelineError, match=r"'train\.epochs' must be an integer"):
        load_params(path)


def test_boolean_for_an_integer(write_params):
    path = write_params(lambda p: p["crop"].update(size=True))
    with pytest.raises(PipelineError, match=r"'crop\.size' must be an integer, not a boolean"):
        load_params(path)


def test_boolean_for_a_number(write_params):
    path = write_params(lambda p: p["train"].update(lr=False))
    with pytest.raises(PipelineError, match=r"'train\.lr'.*not a boolean"):
        load_params(path)


def test_int_accepted_for_a_number_and_null_for_second_face(write_params):
    def edit(p):
        p["train"]["lr"] = 1
        p["filter"]["max_second_face_score"] = None
        p["filter"]["min_face_score"] = 2

    params = load_params(write_params(edit))
    assert params["train"]["lr"] == 1
    assert params["filter"]["max_second_face_score"] is None


def test_a_float_as_dvc_exp_run_writes_it_is_a_number(tmp_path):
    """`dvc exp run -S train.finetune_lr=0.00001` writes `1e-05`, a string to YAML 1.1."""
    text = (REPO / "params.yaml").read_text()
    assert "  finetune_lr: 0.0001 " in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("  finetune_lr: 0.0001 ", "  finetune_lr: 1e-05 "))
    assert load_params(path)["train"]["finetune_lr"] == 1e-05
    path.write_text(text.replace("  finetune_lr: 0.0001 ", "  finetune_lr: -2.5E+1 "))
    with pytest.raises(PipelineError, match="'train.finetune_lr' must be above 0"):
        load_params(path)


def test_float_for_an_integer(write_params):
    path = write_params(lambda p: p["train"].update(batch_size=32.0))
    with pytest.raises(PipelineError, match=r"'train\.batch_size' must be an integer"):
        load_params(path)


def test_split_fractions_must_sum_to_one(write_params):
    path = write_params(lambda p: p["split"].update(train=0.7))
    with pytest.raises(PipelineError, match=r"sum to 1, they sum to 0\.9"):
        load_params(path)


def test_split_fraction_zero_is_refused(write_params):
    path = write_params(lambda p: p["split"].update(train=0.9, val=0.0))
    with pytest.raises(PipelineError, match="each be above 0"):
        load_params(path)


def test_unknown_dataset(write_params):
    path = write_params(lambda p: p["data"].update(dataset="celeba"))
    with pytest.raises(PipelineError, match=r"'data\.dataset' must be one of sample, wiki_crop"):
        load_params(path)


def test_unknown_crop_method(write_params):
    path = write_params(lambda p: p["crop"].update(method="haar"))
    with pytest.raises(PipelineError, match=r"'crop\.method' must be one of metadata, mtcnn, none"):
        load_params(path)


def test_negative_margin(write_params):
    path = write_params(lambda p: p["crop"].update(margin=-0.1))
    with pytest.raises(PipelineError, match=r"'crop\.margin' must be 0 or more"):
        load_params(path)


def test_min_age_above_max_age(write_params):
    path = write_params(lambda p: p["filter"].update(min_age=50, max_age=10))
    with pytest.raises(PipelineError, match=r"'filter\.min_age' must not exceed"):
        load_params(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            {"max_age": 101},
            r"'filter\.max_age' must be at most 100: the age head has one class per year 0\.\.100",
        ),
        ({"min_age": 0, "max_age": 150}, r"'filter\.max_age' must be at most 100"),
        ({"min_age": -1}, r"'filter\.min_age' must be 0 or more"),
    ],
)
def test_ages_outside_the_age_head_are_refused(write_params, edit, message):
    """Not folded into the last class: a 120-year-old face would be learnt as 100."""
    with pytest.raises(PipelineError, match=message):
        load_params(write_params(lambda p: p["filter"].update(edit)))


def test_the_whole_age_head_is_accepted(write_params):
    params = load_params(write_params(lambda p: p["filter"].update(min_age=0, max_age=100)))
    assert (params["filter"]["min_age"], params["filter"]["max_age"]) == (0, 100)


def test_knobs_that_were_hard_coded_are_params():
    params = load_params(REPO / "params.yaml")
    assert params["features"]["batch_size"] == 64
    assert (params["train"]["plateau_factor"], params["train"]["plateau_patience"]) == (0.5, 2)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda p: p["features"].update(batch_size=0),
            r"'features\.batch_size' must be at least 1",
        ),
        (
            lambda p: p["features"].update(batch_size=8.5),
            r"'features\.batch_size' must be an integer",
        ),
        (lambda p: p.pop("features"), r"key 'features' is missing"),
        (
            lambda p: p["train"].update(plateau_factor=1),
            r"'train\.plateau_factor' must be in \(0, 1\)",
        ),
        (
            lambda p: p["train"].update(plateau_factor=0.0),
            r"'train\.plateau_factor' must be in \(0, 1\)",
        ),
        (lambda p: p["train"].pop("plateau_factor"), r"key 'train\.plateau_factor' is missing"),
        (
            lambda p: p["train"].update(plateau_patience=0),
            r"'train\.plateau_patience' must be at least 1",
        ),
        (
            lambda p: p["train"].update(plateau_patience=1.5),
            r"'train\.plateau_patience' must be an integer",
        ),
    ],
)
def test_features_and_plateau_values_are_checked(write_params, edit, message):
    with pytest.raises(PipelineError, match=message):
        load_params(write_params(edit))


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("dropout", 1.0, r"'train\.dropout' must be in \[0, 1\)"),
        ("lr", 0, r"'train\.lr' must be above 0"),
        ("epochs", 0, r"'train\.epochs' must be at least 1"),
        ("input_size", 16, r"'train\.input_size' must be at least 32"),
    ],
)
def test_train_value_ranges(write_params, key, value, message):
    path = write_params(lambda p: p["train"].update({key: value}))
    with pytest.raises(PipelineError, match=message):
        load_params(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (
            lambda p: p["train"].update(age_loss="l2"),
            r"'train\.age_loss' must be one of cross_entropy, mean_variance, dldl",
        ),
        (
            lambda p: (
                p["model"].update(backbone="resnet50"),
                p["train"].update(trainable_layers=2),
            ),
            r"'train\.trainable_layers' must be 0 for backbones other than vgg16",
        ),
        (
            lambda p: p["train"].update(mixed_precision="maybe"),
            r"'train\.mixed_precision' must be true, false or auto",
        ),
        (
            lambda p: p["train"].update(jit_compile="yes"),
            r"'train\.jit_compile' must be true, false or auto",
        ),
        (
            lambda p: p["train"].update(early_stopping=-1),
            r"'train\.early_stopping' must be 0 \(off\) or a patience",
        ),
        (
            lambda p: p["train"].update(lr_schedule="step"),
            r"'train\.lr_schedule' must be constant, cosine or plateau",
        ),
        (lambda p: p["train"].update(pooling="max"), r"'train\.pooling' must be flatten or avg"),
        (
            lambda p: p["train"].update(gender_weighting="inverse"),
            r"'train\.gender_weighting' must be none or balanced",
        ),
        (
            lambda p: p["train"].update(age_balance=1.5),
            r"'train\.age_balance' must be from 0 \(ages as sampled\) to 1",
        ),
        (
            lambda p: p["train"].update(label_smoothing=1.0),
            r"'train\.label_smoothing' must be in \[0, 1\)",
        ),
        (
            lambda p: p["train"].update(trainable_layers=-1),
            r"'train\.trainable_layers' must be 0 or more",
        ),
        (
            lambda p: p["train"].update(finetune_epochs=-2),
            r"'train\.finetune_layers' and train\.finetune_epochs",
        ),
        (
            lambda p: p["model"].update(face_features="logits"),
            r"'model\.face_features' must be descriptor .* or pooled",
        ),
        (lambda p: p["model"].update(face_models=" "), r"'model\.face_models' must be package"),
        (lambda p: p["train"].update(finetune_lr=0), r"'train\.finetune_lr' must be above 0"),
        (
            lambda p: p["model"].update(backbone="vgg19"),
            r"'model\.backbone' must be one of dlib_resnet, dlib_resnet\+cydral_age, dlib_resnet\+"
            r"cydral_age\+cydral_gender, vgg16, ",
        ),
        (
            lambda p: p["model"].update(
                backbone="dlib_resnet+cydral_age+cydral_gender", cydral_models="none"
            ),
            r"'model\.cydral_models' is none, but model\.backbone dlib_resnet\+cydral_age\+cydral_"
            r"gender reads Cydral's networks",
        ),
        (
            lambda p: (
                p["model"].update(backbone="dlib_resnet+cydral_age", cydral_models="registry"),
                p["train"].update(finetune_layers=3, finetune_epochs=1),
            ),
            r"'train\.finetune_epochs' must be 0 with model\.backbone dlib_resnet\+cydral_age",
        ),
        (
            lambda p: p["train"].update(age_pull=-0.1),
            r"'train\.age_pull' must be 0 or more",
        ),
        (
            lambda p: p["train"].update(age_correction="mlp"),
            r"'train\.age_correction' must be none \(Cydral's adapted layer alone\) or heads",
        ),
        (
            lambda p: p["train"].update(mixed_precision=1),
            r"'train\.mixed_precision' must be true, false or auto",
        ),
        (
            lambda p: p["train"]["augment"].update(flip="yes"),
            r"'train\.augment\.flip' must be true or false",
        ),
    ],
)
def test_train_choices_are_checked(write_params, edit, message):
    with pytest.raises(PipelineError, match=message):
        load_params(write_params(edit))


@pytest.mark.parametrize(
    "edit",
    [
        lambda p: p["train"].update(mixed_precision=True, jit_compile=False),
        lambda p: p["train"].update(mixed_precision="auto", jit_compile="auto"),
        lambda p: (
            p["model"].update(backbone="mobilenetv3small"),
            p["train"].update(trainable_layers=0, finetune_layers=20),
        ),
        lambda p: p["train"].update(
            age_loss="dldl", lr_schedule="cosine", early_stopping=0, gender_weighting="balanced"
        ),
    ],
)
def test_train_choices_accepted(write_params, edit):
    load_params(write_params(edit))
