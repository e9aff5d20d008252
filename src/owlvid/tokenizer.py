"""Qwen2 byte-level BPE tokenizer on top of the `tokenizers` library (no transformers)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from .errors import CheckpointError

# The Qwen2 pre-tokenizer split (digits one at a time, contractions, letters, punctuation, spaces).
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _from_vocab_merges(folder: Path) -> Tokenizer:
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = []
    for line in (folder / "merges.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#version"):
            a, b = line.split(" ")
            merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    specials = QWEN2_SPECIAL
    config = folder / "tokenizer_config.json"
    if config.exists():
        decl = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        specials = [v["content"] for _, v in sorted(decl.items(), key=lambda kv: int(kv[0]))] or specials
    tok.add_special_tokens(specials)
    return tok


class QwenTokenizer:
    """Encodes text (special tokens such as <|im_start|> recognised anywhere) and decodes ids."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_ids = {i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}

    @classmethod
    def from_dir(cls, folder: str | Path) -> QwenTokenizer:
        folder = Path(folder)
        if (folder / "tokenizer.json").exists():
            return cls(Tokenizer.from_file(str(folder / "tokenizer.json")))
        if (folder / "vocab.json").exists() and (folder / "merges.txt").exists():
            return cls(_from_vocab_merges(folder))
        raise CheckpointError(f"no tokenizer in {folder}: expected tokenizer.json or vocab.json + merges.txt")

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise CheckpointError(f"tokenizer has no token {token!r}")
        return i

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # ids past the tokenizer (the checkpoints have spare embedding rows) have no text.
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)


class IncrementalDecoder:
    """Turns a stream of ids into text deltas that never split a UTF-8 character.

    Built on `tokenizers.decoders.DecodeStream`, which decodes only a short window (the ids of the last
    chunk it gave out, as context, plus those not given out yet) per id instead of the whole sequence.
    The deltas joined with `flush()` equal `tokenizer.decode(all ids)` exactly: every chunk ends after a
    complete character, so the byte-level text splits cleanly there.
    """

    def __init__(self, tokenizer: QwenTokenizer) -> None:
        self.tokenizer = tokenizer
        self._stream = decoders.DecodeStream(skip_special_tokens=True)
        self._pending: list[int] = []  # ids fed to the stream whose text has not come out yet

    def push(self, token_id: int) -> str:
        tok = self.tokenizer
        # Ids past the vocabulary and (skipped) special tokens have no text; keeping them out of the stream
        # also keeps its window short when a model emits many of them in a row.
        if not 0 <= token_id < tok.vocab_size or token_id in tok.special_ids:
            return ""
        self._pending.append(token_id)
        chunk = self._stream.step(tok._tok, token_id)
        if chunk is None:  # an incomplete character (or a text ending in U+FFFD): wait for the next id
            return ""
        self._pending.clear()
        return chunk

    def flush(self) -> str:
        """The text of the ids still held back (with the U+FFFD a full decode gives an incomplete character);
        the decoder starts afresh afterwards."""
        text = self.tokenizer.decode(self._pending) if self._pending else ""
        self._pending = []
        self._stream = decoders.DecodeStream(skip_special_tokens=True)
        return text
