"""The README's "The pipeline by hand" block runs top to bottom, as written, at a tiny size.

The block is read from README.md and run line by line in a fresh directory with bash; the
only changes are the sizes below (each must be in the block, so a README edit that drops
one fails here too) and, on the train lines, a smaller model and batch appended as later
overrides. So the README and the commands cannot drift apart.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"

# README size -> test size.
SIZES = {
    "--people 400": "--people 120",
    "--vocab-size 2048": "--vocab-size 512",
    "--workers 2": "--workers 1",
    "train.max_steps=300": "train.max_steps=3",
    "--limit 10": "--limit 3",
    "--people 40": "--people 2",
    "--people 10": "--people 2",
}
SMALL_TRAIN = ("model.n_layer=1 model.d_model=64 model.n_head=2 model.max_seq_len=64 train.seq_len=64 "
               "train.micro_batch_size=2 train.warmup_steps=1 train.log_every=1")


def readme_block() -> list[str]:
    """The command lines of the README's "The pipeline by hand" block, comments dropped."""
    text = README.read_text()
    section = text.split("## The pipeline by hand", 1)[1]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    lines = []
    for line in block.splitlines():
        command = re.sub(r"\s+#.*$", "", line).strip()  # no '#' appears inside the commands' quotes
        if command:
            lines.append(command)
    return lines


def _size(text: str) -> str:
    """A size as a whole word: "--people 40" is not in "--people 400"."""
    return re.escape(text) + r"(?![\w.])"


def tiny(line: str) -> str:
    for big, small in SIZES.items():
        line = re.sub(_size(big), small, line)
    if line.startswith("lacy-fast train "):
        line += " " + SMALL_TRAIN
    return line


def test_the_block_holds_every_size_the_test_replaces():
    block = "\n".join(readme_block())
    for big in SIZES:
        assert re.search(_size(big), block), f"README's block no longer has {big!r}; update SIZES"
    assert all(line.startswith("lacy-fast ") for line in readme_block())


@pytest.mark.slow
def test_the_readme_pipeline_runs_top_to_bottom(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    for line in readme_block():
        proc = subprocess.run(["bash", "-c", tiny(line)], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{tiny(line)}\n{proc.stderr[-3000:]}"
    # What the later lines read, the earlier ones made.
    rows = [json.loads(line) for line in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(isinstance(r["title"], str) and r["generation"].startswith(r["title"])
                                  for r in rows)
    scored = json.loads((tmp_path / "fs.json").read_text())
    assert scored["generations"] == 3 and [i["title"] for i in scored["items"]] == [r["title"] for r in rows]
    assert json.loads((tmp_path / "eval" / "lacy" / "eval.json").read_text())["people"] == 2
    assert (tmp_path / "eval" / "lacy" / "sweep.png").is_file() and (tmp_path / "curves.png").is_file()
    assert json.loads((tmp_path / "eval" / "articles" / "eval.json").read_text())["people"] == 2
    for run in ("big", "none", "lacy"):
        assert (tmp_path / "runs" / run / "export" / "model.safetensors").is_file()
