"""OpenAI's moderation endpoint (``POST /v1/moderations``, model ``omni-moderation-latest``).

The score of a text is its highest category score; ``categories`` lists the native categories at
or above ``category_threshold`` (independent of ``threshold``), highest first (rules map them to
the recipe taxonomy, see ``taxonomy``).
Texts are sent in batches (``input`` is a list) but cached one by one, keyed by the single-text
request ``{"model", "input": text}``.
"""

from __future__ import annotations

from typing import Any

from bsafe_data.classify.base import Item, Score
from bsafe_data.classify.remote import RemoteClassifier, Request, canonical
from bsafe_data.llm.errors import RequestFailed


def _results(body: dict[str, Any]) -> list[dict[str, Any]]:
    results = body["results"]
    out = []
    for result in results:
        scores = {str(k): float(v) for k, v in result["category_scores"].items() if v is not None}
        out.append({"category_scores": scores, "flagged": bool(result.get("flagged", False))})
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

    async def _fetch_all(self, todo: dict[str, tuple[Request, bytes]]) -> dict[str, Any]:
        keys = list(todo)
        size = self.spec.batch_size
        batches = [keys[i : i + size] for i in range(0, len(keys), size)]
        out: dict[str, Any] = {}

        async def one(batch: list[str]) -> None:
            body = canonical({"model": self.model, "input": [todo[k][0].payload["input"] for k in batch]})
            try:
                results = await self._post("/moderations", body, _results)
                if len(results) != len(batch):
                    raise RequestFailed(f"{len(results)} results for {len(batch)} inputs")
            except RequestFailed as exc:
                out.update(dict.fromkeys(batch, exc))
                return
            out.update(zip(batch, results, strict=True))

        await self._each(batches, one)
        return out
