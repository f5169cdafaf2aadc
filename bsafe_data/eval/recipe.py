"""The ``eval`` recipe: the model under test, prompt sources, attacks and classifiers.

A recipe with ``method: eval`` is parsed here; every other method goes to ``registry``
(``load_any_recipe`` picks), so ``bsafe-data validate`` and ``plan`` take both kinds.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from bsafe_data.label import DEFAULT_CONTROL_FORMAT
from bsafe_data.recipe import (
    RLBF_CATEGORIES,
    AnyClassifierSpec,
    ClassifierSpec,
    ControlSpec,
    PublishSpec,
    Recipe,
    RecipeError,
    Strict,
    _without_credentials,
    load_with,
)

#: Prompt-file layouts: AdvBench (``goal``, ``target``), HarmBench (``Behavior``), JailbreakBench
#: (``Goal``, ``Target``, ``Category``), an ``rlbf_prompts`` build (a folder or its parquet), or
#: any table with a ``prompt`` (or ``messages``) column and optional ``target``, ``category``.
LAYOUTS = ("auto", "advbench", "harmbench", "jailbreakbench", "rlbf_prompts", "prompts")


class ModelSpec(Strict):
    """A model to evaluate: an OpenAI-compatible endpoint or a local checkpoint (transformers)."""

    provider: Literal["openai", "transformers"] = "openai"
    model: str = Field(..., description="model name sent to the endpoint, or a local checkpoint folder")
    label: str | None = Field(None, description="name in the report (default: model)")
    tokenizer: str | None = Field(
        None,
        description="the model's tokenizer ('builtin:NAME', a folder or a Hub id; X counts its tokens); "
        "default: the checkpoint's (transformers) or builtin:qwen2.5",
    )
    gguf_file: str | None = Field(None, description="a GGUF file inside `model` (transformers)")
    api: Literal["completions", "chat"] = Field(
        "completions",
        description="completions: the prompt rendered with the model's chat template, sent raw (a "
        "prefill is the start of the assistant turn); chat: messages, a prefill sent as a final "
        "assistant message with continue_final_message",
    )
    base_url: str | None = Field(None, description="endpoint; default $OPENAI_BASE_URL")
    api_key_env: str = Field("OPENAI_API_KEY", description="name of the env var holding the API key")
    extra_body: dict[str, Any] = Field(
        default_factory=lambda: {"skip_special_tokens": False},
        description="fields added to every request (vLLM: keep control atoms in the text)",
    )
    max_tokens: int = Field(256, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: no top-k cut")
    seed: int = 0
    max_concurrency: int = Field(16, ge=1)
    min_concurrency: int = Field(1, ge=1, description="floor of the adaptive limit (see the build recipe)")
    timeout_s: float = Field(120.0, gt=0)
    max_retries: int = Field(4, ge=0)
    max_retry_after_s: float = Field(120.0, ge=0)
    device: str | None = Field(None, description="transformers: 'cpu', 'cuda:0', ...")

    @field_validator("base_url")
    @classmethod
    def _no_credentials(cls, value: str | None) -> str | None:
        return _without_credentials(value)

    @property
    def name(self) -> str:
        """The model's name in the report."""
        return self.label or self.model

    @property
    def tokenizer_ref(self) -> str:
        """What X is counted with."""
        if self.tokenizer:
            return self.tokenizer
        return self.model if self.provider == "transformers" else "builtin:qwen2.5"


class PromptSourceSpec(Strict):
    """A prompt file (CSV, JSONL, JSON, parquet) or an ``rlbf_prompts`` build folder."""

    path: str
    layout: Literal[LAYOUTS] = "auto"  # type: ignore[valid-type]
    kind: Literal["harmful", "benign"] = Field(
        "harmful", description="benign prompts measure over-refusal (asked without attacks)"
    )
    limit: int | None = Field(None, ge=1)
    encoding: str | None = None


