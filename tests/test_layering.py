"""Which package may import which: evaluation reads fact tables and knowledge sources, not
the synthetic generator; the cascade (and its oracle big model) does not import evaluation;
data does not import training, and the training pieces do not import the Trainer."""
import ast
import json
from pathlib import Path

import lacy_fast
from lacy_fast.data.facts import FactTable

ROOT = Path(lacy_fast.__file__).parent


def imports(package):
    """(file, imported module) for every import statement of the package's modules."""
    out = []
    for path in sorted((ROOT / package).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                out += [(path.name, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                out += [(path.name, node.module)] + [(path.name, f"{node.module}.{a.name}") for a in node.names]
    return out


def test_eval_does_not_import_the_synthetic_generator():
    found = imports("eval")
    assert any(m == "lacy_fast.data.facts" for _, m in found)  # the walk sees eval's imports
    assert [(f, m) for f, m in found if m.startswith("lacy_fast.data.synth")] == []


def test_cascade_does_not_import_eval():
    found = imports("cascade")
    assert any(m.startswith("lacy_fast.data.facts") for _, m in found)
    assert [(f, m) for f, m in found if m.startswith("lacy_fast.eval")] == []


def test_data_does_not_import_training():
    found = imports("data")
    assert any(m == "lacy_fast.data.workers" for _, m in found)  # the prefetcher's pool is data's own
    assert [(f, m) for f, m in found if m.startswith("lacy_fast.train")] == []


def test_the_training_pieces_do_not_import_the_trainer():
    """loop.py (the Trainer) uses dist, settings, guards, metrics, reference, checkpoint...;
    none of them runs back up to it (only the command line starts a run)."""
    found = imports("train")
    assert {"dist.py", "settings.py", "guards.py", "metrics.py", "reference.py"} <= {f for f, _ in found}
    assert [(f, m) for f, m in found if m.startswith("lacy_fast.train.loop") and f != "cli.py"] == []


def test_fact_table_takes_its_attributes_from_its_rows_and_ignores_unknown_keys(tmp_path):
    rows = [{"id": 0, "name": "Anna Tolk", "pronoun": "she", "popularity": "rare",
             "facts": {"birth_date": "1 May 1901", "birth_place": "Tolmere", "residence": "Brask"}},
            {"id": 1, "name": "Boris Vell", "pronoun": "he", "popularity": "frequent",
             "facts": {"birth_date": "2 May 1902", "birth_place": "Gravholm", "award": "Orn Prize",
                       "residence": "Strin"}}]
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = FactTable.read(path)
    assert table.attributes == ("birth_date", "birth_place", "award", "residence")
    assert table.by_name["Boris Vell"].facts["award"] == "Orn Prize"
    assert [f.attribute for f in table.extract("Born in Gravholm, she won the Orn Prize.")] == ["birth_place", "award"]
