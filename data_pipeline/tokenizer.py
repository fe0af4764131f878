"""Tokenizer: train a byte-level BPE with ``tokenizers`` on a sample, or load an existing ``tokenizer.json``.

Special tokens (ids 0, 1, 2 when trained here): PAD, BOS, EOS. The sample is drawn by the workers, each from
its own partition of deduplicated training documents, by a hash of the text (fraction sample_bytes / corpus
bytes): uniform over the corpus and its sources, not a prefix of the first files. Training runs in one
Ray task (``tokenizers`` trains in one process).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.config import TokenizerConfig

log = logging.getLogger(__name__)


class TokenizerError(ValueError):
    pass


@dataclass
class SpecialIds:
    pad: int
    bos: int
    eos: int


def train_bpe(texts: Iterable[str], cfg: TokenizerConfig):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [cfg.pad, cfg.bos, cfg.eos]
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=True,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if tok.get_vocab_size() < cfg.vocab_size:
        log.warning(
            "tokenizer: the sample supports only %d tokens (< vocab_size %d); the model's embedding "
            "keeps vocab_size rows",
            tok.get_vocab_size(),
            cfg.vocab_size,
        )
    return tok


def load(path: str | Path):
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"{path}: tokenizer.json not found; give tokenizer.path or leave it empty to train")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise TokenizerError(f"{path}: not a tokenizers JSON file ({e})") from e


def from_str(tokenizer_json: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def special_ids(tok, cfg: TokenizerConfig) -> SpecialIds:
    ids = {}
    for name in ("pad", "bos", "eos"):
        token = getattr(cfg, name)
        tid = tok.token_to_id(token)
        if tid is None:
            raise TokenizerError(
                f"tokenizer has no {name.upper()} token '{token}'; set tokenizer.{name} to one of its special tokens"
            )
        ids[name] = tid
    return SpecialIds(**ids)
