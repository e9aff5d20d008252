"""Text side of the decode loop: detokenisation + stop-string handling, per generated token (no model).

    python benchmarks/detok.py [--tokenizer DIR] [--lengths 100,1000,4000] [--repeat 3]

"old" is the code before the incremental rewrite (re-decode every id per token, rebuild the whole text per
token to look for stop strings), kept inline below; "new" is owlvid's IncrementalDecoder + RequestStream.
Both get the same ids (a real Qwen2 tokenizer on mixed English/CJK/emoji text), with no stop string and
with two stop strings that never occur (the common case: checked at every token, never hit). Prints the
mean microseconds per token (push + stop handling, the final flush included) over a whole generation.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from owlvid.engine import RequestStream, SamplingParams, TokenEvent  # noqa: E402
from owlvid.tokenizer import QwenTokenizer  # noqa: E402

TEXT = ("The cat sat on the mat, then looked at the window for a while. 猫はしばらく窓の外を見ていた。"
        "它跳上了桌子 🐈 and knocked over a cup of tea ☕️; nobody noticed until 3:45 pm.\n\n")
STOPS = ["</answer>", "\n\nUser:"]


class OldDecoder:
    """owlvid.tokenizer.IncrementalDecoder before the rewrite: decodes the whole id list at every token."""

    def __init__(self, tokenizer: QwenTokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        delta = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return delta


def _old_stop_prefix_length(text: str, stops: list[str], start: int) -> int:
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text) - start), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class OldText:
    """RequestStream's text handling before the rewrite: `self.text + self._held + delta` per token."""

    def __init__(self, tokenizer: QwenTokenizer, stop: list[str]) -> None:
        self.decoder = OldDecoder(tokenizer)
        self.stop = stop
        self.text = ""
        self._held = ""
        self.finish_reason: str | None = None

    def _emit(self, token: int, delta: str, final: bool) -> list[TokenEvent]:
        candidate = self.text + self._held + delta
        stops = [s for s in self.stop if s]
        if stops:
            start = max(0, len(self.text) - max(map(len, stops)))
            hits = [i for i in (candidate.find(s, start) for s in stops) if i >= 0]
            if hits:
                final, candidate = True, candidate[: min(hits)]
                self.finish_reason = "stop"
        keep = 0 if final else _old_stop_prefix_length(candidate, stops, len(self.text))
        out = candidate[len(self.text): len(candidate) - keep]
        self._held = candidate[len(candidate) - keep:]
        self.text += out
        return [TokenEvent(token, out)]

    def _finish_text(self, token: int) -> list[TokenEvent]:
        return [e for e in self._emit(token, self.decoder.flush(), final=True) if e.text]


def _new(tokenizer: QwenTokenizer, stop: list[str]) -> RequestStream:
    runtime = SimpleNamespace(max_positions=1 << 20, tokenizer=tokenizer, stop_token_ids=[], penalize_prompt=False)
    return RequestStream(runtime, [0], SamplingParams(max_new_tokens=1 << 20, stop=stop))


def _run(make, tokenizer: QwenTokenizer, ids: list[int], stop: list[str]) -> tuple[float, str]:
    """Seconds for the text side of one generation of `ids`, and its text."""
    stream = make(tokenizer, stop)
    t0 = time.perf_counter()
    for token in ids:
        stream._emit(token, stream.decoder.push(token), final=False)
    stream._finish_text(ids[-1])
    return time.perf_counter() - t0, stream.text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", default=None, help="Qwen2 tokenizer folder (default: the fixture tokenizer)")
    ap.add_argument("--lengths", default="100,1000,4000")
    ap.add_argument("--repeat", type=int, default=3, help="runs per point; the best is reported")
    args = ap.parse_args()
    folder = args.tokenizer
    if folder is None:
        candidates = (REPO / "tests/fixtures/owl3/tokenizer", REPO.parent / "shared/fixtures/owl3/tokenizer")
        folder = next(p for p in candidates if p.exists())
    tokenizer = QwenTokenizer.from_dir(folder)
    lengths = [int(n) for n in args.lengths.split(",")]
    words = tokenizer.encode(TEXT)
    ids_all = (words * (max(lengths) // len(words) + 1))[: max(lengths)]

    print(f"detokenisation + stop handling, µs per generated token (best of {args.repeat}; CPU, no model)")
    print(f"{'tokens':>7} {'stops':>6} {'old µs/tok':>11} {'new µs/tok':>11} {'speed-up':>9}")
    for n in lengths:
        ids = ids_all[:n]
        for stop in ([], STOPS):
            best = {}
            for name, make in (("old", OldText), ("new", _new)):
                times, texts = zip(*(_run(make, tokenizer, ids, stop) for _ in range(args.repeat)))
                best[name] = min(times) / n * 1e6
                assert texts[0] == tokenizer.decode(ids), name  # both give the full text (no stop occurs)
            print(f"{n:>7} {len(stop):>6} {best['old']:>11.1f} {best['new']:>11.1f} {best['old'] / best['new']:>8.1f}x")


if __name__ == "__main__":
    main()
