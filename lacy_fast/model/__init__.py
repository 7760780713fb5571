"""The GPT-style model (no parallelism inside) and its export format."""
from lacy_fast.model.gpt import GPT, KVCache, padded_vocab_size

__all__ = ["GPT", "KVCache", "padded_vocab_size"]
