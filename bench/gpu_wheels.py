"""Prepare the folder of wheels ``make gpu-check`` installs from on a GPU machine that cannot
download anything.

    python bench/gpu_wheels.py --out gpu-wheels       # here, where a package registry is reached
    make gpu-check WHEELS=gpu-wheels                  # there, with the folder copied beside the checkout

That machine is assumed to have only torch and triton (possibly older than the pins:
torch 2.11 with triton 3.6). The check itself needs nothing else from lacy-fast's
requirements (no DeepSpeed, spaCy, sentencepiece: its training steps are a plain PyTorch
step, bench/gpu_check.py). The folder holds, as pure-Python wheels pinned below, what
the check adds: the two fused cross-entropy libraries it benchmarks against, and pytest
for the GPU-marked tests, each with the dependencies torch and triton do not bring.
flash-attn is not among them: the registry has no wheel of it (only a source archive
that builds for an hour against a CUDA toolkit), so the check runs with it where it is
preinstalled and says so where it is not.

The folder must stay within 64 MiB (checked after the download; too big is an error and
the folder is left for inspection). A manifest, MANIFEST.json, lists each wheel with its
size and sha256; gpu_check.py verifies them before it installs anything.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from lacy_fast.errors import UserError  # noqa: E402
from lacy_fast.fileio import write_json  # noqa: E402

LIMIT_BYTES = 64 * 2**20
MANIFEST = "MANIFEST.json"
# (distribution, version, why): pure-Python wheels, no dependency resolution beyond this list.
PACKAGES = [
    ("liger-kernel", "0.8.5", "benchmark provider liger-flce (needs torch, triton, packaging)"),
    ("cut-cross-entropy", "25.1.1", "benchmark providers cce and cce-exact (needs torch, triton)"),
    ("packaging", "26.3", "a dependency of liger-kernel and pytest"),
    ("typing-extensions", "4.16.0", "a dependency of cut-cross-entropy"),
    ("pytest", "9.2.0", "the GPU-marked tests"),
    ("pluggy", "1.7.0", "a dependency of pytest"),
    ("iniconfig", "2.3.1", "a dependency of pytest"),
    ("pygments", "2.21.0", "a dependency of pytest"),
]


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def check_size(folder: Path, limit: int = LIMIT_BYTES) -> int:
    """Total bytes of the files in ``folder``; a UserError if they exceed ``limit``."""
    total = folder_bytes(folder)
    if total > limit:
        raise UserError(f"the wheel folder {folder} holds {total / 2**20:.1f} MiB, more than the "
                        f"{limit / 2**20:.0f} MiB a GPU check may bring; drop a package from PACKAGES")
    return total


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(specs: list[str], out: Path) -> None:
    """Pure-Python wheels only, exactly the pinned list (no dependency resolution)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--dest", str(out), *specs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"pip download failed ({last}); this script needs a machine that reaches the registry")


def main(argv: list[str] | None = None, download: Callable[[list[str], Path], None] = pip_download) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder to fill (created; must be empty)")
    args = parser.parse_args(argv)
    try:
        out = args.out
        if out.exists() and any(out.iterdir()):
            raise UserError(f"{out} is not empty; give a new folder so nothing stale is carried along")
        out.mkdir(parents=True, exist_ok=True)
        download([f"{name}=={version}" for name, version, _ in PACKAGES], out)
        wheels = sorted(out.glob("*.whl"))
        found = {w.name.split("-")[0].lower().replace("_", "-") for w in wheels}
        absent = [name for name, _, _ in PACKAGES if name not in found]
        if absent:
            raise UserError(f"no wheel of {', '.join(absent)} arrived in {out}; check the pins in PACKAGES")
        not_pure = [w.name for w in wheels if not w.name.endswith("-none-any.whl")]
        if not_pure:
            raise UserError(f"{', '.join(not_pure)} is not a pure-Python wheel; it would not install on another "
                            "Python or platform")
        total = check_size(out)
        write_json(out / MANIFEST, {"wheels": [{"file": w.name, "bytes": w.stat().st_size, "sha256": sha256(w)}
                                               for w in wheels],
                                    "packages": [{"name": n, "version": v, "why": why} for n, v, why in PACKAGES]})
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(wheels)} wheels, {total / 2**20:.2f} MiB, in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
