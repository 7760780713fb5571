"""Cascade generation: the cached, batched cascade against a naive re-encode-everything
reference, token by token, for each call rule and each kind of big model."""
import dataclasses
import json
import math

import pytest
import torch

from lacy_fast import cli
from lacy_fast.cascade import (ArgmaxRule, BudgetRule, Cascade, LacyBig, NeverRule, OracleBig, ThresholdRule,
                               load_big, load_model)
from lacy_fast.cascade.rules import call_scores, ranked_score
from lacy_fast.cascade.slm import ExportedModel, context_ids, encode_continuation, unfinished_bytes
from lacy_fast.config import CascadeConfig
from lacy_fast.data import synth
from lacy_fast.errors import UserError
from lacy_fast.data.facts import FactTable
from helpers import byte_bpe, export, save_hf, tiny_gpt, tiny_gpt2, train_small

PROMPTS = ["Thynoxine Nahoxski", "Anna", "By profession, she was a"]
THRESHOLD = 0.05  # p(CALL) of tiny_gpt spans ~1e-6..0.4: some steps call, most do not


@pytest.fixture(scope="module")
def slm(tok, tmp_path_factory):
    return load_model(export(tmp_path_factory.mktemp("slm") / "export", tiny_gpt(tok), tok))


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    synth.write(out, 60, seed=0)
    return out / "facts.jsonl"


# -- the naive reference ---------------------------------------------------------------------


@torch.no_grad()
def logits_of(model, ids):
    """Last-position logits of ``ids`` run from scratch (no cache, no batch)."""
    return model.logits(model(torch.tensor([ids]))[0, -1]).float()


def naive_cascade(model, tok, prompts, decide, answer, max_new, score=None):
    """Per prompt, re-encode everything at every step: (tokens, from_big, context lengths at calls).
    ``score``: logits -> the call score (default p(CALL))."""
    out = []
    for prompt in prompts:
        ids = context_ids(tok, prompt)
        gen, flags, asked = [], [], []
        while len(gen) < max_new:
            logits = logits_of(model, ids)
            value = score(logits) if score else torch.softmax(logits, -1)[tok.call_id]
            call = bool(decide(value, logits.argmax() == tok.call_id))
            logits[tok.call_id] = float("-inf")
            new, big = [int(logits.argmax())], False
            if call:
                asked.append(len(ids))
                ans = answer(ids)
                if ans:
                    new, big = ans, True
            new = new[: max_new - len(gen)]
            if tok.eos_id in new:
                new = new[: new.index(tok.eos_id) + 1]
            gen += new
            flags += [big] * len(new)
            ids = ids + new
            if tok.eos_id in new:
                break
        out.append((gen, flags, asked))
    return out


class StubBig:
    """A big model answering from the context alone, recording where it was asked.

    It also checks the cascade's bookkeeping: the contexts it is shown must stay in step
    with the rows it was told to keep."""

    name = "stub"

    def __init__(self, answer):
        self.answer = answer
        self.asked = []

    def begin(self, tokenizer, prompts, contexts):
        self.rows = list(prompts)
        self.prompt_ids = [list(c) for c in contexts]

    def propose(self, calling, contexts):
        assert len(contexts) == len(self.rows)
        for ctx, start in zip(contexts, self.prompt_ids):
            assert ctx[: len(start)] == start
        out = []
        for r in calling:
            self.asked.append((self.rows[r], len(contexts[r])))
            out.append(self.answer(contexts[r]))
        return out

    def keep(self, index):
        self.rows = [self.rows[i] for i in index]
        self.prompt_ids = [self.prompt_ids[i] for i in index]


def stub_answer(tok, stop_after=None):
    """Known tokens from the context length: one token, two tokens, or a decline; EOS for the
    row whose first prompt token is ``stop_after[0]`` once its context reaches ``stop_after[1]``."""

    def answer(ctx):
        if stop_after and ctx[1] == stop_after[0] and len(ctx) >= stop_after[1]:
            return [tok.eos_id]
        n = len(ctx)
        if n % 4 == 0:
            return None  # declines
        return [200, 201] if n % 3 == 0 else [100 + n % 50]

    return answer


