"""The shard pool of prepare and its judge step: results by shard index, and a worker that
dies is one sentence naming the shard (the run resumes from the shards already written)."""
import os

import pytest

from lacy_fast.data.workers import ShardPool, die_with_parent
from lacy_fast.errors import UserError


class Bar:
    def __init__(self):
        self.docs = 0

    def update(self, docs, tokens=0):
        self.docs += docs


def _init(events, parent):
    global _events
    die_with_parent(parent)
    _events = events


def _square(x):
    _events.put((1, 0))
    return x * x


def _die(x):
    os._exit(1)


def test_results_come_back_by_shard_index_with_their_progress():
    bar = Bar()
    with ShardPool(2, _init, (), bar, doing="labeling", kept="finished") as pool:
        for index in range(5):
            pool.submit(index, _square, index + 10)
        done = {}
        while pool.pending:
            done.update(pool.wait())
            assert bar.docs >= len(done)  # a shard comes back with its progress applied
    assert done == {i: (i + 10) ** 2 for i in range(5)}
    assert bar.docs == 5


def test_a_worker_that_dies_is_one_sentence_naming_the_shard():
    with pytest.raises(UserError, match=r"died while judging shard 7 .*resume from the judged shards"):
        with ShardPool(1, _init, (), Bar(), doing="judging", kept="judged") as pool:
            pool.submit(7, _die, 0)
            while pool.pending:
                pool.wait()
