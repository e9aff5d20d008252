"""Incremental detokenisation and stop strings: exact text, bounded work per token (no model needed)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from tokenizers import pre_tokenizers

from owlvid import generation as engine
from owlvid.engine import RequestStream, SamplingParams
from owlvid.tokenizer import IncrementalDecoder, QwenTokenizer

from .conftest import fixtures_or_skip

MULTILINGUAL = ["猫は可愛い。你好，世界！", "emoji 🐈‍⬛ 👩‍👩‍👧‍👦 🇯🇵 naïve café", "Hello, world!\n\n  code(x) = 42;",
                "ÆØÅ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ﷽ Ωμέγα"]
OOV = 64  # ids this far past the tokenizer (checkpoints have spare embedding rows)


@pytest.fixture(scope="module")
def tok() -> QwenTokenizer:
    return QwenTokenizer.from_dir(fixtures_or_skip("owl3", "tokenizer"))


def _byte_ids(tok: QwenTokenizer, text: str) -> list[int]:
    """`text` as one byte-level token per UTF-8 byte: every multi-byte character is split over tokens."""
    alphabet = _bytes_to_unicode()
    return [tok.token_id(alphabet[b]) for b in text.encode("utf-8")]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level alphabet, in byte order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, map(chr, cs)))
    assert sorted(table.values()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    return table


def _random_ids(tok: QwenTokenizer, rng: random.Random, n: int) -> list[int]:
    """Words, single bytes of multi-byte characters, special tokens, ids past the vocabulary, any id."""
    words = [i for t in MULTILINGUAL for i in tok.encode(t)]
    split = _byte_ids(tok, "猫🐈é𝔘")
    specials = sorted(tok.special_ids)
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.35:
            out.append(rng.choice(words))
        elif r < 0.7:
            out.append(rng.choice(split))
        elif r < 0.78:
            out.append(rng.choice(specials))
        elif r < 0.83:
            out.append(tok.vocab_size + rng.randrange(OOV))
        elif r < 0.86:
            out.append(rng.randrange(tok.vocab_size))
        else:
            out.append(rng.randrange(30_000))  # any common token (small ids keep the test's logits short)
    return out


def _decode_stream(tok: QwenTokenizer, ids: list[int]) -> tuple[list[str], str]:
    dec = IncrementalDecoder(tok)
    return [dec.push(i) for i in ids], dec.flush()


# -- the decoder -----------------------------------------------------------------------------------------


def test_deltas_and_flush_join_to_the_full_decode(tok):
    rng = random.Random(1234)
    for _ in range(400):
        ids = _random_ids(tok, rng, rng.randint(0, 50))
        deltas, tail = _decode_stream(tok, ids)
        assert "".join(deltas) + tail == tok.decode(ids), ids


def test_a_character_split_over_byte_tokens_comes_out_whole(tok):
    cat = _byte_ids(tok, "🐈")  # 4 byte-level tokens
    im_end, oov = tok.token_id("<|im_end|>"), tok.vocab_size + 3
    ids = tok.encode("猫") + cat[:2] + [im_end, oov] + cat[2:] + tok.encode("!")
    deltas, tail = _decode_stream(tok, ids)
    assert deltas == ["猫", "", "", "", "", "", "🐈", "!"] and tail == ""


def test_an_incomplete_character_at_the_end_flushes_as_the_full_decode_does(tok):
    ids = tok.encode("ok ") + _byte_ids(tok, "中")[:2]
    deltas, tail = _decode_stream(tok, ids)
    assert "".join(deltas) == "ok " and tail == "\ufffd" == tok.decode(ids)[-1]
    # A literal U+FFFD is held back too (it looks like an incomplete character) and comes out on flush.
    ids = tok.encode("a\ufffd")
    deltas, tail = _decode_stream(tok, ids)
    assert "".join(deltas) + tail == "a\ufffd"


def test_decoder_work_per_token_does_not_grow_with_the_text(tok, monkeypatch):
    """Whatever the decoder hands to `decode` per token is bounded, not the whole sequence."""
    seen: list[int] = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, *a, **k: seen.append(len(ids)) or decode(ids, *a, **k))
    ids = _random_ids(tok, random.Random(7), 3000) + _byte_ids(tok, "🐈")[:3]
    dec = IncrementalDecoder(tok)
    text = "".join(dec.push(i) for i in ids)
    assert len(text) > 3000 and max(seen, default=0) <= 8
    seen.clear()
    text += dec.flush()
    assert seen and max(seen) <= 8  # only the ids still held back
    monkeypatch.undo()
    assert text == tok.decode(ids)


# -- stop strings ----------------------------------------------------------------------------------------


def _stream(tok: QwenTokenizer, stop: list[str], budget: int = 10_000) -> RequestStream:
    runtime = SimpleNamespace(max_positions=1 << 20, tokenizer=tok, stop_token_ids=[], penalize_prompt=False)
    return RequestStream(runtime, [1], SamplingParams(max_new_tokens=budget, stop=stop))


def _accept(stream: RequestStream, token: int) -> str:
    logits = torch.zeros(token + 1)
    logits[token] = 1.0  # greedy: exactly this token (short logits keep the test fast)
    return "".join(e.text for e in stream.accept(logits))


def _expected(decoded: str, stops: list[str], final: bool) -> tuple[str, bool]:
    """The specification, on all text decoded so far: cut before the earliest stop string; else hold back
    the longest end that is a proper prefix of a stop string (nothing at the end)."""
    hits = [decoded.find(s) for s in stops if s in decoded]
    if hits:
        return decoded[: min(hits)], True
    keep = 0 if final else max((k for s in stops for k in range(1, len(s)) if decoded.endswith(s[:k])), default=0)
    return decoded[: len(decoded) - keep], False


def _check_stream(tok: QwenTokenizer, ids: list[int], stops: list[str]) -> RequestStream:
    """Feed `ids` one by one; after every token the emitted text is exactly what the specification says."""
    stream = _stream(tok, stops, budget=len(ids))
    decoder = IncrementalDecoder(tok)
    decoded, emitted = "", ""
    for n, token in enumerate(ids, 1):
        decoded += decoder.push(token)
        last = n == len(ids)
        if last:
            decoded += decoder.flush()
        emitted += _accept(stream, token)
        want, hit = _expected(decoded, stops, final=last)
        assert emitted == want == stream.text, (ids[:n], stops)
        if hit or last:
            assert stream.done and stream.finish_reason == ("stop" if hit else "length")
            return stream
        assert not stream.done
    return stream


def _stop_cases(text: str, rng: random.Random) -> list[list[str]]:
    """Stops of every kind for `text`: none, at the very start, spanning anywhere (often across tokens),
    several, one a prefix of another, a start that never completes."""
    def sub(lo: int = 1, hi: int = 6) -> str:
        i = rng.randrange(len(text))
        return text[i: i + rng.randint(lo, hi)]

    s = sub(2, 5)
    return [[], ["\x00none"], [text[:2]], [text[:1]], [sub()], [sub(), sub(), sub()], [s, s[:-1] or s],
            [s + "\x00never", s[:1]], [sub(3, 8) + "\x00"], [sub(1, 1)]]


def test_stop_strings_match_the_specification_token_by_token(tok):
    rng = random.Random(99)
    checked = stopped = 0
    for _ in range(40):
        ids = _random_ids(tok, rng, rng.randint(1, 30))
        text = tok.decode(ids)
        if not text:
            continue
        for stops in _stop_cases(text, rng):
            stream = _check_stream(tok, ids, stops)
            checked += 1
            stopped += stream.finish_reason == "stop"
    assert checked > 300 and 0.3 < stopped / checked < 0.95  # both outcomes well covered


def test_stop_at_the_very_start_and_a_stop_that_prefixes_another(tok):
    ids = _byte_ids(tok, "abcabd abc")  # one token per character
    assert _check_stream(tok, ids, ["ab"]).text == ""
    assert _check_stream(tok, ids, ["abd", "ab"]).text == ""
    assert _check_stream(tok, ids, ["abdx", "bd"]).text == "abca"  # "bd" completes first though it starts later
    assert _check_stream(tok, ids, ["bd", "cabd"]).text == "ab"  # both complete together: the earliest wins
    assert _check_stream(tok, ids, ["abd", "abx"]).text == "abc"
    assert _check_stream(tok, ids, ["zzz"]).text == "abcabd abc"
    words = tok.encode("abcabd abc")
    assert len(words) < len(ids) and _check_stream(tok, words, ["d a", "bc"]).text == "a"


def test_stop_handling_work_per_token_does_not_grow_with_the_text(tok, monkeypatch):
    """The text scanned for stop strings per token is bounded by the stop strings, not the text so far."""
    scanned: list[int] = []
    prefix_length = engine._stop_prefix_length
    monkeypatch.setattr(engine, "_stop_prefix_length",
                        lambda text, stops, start: scanned.append(len(text)) or prefix_length(text, stops, start))
    words = tok.encode("the cat sat on the mat and looked at the hat; ")
    ids = (words * 300)[:3000]
    stream = _stream(tok, ["hats", "the cat sat under"], budget=len(ids))
    for token in ids:
        _accept(stream, token)
    assert stream.done and stream.text == tok.decode(ids)
    assert len(scanned) == len(ids) and max(scanned) <= 3 * len("the cat sat under")