def record_forwards(model):
    """Shapes of the token blocks ``model`` is run on, in order."""
    shapes = []
    handle = model.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    return shapes, handle


def check_against_naive(slm, generations, reference, big):
    for g, (gen, flags, asked) in zip(generations, reference):
        assert g.tokens == gen
        assert g.from_big == flags
        assert g.calls == len(asked) and g.steps >= len(asked)
        assert sorted(n for p, n in big.asked if p == g.prompt) == asked


# -- the cascade against the reference -------------------------------------------------------


def test_stub_handoffs_match_naive_reference_token_by_token(slm, tok):
    threshold = THRESHOLD
    big = StubBig(stub_answer(tok))
    shapes, handle = record_forwards(slm.model)
    cfg = CascadeConfig(rule="threshold", threshold=threshold, max_new_tokens=24)
    generations = Cascade(slm, big, cfg).generate(PROMPTS)
    handle.remove()
    reference = naive_cascade(slm.model, tok, PROMPTS, ThresholdRule(threshold).decide, stub_answer(tok), 24)
    check_against_naive(slm, generations, reference, big)
    assert all(g.finish == "length" for g in generations)
    # Every outcome happened: own tokens, one- and two-token handoffs, declines.
    flags = [f for g in generations for f in g.from_big]
    assert 0 < sum(flags) < len(flags)
    assert any(g.answered < g.calls for g in generations)
    assert any(g.tokens[i:i + 2] == [200, 201] for g in generations for i in range(len(g.tokens)))
    # Cache reuse: one pass over the left-padded prompts, then one block per step, never
    # wider than the longest handoff (2 tokens): nothing is re-encoded.
    longest = max(len(context_ids(tok, p)) for p in PROMPTS)
    assert shapes[0] == (3, longest)
    assert all(t <= 2 for _, t in shapes[1:]) and len(shapes) == max(g.steps for g in generations)


@pytest.mark.parametrize("kind", ["entropy", "max_prob"])
def test_uncertainty_scores_call_where_the_slm_is_unsure(slm, tok, kind):
    """A plain LM defers by its own uncertainty over the vocabulary without <CALL>: the
    threshold rule on the normalised entropy (or 1 - max p), computed here independently."""
    def uncertainty(logits):
        own = torch.cat([logits[: tok.call_id], logits[tok.call_id + 1:]])  # (V - 1,)
        dist = torch.distributions.Categorical(logits=own)
        return dist.entropy() / math.log(len(own)) if kind == "entropy" else 1 - dist.probs.max()

    values = sorted(float(uncertainty(logits_of(slm.model, context_ids(tok, p)))) for p in PROMPTS)
    threshold = (values[0] + values[1]) / 2  # between the prompts' first-step scores: some call, some not
    big = StubBig(stub_answer(tok))
    cascade = Cascade(slm, big, CascadeConfig(rule="threshold", score=kind, threshold=threshold, max_new_tokens=16))
    generations = cascade.generate(PROMPTS)
    reference = naive_cascade(slm.model, tok, PROMPTS, ThresholdRule(threshold).decide, stub_answer(tok), 16,
                              score=uncertainty)
    check_against_naive(slm, generations, reference, big)
    assert cascade.score == kind and 0 < sum(g.calls for g in generations) < sum(g.steps for g in generations)
    # auto: p(CALL) for an SLM trained with <CALL> targets, entropy for a plain LM.
    plain = ExportedModel(slm.model, tok, {**slm.meta, "strategy": "none"}, slm.path)
    assert Cascade(plain, big, CascadeConfig()).score == "entropy" and Cascade(slm, big, CascadeConfig()).score == "p_call"


