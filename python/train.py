"""Train a model from a YAML recipe: ``python python/train.py python/configs/rcan_x4.yaml [--set key=value]``.

A thin wrapper over ``srkernels.toolkit.commands.train_main`` (see python/README.md). DDP:
``torchrun --nproc_per_node 2 python/train.py CONFIG``.
"""
import os
import sys

# run from a source checkout without installing: put the repository root on the path
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from srkernels.toolkit.commands import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main(prog="train.py"))
