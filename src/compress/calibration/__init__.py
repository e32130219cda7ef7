"""Calibration data: ``.npz`` batches keyed by model input name, checked and streamed.

Format (see ``calib/README.md``): a folder of ``.npz`` files, or one ``.npz`` file. Each
file holds one array per model input, named exactly like the input, with the batch
(sample) axis first; all arrays of a file hold the same number of samples. A file is one
batch, or is split into batches of ``batch_size`` samples along axis 0. An input the model
gives no batch axis (Flux's 2-D ``img_ids``/``txt_ids``: a leading dim that is not the batch
dim of the other inputs, see :func:`shared_inputs`) is *shared*: saved with its own shape,
passed whole to every batch, never split.

* :func:`load_calibration` reads only the array headers (names, dtypes, shapes), never
  the data; :func:`iter_batches` streams the data one file at a time.
* :func:`check_calibration` checks names, dtypes, ranks and static dims against a model
  before any work is done. Data is never cast: a dtype mismatch is an error.
* :func:`random_calibration` makes labelled random inputs, only when asked for.
* :func:`split_calibration` holds out batches for verification; :func:`as_data_reader`
  adapts a set to ONNX Runtime's ``CalibrationDataReader`` protocol.
* :func:`text_batches` and :func:`image_batches` turn texts (with a ``tokenizer.json``)
  and image files into batches; the CLI (``compress calib text|images``) writes them.

Submodules (each imports its siblings directly, never this package):

* :mod:`compress.calibration.npz`: one ``.npz`` file: headers (:func:`read_npz_header`) and data.
* :mod:`compress.calibration.source`: :class:`CalibrationSet`, :func:`load_calibration`,
  :func:`iter_batches`, :func:`split_calibration`, the ORT reader.
* :mod:`compress.calibration.check`: the model's inputs and :func:`check_calibration`.
* :mod:`compress.calibration.random`: :func:`random_calibration`.
* :mod:`compress.calibration.text`: tokenized texts (:func:`text_batches`).
* :mod:`compress.calibration.images`: preprocessed images (:func:`image_batches`).
"""

from __future__ import annotations

from compress.calibration.check import check_calibration, load_calibration_for, model_input_types, shared_inputs
from compress.calibration.images import (
    IMAGE_SUFFIXES,
    MAX_IMAGE_ASPECT,
    MAX_IMAGE_PIXELS,
    MAX_IMAGE_SIDE,
    ImageOptions,
    find_images,
    image_batches,
    parse_floats,
    preprocess_image,
)
from compress.calibration.npz import (
    MAX_ARRAYS,
    MAX_DEFLATE_RATIO,
    MAX_FILE_BYTES,
    ArraySpec,
    CalibrationFile,
    read_npz_header,
)
from compress.calibration.random import (
    DEFAULT_RANDOM_INT_HIGH,
    MAX_RANDOM_BATCHES,
    MAX_RANDOM_ELEMENTS,
    random_calibration,
    static_batch,
)
from compress.calibration.source import (
    LABELS,
    CalibrationBatch,
    CalibrationReader,
    CalibrationSet,
    as_data_reader,
    describe,
    iter_batches,
    iter_labels,
    load_calibration,
    relabel,
    split_calibration,
    summarize_batches,
    with_labels,
)
from compress.calibration.text import MAX_TEXT_LENGTH, TextOptions, load_tokenizer, split_texts, text_batches

__all__ = [
    "DEFAULT_RANDOM_INT_HIGH", "IMAGE_SUFFIXES", "LABELS", "MAX_ARRAYS", "MAX_DEFLATE_RATIO", "MAX_FILE_BYTES",
    "MAX_IMAGE_ASPECT", "MAX_IMAGE_PIXELS", "MAX_IMAGE_SIDE", "MAX_RANDOM_BATCHES", "MAX_RANDOM_ELEMENTS",
    "MAX_TEXT_LENGTH", "ArraySpec", "CalibrationBatch", "CalibrationFile", "CalibrationReader", "CalibrationSet",
    "ImageOptions", "TextOptions", "as_data_reader", "check_calibration", "describe", "find_images", "image_batches",
    "iter_batches", "iter_labels", "load_calibration", "load_calibration_for", "load_tokenizer", "model_input_types",
    "parse_floats", "preprocess_image",
    "random_calibration", "read_npz_header", "relabel", "shared_inputs", "split_calibration", "split_texts", "static_batch",
    "summarize_batches", "text_batches", "with_labels",
]
