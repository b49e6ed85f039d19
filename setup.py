"""Drives CMakeLists.txt (the one build description) to build srkernels._C; see README "Build options"."""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        import torch  # noqa: F401  (fail early with a clear message if torch is missing)

        version = self.distribution.get_version()
        cfg = [
            "cmake", "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('SRKERNELS_BUILD_TYPE', 'Release')}",
            f"-DSRKERNELS_CUDA={os.environ.get('SRKERNELS_CUDA', 'auto')}",
            f"-DSRKERNELS_CPU_ISA={os.environ.get('SRKERNELS_CPU_ISA', 'avx512')}",
            f"-DSRKERNELS_VERSION={version}",
        ]
        subprocess.run(cfg, check=True)
        build = ["cmake", "--build", str(build_dir), "--target", "_C"]
        jobs = os.environ.get("MAX_JOBS")
        if jobs:
            build += ["-j", jobs]
        subprocess.run(build, check=True)


setup(ext_modules=[CMakeExtension("srkernels._C")], cmdclass={"build_ext": CMakeBuild})
