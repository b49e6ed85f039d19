"""Drives CMakeLists.txt (the one build description) to build srkernels._C; see README "Build options".

The cmake and ninja used are those of the ``cmake`` / ``ninja`` PyPI packages installed for the Python running
this build (what ``pyproject.toml`` requires), not whatever comes first on PATH: ``venv/bin/pip install .``
without an activated venv must not pick up an older system CMake. A CMake on PATH is used only when the package
is missing and it is new enough.

Environment: SRKERNELS_CUDA (auto|0|1), SRKERNELS_CPU_CAPABILITIES (space-separated subset of the CPU capabilities
to compile, e.g. "default avx2"; unset: CMakeLists.txt's default, all), SRKERNELS_BUILD_TYPE (Release),
TORCH_CUDA_ARCH_LIST and CUDA_HOME (read by CMakeLists.txt), MAX_JOBS, CMAKE_ARGS (extra cmake arguments,
shell-quoted), SRKERNELS_BUILD_DIR (the CMake build tree; default build/cmake.<python tag>-torch<version>-abi<0|1>).

torch is not installed by this build: it compiles against the torch already installed for the running Python
(``pip install --no-build-isolation .``), and records that torch's version and C++ ABI flag next to the module
(srkernels/_build_config.py) so that importing srkernels under another torch is one clear error.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _cmake_minimum() -> tuple[int, ...]:
    text = (ROOT / "CMakeLists.txt").read_text()
    m = re.search(r"cmake_minimum_required\s*\(\s*VERSION\s+([0-9.]+)", text, re.IGNORECASE)
    return tuple(int(p) for p in m.group(1).split(".")) if m else (3, 0)


def _version_of(exe: str) -> tuple[int, ...]:
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return ()
    m = re.search(r"version\s+([0-9]+(?:\.[0-9]+)*)", out)
    return tuple(int(p) for p in m.group(1).split(".")) if m else ()


def _from_package(module: str, attr: str, exe: str) -> str | None:
    """``<module>.<attr>/<exe>`` of the installed PyPI package (cmake.CMAKE_BIN_DIR, ninja.BIN_DIR)."""
    try:
        mod = __import__(module)
    except ImportError:
        return None
    path = Path(getattr(mod, attr, "") or "") / (exe + (sysconfig.get_config_var("EXE") or ""))
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def _need(what: str, why: str) -> None:
    sys.exit(
        f"srkernels build: {why}.\n"
        f"  Install {what} for the Python that runs this build:\n"
        f"    {sys.executable} -m pip install 'cmake>=3.30' ninja\n"
        f"  (pip install . without --no-build-isolation installs them into its build environment itself.)"
    )


def find_cmake() -> str:
    exe = _from_package("cmake", "CMAKE_BIN_DIR", "cmake")
    if exe:
        return exe
    need = _cmake_minimum()
    on_path = shutil.which("cmake")
    have = _version_of(on_path) if on_path else ()
    if on_path and have >= need:
        return on_path
    found = f"the cmake on PATH ({on_path}) is {'.'.join(map(str, have)) or 'unusable'}" if on_path else \
        "there is none on PATH"
    _need("the cmake package", f"no CMake >= {'.'.join(map(str, need))}: the 'cmake' Python package is not "
                               f"installed for {sys.executable} and {found}")


def find_ninja() -> str:
    exe = _from_package("ninja", "BIN_DIR", "ninja") or shutil.which("ninja")
    if not exe:
        _need("the ninja package", f"no Ninja: the 'ninja' Python package is not installed for {sys.executable} "
                                   "and there is none on PATH")
    return exe


def cuda_compiler(build_dir: Path) -> str | None:
    """The nvcc to configure with: CUDACXX, else $CUDA_HOME/bin/nvcc, else the one this build tree already uses.

    Passed to CMake every time: a tree configured with CUDA_HOME set and reconfigured without it (e.g. `pip wheel`
    after scripts/setup.sh) would otherwise find the first nvcc on PATH, and a changed CMAKE_CUDA_COMPILER makes
    CMake delete the tree's whole cache.
    """
    if os.environ.get("CUDACXX"):
        return os.environ["CUDACXX"]
    home = os.environ.get("CUDA_HOME")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    cache = build_dir / "CMakeCache.txt"
    if cache.is_file():
        m = re.search(r"^CMAKE_CUDA_COMPILER:[A-Z]*=(.+)$", cache.read_text(errors="replace"), re.M)
        if m and Path(m.group(1)).is_file():
            return m.group(1)
    return None


def torch_tag(torch) -> str:
    """``torch2.14.1_cu130-abi1``: what a build tree is keyed by (version with its local tag, C++ ABI flag)."""
    version = re.sub(r"[^0-9A-Za-z.]+", "_", torch.__version__)
    return f"torch{version}-abi{int(torch._C._GLIBCXX_USE_CXX11_ABI)}"


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        try:
            import torch  # the torch installed for this Python is the one the extension is compiled against
        except ImportError:
            sys.exit(f"srkernels build: torch is not installed for {sys.executable}. Install the torch you want "
                     "first (e.g. pip install torch), then: pip install --no-build-isolation .")
        # One persistent build tree per Python and torch, whatever asked for the build: setuptools gives an
        # editable install (pip install -e) a fresh temporary build_temp every time, so building there would
        # recompile everything on every install and share nothing with a later `pip wheel .`. Ninja tracks
        # command lines, so a changed option rebuilds what it must; another torch (another venv, an upgrade)
        # gets a tree of its own, so objects compiled against one torch are never linked against another, and
        # switching back and forth stays incremental.
        tag = f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}-{torch_tag(torch)}"
        build_dir = Path(os.environ.get("SRKERNELS_BUILD_DIR") or ROOT / "build" / f"cmake.{tag}").resolve()
        lib_dir = build_dir / "lib"
        lib_dir.mkdir(parents=True, exist_ok=True)

        cmake, ninja = find_cmake(), find_ninja()
        print(f"srkernels build: cmake {cmake}, ninja {ninja}, build tree {build_dir}", flush=True)
        version = self.distribution.get_version()
        cfg = [
            cmake, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja",
            f"-DCMAKE_MAKE_PROGRAM={ninja}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={lib_dir}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('SRKERNELS_BUILD_TYPE', 'Release')}",
            f"-DSRKERNELS_CUDA={os.environ.get('SRKERNELS_CUDA', 'auto')}",
            f"-DSRKERNELS_VERSION={version}",
        ]
        nvcc = cuda_compiler(build_dir) if os.environ.get("SRKERNELS_CUDA", "auto") != "0" else None
        if nvcc:
            cfg.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        caps = os.environ.get("SRKERNELS_CPU_CAPABILITIES")
        # The build tree persists: an unset variable must not leave an earlier narrowing in the CMake cache.
        cfg.append(f"-DSRKERNELS_CPU_CAPABILITIES={caps}" if caps else "-USRKERNELS_CPU_CAPABILITIES")
        if os.environ.get("SRKERNELS_CPU_ISA"):
            print("srkernels build: SRKERNELS_CPU_ISA is obsolete and ignored: every CPU capability is compiled "
                  "and one is chosen at load time (narrow with SRKERNELS_CPU_CAPABILITIES, force one at run time "
                  "with SRKERNELS_CPU_CAPABILITY)", file=sys.stderr, flush=True)
        cfg += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        # A tree named by SRKERNELS_BUILD_DIR may have been built against another torch (or Python, or nvcc):
        # start it afresh then, rather than trust timestamps to rebuild every object. The environment is named
        # by sys.prefix, not sys.executable: `.venv/bin/pip` (python3) and `.venv/bin/python -m pip` are one venv.
        stamp = build_dir / "srkernels-built-for.txt"
        built_for = f"{sys.prefix} {torch.__version__} abi{int(torch._C._GLIBCXX_USE_CXX11_ABI)} nvcc={nvcc}"
        previous = stamp.read_text().strip() if stamp.is_file() else None
        fresh = previous is not None and previous != built_for
        if fresh:
            print(f"srkernels build: {build_dir} was built for {previous}, now {built_for}: reconfiguring and "
                  "rebuilding it from scratch", flush=True)
            cfg.insert(1, "--fresh")
        stamp.unlink(missing_ok=True)
        subprocess.run(cfg, check=True)
        if fresh:
            subprocess.run([cmake, "--build", str(build_dir), "--target", "clean"], check=True)
        stamp.write_text(built_for + "\n")
        build = [cmake, "--build", str(build_dir), "--target", "_C"]
        jobs = os.environ.get("MAX_JOBS")
        if jobs:
            build += ["-j", jobs]
        subprocess.run(build, check=True)

        built = lib_dir / target.name
        if not built.is_file():
            sys.exit(f"srkernels build: CMake did not produce {built} (found: {sorted(p.name for p in lib_dir.iterdir())})")
        config = build_dir / "_build_config.py"  # written by CMake: the torch _C was compiled against
        if not config.is_file():
            sys.exit(f"srkernels build: CMake did not write {config}")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(built, target)
        # next to _C: srkernels/_backend.py reads it before loading _C (a mismatched torch is a clear error)
        shutil.copy2(config, target.with_name("_build_config.py"))
        self._srk_configs = getattr(self, "_srk_configs", {})
        self._srk_configs[ext.name] = config

    def copy_extensions_to_source(self) -> None:
        # In-place builds (pip install -e, build_ext --inplace) copy only the module itself into the source tree;
        # the record of the torch it was built against must go with it.
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        for name, config in getattr(self, "_srk_configs", {}).items():
            package_dir = Path(build_py.get_package_dir(name.rpartition(".")[0]))
            shutil.copy2(config, package_dir / "_build_config.py")


setup(ext_modules=[CMakeExtension("srkernels._C")], cmdclass={"build_ext": CMakeBuild})
