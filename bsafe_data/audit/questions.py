"""What annotators are asked, per row group, and what counts as a bad row.

Groups: ``injected`` and ``clean`` are kept rows (config ``default``) of that kind; ``rejected``
is any row of config ``rejected``. Every answer is ``yes``, ``no`` or ``unsure``.
"""

from __future__ import annotations

from typing import Any

ANSWERS: tuple[str, ...] = ("yes", "no", "unsure")

#: group -> [(key, question)], in screen order. Keys are stable: the store and exports use them.
QUESTIONS: dict[str, list[tuple[str, str]]] = {
    "injected": [
        ("violation_real", "Is the violation a real policy violation?"),
        ("category_right", "Is the category in the control signal right?"),
        ("continues_text", "Does the violation continue the text before it?"),
        ("backtrack_exact", "Does the backtrack remove exactly the steering and the violation?"),
        ("continuation_safe", "Is the continuation after the control signal safe?"),
    ],
    "clean": [("response_safe", "Is this answer safe?")],
    "rejected": [("rejection_right", "Was the rejection right (should this row stay out of the data)?")],
}

QUESTION_TEXT: dict[str, str] = {key: text for qs in QUESTIONS.values() for key, text in qs}

#: The answer that marks a row as bad, per question.
BAD_ANSWER: dict[str, str] = {
    "violation_real": "no",
    "category_right": "no",
    "continues_text": "no",
    "backtrack_exact": "no",
    "continuation_safe": "no",
    "response_safe": "no",
    "rejection_right": "yes",
}


def group_of(config: str, kind: str) -> str:
    """The question group of a row: ``rejected`` for config rejected, else its kind."""
    return "rejected" if config == "rejected" else ("injected" if kind == "injected" else "clean")


def validate_answers(group: str, answers: dict[str, Any], *, complete: bool = True) -> dict[str, str]:
    """Check answers against the group's questions; returns a clean copy or raises ValueError."""
    keys = [k for k, _ in QUESTIONS[group]]
    unknown = sorted(set(answers) - set(keys))
    if unknown:
        raise ValueError(f"unknown questions for {group} rows: {', '.join(unknown)}")
    clean: dict[str, str] = {}
    for key in keys:
        value = answers.get(key)
        if value is None:
            if complete:
                raise ValueError(f"question {key} is not answered")
            continue
        if value not in ANSWERS:
            raise ValueError(f"answer to {key} must be one of {', '.join(ANSWERS)}")
        clean[key] = value
    return clean


def bad_questions(answers: dict[str, str]) -> list[str]:
    """The questions whose answer marks the row as bad (empty: the annotator found nothing wrong)."""
    return [key for key, value in answers.items() if BAD_ANSWER.get(key) == value]


def verdict(answers: dict[str, str]) -> str:
    """``bad`` (some answer marks it bad), ``good`` (every answer is the good one) or ``unsure``."""
    if bad_questions(answers):
        return "bad"
    if answers and all(value != "unsure" for value in answers.values()):
        return "good"
    return "unsure"
