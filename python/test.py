"""Evaluate checkpoints on image folders and print a Markdown PSNR/SSIM table with a bicubic column:
``python python/test.py --weights runs/rcan_x4 --data datasets/Set5/HR``.

A thin wrapper over ``srkernels.toolkit.commands.eval_main`` (``srkernels eval`` is the same command).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from srkernels.toolkit.commands import eval_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(eval_main(prog="test.py"))
