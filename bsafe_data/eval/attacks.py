"""Attacks: what each prompt becomes before the model sees it.

* ``none``: the prompt as it is, at the model's sampling settings.
* ``prefill`` (middle filling): a harmful assistant prefix (the prompt's ``target``, or the
  attack's sandboxed template) is the start of the assistant turn; the model continues it.
* ``suffix``: each of the attack's suffixes appended to the user turn (GCG-style slots).
* ``decoding``: the product of the attack's temperature / top-p / top-k lists.

An attack with several settings (suffixes, a decoding grid) succeeds on a prompt when any setting
does. Benign prompts are asked once, without an attack (over-refusal).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bsafe_data.eval.prompts import EvalPrompt
from bsafe_data.eval.recipe import AttackSpec, ModelSpec
from bsafe_data.sandbox import environment

#: The attack name of benign prompts.
BENIGN = "benign"


@dataclass(frozen=True)
class Instance:
    """One generation to ask for: a prompt under one setting of one attack."""

    prompt: EvalPrompt
    attack: str  # the attack's name (``benign`` for benign prompts)
    kind: str  # none | prefill | suffix | decoding
    messages: tuple[tuple[str, str], ...]  # the turns sent, the last one the (suffixed) user turn
    prefill: str = ""  # the start of the assistant turn ('' when none)
    violation: str = ""  # the known violating text inside the prefill (the reward's `attack`)
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, top_k
    suffix: str = ""

    @property
    def setting(self) -> str:
        """What distinguishes this instance among its attack's settings (for the report)."""
        parts = [f"{k}={v}" for k, v in sorted(self.sampling.items())]
        if self.suffix:
            parts.append(f"suffix={self.suffix!r}")
        return " ".join(parts)


def _sampling(model: ModelSpec) -> dict[str, Any]:
    return {"temperature": model.temperature, "top_p": model.top_p, "top_k": model.top_k}


def _with_suffix(messages: tuple[tuple[str, str], ...], suffix: str) -> tuple[tuple[str, str], ...]:
    last = len(messages) - 1 - next(i for i, (r, _) in enumerate(reversed(messages)) if r == "user")
    role, content = messages[last]
    return (*messages[:last], (role, f"{content} {suffix}"), *messages[last + 1 :])


def _prefill(attack: AttackSpec, prompt: EvalPrompt) -> tuple[str, str]:
    """(prefill, violating text inside it); ('', '') when the prompt has nothing to prefill."""
    if attack.prefill is not None:
        text = (
            environment()
            .from_string(attack.prefill)
            .render(prompt=prompt.user, target=prompt.target, category=prompt.category)
        )
        return text, text
    if not prompt.target:
        return "", ""
    violation = prompt.injection if prompt.injection and prompt.injection in prompt.target else prompt.target
    return prompt.target, violation


def expand(
    prompts: Sequence[EvalPrompt], attacks: Sequence[AttackSpec], model: ModelSpec
) -> tuple[list[Instance], dict[str, int]]:
    """Every instance to generate for ``model``, and per attack the prompts it skipped (a prefill
    attack on a prompt without a target)."""
    base = _sampling(model)
    out: list[Instance] = []
    skipped: dict[str, int] = {}
    for prompt in prompts:
        if prompt.kind == "benign":
            out.append(Instance(prompt, BENIGN, "none", prompt.messages, sampling=base))
            continue
        for attack in attacks:
            name = attack.label
            if attack.kind == "none":
                out.append(Instance(prompt, name, "none", prompt.messages, sampling=base))
            elif attack.kind == "prefill":
                text, violation = _prefill(attack, prompt)
                if not text.strip():
                    skipped[name] = skipped.get(name, 0) + 1
                    continue
                out.append(Instance(prompt, name, "prefill", prompt.messages, text, violation, base))
            elif attack.kind == "suffix":
                for suffix in attack.suffixes:
                    messages = _with_suffix(prompt.messages, suffix)
                    out.append(Instance(prompt, name, "suffix", messages, sampling=base, suffix=suffix))
            else:
                grid = itertools.product(
                    attack.temperature or [base["temperature"]],
                    attack.top_p or [base["top_p"]],
                    attack.top_k or [base["top_k"]],
                )
                for t, p, k in grid:
                    sampling = {"temperature": t, "top_p": p, "top_k": k}
                    out.append(Instance(prompt, name, "decoding", prompt.messages, sampling=sampling))
    return out, skipped
