"""Where each dataset and backbone's weights come from, in one place, so stages never hard-code URLs.

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
        "folder": "wiki_crop", "mat": "wiki.mat",
    },
    "wiki_crop": {
        "archives": [_archive(IMDB_WIKI + "wiki_crop.tar")],
        "folder": "wiki_crop", "mat": "wiki.mat",
    },
    "imdb_crop": {
        "archives": [_archive(IMDB_WIKI + "imdb_crop.tar")],
        "folder": "imdb_crop", "mat": "imdb.mat",
    },
    "wiki": {
        "archives": [_archive(IMDB_WIKI + "wiki.tar.gz")],
        "folder": "wiki", "mat": "wiki.mat",
    },
    "imdb": {
        "archives": [_archive(f"{IMDB_WIKI}imdb_{i}.tar") for i in range(10)]
        + [_archive(IMDB_WIKI + "imdb_meta.tar")],
        "folder": "imdb", "mat": "imdb.mat",
    },
}

# Keras' own published md5 hashes for its VGG16 ImageNet weights.
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
}


def weights_source(backbone, input_size):
    """The file with the pretrained first dense layer fits only 224 px input; else conv layers only.

    Returns {"url", "md5", "file"}.
    """
    variant = WEIGHTS[backbone]["top" if input_size == 224 else "notop"]
    return {**variant, "file": variant["url"].rsplit("/", 1)[-1]}


def dataset_dir(raw_dir, dataset):
    """The folder the dataset's archives unpack to, under the raw data directory."""
    return Path(raw_dir) / DATASETS[dataset]["folder"]


def mat_path(raw_dir, dataset):
    """The dataset's MATLAB metadata file, e.g. data/raw/wiki_crop/wiki.mat."""
    return dataset_dir(raw_dir, dataset) / DATASETS[dataset]["mat"]
