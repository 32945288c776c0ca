"""Faces as data: where datasets and weights come from, fetching them, IMDB-WIKI metadata, image
decoding, face detection, aligned face chips and the tf.data input pipeline."""
