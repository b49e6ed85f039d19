"""Argument parsing and ``main`` functions behind ``python/train.py``, ``python/test.py`` and the
``srkernels upscale|eval|convert`` subcommands (the scripts and ``cli.py`` only call these)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from .._validate import DTYPES
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


class UserError(Exception):
    """A problem with the command's input: printed as one line, exit status 2."""


# what a command reports in one line (exit status 2) instead of a traceback: bad arguments and files
# (ValueError, TypeError, including CheckpointError and ConfigError), files that cannot be read or written
# (OSError), and what an input too large for the machine causes (MemoryError; RuntimeError is how torch
# reports a failed allocation, and also its other refusals of an input)
USER_ERRORS = (UserError, ValueError, TypeError, OSError, RuntimeError, MemoryError)


def _one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (some messages list several problems, one per line)."""
    msg = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()).replace(":;", ":")
    return f"{type(e).__name__}: {msg}" if isinstance(e, (MemoryError, RuntimeError)) or not msg else msg


def _fail(prog: str, e: BaseException) -> int:
    print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
    return 2


def _int_arg(minimum: int, what: str):
    """An argparse ``type``: an integer >= ``minimum`` (``what`` names it in the error)."""
    def parse(v: str) -> int:
        try:
            i = int(v)
        except ValueError:
            i = None
        if i is None or i < minimum:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v!r}")
        return i

    return parse


_positive = _int_arg(1, "a positive integer")
_nonneg = _int_arg(0, "an integer >= 0")


def _parse(args: Any, argv: Sequence[str] | None, prog: str, add_arguments, description: str) -> Any:
    """``args`` as parsed by ``srkernels <command>`` (cli.py), or ``argv`` parsed here (standalone scripts)."""
    if args is not None:
        return args
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(p)
    return p.parse_args(argv)


def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"--device {name!r} is not a device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine")
    return dev


# ---------------------------------------------------------------------------------------------- train


def train_parser(prog: str = "train.py") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train an srkernels model from a YAML recipe (python/configs/). Under torchrun "
        "(--nproc_per_node N) it runs DDP: gloo on CPU, nccl on GPU.",
    )
    p.add_argument("config", nargs="?", help="YAML config (optional with --resume: the run's saved config is used)")
    p.add_argument("--output-dir", "-o", help="run directory (default: config output_dir or runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its newest good checkpoint")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (YAML), e.g. --set train.iterations=1000; repeatable")
    p.add_argument("--stop-after", type=_positive, metavar="N", help="stop (with a checkpoint) after iteration N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def train_main(argv: Sequence[str] | None = None, prog: str = "train.py") -> int:
    from .trainer import train

    args = train_parser(prog).parse_args(argv)
    if args.config is None and not args.resume:
        return _fail(prog, ValueError("a config file is required (or --resume with --output-dir)"))
    if args.config is None and args.output_dir is None:
        return _fail(prog, ValueError("--resume without a config needs --output-dir"))
    try:
        res = train(args.config, overrides=args.overrides, output_dir=args.output_dir, resume=args.resume,
                    stop_after=args.stop_after, progress=not args.no_progress)
    except (*USER_ERRORS, FloatingPointError) as e:  # FloatingPointError: the loss diverged
        return _fail(prog, e)
    except KeyboardInterrupt:  # checkpoints are published atomically: the last one is whole
        print(f"{prog}: interrupted; run it again with --resume to continue from the last checkpoint",
              file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        best = res.best.get("psnr")
        msg = f"{res.run_dir}: iteration {res.iteration}"
        if best is not None and best > float("-inf"):
            msg += f", best validation PSNR {best:.3f} dB at iteration {res.best['iteration']}"
        print(msg)
    return 0


# ---------------------------------------------------------------------------------------------- test / eval


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", "-w", nargs="+", required=True, metavar="FILE",
                   help="checkpoints: run dirs, iter_*.pt, .safetensors (save_pretrained) or upstream files")
    p.add_argument("--model", "-m", nargs="+", metavar="NAME",
                   help="architecture (one for all weights, or one per weights); needed for upstream files")
    p.add_argument("--scale", "-s", nargs="+", type=_positive, metavar="S",
                   help="scale (one for all weights, or one per weights); needed for upstream files")
    p.add_argument("--source", default="auto", help="upstream layout for load_pretrained (default: auto)")
    p.add_argument("--data", "-d", nargs="+", default=[], metavar="DIR",
                   help="folders of HR images (LR made with MATLAB bicubic), or skimage:NAME,NAME,...")
    p.add_argument("--root", help="benchmark root for --sets (layouts of srkernels.toolkit.data.folder_layouts)")
    p.add_argument("--sets", nargs="+", default=[], metavar="SET", help="e.g. Set5 Set14 B100 Urban100 (with --root)")
    p.add_argument("--self-ensemble", action="store_true", help="x8 flip/transpose self-ensemble (RCAN+)")
    p.add_argument("--chop", action="store_true", help="official RCAN chop forward (10 px shave, 160000 px tiles)")
    p.add_argument("--tile", type=_positive, help="tiled forward with this LR tile size")
    p.add_argument("--overlap", type=_nonneg, default=16, help="tile overlap in LR pixels (default 16)")
    p.add_argument("--quantize", action="store_true", help="round SR to uint8 levels before measuring (official RCAN)")
    p.add_argument("--y-coeffs", choices=["bt601", "typo64738"], default="bt601",
                   help="Y convention: bt601 (MATLAB) or typo64738 (yjn870 / HEEJOWOO / super-image)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="autocast dtype for the network")
    p.add_argument("--reference", action="store_true", help="reference layers instead of fused ones")
    p.add_argument("--no-bicubic", action="store_true", help="leave out the bicubic column")
    p.add_argument("--per-image", action="store_true", help="also print per-image PSNR/SSIM")
    p.add_argument("--digits", type=_nonneg, default=2, help="PSNR decimals in the table (default 2)")
    p.add_argument("--progress", action="store_true", help="progress bar per set")


def _per_weight(values: list | None, n: int, what: str) -> list:
    if not values:
        return [None] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise UserError(f"give one {what} for all weights or one per weights ({n}), got {len(values)}")
    return list(values)


def _column_names(paths: list[str]) -> list[str]:
    names = []
    for w in paths:
        p = Path(w)
        n = p.name if p.is_dir() else p.stem
        if n in names or n.startswith("iter_") or n in ("model", "best"):
            n = f"{p.parent.name}/{n}" if not p.is_dir() else n
        while n in names:
            n += "'"
        names.append(n)
    return names


def eval_main(argv: Sequence[str] | None = None, prog: str = "test.py", args: Any = None) -> int:
    from ..models.convert import CheckpointError
    from .checkpoint import load_model
    from .evaluate import evaluate, evaluate_bicubic, markdown_table, resolve_dataset

    args = _parse(args, argv, prog, add_eval_arguments, "Evaluate SR checkpoints: Markdown table of Y PSNR/SSIM "
                  "(crop = scale) per set and scale, with a bicubic column.")
    try:
        if not args.data and not args.sets:
            raise UserError("nothing to evaluate on: give --data DIR... and/or --root ROOT --sets SET...")
        if args.sets and not args.root:
            raise UserError("--sets needs --root")
        if args.chop and args.tile:
            raise UserError("--chop and --tile are exclusive")
        device = _device(args.device)
        n = len(args.weights)
        archs = _per_weight(args.model, n, "--model")
        scales = _per_weight(args.scale, n, "--scale")
        models = []
        for w, a, s in zip(args.weights, archs, scales):
            try:
                m = load_model(w, a, s, source=args.source, fused=not args.reference)
            except (CheckpointError, FileNotFoundError) as e:
                raise UserError(str(e)) from None
            models.append(m.to(device))
        columns: dict[str, list] = {}
        bicubic: list = []
        done_scales: set[int] = set()
        for name, model in zip(_column_names(args.weights), models):
            specs = [resolve_dataset(d, model.scale) for d in args.data]
            specs += [resolve_dataset({"root": args.root, "set": s}, model.scale) for s in args.sets]
            res = evaluate(model, specs, y_coeffs=args.y_coeffs, quantize=args.quantize, progress=args.progress,
                           tile=args.tile, overlap=args.overlap, ensemble=args.self_ensemble, chop=args.chop,
                           dtype=DTYPES[args.dtype])
            columns[name] = res
            if model.scale not in done_scales and not args.no_bicubic:
                bicubic += evaluate_bicubic(specs, model.scale, y_coeffs=args.y_coeffs, quantize=args.quantize)
                done_scales.add(model.scale)
    except USER_ERRORS as e:
        return _fail(prog, e)
    opts = [f"Y {args.y_coeffs}", "crop = scale", "uint8-quantised SR" if args.quantize else "float SR"]
    if args.self_ensemble:
        opts.append("x8 self-ensemble")
    if args.chop:
        opts.append("chop forward")
    if args.tile:
        opts.append(f"tiles {args.tile}+{args.overlap}")
    print(f"PSNR (dB) / SSIM; {', '.join(opts)}\n")
    print(markdown_table(columns, None if args.no_bicubic else bicubic, digits=args.digits))
    if args.per_image:
        for col, res in columns.items():
            for r in res:
                print(f"\n{col} on {r.name} x{r.scale}:")
                for img, p_, s_ in r.per_image:
                    print(f"  {img:24s} {p_:8.4f} {s_:.6f}")
    return 0


# ---------------------------------------------------------------------------------------------- upscale


def _sidecar(path: Path) -> dict:
    import json

    try:
        info = json.loads(path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def shipped_weights() -> dict[int, Path]:
    """scale -> the safetensors file shipped in ``srkernels/weights`` (trained by python/train.py)."""
    out: dict[int, Path] = {}
    if not WEIGHTS_DIR.is_dir():
        return out
    for p in sorted(WEIGHTS_DIR.glob("*.safetensors")):
        info = _sidecar(p)
        if isinstance(info.get("scale"), int) and isinstance(info.get("arch"), str):
            out[info["scale"]] = p
    return out


def add_upscale_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="image file or folder of images")
    p.add_argument("output", nargs="?",
                   help="output file (or folder for a folder input); default: <input>_x<S>.png / <input>_x<S>/")
    p.add_argument("--model", "-m", help="architecture (default: the shipped model's)")
    p.add_argument("--scale", "-s", type=_positive, help="scale factor (default: the weights' scale, or 4 for the shipped model)")
    p.add_argument("--weights", "-w", help="checkpoint (default: the small model shipped with srkernels)")
    p.add_argument("--source", default="auto", help="upstream layout for load_pretrained (default: auto)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="autocast dtype for the network")
    p.add_argument("--tile", type=_positive, default=256, help="LR tile size in pixels (default 256; see --no-tile)")
    p.add_argument("--overlap", type=_nonneg, default=16, help="tile overlap in LR pixels (default 16)")
    p.add_argument("--no-tile", action="store_true", help="one forward over the whole image")
    p.add_argument("--self-ensemble", action="store_true", help="x8 self-ensemble (8x slower)")
    p.add_argument("--reference", action="store_true", help="reference layers instead of fused ones")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _resolve_model(args) -> torch.nn.Module:
    from ..models import resolve
    from ..models.convert import CheckpointError
    from .checkpoint import load_model

    if args.model is not None:
        resolve(args.model)  # unknown names fail here with the list of known ones
    if args.weights is None:
        shipped = shipped_weights()
        if not shipped:
            raise UserError("no weights given and no shipped weights found in the package; pass --weights FILE")
        scale = args.scale or (4 if 4 in shipped else max(shipped))
        if scale not in shipped:
            raise UserError(f"scale {scale} has no shipped weights (shipped: "
                            f"{', '.join(f'x{s}' for s in sorted(shipped))}); pass --weights FILE for other scales")
        path = shipped[scale]
        arch = _sidecar(path).get("arch")
        if args.model is not None and resolve(args.model)[0] is not resolve(arch)[0]:
            raise UserError(f"no shipped weights for --model {args.model} (the shipped model is {arch}); "
                            "pass --weights FILE")
    else:
        path = args.weights
        scale = args.scale
    try:
        model = load_model(path, args.model, scale, source=args.source, fused=not args.reference)
    except FileNotFoundError as e:
        raise UserError(str(e)) from None
    except CheckpointError as e:
        raise UserError(f"wrong or unreadable weights: {e}") from None
    return model


def _plan(args, scale: int) -> list[tuple[Path, Path]]:
    from .data import IMAGE_EXTENSIONS

    src = Path(args.input)
    if not src.exists():
        raise UserError(f"input not found: {src}")
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise UserError(f"input folder {src} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        out_dir = Path(args.output) if args.output else src.with_name(f"{src.name}_x{scale}")
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"output {out_dir} exists and is not a folder")
        if out_dir.resolve() == src.resolve():
            raise UserError("the output folder must differ from the input folder (inputs are never replaced)")
        stems: dict[str, Path] = {}
        for f in files:
            if f.stem in stems:
                raise UserError(f"{f.name} and {stems[f.stem].name} would both be written as {f.stem}.png")
            stems[f.stem] = f
        pairs = [(f, out_dir / f"{f.stem}.png") for f in files]
    else:
        if args.output:
            out = Path(args.output)
            if out.is_dir():
                out = out / f"{src.stem}_x{scale}.png"
        else:
            out = src.with_name(f"{src.stem}_x{scale}.png")
        pairs = [(src, out)]
    for f, o in pairs:
        if o.resolve() == f.resolve():
            raise UserError(f"output {o} is the input file; inputs are never replaced")
    if not args.overwrite:
        existing = [str(o) for _, o in pairs if o.exists()]
        if existing:
            shown = ", ".join(existing[:5]) + (f" and {len(existing) - 5} more" if len(existing) > 5 else "")
            raise UserError(f"output exists: {shown}; pass --overwrite to replace")
    from PIL import Image

    for _, o in pairs:
        if Image.registered_extensions().get(o.suffix.lower()) is None:
            raise UserError(f"output {o}: unknown image extension {o.suffix!r}")
    return pairs


def _upscale_file(up, src: Path, dst: Path, bar, overwrite: bool) -> None:
    from .data import imresize, load_image, save_image, to_uint8

    img = load_image(src, mode=None)  # keeps grey / grey+alpha / RGB / RGBA
    c = img.shape[0]
    rgb = img[:3] if c >= 3 else img[:1].expand(3, -1, -1)
    out = up(rgb, out_dtype=torch.uint8, on_tile=(lambda: bar.update(1)) if bar is not None else None)
    if c <= 2:
        out = torch.round(out.float().mean(0, keepdim=True)).to(torch.uint8)  # grey in, grey out
    if c in (2, 4):  # alpha is upsampled with bicubic, not by the network
        alpha = to_uint8(imresize(img[c - 1:c], up.scale).clamp(0, 1))
        out = torch.cat([out, alpha], 0)
    try:  # atomic; without overwrite, a file that appeared since the up-front check is not replaced either
        save_image(out, dst, overwrite=overwrite)
    except FileExistsError:
        raise UserError(f"output exists: {dst}; pass --overwrite to replace") from None


def upscale_main(argv: Sequence[str] | None = None, prog: str = "srkernels upscale", args: Any = None) -> int:
    from .inference import Upscaler

    args = _parse(args, argv, prog, add_upscale_arguments, "Upscale an image or a folder of images")
    try:
        device = _device(args.device)
        model = _resolve_model(args).to(device)
        pairs = _plan(args, model.scale)
        up = Upscaler(model, tile=None if args.no_tile else args.tile, overlap=args.overlap,
                      ensemble=args.self_ensemble, dtype=DTYPES[args.dtype])
    except USER_ERRORS as e:
        return _fail(prog, e)
    from .._io import remove_stale_temp_files

    for folder in sorted({dst.parent for _, dst in pairs}):
        for p in remove_stale_temp_files(folder):  # left by an earlier run that was killed mid-write
            print(f"{prog}: removed stale temp file {p}", file=sys.stderr)
    bar = None
    failures = []
    for src, dst in pairs:
        try:
            if not args.no_progress:
                from PIL import Image
                from tqdm import tqdm

                try:
                    with Image.open(src) as im:
                        w, h = im.size
                    total = up.n_tiles(h, w)
                except Exception:
                    total = None
                bar = tqdm(total=total, desc=src.name, unit="tile", leave=False, file=sys.stderr)
            _upscale_file(up, src, dst, bar, args.overwrite)
            print(f"{src} -> {dst}")
        except USER_ERRORS as e:  # one image failing (unreadable, too large) does not stop the others
            failures.append(src)
            print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        finally:
            if bar is not None:
                bar.close()
    if failures:
        print(f"{prog}: {len(failures)} of {len(pairs)} image(s) failed", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------- convert


def add_convert_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", help="upstream checkpoint (or a training run / iter_*.pt)")
    p.add_argument("output", help="output .safetensors (a .json with the config is written beside it)")
    p.add_argument("--model", "-m", help="architecture (needed for upstream files)")
    p.add_argument("--scale", "-s", type=_positive, help="scale (needed for upstream files)")
    p.add_argument("--source", default="auto", help="upstream layout (default: auto)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")


def convert_main(argv: Sequence[str] | None = None, prog: str = "srkernels convert", args: Any = None) -> int:
    from ..models import save_pretrained
    from .checkpoint import load_model

    args = _parse(args, argv, prog, add_convert_arguments, "Convert a checkpoint to srkernels safetensors")
    try:
        out = Path(args.output)
        if out.suffix != ".safetensors":
            raise UserError(f"output must end in .safetensors, got {out}")
        if not args.overwrite and (out.exists() or out.with_suffix(".json").exists()):
            raise UserError(f"output exists: {out} (or its .json); pass --overwrite to replace")
        model = load_model(args.input, args.model, args.scale, source=args.source, fused=False)
        save_pretrained(model, out, overwrite=args.overwrite)
    except USER_ERRORS as e:
        return _fail(prog, e)
    print(f"{args.input} -> {out} ({type(model).__name__} x{model.scale})")
    return 0
