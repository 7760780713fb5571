"""The objectives that keep what the SLM can learn, and what training measures about them:
soft relabeling (objective.call_weight), the warm-up share, selection persistence, the
probe, and rho's reference nll computed once per shard."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lacy_fast.config import RunConfig, load_config
from lacy_fast.data.loader import ShardBatches
from lacy_fast.data.shards import ShardSet
from lacy_fast.errors import UserError
from lacy_fast.method import Targets
from lacy_fast.model.io import load_export
from lacy_fast.train.reference import reference_nll, write_reference_sidecars
from lacy_fast.train.probes import SelectionTracker
from helpers import metrics, prepared, train


@pytest.fixture(scope="module")
def few(tmp_path_factory) -> Path:
    """A corpus small enough that a short run passes over it several times."""
    return prepared(tmp_path_factory.mktemp("few-data"), 24, seed=5, vocab=400)


def epoch_steps(data: Path, seq_len: int = 64, batch: int = 4) -> int:
    stats = json.loads((data / "stats.json").read_text())
    return stats["tokens"] // (seq_len * batch)


def test_soft_relabel_trains_and_counts_every_target_as_ground_truth(few, tmp_path):
    train(tmp_path / "soft", few, "train.max_steps=6", "objective.call_weight=0.5", "objective.call_weight_by_error=true")
    rows = metrics(tmp_path / "soft")
    assert all(abs(r["call_rate"] - 0.6 * r["fact_fraction"]) < 0.02 for r in rows)  # the same selection as lacy
    hard = tmp_path / "hard"
    train(hard, few, "train.max_steps=6")
    # A soft-relabeled target keeps a ground-truth gradient: every valid target counts.
    assert rows[-1]["gt_tokens"] > metrics(hard)[-1]["gt_tokens"]
    assert json.loads((tmp_path / "soft" / "config.json").read_text())["objective"]["call_weight"] == 0.5


def test_warmup_share_relabels_nothing_until_its_share_is_spent(few, tmp_path):
    out = tmp_path / "warm"
    budget = 64 * 4 * 10  # about 10 steps of ground-truth tokens
    train(out, few, "train.max_steps=40", f"train.max_gt_tokens={budget}", "objective.warmup_share=0.5")
    rows = metrics(out)
    warm = [r for r in rows if r["gt_tokens"] <= 0.5 * budget]
    after = [r for r in rows if r["gt_tokens"] - 64 * 4 > 0.5 * budget]  # steps that began past the share
    assert warm and after
    assert all(r["call_rate"] == 0.0 for r in warm)
    assert all(abs(r["call_rate"] - 0.6 * r["fact_fraction"]) < 0.02 for r in after)


@pytest.mark.parametrize("args, words", [
    (["objective.strategy=spacy", "objective.call_weight=0.5"], "applies to the strategies lacy, loss, rho"),
    (["objective.call_weight=0"], "must lie in (0, 1]"),
    (["objective.warmup_share=0.2"], "train.max_gt_tokens, which is unset"),
    (["objective.strategy=none", "objective.warmup_share=0.2", "train.max_gt_tokens=100"], "ranked strategies"),
])
def test_bad_objective_settings_are_one_sentence(args, words):
    with pytest.raises(UserError, match=None) as err:
        load_config(RunConfig, "tiny", args)
    assert words in str(err.value) and str(err.value).count(". ") == 0


def test_selection_tracker_counts_against_brute_force():
    """Persistence = selected now and at the previous occurrence / selected now and seen
    before; chance = candidates seen before that were selected then / candidates seen before."""
    rule = Targets(vocab=10, call_id=2)
    tracker = SelectionTracker("lacy", 8, rule)
    ids = np.arange(8)
    targets = torch.tensor([3, 4, 5, 6, 7, 8, 9, 3])
    flags = torch.tensor([1, 1, 1, 1, 0, 0, 1, 1], dtype=torch.uint8)  # 6 fact candidates (0-3, 6, 7)
    first = torch.tensor([1, 1, 0, 0, 0, 0, 1, 0], dtype=torch.bool)
    tracker.add(ids, targets, flags, first)
    assert tracker.read() == {"selection_persistence": None, "selection_chance": None}  # nothing seen before
    second = torch.tensor([1, 0, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
    tracker.add(ids, targets, flags, second)
    shares = tracker.read()
    # selected now: 0, 2, 6 (all seen); of them selected before: 0 and 6. Candidates seen: 6,
    # of which selected before: 0, 1, 6.
    assert shares == {"selection_persistence": pytest.approx(2 / 3), "selection_chance": pytest.approx(3 / 6)}


def test_persistence_and_the_probe_are_logged(few, tmp_path):
    out = tmp_path / "lacy"
    steps = 3 * epoch_steps(few)
    train(out, few, f"train.max_steps={steps}", f"train.log_every={max(2, steps // 6)}", f"train.probe={few}",
          "train.probe_every=5")
    rows = metrics(out)
    persisted = [r["selection_persistence"] for r in rows if r.get("selection_persistence") is not None]
    assert persisted and all(0.0 <= p <= 1.0 for p in persisted)
    assert all(r.get("selection_chance") is not None for r in rows if r.get("selection_persistence") is not None)
    probed = [r for r in rows if "probe_fact_nll" in r]
    assert [r["step"] for r in probed] == sorted({*range(5, steps + 1, 5), steps})
    assert probed[-1]["probe_nll"] < probed[0]["probe_nll"]  # the model learned its own corpus
    assert all(0.0 < r["probe_p_call"] < 1.0 and 0.0 <= r["probe_call_rate"] <= 1.0 for r in probed)
    none = tmp_path / "none"
    train(none, few, "train.max_steps=4", "objective.strategy=none")
    assert not any("selection_persistence" in r for r in metrics(none))  # ranked strategies only


def test_probe_on_another_tokenizer_is_refused(few, data_other_tokenizer, tmp_path):
    proc = train(tmp_path / "x", few, "train.max_steps=2", f"train.probe={data_other_tokenizer}", check=False)
    assert proc.returncode == 2 and "another tokenizer" in proc.stderr


@pytest.fixture(scope="module")
def data_other_tokenizer(tmp_path_factory) -> Path:
    return prepared(tmp_path_factory.mktemp("other-tok"), 12, seed=9, vocab=360)


def test_reference_sidecar_equals_the_reference_on_each_document(few, tmp_path):
    """rho's reference nll, written once per shard, is the reference's nll of each document
    in its own context (EOS before it), and the loader attaches it to batches by token."""
    train(tmp_path / "ref", few, "train.max_steps=2", "objective.strategy=none")
    ref, _ = load_export(tmp_path / "ref" / "export")
    shards = ShardSet(few)
    written = write_reference_sidecars(ref, shards, "refnll-test", call_id=2, eos_id=1, ignore_index=-100,
                                       impl="chunked", device=torch.device("cpu"))
    assert written == len(shards.shards)
    assert write_reference_sidecars(ref, shards, "refnll-test", 2, 1, -100, "chunked", torch.device("cpu")) == 0
    shard = shards.shards[0]
    lo = int(shard.doc_offsets[0])
    hi = min(int(shard.doc_offsets[1]), lo + ref.cfg.max_seq_len)  # the first document's first window
    doc = torch.from_numpy(np.asarray(shard.tokens[lo:hi], dtype=np.int64))
    idx = torch.cat([torch.tensor([1]), doc[:-1]])[None]
    direct = reference_nll(ref, idx, doc[None], torch.zeros_like(doc)[None], 2, -100, "chunked")[0]
    assert torch.allclose(torch.from_numpy(np.asarray(shard.sidecar("refnll-test")[lo:hi])), direct, atol=1e-5)
    source = ShardBatches(str(few), seq_len=64, micro_batch=2, grad_accum=1, world=1, rank=0, seed=1)
    source.ref_sidecar = "refnll-test"
    batch = source.batch(3, 0)
    want = shards.gather("refnll-test", batch.target_ids)
    assert batch.ref_nll.shape == batch.targets.shape and np.array_equal(batch.ref_nll.numpy(), want)
    # target ids name the corpus token each target is
    flat = np.concatenate([np.asarray(s.tokens) for s in shards.shards])
    assert np.array_equal(flat[batch.target_ids], batch.targets.numpy())


def test_rho_reads_the_sidecar_instead_of_running_the_reference(few, tmp_path):
    train(tmp_path / "ref", few, "train.max_steps=2", "objective.strategy=none")
    proc = train(tmp_path / "rho", few, "train.max_steps=3", "objective.strategy=rho", "objective.call_rate=0.5",
                 f"objective.ref_checkpoint={tmp_path / 'ref' / 'export'}")
    assert all(abs(r["call_rate"] - 0.5) < 0.02 for r in metrics(tmp_path / "rho"))
    assert list(few.glob("*.refnll-*.npy")), proc.stderr
