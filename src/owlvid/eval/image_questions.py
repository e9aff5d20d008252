"""One question of the image tables (`ImageQuestion`) and the parsing of options written into a question's
text; shared by the parquet loaders (`image_datasets`) and the official json layouts (`image_official_data`)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class ImageQuestion:
    """One question: its images (bytes or paths, in prompt order) and what scoring needs: ``options`` + letter
    ``answer`` (multiple choice), ``answer`` (GQA, "yes"/"no" for POPE/NLVR2), ``answers`` (open-ended VQA), None
    where the split has no public answer (then the run writes a submission file). ``task`` is the category
    --tasks filters and the results break down by (POPE split, sub-task, MMBench category ...); ``group`` is the
    MMBench circular-evaluation group; ``fields`` hold what the prompts need besides the question."""

    qid: str
    benchmark: str
    task: str
    question: str
    images: tuple
    options: tuple[str, ...] = ()
    answer: str | None = None
    answers: tuple[str, ...] | None = None
    group: str | None = None
    categories: dict[str, str] = field(default_factory=dict)
    fields: dict[str, Any] = field(default_factory=dict)

    @property
    def has_truth(self) -> bool:
        return self.answer is not None or bool(self.answers)


def interleave_options(question: str, answer: str) -> tuple[str, ...]:
    """Option texts of a question whose options live in its text ("A. ..", "(A) ..", "A: .." lines); letters up to
    the answer's when the text has none."""
    found = re.findall(r"^\s*\(?([A-H])[\.\):]\s*(.*)$", question, flags=re.MULTILINE)
    texts = {}
    for letter, text in found:
        texts.setdefault(letter, text.strip())
    n = max([LETTERS.index(x) + 1 for x in texts] + [LETTERS.index(answer) + 1 if answer in LETTERS else 1])
    return tuple(texts.get(LETTERS[i], LETTERS[i]) for i in range(n))
