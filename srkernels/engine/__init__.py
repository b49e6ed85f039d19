"""Training, evaluation and inference for the model zoo (the library behind ``python/train.py``,
``python/test.py`` and ``srkernels upscale|eval|convert``).

* ``config``: YAML recipes, validated, with ``key=value`` overrides.
* ``trainer.train``: the train loop (AMP, channels_last, EMA, grad clipping, DDP, exact resume).
* ``checkpoint``: atomic checkpoints, RNG states, ``load_model`` for any weights the library reads.
* ``evaluate``: PSNR/SSIM per set with a bicubic baseline, Markdown table.
* ``inference.Upscaler``: RGB in, RGB out for every model; tiling, self-ensemble, chop.
* ``sample_data``: photographs bundled with scikit-image as training/held-out folders.
"""
from .checkpoint import load_model
from .config import ConfigError, load_config
from .evaluate import DatasetSpec, evaluate, evaluate_bicubic, markdown_table, resolve_dataset
from .inference import Upscaler, rgb_to_ycbcr, tiled, ycbcr_to_rgb
from .trainer import EMA, TrainResult, train

__all__ = [
    "train", "TrainResult", "EMA", "load_config", "ConfigError", "load_model", "evaluate", "evaluate_bicubic",
    "markdown_table", "resolve_dataset", "DatasetSpec", "Upscaler", "tiled", "rgb_to_ycbcr", "ycbcr_to_rgb",
]