def test_rows_that_end_leave_the_batch(slm, tok):
    first = tok.encode(PROMPTS[0])[0]
    answer = stub_answer(tok, stop_after=(first, 12))
    big = StubBig(answer)
    shapes, handle = record_forwards(slm.model)
    generations = Cascade(slm, big, CascadeConfig(rule="threshold", threshold=THRESHOLD, max_new_tokens=24)).generate(PROMPTS)
    handle.remove()
    reference = naive_cascade(slm.model, tok, PROMPTS, ThresholdRule(THRESHOLD).decide, answer, 24)
    check_against_naive(slm, generations, reference, big)
    assert generations[0].finish == "eos" and generations[0].tokens[-1] == tok.eos_id
    # The finished row no longer costs compute: the batch holds 3 rows until row 0's last step.
    sizes = [b for b, _ in shapes]
    assert sizes == sorted(sizes, reverse=True) and sizes.count(3) == generations[0].steps < len(sizes)


def test_argmax_rule_calls_exactly_where_call_is_the_argmax(slm, tok):
    big = StubBig(stub_answer(tok))
    generations = Cascade(slm, big, CascadeConfig(rule="argmax", max_new_tokens=20)).generate(PROMPTS)
    reference = naive_cascade(slm.model, tok, PROMPTS, ArgmaxRule().decide, stub_answer(tok), 20)
    check_against_naive(slm, generations, reference, big)
    assert 0 < sum(g.calls for g in generations) < sum(g.steps for g in generations)


def test_never_rule_and_no_big_model_are_the_slm_alone(slm, tok):
    alone = Cascade(slm, None, CascadeConfig(rule="argmax", max_new_tokens=16)).generate(PROMPTS)
    never = Cascade(slm, StubBig(stub_answer(tok)), CascadeConfig(rule="never", max_new_tokens=16)).generate(PROMPTS)
    reference = naive_cascade(slm.model, tok, PROMPTS, NeverRule().decide, None, 16)
    for a, n, (gen, _, _) in zip(alone, never, reference):
        assert a.tokens == n.tokens == gen
        assert a.calls == n.calls == 0 and not any(a.from_big)
        assert tok.call_id not in a.tokens


