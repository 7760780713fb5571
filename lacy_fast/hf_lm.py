"""A local Hugging Face causal LM: one loader, and one Yes/No answer read from its logits.

    model, tok = load_causal_lm("models/judge", "cpu", flag="--judge hf:models/judge")
    answer = YesNo.of(tok(" Yes", add_special_tokens=False)["input_ids"],
                      tok(" No", add_special_tokens=False)["input_ids"], "the judge model models/judge")
    margin = answer.margin(logits)   # (B,) log p(Yes) - log p(No) at the answer position

The data labeler (``data/judge.py``), the claim verifier (``eval/verify.py``) and the
Hugging Face big model (``cascade/big.py``) load their models with ``load_causal_lm``; the
first two read their answers with ``YesNo``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lacy_fast.errors import UserError

HINT = "pass a directory holding a causal LM and its tokenizer (save_pretrained of both)"


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def import_transformers(flag: str) -> Any:
    """transformers, quiet (no logging, no progress bars); a UserError naming ``flag`` when missing."""
    try:
        import transformers
    except ImportError:
        raise UserError(f"{flag} needs transformers, which is not installed; pip install 'lacy-fast[hf]'")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_causal_lm(path: str | Path, device: Any = "cpu", *, flag: str) -> tuple[Any, Any]:
    """(model, tokenizer) from the local directory ``path``, the model on ``device`` in eval
    mode; ``flag`` (the option that named it) starts the one-sentence error when it is not one."""
    transformers = import_transformers(flag)
    if not Path(path).is_dir():
        raise UserError(f"{flag}: {path} is not a directory; {HINT}")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise UserError(f"{flag}: cannot load the model in {path} ({first_line(err)}); {HINT}")
    try:
        model = model.to(device).eval()
    except (RuntimeError, AssertionError) as err:
        raise UserError(f"{flag}: cannot move the model to device {device} ({first_line(err)}); use cpu or a device "
                        "this machine has")
    return model, tokenizer


def context_limit(config: Any) -> int:
    """Positions the model reads at most (no learned positions: no limit)."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return int(limit) if limit else sys.maxsize


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's padding id, else its EOS, else 0 (padding is masked out anyway)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


@dataclass(frozen=True)
class YesNo:
    """A two-way answer: the tokens both spellings share (``prefix``), then the first token
    where they differ (``yes``, ``no``); the answer is the sign of their logit difference."""

    prefix: list[int]
    yes: int
    no: int

    @classmethod
    def of(cls, yes: list[int], no: list[int], who: str) -> "YesNo":
        """From the token ids of the two answers (alone, or each after the same prompt)."""
        n = 0
        while n < min(len(yes), len(no)) and yes[n] == no[n]:
            n += 1
        if n == min(len(yes), len(no)):
            raise UserError(f"the tokenizer of {who} cannot tell the two answers apart; use another model")
        return cls(list(yes[:n]), int(yes[n]), int(no[n]))

    def margin(self, logits: Any) -> Any:
        """log p(yes) - log p(no) from next-token logits (..., V), in fp32 (a tie is 0: no)."""
        return logits[..., self.yes].float() - logits[..., self.no].float()
