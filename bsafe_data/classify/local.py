"""Local Hugging Face text-classification models through ``transformers`` (optional extra ``local``).

``pip install 'bsafe-data[local]'`` adds PyTorch. The model is a local folder or a Hub id (cached
by ``huggingface_hub`` as usual). The score of a text is the highest probability among the
*unsafe* labels (``unsafe_labels``, or by default every label not named like safe/neutral/benign).
Results go through the engine's response cache, keyed by model, revision and text.
"""

from __future__ import annotations

import importlib.util
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bsafe_data.classify.base import Classifier, Item, Score, is_unsafe
from bsafe_data.classify.remote import canonical
from bsafe_data.llm.cache import ResponseCache, request_key

_SAFE_LABEL = re.compile(
    r"^(safe|neutral|benign|ok|normal|none|clean|non[-_ ]?toxic|not[-_ ]?\w+|label_0)$", re.I
)
PROTOCOL = "classify/transformers/1"


class LocalModelUnavailable(RuntimeError):
    """PyTorch (the ``local`` extra) is not installed."""


class LocalModelClassifier(Classifier):
    """A ``transformers`` text-classification pipeline, run in-process, results cached."""

    provider = "transformers"

    def __init__(self, spec: Any, cache_dir: Path | str | None = None):
        if importlib.util.find_spec("torch") is None:
            raise LocalModelUnavailable(
                f"classifier {spec.name!r} (provider transformers) needs PyTorch: "
                "install the extra with `pip install 'bsafe-data[local]'`"
            )
        super().__init__()
        self.spec = spec
        self.name = spec.name
        self.threshold = spec.threshold
        self.targets = tuple(spec.scored_targets)
        self.model = spec.model
        self._cache = ResponseCache(cache_dir)
        self._pipe: Any = None
        self.usage = {"texts": 0, "cache_hits": 0}

    def _pipeline(self) -> Any:
        if self._pipe is None:
            from transformers import pipeline

            kwargs: dict[str, Any] = {"model": self.spec.model, "top_k": None}
            if self.spec.revision:
                kwargs["revision"] = self.spec.revision
            if self.spec.device:
                kwargs["device"] = self.spec.device
            self._pipe = pipeline("text-classification", **kwargs)
        return self._pipe

    def _unsafe(self, labels: Sequence[str]) -> list[str]:
        if self.spec.unsafe_labels:
            wanted = {w.lower() for w in self.spec.unsafe_labels}
            return [label for label in labels if label.lower() in wanted]
        return [label for label in labels if not _SAFE_LABEL.match(label)]

    def score_items(self, items: Sequence[Item]) -> list[Score]:
        """Score the items' texts."""
        return self.score_batch([i.text for i in items])

    def score_batch(self, texts: Sequence[str]) -> list[Score]:
        """One Score per text; cached label probabilities are reused."""
        texts = list(texts)
        keys = [
            request_key(canonical({"model": self.model, "revision": self.spec.revision, "text": t}), PROTOCOL)
            for t in texts
        ]
        found: dict[str, dict[str, float]] = {}
        for key, hit in self._cache.get_many(keys).items():
            try:
                probs = json.loads(hit.text)
            except ValueError:  # a damaged entry is a miss: scored again, then replaced
                continue
            if isinstance(probs, dict) and all(type(v) in (int, float) for v in probs.values()):
                found[key] = probs
        self.usage["cache_hits"] += sum(1 for k in keys if k in found)
        todo = list(dict.fromkeys(k for k in keys if k not in found))
        if todo:
            first = {k: t for k, t in zip(keys, texts, strict=True) if k in todo}
            batch = [first[k] for k in todo]
            outputs = self._pipeline()(
                batch, batch_size=self.spec.batch_size, truncation=True, max_length=self.spec.max_length
            )
            self.usage["texts"] += len(batch)
            for key, output in zip(todo, outputs, strict=True):
                probs = {o["label"]: round(float(o["score"]), 6) for o in output}
                found[key] = probs
                self._cache.put(key, model=self.model, status="ok", text=json.dumps(probs))
            self._cache.flush()
        scores = []
        for key in keys:
            probs: dict[str, float] = found[key]
            unsafe = self._unsafe(list(probs))
            top = max((probs[label] for label in unsafe), default=0.0)
            at = self.spec.category_threshold
            flagged = sorted((lb for lb in unsafe if probs[lb] >= at), key=lambda lb: -probs[lb])
            label = "unsafe" if is_unsafe(top, self.threshold) else "safe"
            scores.append(Score(self.name, label, top, tuple(flagged)))
        return scores

    def close(self) -> None:
        """Commit and close the cache."""
        self._cache.close()