def test_budget_rule_reaches_its_target_share_on_a_long_stream():
    """Values from a drifting distribution, one or 16 per step: realised share within 0.01."""
    gen = torch.Generator().manual_seed(0)
    for budget in (0.05, 0.22, 0.5):
        for batch, total in ((1, 8_000), (16, 32_000)):
            rule = BudgetRule(budget, window=1024)
            calls = n = 0
            for step in range(total // batch):
                drift = 1.0 + step * batch / total  # p(CALL) grows along the stream
                p = torch.rand(batch, generator=gen) ** (3.0 / drift)
                calls += int(rule.decide(p, torch.zeros(batch, dtype=torch.bool)).sum())
                n += batch
            assert abs(calls / n - budget) < 0.01, (budget, batch, calls / n)


BUDGETS = (0.05, 0.1, 0.22, 0.35, 0.5)


def _stream(kind, step, batch, total, gen):
    """(batch,) scores of one step of a stream of ``kind``."""
    if kind == "saturating":  # most values exactly 1.0, as p(<CALL>) of a LaCy SLM in fp32
        p = torch.rand(batch, generator=gen)
        return torch.where(p < 0.8, torch.ones(batch), p)
    if kind == "tied":
        return torch.full((batch,), 0.7)
    drift = 1.0 + step * batch / total  # the score grows along the stream
    return torch.rand(batch, generator=gen) ** (3.0 / drift)


@pytest.mark.parametrize("kind", ["saturating", "tied", "drifting"])
def test_budget_rule_realises_every_budget_whatever_the_scores(kind):
    """After every step the calls made are budget x values seen within one call."""
    gen = torch.Generator().manual_seed(0)
    for budget in BUDGETS:
        for batch, total in ((1, 3_000), (7, 7_000), (64, 12_800)):
            rule = BudgetRule(budget, window=1024)
            calls = n = 0
            for step in range(total // batch):
                decided = rule.decide(_stream(kind, step, batch, total, gen), torch.zeros(batch, dtype=torch.bool))
                calls += int(decided.sum())
                n += batch
                assert abs(calls - budget * n) <= 1 + 1e-6, (kind, budget, batch, step, calls, n)
            assert abs(calls / n - budget) < 0.01


def test_budget_rule_breaks_ties_at_random_but_seeded():
    """All-tied values: which rows call is spread over the rows, the same for the same seed."""
    first = [BudgetRule(0.22, seed=s) for s in (0, 0, 1)]
    picks = [[r.decide(torch.full((10,), 0.5), torch.zeros(10, dtype=torch.bool)) for _ in range(50)] for r in first]
    assert all(torch.equal(a, b) for a, b in zip(picks[0], picks[1]))
    assert any(not torch.equal(a, b) for a, b in zip(picks[0], picks[2]))
    per_row = torch.stack(picks[0]).sum(0)  # (10,) calls each row made
    assert int(per_row.sum()) == 110 and int((per_row > 0).sum()) == 10


def test_budget_rule_ranks_p_call_by_its_log_odds(tok):
    """p(<CALL>) rounds to 1.0 in fp32 where its logit margin exceeds ~17; the log-odds keeps the order."""
    logits = torch.zeros(4, 8)
    logits[:, 3] = torch.tensor([20.0, 30.0, 40.0, 5.0])
    s = call_scores(logits, 3)
    assert s["p_call"][0] == s["p_call"][1] == s["p_call"][2] == 1.0  # saturated: tied
    truth = logits[:, 3].double() - math.log(7.0)  # log p / (1 - p): the 7 other logits are 0
    assert torch.allclose(s["call_logodds"].double(), truth, rtol=1e-6)
    assert torch.all(s["call_logodds"].argsort() == torch.tensor([3, 0, 1, 2]))
    assert ranked_score("p_call", "budget") == "call_logodds" and ranked_score("p_call", "threshold") == "p_call"
    assert ranked_score("entropy", "budget") == "entropy"


def test_budget_rule_extremes_and_warm_up():
    never, always = BudgetRule(0.0), BudgetRule(1.0)
    p = torch.rand(50)
    assert not never.decide(p, p > 2).any() and always.decide(p, p > 2).all()
    lone = BudgetRule(0.22)
    assert not lone.decide(torch.tensor([0.9]), torch.tensor([False])).any()  # 0.22 calls owed: not one yet
    batch = BudgetRule(0.22)
    assert int(batch.decide(torch.linspace(0, 1, 100), torch.zeros(100, dtype=torch.bool)).sum()) == 22


def test_budget_rule_in_generation_calls_on_its_target_share(slm, tok):
    prompts = [f"{name} was born in" for name in ("Anna", "Bo", "Cyra", "Dov", "Ela", "Finn", "Gus", "Hal")] * 2
    for budget in BUDGETS:
        generations = Cascade(slm, StubBig(lambda ctx: [100]), CascadeConfig(rule="budget", budget=budget,
                                                                              max_new_tokens=40)).generate(prompts)
        calls, steps = sum(g.calls for g in generations), sum(g.steps for g in generations)
        assert steps > 16 * 30 and abs(calls / steps - budget) < 0.01, (budget, calls / steps)


def test_sampling_is_seeded_and_never_emits_call(slm, tok):
    cfg = CascadeConfig(rule="never", temperature=1.0, top_p=0.9, max_new_tokens=30, seed=3)
    a = Cascade(slm, None, cfg).generate(PROMPTS)
    b = Cascade(slm, None, cfg).generate(PROMPTS)
    greedy = Cascade(slm, None, CascadeConfig(rule="never", max_new_tokens=30)).generate(PROMPTS)
    assert [g.tokens for g in a] == [g.tokens for g in b]
    assert [g.tokens for g in a] != [g.tokens for g in greedy]
    assert all(tok.call_id not in g.tokens for g in a)


# -- big models --------------------------------------------------------------------------------


def test_lacy_big_supplies_its_argmax_and_reads_each_token_once(slm, tok, tmp_path):
    big_model = tiny_gpt(tok, seed=1, d_model=48, call_scale=1.0)
    big = load_big(str(export(tmp_path / "big", big_model, tok)))
    assert isinstance(big, LacyBig)
    fed = []

    def record(module, args, kwargs):
        ids, valid = args[0], kwargs["valid"]
        fed.append([row[v].tolist() for row, v in zip(ids, valid)])

    handle = big.big.model.register_forward_pre_hook(record, with_kwargs=True)
    generations = Cascade(slm, big, CascadeConfig(rule="threshold", threshold=THRESHOLD, max_new_tokens=20)).generate(PROMPTS)
    handle.remove()

    def answer(ctx):
        logits = logits_of(big.big.model, ctx)
        logits[tok.call_id] = float("-inf")
        return [int(logits.argmax())]

    for g, (gen, flags, asked) in zip(generations, naive_cascade(slm.model, tok, PROMPTS, ThresholdRule(THRESHOLD).decide,
                                                                  answer, 20)):
        assert g.tokens == gen and g.from_big == flags and g.calls == len(asked)
    assert all(g.finish == "length" for g in generations)  # no row left: batch rows are stable
    for r, g in enumerate(generations):
        read = [t for block in fed for t in block[r]]
        context = context_ids(tok, g.prompt) + g.tokens
        assert read == context[: len(read)]  # each context token read once, in order
    assert len(fed) < sum(g.calls for g in generations)  # one catch-up per calling step, not per call


def test_lacy_big_on_another_tokenizer_is_refused(slm, tmp_path):
    other = train_small(tmp_path, seed=5)
    big = load_big(str(export(tmp_path / "big", tiny_gpt(other), other)))
    with pytest.raises(UserError, match="another tokenizer"):
        Cascade(slm, big, CascadeConfig(rule="threshold", threshold=0.0)).generate(["Anna"])


def test_oracle_supplies_the_rest_of_the_cued_value(slm, tok, facts):
    table = FactTable.read(facts)
    oracle = OracleBig(table, "value")
    person = table.people[0]
    place, school = person.facts["birth_place"], person.facts["education"]
    assert oracle.answer(person, f"{person.name} was born in") == f" {place}"
    assert oracle.answer(person, f"{person.name} was born in {place[:3]}") == place[3:]
    assert oracle.answer(person, f"{person.name} studied at the") == f" {school}"
    assert oracle.answer(person, f"{person.name} was born in {place}") is None  # complete
    assert oracle.answer(person, f"{person.name} was born in Xq") is None  # contradicted
    assert oracle.answer(person, f"{person.name} is kind") is None  # no cue
    assert oracle.answer(None, "Anna was born in") is None  # unknown person
    without = next(p for p in table.people if "award" not in p.facts)
    assert oracle.answer(without, f"{without.name} received the") is None

    prompts = [f"{person.name} was born in", f"{person.name}'s career as a", "Nobody Known was born in"]
    generations = Cascade(slm, load_big(f"oracle-value:{facts}"),
                          CascadeConfig(rule="threshold", threshold=0.0, max_new_tokens=12)).generate(prompts)
    born, career, nobody = generations
    assert born.text.startswith(f" {place}") and born.spans[0] == (0, len(place) + 1)
    assert born.marked().startswith(f"{prompts[0]}[[ {place}]]")
    assert career.text.startswith(f" {person.facts['occupation']}")
    assert born.answered == 1 and born.calls == born.steps  # every later call declined: the SLM went on
    assert nobody.answered == 0 and not nobody.spans


def test_word_oracle_answers_one_word_per_call(slm, tok, facts):
    """The paper's handoff: the next word of the value after a cue, a begun word completed."""
    table = FactTable.read(facts)
    person = dataclasses.replace(table.people[0], facts={**table.people[0].facts, "birth_date": "12 March 1950"})
    word = OracleBig(table)
    assert word.handoff == "word" and load_big(f"oracle:{facts}").handoff == "word"
    assert load_big(f"oracle-value:{facts}").handoff == "value" and load_big(f"oracle-word:{facts}").handoff == "word"
    cue = next(c for c, attr in synth.CUES.items() if attr == "birth_date")
    text = f"{person.name} {cue}"
    assert word.answer(person, text) == " 12"
    assert word.answer(person, text + " 12") == " March"
    assert word.answer(person, text + " 12 March") == " 1950"
    assert word.answer(person, text + " 1") == "2"
    assert word.answer(person, text + " 12 Mar") == "ch"
    assert word.answer(person, text + " 12 March 1950") is None  # complete
    assert OracleBig(table, "value").answer(person, text + " 12") == " March 1950"

    born = table.people[0]
    value = born.facts["birth_date"]  # "D Month YYYY": three words
    g, = Cascade(slm, load_big(f"oracle:{facts}"), CascadeConfig(rule="threshold", threshold=0.0,
                                                                  max_new_tokens=40)).generate([text.replace(
                                                                      person.name, born.name)])
    assert g.text.startswith(f" {value}") and g.spans[0] == (0, len(value) + 1)
    assert g.answered == 3  # one call per word, every step calls; then the oracle declines


def test_encode_continuation_spells_exactly_the_text(tok):
    prefix = tok.encode("She was born in Tol")
    for fragment in [" Paris.", "mere", ", and", "  two spaces", "ville was", "\nnew line", "é", " 12 March 1950"]:
        ids = encode_continuation(tok, fragment)
        assert tok.decode(prefix + ids) == tok.decode(prefix) + fragment, fragment
        assert tok.call_id not in ids


def test_unfinished_bytes_are_only_a_character_still_being_spelled(tok):
    byte = {b: tok.sp.piece_to_id(f"<0x{b:02X}>") for b in (0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0x80, 0xF1)}
    ctx = context_ids(tok, "caf")
    assert unfinished_bytes(tok, ctx) == 0
    assert unfinished_bytes(tok, ctx + [byte[0xC3]]) == 1  # é's first byte
    assert unfinished_bytes(tok, ctx + [byte[0xC3], byte[0xA9]]) == 0  # é
    assert unfinished_bytes(tok, ctx + [byte[0xE2], byte[0x82]]) == 2  # two bytes of €'s three
    assert unfinished_bytes(tok, ctx + [byte[0xE2], byte[0x82], byte[0xAC]]) == 0  # €
    assert unfinished_bytes(tok, ctx + [byte[0x80]]) == 0  # a stray continuation byte never completes
    assert unfinished_bytes(tok, ctx + [byte[0xF1], byte[0xF1]]) == 1  # the first lead is broken for good


def test_grown_cache_decodes_like_a_large_one(slm, tok):
    model = slm.model
    ids = torch.tensor([context_ids(tok, "Thynoxine Nahoxski was born in Tolmere")])
    small, large = model.new_cache(1, 4), model.new_cache(1, 64)
    with torch.no_grad():
        a = model(ids[:, :3], cache=small)
        b = model(ids[:, :3], cache=large)
        for t in range(3, ids.shape[1]):
            small.reserve(1)
            a = model(ids[:, t:t + 1], cache=small)
            b = model(ids[:, t:t + 1], cache=large)
    torch.testing.assert_close(a, b)
    assert small.max_len >= ids.shape[1] and small.length == ids.shape[1]


# -- the Hugging Face handoff --------------------------------------------------------------------


def make_hf(directory, steps=150, n_layer=1):
    """A 1-layer GPT-2 on a character-level byte BPE (no merges: chunk seams cannot change the
    tokens, so re-encoding the whole text is an exact reference), trained briefly on biographies
    so its words end in spaces."""
    texts = [ts[0] for _, ts, _ in synth.generate(200, seed=4, heldout=0.0)]
    hf_tok = byte_bpe(texts)
    model = tiny_gpt2(len(hf_tok), n_positions=256, n_embd=64, n_layer=n_layer, bos_token_id=0, eos_token_id=0)
    data = torch.tensor(hf_tok(" ".join(texts))["input_ids"])
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        starts = torch.randint(0, len(data) - 65, (8,), generator=gen)
        batch = torch.stack([data[s:s + 65] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return save_hf(directory, model, hf_tok)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf(tmp_path_factory.mktemp("hf"))


def naive_hf_answer(model, hf_tok, slm_tok, max_word_tokens):
    """The next word from the whole text, re-tokenized and run without a cache at every token
    (declined inside a character the random SLM has spelled in part, in byte pieces)."""

    @torch.no_grad()
    def answer(ctx):
        if unfinished_bytes(slm_tok, ctx):
            return None
        text = slm_tok.decode(ctx[1:])
        ids = hf_tok(text)["input_ids"]
        word = ""
        for _ in range(max_word_tokens):
            t = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if t == hf_tok.eos_token_id:
                return [slm_tok.eos_id] if not word else encode_continuation(slm_tok, word)
            piece = hf_tok.decode([t])
            stripped = (word + piece).lstrip()
            if any(c.isspace() for c in stripped):  # the piece runs into the next word
                cut = len(word + piece) - len(stripped) + next(i for i, c in enumerate(stripped) if c.isspace())
                return encode_continuation(slm_tok, (word + piece)[:cut])
            word += piece
            ids.append(t)
        return encode_continuation(slm_tok, word) or None

    return answer


def test_hf_next_word_handoff_matches_full_reencoding(slm, tok, hf_dir):
    big = load_big(str(hf_dir), max_word_tokens=10)
    fed = []
    handle = big.model.register_forward_pre_hook(
        lambda module, args, kwargs: fed.append(int(kwargs["attention_mask"][:, -kwargs["input_ids"].shape[1]:].sum())),
        with_kwargs=True)
    prompts = ["Thynoxine Nahoxski was born in", "Anna", "She worked as a"]
    cfg = CascadeConfig(rule="threshold", threshold=THRESHOLD, max_new_tokens=30, max_word_tokens=10)
    generations = Cascade(slm, big, cfg).generate(prompts)
    handle.remove()
    reference = naive_cascade(slm.model, tok, prompts, ThresholdRule(THRESHOLD).decide,
                              naive_hf_answer(big.model, big.tok, tok, 10), 30)
    for g, (gen, flags, asked) in zip(generations, reference):
        assert g.tokens == gen and g.from_big == flags and g.calls == len(asked)
    words = [g.text[s:e] for g in generations for s, e in g.spans]
    assert words and any(w.strip() and len(big.tok(w)["input_ids"]) < 10 for w in words)  # some ended at a space
    # Each byte read once (byte-level tokens, no merges): the big model was fed at most the
    # texts' bytes in all, where re-reading the text at every call would feed it many times over.
    assert sum(fed) <= sum(len((g.prompt + g.text).encode()) for g in generations)


def test_hf_left_padded_rows_answer_as_alone(tok, tmp_path):
    """Two layers, so that a padding slot's state would reach the next layer's keys."""
    big = load_big(str(make_hf(tmp_path / "hf2", steps=0, n_layer=2)), max_word_tokens=4)
    contexts = [context_ids(tok, t) for t in ("Thynoxine Nahoxski was born in", "Bo", "She worked as a")]
    big.begin(tok, ["a", "b", "c"], contexts)
    together = big.propose([0, 1, 2], contexts)
    grown = [c + a for c, a in zip(contexts, together)]
    together += big.propose([1, 2], grown)
    alone = []
    for r, c in enumerate(contexts):
        one = load_big(str(tmp_path / "hf2"), max_word_tokens=4)
        one.begin(tok, ["x"], [c])
        alone += one.propose([0], [c])
        if r:
            alone.append(one.propose([0], [grown[r]])[0])
    assert together == [alone[0], alone[1], alone[3], alone[2], alone[4]]


def test_hf_keep_drops_rows_like_a_fresh_batch(tok, hf_dir):
    contexts = [context_ids(tok, t) for t in ("Anna was born in", "Bo lives in", "She worked as a")]
    big = load_big(str(hf_dir))
    big.begin(tok, ["a", "b", "c"], contexts)
    words = big.propose([0, 1, 2], contexts)
    assert all(words)
    grown = [c + w for c, w in zip(contexts, words)]  # as the cascade appends them
    big.keep([2, 0])
    later = [grown[2] + tok.encode(" and"), grown[0]]
    fresh = load_big(str(hf_dir))
    fresh.begin(tok, ["c", "a"], later)
    assert big.propose([0, 1], later) == fresh.propose([0, 1], later)


# -- the command line -----------------------------------------------------------------------------


def test_generate_cli_json_and_text(slm, tok, facts, capsys):
    assert cli.main(["generate", "--slm", str(slm.path.parent), "--big", f"oracle:{facts}", "--prompt", "Anna",
                     "--prompt", "Bo", "--max-new-tokens", "8", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]  # JSONL: factscore's input
    assert [r["title"] for r in rows] == ["Anna", "Bo"] and rows[0]["steps"] == 8
    assert all(r["generation"] == r["prompt"] + r["text"] for r in rows)
    assert {"marked", "called_spans", "calls", "call_rate", "finish", "slm", "big", "rule", "score"} <= set(rows[0])
    assert cli.main(["generate", "--slm", str(slm.path), "--prompt", "Anna", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out
    assert "Anna" in text and "steps 5 | calls 0" in text


@pytest.mark.parametrize("args, message", [
    (["--big", "nowhere/model"], "--big nowhere/model is not a directory"),
    (["--big", "oracle:/no/facts.jsonl"], "facts file /no/facts.jsonl does not exist"),
    (["--budget", "1.5"], "--budget is 1.5"),
    (["--prompt", " "], "--prompt is empty"),
    (["--device", "cuda:7"], "--device cuda:7"),
])
def test_generate_cli_errors_are_one_line(slm, capsys, args, message):
    argv = ["generate", "--slm", str(slm.path), "--prompt", "Anna"] + args
    if torch.cuda.is_available() and "--device" in args:
        pytest.skip("a CUDA device exists")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_generate_cli_refuses_what_is_not_an_export(tmp_path, capsys, tok, slm):
    (tmp_path / "empty").mkdir()
    assert cli.main(["generate", "--slm", str(tmp_path / "empty"), "--prompt", "Anna"]) == 2
    assert "not a lacy-fast model export" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "config.json").write_text(json.dumps({"hello": 1}))
    assert cli.main(["generate", "--slm", str(slm.path), "--big", str(tmp_path / "notes"), "--prompt", "A"]) == 2
    assert "neither a lacy-fast export nor a Hugging Face model" in capsys.readouterr().err
    other = train_small(tmp_path, seed=5)
    big = export(tmp_path / "big", tiny_gpt(other), other)
    assert cli.main(["generate", "--slm", str(slm.path), "--big", str(big), "--rule", "threshold", "--threshold",
                     "0", "--prompt", "A"]) == 2
    err = capsys.readouterr().err
    assert "another tokenizer" in err and err.count("\n") == 1