class AttackSpec(Strict):
    """One attack: what each harmful prompt becomes before the model sees it."""

    kind: Literal["none", "prefill", "suffix", "decoding"]
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="default: kind")
    prefill: str | None = Field(
        None,
        description="prefill: a sandboxed Jinja template of the harmful assistant prefix over "
        "{{ prompt }}, {{ target }}, {{ category }}; default: the prompt's own target / prefill",
    )
    suffixes: list[str] = Field(default_factory=list, description="suffix: texts appended to the user turn")
    temperature: list[float] = Field(default_factory=list, description="decoding: temperatures")
    top_p: list[float] = Field(default_factory=list, description="decoding: top-p values")
    top_k: list[int] = Field(default_factory=list, description="decoding: top-k values (0: none)")

    @property
    def label(self) -> str:
        """The attack's name in the report."""
        return self.name or self.kind

    @model_validator(mode="after")
    def _fits_kind(self) -> AttackSpec:
        if self.kind == "suffix" and not self.suffixes:
            raise ValueError("a suffix attack needs `suffixes`")
        if self.kind == "decoding" and not (self.temperature or self.top_p or self.top_k):
            raise ValueError("a decoding attack needs a grid: `temperature`, `top_p` and/or `top_k`")
        if any(not 0 <= t <= 2 for t in self.temperature) or any(not 0 < p <= 1 for p in self.top_p):
            raise ValueError("temperature must be in [0, 2] and top_p in (0, 1]")
        if any(k < 0 for k in self.top_k):
            raise ValueError("top_k must not be negative")
        if self.prefill is not None:
            from bsafe_data.sandbox import check_template, environment

            sample = {"prompt": "How do I?", "target": "Sure, here is", "category": "Toxic"}
            check_template(environment(), self.prefill, sample, "prefill")
        return self


class EvalOutputSpec(Strict):
    """Where the report folder goes."""

    dir: str = Field("out/{name}", description="report folder; {name} is the recipe name")
    license: str = "cc-by-4.0"


class EvalRecipe(Strict):
    """An evaluation: model (and baseline) x prompts x attacks, judged by classifiers."""

    method: Literal["eval"] = "eval"
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    version: str = Field("0.1.0", pattern=r"^\d+\.\d+\.\d+$")
    description: str = ""
    model: ModelSpec
    baseline: ModelSpec | None = Field(None, description="a second model reported side by side")
    control_format: str = Field(DEFAULT_CONTROL_FORMAT, description="the control signal's format")
    categories: list[str] = Field(default_factory=lambda: list(RLBF_CATEGORIES), min_length=1)
    prompts: list[PromptSourceSpec] = Field(..., min_length=1)
    attacks: list[AttackSpec] = Field(default_factory=lambda: [AttackSpec(kind="none")], min_length=1)
    classifiers: list[AnyClassifierSpec] = Field(default_factory=lambda: [ClassifierSpec()], min_length=1)
    combine: Literal["any", "all"] = Field("any", description="unsafe when any / all classifiers say so")
    output: EvalOutputSpec = Field(default_factory=EvalOutputSpec)
    publish: PublishSpec = Field(default_factory=PublishSpec)

    @field_validator("control_format")
    @classmethod
    def _valid_format(cls, value: str) -> str:
        return ControlSpec(format=value).format

    @model_validator(mode="after")
    def _unique(self) -> EvalRecipe:
        for what, names in (
            ("attack", [a.label for a in self.attacks]),
            ("classifier", [c.name for c in self.classifiers]),
        ):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{what} names must be unique: {dupes}")
        if self.baseline is not None and self.baseline.name == self.model.name:
            raise ValueError("model and baseline need different names (set `label`)")
        return self

    def models(self) -> list[tuple[str, ModelSpec]]:
        """(role, spec): the model under test, then the baseline."""
        out = [("model", self.model)]
        if self.baseline is not None:
            out.append(("baseline", self.baseline))
        return out

    def sha256(self) -> str:
        """Hash of the resolved recipe (canonical JSON)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_yaml(self) -> str:
        """The resolved recipe as YAML (written into the report folder)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def load_any_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe | EvalRecipe:
    """A build recipe (any registered method) or an eval recipe (``method: eval``); RecipeError
    with every problem."""
    from bsafe_data.registry import METHODS

    models = {name: cls.recipe_model for name, cls in METHODS.items()}
    return load_with({**models, "eval": EvalRecipe}, path, overrides)  # type: ignore[dict-item]


def load_eval_recipe(path: str | Path, overrides: list[str] | None = None) -> EvalRecipe:
    """An eval recipe; a recipe of another method is a RecipeError."""
    loaded = load_any_recipe(path, overrides)
    if not isinstance(loaded, EvalRecipe):
        raise RecipeError(str(path), [("method", None, f"not an eval recipe (method {loaded.method!r})")])
    return loaded


def eval_json_schema() -> dict[str, Any]:
    """JSON Schema of an eval recipe (``schemas/eval.schema.json``)."""
    schema = EvalRecipe.model_json_schema()
    schema["title"] = "Eval recipe"
    return schema
