"""What the CPU can check of ``make gpu-check`` (bench/gpu_check.py) and of the script that
prepares its wheel folder (bench/gpu_wheels.py): arguments, the wheel folder's size and
manifest, unpacking without installing, the rows of providers that are not installed, a
provider that disagrees or crashes failing the run, and a dry run of every stage on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import bench_lacy_ce  # noqa: E402
import gpu_check  # noqa: E402
import gpu_wheels  # noqa: E402

from lacy_fast.errors import UserError  # noqa: E402
from lacy_fast.fileio import sha256_of  # noqa: E402


def _wheel(folder: Path, dist: str, module: str, body: str = "VALUE = 7\n", pad: int = 0) -> Path:
    """A minimal pure-Python wheel: one module and its dist-info."""
    path = folder / f"{dist}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{module}.py", body + "#" * pad + "\n")
        zf.writestr(f"{dist}-1.0.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
        zf.writestr(f"{dist}-1.0.dist-info/RECORD", "")
    return path


KIND_SUFFIX = {"pure": "py3-none-any", "cp312": "cp312-cp312-manylinux_2_17_x86_64"}


def _fake_download(sizes: dict[str, int] | None = None, skip: str | None = None, suffix: str | None = None):
    """A stand-in for pip download: writes a file per requested spec (no network), with the
    tag of the kind PACKAGES lists unless ``suffix`` says otherwise."""
    kinds = {name: kind for name, _, kind, _ in gpu_wheels.PACKAGES}

    def download(specs: list[str], out: Path) -> None:
        for spec in specs:
            name, version = spec.split("==")
            if name == skip:
                continue
            size = (sizes or {}).get(name, 1000)
            with open(out / f"{name.replace('-', '_')}-{version}-{suffix or KIND_SUFFIX[kinds[name]]}.whl", "wb") as fh:
                fh.truncate(size)  # sparse: the size counts, the disk does not fill
    return download


def _fake_build(compiled: bool = False):
    """A stand-in for the DS_BUILD_OPS=0 build: a real (tiny) pure-Python wheel per spec."""
    def build(specs: list[str], out: Path) -> None:
        for spec in specs:
            name, version = spec.split("==")
            with zipfile.ZipFile(out / f"{name}-{version}-py3-none-any.whl", "w") as zf:
                zf.writestr(f"{name}/__init__.py", "")
                if compiled:
                    zf.writestr(f"{name}/ops/fused_adam.so", b"\x7fELF")
    return build


# ----------------------------------------------------------------------------------------
# bench/gpu_wheels.py
# ----------------------------------------------------------------------------------------


def test_wheels_script_writes_a_manifest(tmp_path):
    out = tmp_path / "wheels"
    assert gpu_wheels.main(["--out", str(out)], download=_fake_download(), build=_fake_build()) == 0
    manifest = json.loads((out / gpu_wheels.MANIFEST).read_text())
    names = {w["file"].split("-")[0] for w in manifest["wheels"]}
    assert names == {name.replace("-", "_") for name, _, _, _ in gpu_wheels.PACKAGES}
    assert {"deepspeed", "hjson", "pydantic", "pydantic_core", "annotated_types", "typing_inspection"} <= names
    assert all(len(w["sha256"]) == 64 for w in manifest["wheels"])
    assert {p["name"]: p["kind"] for p in manifest["packages"]}["deepspeed"] == "built"
    assert gpu_check.check_wheels(out) == sorted(out.glob("*.whl"))  # what the check accepts


@pytest.mark.parametrize("download, build, words", [
    (_fake_download(sizes={"pygments": 65 * 2**20}), _fake_build(), "more than the 64 MiB"),
    (_fake_download(skip="pytest"), _fake_build(), "no wheel of pytest arrived"),
    (_fake_download(skip="pydantic-core"), _fake_build(), "no wheel of pydantic-core arrived"),
    (_fake_download(suffix="cp311-cp311-manylinux_2_28_x86_64"), _fake_build(), "is not a pure-Python wheel"),
    (_fake_download(), _fake_build(compiled=True), "holds compiled files"),
])
def test_wheels_script_refuses_with_one_sentence(tmp_path, capsys, download, build, words):
    assert gpu_wheels.main(["--out", str(tmp_path / "w")], download=download, build=build) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err


def test_compiled_wheels_must_be_for_the_gpu_machines_python(tmp_path):
    good = tmp_path / "pydantic_core-2.50.5-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
    gpu_wheels.check_kinds([good])
    for name in ("pydantic_core-2.50.5-cp311-cp311-manylinux_2_17_x86_64.whl",
                 "pydantic_core-2.50.5-cp312-cp312-macosx_11_0_arm64.whl"):
        with pytest.raises(UserError, match="not a CPython 3.12 manylinux x86_64 wheel"):
            gpu_wheels.check_kinds([tmp_path / name])


def test_wheels_script_wants_an_empty_folder(tmp_path, capsys):
    (tmp_path / "old.whl").write_text("x")
    assert gpu_wheels.main(["--out", str(tmp_path)], download=_fake_download(), build=_fake_build()) == 2
    assert "is not empty" in capsys.readouterr().err


def test_size_check_counts_the_limit_exactly(tmp_path):
    with open(tmp_path / "a.whl", "wb") as fh:
        fh.truncate(gpu_wheels.LIMIT_BYTES)
    assert gpu_wheels.check_size(tmp_path) == gpu_wheels.LIMIT_BYTES  # at the limit: fine
    (tmp_path / "b.whl").write_bytes(b"x")
    with pytest.raises(UserError, match="more than the 64 MiB"):
        gpu_wheels.check_size(tmp_path)


# ----------------------------------------------------------------------------------------
# bench/gpu_check.py: arguments and the wheel folder
# ----------------------------------------------------------------------------------------


def _folder(tmp_path: Path, *wheels: Path) -> Path:
    entries = [{"file": w.name, "bytes": w.stat().st_size, "sha256": sha256_of(w)} for w in wheels]
    (tmp_path / gpu_check.MANIFEST).write_text(json.dumps({"wheels": entries}))
    return tmp_path


def test_check_unpacks_a_missing_distribution_without_installing(tmp_path):
    folder = tmp_path / "wheels"
    folder.mkdir()
    wheel = _wheel(folder, "lacyfast_probe_pkg", "lacyfast_probe_mod")
    _folder(folder, wheel, _wheel(folder, "pytest", "not_pytest"))
    rows = gpu_check.unpack(gpu_check.check_wheels(folder), tmp_path / "site")
    actions = {r["wheel"].split("-")[0]: r["action"] for r in rows}
    assert actions["pytest"].startswith("already installed")  # the machine's own is kept
    assert actions["lacyfast_probe_pkg"].startswith("unpacked")
    assert not (tmp_path / "site" / "not_pytest.py").exists()
    code = ("import importlib.metadata, lacyfast_probe_mod; "
            "print(lacyfast_probe_mod.VALUE, importlib.metadata.version('lacyfast_probe_pkg'))")
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(tmp_path / "site")},
                         capture_output=True, text=True)
    assert out.stdout.split() == ["7", "1.0"], out.stderr


def test_check_refuses_a_tampered_or_oversized_folder(tmp_path):
    folder = tmp_path / "wheels"
    folder.mkdir()
    wheel = _wheel(folder, "probe", "probe_mod")
    _folder(folder, wheel)
    _wheel(folder, "probe", "probe_mod", body="VALUE = 8\n")  # rewritten after the manifest
    with pytest.raises(UserError, match="does not match MANIFEST.json"):
        gpu_check.check_wheels(folder)
    with open(folder / "big.whl", "wb") as fh:
        fh.truncate(64 * 2**20)  # sparse: 64 MiB more than fits
    with pytest.raises(UserError, match="more than the 64 MiB"):
        gpu_check.check_wheels(folder)
    (folder / "big.whl").unlink()
    (folder / gpu_check.MANIFEST).unlink()
    with pytest.raises(UserError, match="missing or unreadable"):
        gpu_check.check_wheels(folder)
    with pytest.raises(UserError, match="does not exist"):
        gpu_check.check_wheels(tmp_path / "nowhere")


@pytest.mark.parametrize("args, words, code", [
    (["--stages", "tests,bogus"], "unknown stage(s) bogus", 2),
    (["--budget", "0"], "--budget must be positive", 2),
    (["--cpu-dry-run", "--wheels", "/nonexistent/wheels"], "does not exist; prepare it with bench/gpu_wheels.py", 2),
])
def test_check_arguments(tmp_path, args, words, code):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--results", str(tmp_path), *args],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == code and words in out.stderr, out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_check_without_a_gpu_says_so(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--results", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no CUDA device is visible" in out.stderr
    assert out.stderr.count("\n") == 1


# ----------------------------------------------------------------------------------------
# The kernel benchmark: missing providers are rows, disagreements and crashes fail
# ----------------------------------------------------------------------------------------


def _bench(tmp_path, *extra) -> tuple[int, list[dict]]:
    results = tmp_path / "lacy_ce.jsonl"
    code = bench_lacy_ce.main(["--device", "cpu", "--shapes", "40x16x101", "--reps", "2", "--warmup", "0",
                               "--passes", "fwdbwd", "--verify-rows", "40", "--results", str(results), *extra])
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    return code, rows


def test_bench_rows_for_providers_that_cannot_run(tmp_path):
    code, rows = _bench(tmp_path, "--providers", "lacy-chunked,ce-onepass-torch,liger-flce,cce,cce-exact,lacy-triton")
    assert code == 0
    status = {(r["provider"], r["strategy"]): r["status"] for r in rows}
    assert status[("lacy-chunked", "lacy")] == "ok" and status[("ce-onepass-torch", "plain-ce")] == "ok"
    for name in ("liger-flce", "cce", "cce-exact"):
        assert status[(name, "plain-ce")].startswith("not run:"), status
        assert "needs CUDA" in status[(name, "plain-ce")]
    assert status[("lacy-triton", "none")] == "not run: needs CUDA"
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["checked"].startswith("loss+grads") and r["median_ms"] > 0 and "commit" in r for r in ok)
    assert {r["strategy"] for r in ok if r["provider"] == "lacy-chunked"} == {"lacy", "none"}


def test_bench_fails_loudly_on_a_wrong_or_crashing_provider(tmp_path, monkeypatch, capsys):
    real = bench_lacy_ce.providers

    def with_bad(device, strategies, bounds):
        def wrong(h, w, t, f, c):  # plain CE off by a little
            return bench_lacy_ce.ce_onepass_torch(h, w, t) * 1.001, None

        def crash(h, w, t, f, c):
            raise RuntimeError("kernel exploded")

        return real(device, strategies, bounds) + [bench_lacy_ce.Provider("wrong", "plain-ce", wrong),
                                                   bench_lacy_ce.Provider("crash", "plain-ce", crash)]

    monkeypatch.setattr(bench_lacy_ce, "providers", with_bad)
    code, rows = _bench(tmp_path, "--providers", "ce-onepass-torch,wrong,crash")
    assert code == 1
    status = {r["provider"]: r for r in rows}
    assert status["ce-onepass-torch"]["status"] == "ok"
    assert status["wrong"]["status"] == "disagrees" and "loss: max error" in status["wrong"]["error"]
    assert status["crash"]["status"] == "crashed" and "kernel exploded" in status["crash"]["error"]
    assert "FAILED" in capsys.readouterr().err


def test_verify_catches_a_wrong_selection(monkeypatch):
    """Our op checked given its own selection: a selection that is not a top-k fails."""
    inputs = bench_lacy_ce.make_inputs(64, 16, 101, torch.float32, torch.device("cpu"))

    def swapped(h, w, t, f, c):
        loss, stats = bench_lacy_ce.lacy_linear_cross_entropy(h, w, t, f, c, strategy="lacy", impl="chunked")
        is_call = stats["is_call"].clone()
        candidates = ((f & 1) != 0) & (t != bench_lacy_ce.IGNORE) & ~is_call
        is_call[int(candidates.nonzero()[0])] = True  # one row too many, below the k-th score
        is_call[int(stats["is_call"].nonzero()[0])] = False
        return loss, is_call

    def right(h, w, t, f, c):
        loss, stats = bench_lacy_ce.lacy_linear_cross_entropy(h, w, t, f, c, strategy="lacy", impl="chunked")
        return loss, stats["is_call"]

    assert bench_lacy_ce.verify(bench_lacy_ce.Provider("lacy-chunked", "lacy", right), inputs, 64) == \
        "loss+grads+selection"
    with pytest.raises(bench_lacy_ce.Disagreement, match="selection"):
        bench_lacy_ce.verify(bench_lacy_ce.Provider("lacy-chunked", "lacy", swapped), inputs, 64)


def test_onepass_yardstick_is_plain_cross_entropy(monkeypatch):
    monkeypatch.setenv("LACY_FAST_CE_CHUNK_ROWS", "128")  # several chunks
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(300, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(77, 24, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 77, (300,), generator=gen)
    t[::9] = bench_lacy_ce.IGNORE
    loss = bench_lacy_ce.ce_onepass_torch(h, w, t)
    grads = torch.autograd.grad(loss * 0.7, (h, w))
    ref = torch.nn.functional.cross_entropy(h @ w.T, t, ignore_index=bench_lacy_ce.IGNORE)
    ref_grads = torch.autograd.grad(ref * 0.7, (h, w))
    assert torch.allclose(loss, ref, rtol=1e-12, atol=0)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-14) for a, b in zip(grads, ref_grads))


# ----------------------------------------------------------------------------------------
# A dry run of every stage on the CPU
# ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dry_run_of_every_stage_on_the_cpu(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu-dry-run", "--results",
                          str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    read = lambda name: [json.loads(x) for x in (tmp_path / name).read_text().splitlines()]  # noqa: E731
    stages = read("gpu_check.jsonl")
    assert [(s["stage"], s["status"]) for s in stages] == [("tests", "passed"), ("kernel", "passed"),
                                                           ("train", "passed"), ("determinism", "passed")]
    assert all(s["dry_run"] and "commit" in s and "device" in s for s in stages)
    kernel = {(r["provider"], r["strategy"]): r for r in read("lacy_ce.jsonl")}
    assert kernel[("liger-flce", "plain-ce")]["status"].startswith("not run:")
    assert kernel[("lacy-chunked", "lacy")]["status"] == "ok"
    train = read("train_step.jsonl")
    assert any(r["attention"] == "flash" and r["status"].startswith("not run: flash-attn not installed") for r in train)
    assert all(r["loop"] == "Trainer" and r["engine"] == "deepspeed" and r["zero_stage"] == 1 for r in train)
    done = {r["strategy"]: r for r in train if r["status"] == "ok"}
    assert set(done) == {"none", "lacy"}
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0 and r["timed_steps"] > 0 for r in done.values())
    assert done["lacy"]["call_rate"] > 0 == done["none"]["call_rate"]  # the objective the Trainer ran
    assert "overhead_vs_none" in done["lacy"]
    determinism = {r["strategy"]: r for r in read("determinism.jsonl")}
    assert set(determinism) == {"none", "lacy"}
    assert all(r["identical"] and r["processes"] == 2 and r["impl"] == "triton" for r in determinism.values())


def test_synthetic_data_is_a_prepare_output_the_loader_reads(tmp_path):
    from lacy_fast.data.loader import ShardBatches

    data = gpu_check.synthetic_data(tmp_path / "d", 400, 5000)
    batches = ShardBatches(str(data), seq_len=32, micro_batch=4, grad_accum=1, world=1, rank=0, seed=0)
    assert batches.tokenizer.vocab_size == 400
    batch = batches.batch(0, 0)
    assert batch.idx.max() < 400 and 0.15 < batch.n_facts / batch.n_valid < 0.35
    stats = json.loads((data / "stats.json").read_text())
    assert stats["tokens"] >= 5000 and abs(stats["fact_fraction"] - gpu_check.FACT_SHARE) < 0.02


def test_determinism_stage_fails_when_the_two_processes_differ(tmp_path, monkeypatch):
    """The comparison itself: two runs that print different digests fail the stage."""
    differing = "import json, os; print(json.dumps({'lacy': {'grad_weight': os.urandom(8).hex()}}))"
    monkeypatch.setattr(gpu_check, "_DETERMINISM_RUN", differing)
    args = gpu_check.parse(["--cpu-dry-run", "--results", str(tmp_path)])
    assert gpu_check.stage_determinism(args) == 1
    rows = [json.loads(x) for x in (tmp_path / "determinism.jsonl").read_text().splitlines()]
    assert rows[0]["identical"] is False and rows[0]["differ"] == ["grad_weight"]
