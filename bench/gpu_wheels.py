"""Prepare the folder of wheels ``make gpu-check`` installs from on a GPU machine that cannot
download anything.

    python bench/gpu_wheels.py --out gpu-wheels       # here, where a package registry is reached
    make gpu-check WHEELS=gpu-wheels                  # there, with the folder copied beside the checkout

That machine has Python 3.12, torch and triton (possibly older than the pins: torch 2.11
with triton 3.6) and a few common packages (numpy, psutil, py-cpuinfo, msgpack, einops,
ninja, nvidia-ml-py, tqdm, packaging, safetensors, sentencepiece, transformers), but no
spaCy, DeepSpeed or pydantic. The folder holds what the check adds, pinned below: the two
fused cross-entropy libraries it benchmarks against, pytest for the GPU-marked tests, and
DeepSpeed for the ``train`` stage, which runs the product's own Trainer, with the
dependencies DeepSpeed needs that the machine lacks (hjson, pydantic and its own). Three
kinds of wheel, each checked:

  pure    a pure-Python wheel from the registry (``*-none-any.whl``).
  cp312   a compiled wheel from the registry for CPython 3.12 on manylinux x86_64
          (pydantic-core); downloaded for that target, whatever Python runs this script.
  built   DeepSpeed, whose registry release is a source archive only: built here into a
          pure-Python wheel without its compiled ops (``DS_BUILD_OPS=0``, with this
          Python's torch, no build isolation); the ops DeepSpeed would need are compiled
          on first use, and the Trainer needs none (AdamW through torch.optim). A built
          wheel holding a compiled file is refused.
flash-attn is not among them: the registry has no wheel of it (only a source archive
that builds for an hour against a CUDA toolkit), so the check runs with it where it is
preinstalled and says so where it is not.

The folder must stay within 64 MiB (checked after the download; too big is an error and
the folder is left for inspection). A manifest, MANIFEST.json, lists each wheel with its
size and sha256; gpu_check.py verifies them before it installs anything.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lacy_fast.errors import UserError  # noqa: E402
from lacy_fast.fileio import sha256_of, write_json  # noqa: E402

LIMIT_BYTES = 64 * 2**20
MANIFEST = "MANIFEST.json"
# (distribution, version, kind, why): kinds in the module docstring; no dependency
# resolution beyond this list.
PACKAGES = [
    ("liger-kernel", "0.8.5", "pure", "benchmark provider liger-flce (needs torch, triton, packaging)"),
    ("cut-cross-entropy", "25.1.1", "pure", "benchmark providers cce and cce-exact (needs torch, triton)"),
    ("packaging", "26.3", "pure", "a dependency of liger-kernel and pytest"),
    ("typing-extensions", "4.16.0", "pure", "a dependency of cut-cross-entropy and pydantic"),
    ("pytest", "9.2.0", "pure", "the GPU-marked tests"),
    ("pluggy", "1.7.0", "pure", "a dependency of pytest"),
    ("iniconfig", "2.3.1", "pure", "a dependency of pytest"),
    ("pygments", "2.21.0", "pure", "a dependency of pytest"),
    ("deepspeed", "0.19.8", "built", "the Trainer's engine in the train stage (as constraints.txt pins it)"),
    ("hjson", "3.1.0", "pure", "a dependency of deepspeed"),
    ("pydantic", "2.14.4", "pure", "a dependency of deepspeed (its config)"),
    ("pydantic-core", "2.50.5", "cp312", "a dependency of pydantic (compiled)"),
    ("annotated-types", "0.8.0", "pure", "a dependency of pydantic"),
    ("typing-inspection", "0.4.5", "pure", "a dependency of pydantic"),
]
# The GPU machine's interpreter and platform, for the compiled wheels.
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
          "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]
CP312 = ("-cp312-cp312-", "manylinux", "x86_64.whl")


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def check_size(folder: Path, limit: int = LIMIT_BYTES) -> int:
    """Total bytes of the files in ``folder``; a UserError if they exceed ``limit``."""
    total = folder_bytes(folder)
    if total > limit:
        raise UserError(f"the wheel folder {folder} holds {total / 2**20:.1f} MiB, more than the "
                        f"{limit / 2**20:.0f} MiB a GPU check may bring; drop a package from PACKAGES")
    return total


def _pip(args: list[str], env: dict | None = None) -> None:
    proc = subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"], capture_output=True,
                          text=True, env=env)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"pip {args[0]} failed ({last}); this script needs a machine that reaches the registry")


def pip_download(specs: list[str], out: Path) -> None:
    """Wheels for the GPU machine's Python (TARGET), exactly the pinned list (no dependency resolution)."""
    _pip(["download", "--no-deps", "--only-binary=:all:", *TARGET, "--dest", str(out), *specs])


def build_without_ops(specs: list[str], out: Path) -> None:
    """DeepSpeed's source archive built into a pure-Python wheel with no compiled op."""
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        _pip(["download", "--no-deps", "--no-binary=:all:", "--dest", tmp, *specs])
        for sdist in sorted(Path(tmp).iterdir()):
            _pip(["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(out), str(sdist)], env=env)


def _normalized(wheel: Path) -> str:
    return wheel.name.split("-")[0].lower().replace("_", "-")


def check_kinds(wheels: list[Path]) -> None:
    """Each wheel is of the kind PACKAGES lists for it (module docstring); else a UserError."""
    kinds = {name: kind for name, _, kind, _ in PACKAGES}
    for wheel in wheels:
        kind = kinds.get(_normalized(wheel))
        if kind in ("pure", "built") and not wheel.name.endswith("-none-any.whl"):
            raise UserError(f"{wheel.name} is not a pure-Python wheel; it would not install on another Python or "
                            "platform")
        if kind == "cp312" and not all(part in wheel.name for part in CP312):
            raise UserError(f"{wheel.name} is not a CPython 3.12 manylinux x86_64 wheel, the GPU machine's")
        if kind == "built":
            with zipfile.ZipFile(wheel) as zf:
                compiled = [n for n in zf.namelist() if n.endswith((".so", ".pyd", ".dll", ".dylib"))]
            if compiled:
                raise UserError(f"{wheel.name} holds compiled files ({compiled[0]}); build it with DS_BUILD_OPS=0")


def main(argv: list[str] | None = None, download: Callable[[list[str], Path], None] = pip_download,
         build: Callable[[list[str], Path], None] = build_without_ops) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder to fill (created; must be empty)")
    args = parser.parse_args(argv)
    try:
        out = args.out
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} is not empty; give a new folder so nothing stale is carried along")
        out.mkdir(parents=True, exist_ok=True)
        download([f"{name}=={version}" for name, version, kind, _ in PACKAGES if kind != "built"], out)
        build([f"{name}=={version}" for name, version, kind, _ in PACKAGES if kind == "built"], out)
        wheels = sorted(out.glob("*.whl"))
        found = {_normalized(w) for w in wheels}
        absent = [name for name, _, _, _ in PACKAGES if name not in found]
        if absent:
            raise UserError(f"no wheel of {', '.join(absent)} arrived in {out}; check the pins in PACKAGES")
        check_kinds(wheels)
        total = check_size(out)
        write_json(out / MANIFEST, {"wheels": [{"file": w.name, "bytes": w.stat().st_size, "sha256": sha256_of(w)}
                                               for w in wheels],
                                    "packages": [{"name": n, "version": v, "kind": k, "why": why}
                                                 for n, v, k, why in PACKAGES]})
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(wheels)} wheels, {total / 2**20:.2f} MiB, in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
