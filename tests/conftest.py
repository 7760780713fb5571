"""Test-wide settings, and the data that many test files share.

Settings, applied before anything imports triton or deepspeed:
- No CUDA device: Triton kernels run in the interpreter (TRITON_INTERPRET=1, numpy on CPU
  tensors), and DeepSpeed uses its CPU accelerator.
- One intra-op thread per process (subprocesses inherit it): the tensors here are tiny, and
  two OpenMP threads per process wait on each other whenever another process holds a core.
  pytest-xdist runs test processes side by side instead (``-n auto``, at most
  ``MAX_WORKERS``; ``-n 0`` runs in this process).

Shared data (session-scoped): built once per test run. Under pytest-xdist the workers share
one folder, and the first to ask builds it under a file lock while the others wait for it.
Tests read shared data and never write into it; a test that changes data copies it first.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from filelock import FileLock  # noqa: E402

from helpers import prepared, train, train_small  # noqa: E402

# Each worker holds torch, DeepSpeed and spaCy (~1 GB) and some tests launch two ranks: more
# workers than this buys little on a laptop and risks memory on a large machine.
MAX_WORKERS = 4


def pytest_xdist_auto_num_workers(config):
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


def pytest_itemcollected(item):
    """A test that uses a module-scoped fixture runs in the worker that holds it
    (``--dist loadgroup``), so the fixture is built once; the others go wherever a worker is
    free. (Marked here, as each test is collected, before pytest-xdist reads the groups.)"""
    defs = item._fixtureinfo.name2fixturedefs.values()
    if any(d[-1].scope == "module" for d in defs):
        item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def _group(item) -> str:
    mark = item.get_closest_marker("xdist_group")
    return mark.args[0] if mark else item.nodeid


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
    # Long work first: pytest-xdist hands out tests (a group at a time) in this order, so a
    # group that holds a slow test starts at once instead of ending the run alone.
    slow = {_group(item) for item in items if "slow" in item.keywords}
    items.sort(key=lambda item: _group(item) not in slow)


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder ``name`` of this test run, filled by ``build(path)`` the first time any
    test process asks for it."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    path = root / f"shared-{name}"
    with FileLock(f"{path}.lock"):
        if not (path / ".built").exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            build(path)
            (path / ".built").touch()
    return path


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """A prepared corpus of 200 synthetic people (its source in ``data.parent / "synth"``) with a
    512-piece tokenizer: what the training tests train on."""
    return built_once(tmp_path_factory, "train-data", lambda root: prepared(root, 200, seed=3, vocab=512)) / "prep"


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The small tokenizer (helpers.train_small, seed 0) of the cascade, eval and export tests."""
    from lacy_fast.data.tokenizer import Tokenizer

    root = built_once(tmp_path_factory, "tokenizer", lambda path: train_small(path, seed=0))
    return Tokenizer.load(root / "t.model")


@pytest.fixture(scope="session")
def nlp():
    """spaCy's English pipeline, every component loaded."""
    from lacy_fast.data.labeling import load_spacy

    return load_spacy(full=True)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data) -> Path:
    """A finished `lacy-fast train` run on ``data``: 2 steps at the helpers' SMALL size, a
    checkpoint after each (two kept). Tests copy it before they rerun or damage it."""
    return built_once(tmp_path_factory, "trained-run", lambda root: train(
        root / "run", data, "train.max_steps=2", "train.ckpt_every=1", "train.keep_last=2")) / "run"
