"""The SentencePiece tokenizer as a Hugging Face fast tokenizer (``tokenizer.json``).

    files = hf_tokenizer_files("data/tokenizer.model", "<CALL>", max_len=1024)  # name -> text
    # tokenizer.json, tokenizer_config.json, special_tokens_map.json

``AutoTokenizer.from_pretrained(DIR)`` then loads a ``PreTrainedTokenizerFast`` that gives
the ids lacy-fast's ``Tokenizer`` gives and decodes them to the same text. The vocabulary
comes from transformers' own SentencePiece conversion; this module sets the dummy prefix,
the EOS-as-BOS post-processor and the decoder. docs/data.md says why each is set as it is.
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path

from lacy_fast.errors import UserError


@functools.lru_cache(maxsize=4)
def _convert(path: str, sha256: str) -> tuple[str, str, str]:  # sha256: the cache key changes with the file's bytes
    try:
        from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
        from tokenizers.models import BPE, Unigram
        from transformers.convert_slow_tokenizer import SentencePieceExtractor, SpmConverter

        extractor = SentencePieceExtractor(path)
    except ImportError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"writing the Hugging Face tokenizer needs transformers and protobuf ({first}); "
                        "pip install 'transformers>=5.23' protobuf")
    proto = extractor.proto
    kind = BPE if proto.trainer_spec.model_type == 2 else Unigram
    kwargs = extractor.extract(kind)
    tok = SpmConverter.build_tokenizer_from_spm_proto(proto, kwargs["vocab"], kwargs.get("merges"))
    if tok is None:
        raise UserError(f"tokenizer {path} is neither a BPE nor a unigram SentencePiece model; it cannot be converted")
    specials = [t.content for t in kwargs["additional_special_tokens"] if t.special]  # control symbols
    tok.add_special_tokens([AddedToken(s, normalized=True, special=True) for s in specials])
    prefix = proto.normalizer_spec.add_dummy_prefix  # lacy-fast trains with it; a model given by the user may not
    not_special = "".join(f"(?!{re.escape(s)})" for s in specials)
    tok.normalizer = normalizers.Sequence(([normalizers.Replace(Regex(r"\A" + not_special), "▁")] if prefix else [])
                                          + [normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
                                    + ([decoders.Strip(content=" ", left=1)] if prefix else []))
    eos = proto.trainer_spec.eos_piece
    eos_id = tok.token_to_id(eos)
    tok.post_processor = processors.TemplateProcessing(single=f"{eos} $A", pair=f"{eos} $A {eos} $B:1",
                                                       special_tokens=[(eos, eos_id)])
    return tok.to_str(), eos, proto.trainer_spec.unk_piece


def hf_tokenizer_files(model_path: str | Path, call_piece: str, max_len: int) -> dict[str, str]:
    """The files of a Hugging Face fast tokenizer for the SentencePiece model at ``model_path``.

    ``call_piece``: the <CALL> piece; ``max_len``: the model's context length. A training run
    converts once however often it exports (cached on the file's digest).
    """
    digest = hashlib.sha256(Path(model_path).read_bytes()).hexdigest()
    tokenizer_json, eos, unk = _convert(str(model_path), digest)
    special = {"bos_token": eos, "eos_token": eos, "unk_token": unk, "additional_special_tokens": [call_piece]}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_len,
    }
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2, ensure_ascii=False) + "\n",
    }
