"""``bsafe-data plan``: what a build will cost before anything is spent.

Reads the sources and plans every row exactly as ``build`` does (same seeds, same rejections),
renders each generator prompt and counts its tokens with the primary tokenizer, then estimates
cost (online, and through the Batch API at ``batch.discount`` of it) and wall time under the
recipe's limits. Sample rows come from the builtin generator.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from bsafe_data.executor.flow import Flow
from bsafe_data.generate.base import GenerationRequest
from bsafe_data.generate.builtin import BuiltinGenerator
from bsafe_data.methods.base import Resources
from bsafe_data.recipe import Recipe
from bsafe_data.registry import method_class
from bsafe_data.sources import read_sources
from bsafe_data.stages.segment import load_nlp
from bsafe_data.tokenization import load_tokenizer

_TAG_OVERHEAD_TOKENS = 16  # <harmful>…</harmful><category>…</category> around the text
_CHUNK = 2000


@dataclass
class BuildPlan:
    """Estimated requests, tokens, cost and time of a build."""

    source_rows: int = 0
    rejected_before_generation: int = 0
    requests: int = 0
    input_tokens: int = 0
    output_tokens_estimate: int = 0
    output_tokens_max: int = 0
    cost_usd: float | None = None  # online
    cost_batch_usd: float | None = None  # every generator request through the Batch API
    wall_seconds: float = 0.0
    bottleneck: str = ""
    samples: list[dict[str, Any]] = field(default_factory=list)


def _prompt_tokens(tokenizer: Any, recipe: Recipe, requests: list[GenerationRequest]) -> int:
    from bsafe_data.inject import load_template

    template = load_template(recipe.generator.template)
    texts = [
        "\n".join(m["content"] for m in template.render(r.context, r.part1, r.category)) for r in requests
    ]
    return sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0


def plan_build(recipe: Recipe, limit: int | None = None, latency_s: float = 2.0) -> BuildPlan:
    """Plan a build without calling any model; ``latency_s`` is the assumed seconds per request."""
    tokenizer = load_tokenizer(recipe.tokenizers.primary)
    builtin = BuiltinGenerator()
    resources = Resources(
        load_nlp(recipe.segmentation.spacy_model),
        {ref: load_tokenizer(ref) for ref in recipe.tokenizers.all},
        builtin,
    )
    method = method_class(recipe)(recipe, resources)
    result = BuildPlan()
    proxy_tokens = 0
    items = read_sources(recipe.sources, limit)
    while chunk := list(itertools.islice(items, _CHUNK)):
        result.source_rows += len(chunk)
        requests, rejected = method.generation_requests(chunk)
        result.rejected_before_generation += rejected
        result.requests += len(requests)
        result.input_tokens += _prompt_tokens(tokenizer, recipe, requests)
        generated = builtin.generate_batch(requests)
        texts = [g.steering + g.violation for g in generated]
        proxy_tokens += (
            sum(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else 0
        )
        if not result.samples and chunk:
            out = Flow(method).run(0, chunk[:20])
            result.samples = (out.kept["train"] + out.kept["test"])[:3]
    spec = recipe.generator
    per_request = min(spec.max_tokens, proxy_tokens / max(1, result.requests) + _TAG_OVERHEAD_TOKENS)
    result.output_tokens_estimate = round(per_request * result.requests)
    result.output_tokens_max = spec.max_tokens * result.requests
    if spec.prices:
        result.cost_usd = round(
            result.input_tokens / 1e6 * spec.prices.get("input", 0.0)
            + result.output_tokens_estimate / 1e6 * spec.prices.get("output", 0.0),
            4,
        )
        result.cost_batch_usd = round(result.cost_usd * recipe.batch.discount, 4)
    rates = {"concurrency": spec.max_concurrency / latency_s}
    if spec.requests_per_minute:
        rates["requests_per_minute"] = spec.requests_per_minute / 60
    if spec.tokens_per_minute and result.requests:
        tokens_per_request = (result.input_tokens + result.output_tokens_estimate) / result.requests
        rates["tokens_per_minute"] = spec.tokens_per_minute / 60 / max(1.0, tokens_per_request)
    result.bottleneck, rate = min(rates.items(), key=lambda kv: kv[1])
    result.wall_seconds = result.requests / rate if spec.provider != "builtin" else 0.0
    return result
