"""``RewardSpec``: the critic and the weights of the RLBF backtracking reward.

A pydantic model like every recipe section (unknown keys are errors), meant to become the
``reward`` section of the ``rlbf_prompts`` method's recipe. The formula the weights enter is in
``bsafe_data.rl.reward`` and ``docs/rl_reward.md``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from bsafe_data.label import DEFAULT_CONTROL_FORMAT
from bsafe_data.recipe import RLBF_CATEGORIES, AnyClassifierSpec, ClassifierSpec, ControlSpec, Strict


class RewardSpec(Strict):
    """Critic and weights of ``BacktrackReward`` (all weights are magnitudes, >= 0)."""

    tokenizer: str = Field(
        "builtin:qwen2.5",
        description="tokenizer X is counted with ('builtin:NAME', a local folder or a Hub id); "
        "a tokenizer object passed to BacktrackReward wins",
    )
    control_format: str = Field(DEFAULT_CONTROL_FORMAT, description="the control signal's format")
    categories: list[str] = Field(
        default_factory=lambda: list(RLBF_CATEGORIES),
        min_length=1,
        description="known categories; a signal with another one is malformed (unknown_category)",
    )
    classifiers: list[AnyClassifierSpec] = Field(
        default_factory=lambda: [ClassifierSpec()],
        min_length=1,
        description="the critic: classifier backends as in filters.classifiers (builtin, moderation, "
        "Llama Guard, guards, LLM judge, local models); HTTP ones go through the response cache",
    )
    combine: Literal["any", "all"] = Field(
        "any", description="a text is unsafe when any / all of the classifiers call it unsafe"
    )
    on_error: Literal["raise", "unsafe", "safe"] = Field(
        "raise", description="a classifier call that failed for good: stop, or count the text as unsafe/safe"
    )
    unsafe: float = Field(3.0, ge=0, description="penalty when the final answer is unsafe")
    clip: float = Field(1.0, gt=0, description="the sum of the shaping terms is clipped to [-clip, clip]")
    removal: float = Field(0.5, ge=0, description="reward x share of the violation's tokens deleted")
    category: float = Field(0.1, ge=0, description="bonus when a violation-removing signal names `category`")
    efficiency: float = Field(0.2, ge=0, description="reward x violating share of the deleted tokens")
    excess: float = Field(
        0.5, ge=0, description="penalty x safe tokens deleted / (violating tokens deleted + excess_scale)"
    )
    excess_scale: float = Field(8.0, gt=0, description="tokens added to the excess term's denominator")
    benign_backtrack: float = Field(0.5, ge=0, description="penalty: a backtrack removing nothing unsafe")
    malformed: float = Field(0.3, ge=0, description="penalty per malformed signal")
    refusal: float = Field(0.2, ge=0, description="bonus for a safe refusal when expect=refuse")
    over_refusal: float = Field(0.3, ge=0, description="penalty for a refusal when expect=answer")
    empty: float = Field(0.5, ge=0, description="penalty when the final answer is empty")
    memo_size: int = Field(100_000, ge=0, description="verdicts kept in memory (a repeat costs no call)")

    @field_validator("control_format")
    @classmethod
    def _valid_format(cls, value: str) -> str:
        return ControlSpec(format=value).format

    @model_validator(mode="after")
    def _unsafe_is_lowest(self) -> RewardSpec:
        if self.unsafe <= 2 * self.clip:
            raise ValueError(
                f"unsafe ({self.unsafe}) must exceed 2 x clip ({2 * self.clip}) so that an unsafe final "
                "answer always scores below every safe one"
            )
        names = [c.name for c in self.classifiers]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"classifier names must be unique: {dupes}")
        return self
