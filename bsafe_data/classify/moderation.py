"""OpenAI's moderation endpoint (``POST /v1/moderations``, model ``omni-moderation-latest``).

The score of a text is its highest category score; ``categories`` lists the native categories at
or above ``category_threshold`` (independent of ``threshold``), highest first (rules map them to
the recipe taxonomy, see ``taxonomy``).
Texts are sent in batches of up to ``batch_size`` (``input`` is a list; the engine joins the calls
that are waiting) but cached one by one, keyed by the single-text request ``{"model", "input": text}``.
"""

from __future__ import annotations

import json
from typing import Any

from bsafe_data.classify.base import Item, Score
from bsafe_data.classify.remote import RemoteClassifier, Request, canonical
from bsafe_data.llm.engine import Batched, Reply


def _results(raw: bytes) -> list[Reply]:
    """One stored result per input of a ``/moderations`` answer."""
    out = []
    for result in json.loads(raw)["results"]:
        scores = {str(k): float(v) for k, v in result["category_scores"].items() if v is not None}
        out.append(
            Reply(json.dumps({"category_scores": scores, "flagged": bool(result.get("flagged", False))}))
        )
    return out


class ModerationClassifier(RemoteClassifier):
    """Scores texts with an OpenAI-compatible ``/moderations`` endpoint."""

    provider = "openai_moderation"
    protocol = "classify/moderation/1"

    def request(self, item: Item) -> Request:
        return Request("/moderations", {"model": self.model, "input": item.text})

    def parse(self, item: Item, stored: dict[str, Any]) -> Score:
        scores: dict[str, float] = stored["category_scores"]
        top = max(scores.values(), default=0.0)
        at = self.spec.category_threshold
        flagged = sorted((c for c, s in scores.items() if s >= at), key=lambda c: -scores[c])
        return Score(self.name, self.label(top), round(top, 6), tuple(flagged))

    def batched(self, request: Request) -> Batched:
        """Texts share requests of up to ``batch_size`` inputs."""

        def body(texts: list[Any]) -> bytes:
            return canonical({"model": self.model, "input": texts})

        return Batched(self.spec.batch_size, request.payload["input"], body, _results)
