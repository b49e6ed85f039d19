"""The SR toolkit: data, metrics, training, evaluation and inference for the model zoo (the library behind
``python/train.py``, ``python/test.py`` and ``srkernels upscale|eval|convert``).

It is built on the kernel library (``srkernels.models``, ``nn``, ``ops``), which never imports it back.

* ``data``: MATLAB-exact ``imresize``, image I/O, the paired HR/LR folder dataset, benchmark folder layouts.
* ``metrics``: PSNR / SSIM on the Y channel with the field's conventions.
* ``config``: YAML recipes, validated, with ``key=value`` overrides.
* ``trainer.train``: the train loop (AMP, channels_last, EMA, grad clipping, DDP, exact resume).
* ``checkpoint``: atomic checkpoints, RNG states, ``load_model`` for any weights the library reads.
* ``evaluate``: PSNR/SSIM per set with a bicubic baseline, Markdown table.
* ``inference.Upscaler``: RGB in, RGB out for every model; tiling, self-ensemble, chop.
* ``sample_data``: photographs bundled with scikit-image as training/held-out folders.
* ``commands``: argument parsing and ``main`` functions of the command-line tools.
"""
from .checkpoint import load_model
from .config import ConfigError, load_config
from .data import (
    IMAGE_EXTENSIONS, PairedImageFolder, dihedral, find_dataset_dirs, find_lr_file, folder_layouts, imresize,
    load_image, modcrop, quantize_uint8, save_image, to_uint8,
)
from .evaluate import DatasetSpec, SetResult, evaluate, evaluate_bicubic, markdown_table, resolve_dataset
from .inference import Upscaler, rgb_to_ycbcr, tiled, ycbcr_to_rgb
from .metrics import psnr, rgb_to_y, ssim
from .trainer import EMA, TrainResult, train

__all__ = [
    # training
    "train", "TrainResult", "EMA", "load_config", "ConfigError",
    # weights, evaluation, inference
    "load_model", "evaluate", "evaluate_bicubic", "markdown_table", "resolve_dataset", "DatasetSpec", "SetResult",
    "Upscaler", "tiled", "rgb_to_ycbcr", "ycbcr_to_rgb",
    # data
    "imresize", "quantize_uint8", "to_uint8", "modcrop", "dihedral", "load_image", "save_image", "find_lr_file",
    "PairedImageFolder", "folder_layouts", "find_dataset_dirs", "IMAGE_EXTENSIONS",
    # metrics
    "psnr", "ssim", "rgb_to_y",
]
