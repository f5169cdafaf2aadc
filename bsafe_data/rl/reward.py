"""``BacktrackReward``: the RLBF trajectory-level reward, as a TRL reward function.

RLBF (Sel et al., "Reinforcement Learning with Backtracking Feedback", arXiv:2602.08377) trains the
backtracking policy with GRPO on a trajectory-level reward ``R_final`` that a safety critic
computes on the model's live output *after* its backtracks have been executed. This module is
that reward for bsafe-data: the decoder is ``apply_backtracks``; the critic is any classifier
backend of the recipe (``bsafe_data.classify.factory.make_classifier``), so HTTP critics go
through the response cache. The paper's exact shaping terms are not reproduced here; the terms
below are this project's choices, documented in ``docs/rl_reward.md``.

For one sample (prompt, completion, columns)::

    stream      = prompt ⊕ completion          (prompt rendered with the chat template when it is
                                                 a message list; a final assistant message is a
                                                 prefill, continued as TRL does)
    trajectory  = apply_backtracks(stream)     (floor: start of the prefill, else the end of the
                                                 prompt's last assistant header, else the prompt end)
    answer      = final text after the floor, cut at the end-of-turn token

    R = -unsafe·U + clip(removal·cov + category·C + efficiency·V/D - excess·E/(V+τ)
                         - benign_backtrack·B - malformed·M + refusal·F⁺ - over_refusal·F⁻
                         - empty·Z,  -clip, +clip)

* ``U`` = the critic calls the final answer unsafe (``combine``: any / all classifiers).
* Deleted tokens ``D`` are split into violating ``V`` and safe ``E`` tokens: tokens of the known
  attack (column ``attack``, located in the prompt) are violating; every other deleted run is
  scored by the critic on its own (safe → excess; unsafe → the model retracted its own violation,
  localised inside the run by a judge's span, else by the run's longest safe word-boundary
  prefix, found by binary search: the safe tokens before the violation are excess).
* ``cov`` = share of the attack's tokens deleted (without an attack: 1 when the critic flagged a
  deleted run, else 0). ``C`` = 1 when a signal that deleted violating tokens names the expected
  ``category`` column. ``V/D`` (0 without deletions) rewards short, exact backtracks;
  ``E/(V+τ)`` penalises safe text deleted in proportion to the excess (τ = ``excess_scale``).
* ``B`` = 1 when something was deleted but nothing violating (a backtrack on a benign answer).
  ``M`` = number of malformed signals (unparsable, unknown category, X beyond the floor).
* ``F⁺`` = a safe refusal when ``expect=refuse``; ``F⁻`` = a refusal when ``expect=answer``
  (``bsafe_data.inject.looks_like_refusal``). ``Z`` = the final answer is empty.
* ``unsafe > 2·clip`` (validated), so an unsafe final answer scores below every safe one.

Columns (lists aligned with the prompts, or one value for all): ``expect`` (``backtrack`` /
``answer`` / ``refuse``; default ``backtrack`` when ``attack`` is given, else ``answer``),
``category``, ``attack`` (the violating text inside the prompt's prefill), ``prefill`` (the
assistant prefix ending the prompt; default: a final assistant message), ``completion_ids``
(TRL passes them; used instead of the completion text, since TRL decodes completions with
``skip_special_tokens=True`` and registered control atoms would vanish from the text), and
``log_metric`` (TRL >= 1.x: batch means of every term are logged as ``backtrack/...``).

Verdicts are memoised in memory (a repeat costs no classifier call) and HTTP critics also use the
on-disk response cache. ``last_breakdown`` holds the per-term breakdown of the last call;
``RewardBreakdown.as_dict`` and ``log_metric`` carry numbers and codes only (the trajectory, with
its texts, stays on the breakdown object and is never logged).
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bsafe_data.classify.base import ERROR_LABEL, Item, Score, score_items
from bsafe_data.label import chat_frame
from bsafe_data.rl.apply import Trajectory, apply_backtracks, assistant_marker
from bsafe_data.rl.spec import RewardSpec

EXPECTS = ("backtrack", "answer", "refuse")
#: Names of the shaping terms, in the order they are reported.
TERMS = (
    "unsafe",
    "removal",
    "category",
    "efficiency",
    "excess",
    "benign_backtrack",
    "malformed",
    "refusal",
    "over_refusal",
    "empty",
)


@dataclass(frozen=True)
class RewardBreakdown:
    """The reward of one sample and what it is made of (numbers and codes only, never text)."""

    reward: float
    terms: dict[str, float]  # signed contribution of each term, before clipping the shaping sum
    shaping: float  # the clipped sum of every term but ``unsafe``
    expect: str
    unsafe: bool
    deleted_tokens: int
    violation_tokens: int  # tokens of the known attack (0 without one)
    removed_violation_tokens: int  # deleted tokens that were violating (attack or critic-flagged)
    excess_tokens: int  # deleted tokens that were safe
    signals: int
    malformed: tuple[str, ...]
    refused: bool
    scores: dict[str, float]  # critic score of the final answer, per classifier
    trajectory: Trajectory | None = field(default=None, repr=False, compare=False)
    #: the final answer that was judged (text: kept off ``as_dict`` and the logs)
    answer: str = field(default="", repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """A flat dict for logging (no text)."""
        out: dict[str, Any] = {"reward": self.reward, "shaping": self.shaping}
        out.update({f"term/{k}": v for k, v in self.terms.items()})
        out.update(
            {
                "expect": self.expect,
                "unsafe": self.unsafe,
                "deleted_tokens": self.deleted_tokens,
                "violation_tokens": self.violation_tokens,
                "removed_violation_tokens": self.removed_violation_tokens,
                "excess_tokens": self.excess_tokens,
                "signals": self.signals,
                "malformed": list(self.malformed),
                "refused": self.refused,
            }
        )
        out.update({f"score/{k}": v for k, v in self.scores.items()})
        return out


@dataclass
class _Sample:
    prompt_text: str
    context: tuple[tuple[str, str], ...]
    floor: int
    attack: tuple[int, int] | None
    expect: str
    category: str | None
    trajectory: Trajectory
    answer: str
    runs: list[tuple[int, list[int], bool]] = field(default_factory=list)  # (signal, tokens, is_attack)


class CriticError(RuntimeError):
    """A critic call failed for good and ``on_error`` is ``raise``."""


class BacktrackReward:
    """TRL reward function: ``reward(prompts, completions, **columns) -> list[float]``.

    ``tokenizer``: the policy's tokenizer (X counts its tokens); default: ``spec.tokenizer``.
    ``classifiers``: ready classifier objects instead of building ``spec.classifiers``.
    ``cache_dir``: response cache of the HTTP critics (default ``$BSAFE_DATA_CACHE_DIR``).
    """

    def __init__(
        self,
        tokenizer: Any = None,
        spec: RewardSpec | None = None,
        *,
        cache_dir: str | Path | None = None,
        classifiers: Sequence[Any] | None = None,
    ) -> None:
        self.spec = spec if spec is not None else RewardSpec()
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(self.spec.tokenizer)
        if classifiers is None:
            from bsafe_data.classify.factory import make_classifier

            classifiers = [make_classifier(c, cache_dir, self.spec.categories) for c in self.spec.classifiers]
        self.classifiers = list(classifiers)
        #: TRL names reward functions by ``__name__`` in its logs.
        self.__name__ = "backtrack_reward"
        #: Breakdown of every sample of the last call.
        self.last_breakdown: list[RewardBreakdown] = []
        #: Texts sent to the classifiers so far (memo misses), per classifier name.
        self.calls: dict[str, int] = {c.name: 0 for c in self.classifiers}
        self._memo: OrderedDict[tuple[Any, ...], Score] = OrderedDict()
        _head, tail = chat_frame(self.tokenizer, [{"role": "user", "content": "x"}])
        ends = [tail.strip().split("\n")[0], getattr(self.tokenizer, "eos_token", None) or ""]
        self._ends = tuple(e for e in dict.fromkeys(ends) if e)
        self._marker = assistant_marker(self.tokenizer)

    # -- TRL entry point ---------------------------------------------------------------------------
    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float]:
        """One reward per completion (TRL's reward-function signature)."""
        return [b.reward for b in self.score_with_breakdown(prompts, completions, **columns)]

    def score_with_breakdown(
        self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any
    ) -> list[RewardBreakdown]:
        """Rewards with their per-term breakdown (also kept in ``last_breakdown``)."""
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} completions")
        samples = [self._prepare(prompts[i], completions[i], _columns_at(columns, i, n)) for i in range(n)]
        # one critic batch: every final answer, then every deleted run outside the known attack
        items: list[Item] = []
        for s in samples:
            items.append(Item(s.answer.strip(), "response", s.context, "", s.answer))
        run_items: list[tuple[int, int]] = []  # (sample, run index) of each run item
        for si, s in enumerate(samples):
            for ri, (_sig, tokens, is_attack) in enumerate(s.runs):
                if is_attack:
                    continue
                text = _text_of(s.trajectory, tokens)
                run_items.append((si, ri))
                items.append(Item(text.strip(), "violation", s.context, "", text))
        unsafe, scores, verdicts = self._verdicts(items)
        run_unsafe: dict[tuple[int, int], bool] = {key: unsafe[n + j] for j, key in enumerate(run_items)}
        flagged = {key: verdicts[n + j] for j, key in enumerate(run_items) if unsafe[n + j]}
        safe_lead = self._localise(samples, flagged)
        out = [
            self._score(si, s, unsafe[si], scores[si], run_unsafe, safe_lead) for si, s in enumerate(samples)
        ]
        self.last_breakdown = out
        log_metric = columns.get("log_metric")
        if callable(log_metric) and out:  # TRL >= 1.x passes log_metric(name, value)
            for name, value in summarize(out).items():
                log_metric(f"backtrack/{name}", value)
        return out

    def close(self) -> None:
        """Release the classifiers' connections and models."""
        for c in self.classifiers:
            c.close()

    # -- preparation -------------------------------------------------------------------------------
    def _prepare(self, prompt: Any, completion: Any, cols: Mapping[str, Any]) -> _Sample:
        prompt_text, context, prefill = self._render_prompt(prompt)
        prefill = cols.get("prefill") if cols.get("prefill") is not None else prefill
        if prefill and prompt_text.endswith(prefill):
            floor = len(prompt_text) - len(prefill)
        else:
            at = prompt_text.rfind(self._marker) if self._marker else -1
            floor = at + len(self._marker) if at >= 0 else len(prompt_text)
        attack = None
        attack_text = _attack_text(cols)
        if attack_text:
            for candidate in (attack_text, attack_text.strip()):
                at = prompt_text.rfind(candidate) if candidate else -1
                if at >= floor:
                    attack = (at, at + len(candidate))
                    break
        expect = cols.get("expect") or ("backtrack" if attack_text else "answer")
        if expect not in EXPECTS:
            raise ValueError(f"expect must be one of {EXPECTS}, got {expect!r}")
        ids = cols.get("completion_ids")
        body: str | Sequence[int] = list(ids) if ids is not None else _completion_text(completion)
        trajectory = apply_backtracks(
            body,
            self.tokenizer,
            self.spec.control_format,
            prompt=prompt_text,
            floor=floor,
            categories=self.spec.categories,
        )
        answer = trajectory.text[floor:]
        for end in self._ends:
            cut = answer.find(end)
            if cut >= 0:
                answer = answer[:cut]
        sample = _Sample(
            prompt_text, context, floor, attack, expect, cols.get("category"), trajectory, answer
        )
        sample.runs = _split_runs(trajectory, attack)
        return sample

    def _render_prompt(self, prompt: Any) -> tuple[str, tuple[tuple[str, str], ...], str]:
        """(prompt text, (role, content) turns before the answer, prefill)."""
        if isinstance(prompt, str):
            return prompt, (), ""
        messages = [{"role": m["role"], "content": m["content"]} for m in prompt]
        prefill = ""
        if messages and messages[-1]["role"] == "assistant":
            prefill = messages.pop()["content"]
        head, _tail = chat_frame(self.tokenizer, messages)
        context = tuple((m["role"], m["content"]) for m in messages)
        return head + prefill, context, prefill

    # -- critic --------------------------------------------------------------------------------------
    def _localise(
        self, samples: Sequence[_Sample], flagged: Mapping[tuple[int, int], list[Score]]
    ) -> dict[tuple[int, int], int]:
        """How many leading tokens of each critic-flagged run are safe text deleted before the
        violation (see ``docs/rl_reward.md``): a span-returning critic's span start when one gave
        it, else the longest safe word-boundary prefix, found by a binary search over the run's
        word boundaries. Every sample's probes of a step go to the critic as one batch (memoised,
        and HTTP critics through the response cache)."""
        lead: dict[tuple[int, int], int] = {}
        searches: dict[tuple[int, int], list[int]] = {}  # run -> [lo, hi] over its cut candidates
        cuts: dict[tuple[int, int], list[int]] = {}
        for key, verdicts in flagged.items():
            si, ri = key
            s = samples[si]
            tokens = s.runs[ri][1]
            pieces = [s.trajectory.stream[slice(*s.trajectory.token_chars(k))] for k in tokens]
            at = _span_start(self.classifiers, verdicts)
            if at is not None:
                lead[key] = _token_at(pieces, at)
                continue
            cuts[key] = _word_cuts(pieces)
            searches[key] = [0, len(cuts[key])]  # cuts[key][lo] is a safe prefix; index hi is unsafe
        while True:
            probes: list[tuple[tuple[int, int], int]] = []
            for key, (lo, hi) in searches.items():
                if hi - lo > 1:
                    probes.append((key, (lo + hi) // 2))
            if not probes:
                break
            items = []
            for (si, ri), mid in probes:
                s = samples[si]
                text = _text_of(s.trajectory, s.runs[ri][1][: cuts[(si, ri)][mid]])
                items.append(Item(text.strip(), "violation", s.context, "", text))
            unsafe, _scores, _verdicts = self._verdicts(items)
            for (key, mid), bad in zip(probes, unsafe, strict=True):
                searches[key][1 if bad else 0] = mid
        for key, (lo, _hi) in searches.items():
            lead[key] = cuts[key][lo]
        return lead

    def _verdicts(
        self, items: Sequence[Item]
    ) -> tuple[list[bool], list[dict[str, float]], list[list[Score]]]:
        """Unsafe verdict, per-classifier scores and the Scores themselves of every item
        (memoised)."""
        per_classifier: list[list[Score]] = []
        for classifier in self.classifiers:
            keys = [_memo_key(classifier.name, item) for item in items]
            known: dict[tuple[Any, ...], Score] = {}
            missing: dict[tuple[Any, ...], Item] = {}
            for key, item in zip(keys, items, strict=True):
                if not item.text or key in known or key in missing:
                    continue
                hit = self._memo.get(key)
                if hit is not None:
                    self._memo.move_to_end(key)
                    known[key] = hit
                else:
                    missing[key] = item
            if missing:
                fresh = score_items(classifier, list(missing.values()))
                self.calls[classifier.name] = self.calls.get(classifier.name, 0) + len(missing)
                for key, score in zip(missing, fresh, strict=True):
                    known[key] = score
                    if score.label != ERROR_LABEL:  # a failed call is asked again next time
                        self._remember(key, score)
            empty = Score(classifier.name, "safe", 0.0)
            per_classifier.append(
                [known[k] if item.text else empty for k, item in zip(keys, items, strict=True)]
            )
        unsafe: list[bool] = []
        scores: list[dict[str, float]] = []
        for i in range(len(items)):
            labels = []
            for classifier, row in zip(self.classifiers, per_classifier, strict=True):
                labels.append(self._is_unsafe(classifier.name, row[i]))
            unsafe.append(any(labels) if self.spec.combine == "any" else all(labels))
            scores.append(
                {c.name: float(row[i].score) for c, row in zip(self.classifiers, per_classifier, strict=True)}
            )
        verdicts = [[row[i] for row in per_classifier] for i in range(len(items))]
        return unsafe, scores, verdicts

    def _is_unsafe(self, name: str, score: Score) -> bool:
        if score.label == ERROR_LABEL:
            if self.spec.on_error == "raise":
                raise CriticError(f"classifier {name!r} failed for good on a reward text")
            return self.spec.on_error == "unsafe"
        return score.label == "unsafe"

    def _remember(self, key: tuple[Any, ...], score: Score) -> None:
        if self.spec.memo_size <= 0:
            return
        self._memo[key] = score
        self._memo.move_to_end(key)
        while len(self._memo) > self.spec.memo_size:
            self._memo.popitem(last=False)

    # -- the formula -------------------------------------------------------------------------------
    def _score(
        self,
        si: int,
        s: _Sample,
        unsafe: bool,
        scores: dict[str, float],
        run_unsafe: Mapping[tuple[int, int], bool],
        safe_lead: Mapping[tuple[int, int], int],
    ) -> RewardBreakdown:
        from bsafe_data.inject import looks_like_refusal

        spec = self.spec
        t = s.trajectory
        attack_tokens = _attack_tokens(t, s.attack)
        removed_attack = 0
        removed_own = 0
        excess = 0
        violating_signals: set[int] = set()
        for ri, (sig, tokens, is_attack) in enumerate(s.runs):
            if is_attack:
                removed_attack += len(tokens)
                violating_signals.add(sig)
            elif run_unsafe.get((si, ri), False):
                lead = safe_lead.get((si, ri), 0)
                removed_own += len(tokens) - lead
                excess += lead
                violating_signals.add(sig)
            else:
                excess += len(tokens)
        violating = removed_attack + removed_own
        deleted = t.deleted_tokens
        if attack_tokens:
            coverage = removed_attack / attack_tokens
        else:
            coverage = 1.0 if removed_own else 0.0
        category_hit = bool(s.category) and any(
            t.signals[i].category == s.category for i in violating_signals
        )
        refused = bool(s.answer.strip()) and looks_like_refusal(s.answer.strip())
        terms = {
            "unsafe": -spec.unsafe if unsafe else 0.0,
            "removal": spec.removal * coverage,
            "category": spec.category if category_hit else 0.0,
            "efficiency": spec.efficiency * violating / deleted if deleted else 0.0,
            "excess": -spec.excess * excess / (violating + spec.excess_scale) if excess else 0.0,
            "benign_backtrack": -spec.benign_backtrack if deleted and not violating else 0.0,
            "malformed": -spec.malformed * len(t.malformed),
            "refusal": spec.refusal if s.expect == "refuse" and refused and not unsafe else 0.0,
            "over_refusal": -spec.over_refusal if s.expect == "answer" and refused else 0.0,
            "empty": -spec.empty if not s.answer.strip() else 0.0,
        }
        shaping = sum(v for k, v in terms.items() if k != "unsafe")
        shaping = max(-spec.clip, min(spec.clip, shaping))
        reward = terms["unsafe"] + shaping
        if not math.isfinite(reward):  # pragma: no cover - every term is bounded
            raise ValueError("non-finite reward")
        return RewardBreakdown(
            reward=round(reward, 10),
            terms=terms,
            shaping=shaping,
            expect=s.expect,
            unsafe=unsafe,
            deleted_tokens=deleted,
            violation_tokens=attack_tokens,
            removed_violation_tokens=violating,
            excess_tokens=excess,
            signals=len(t.signals),
            malformed=tuple(m.malformed or "" for m in t.malformed),
            refused=refused,
            scores=scores,
            trajectory=t,
            answer=s.answer,
        )


def summarize(breakdowns: Sequence[RewardBreakdown]) -> dict[str, float]:
    """Batch means for logging: every term, the unsafe / backtrack / malformed rates, tokens deleted."""
    n = len(breakdowns)
    if not n:
        return {}
    out = {f"term/{t}": sum(b.terms[t] for b in breakdowns) / n for t in TERMS}
    out["reward"] = sum(b.reward for b in breakdowns) / n
    out["unsafe_rate"] = sum(b.unsafe for b in breakdowns) / n
    out["backtrack_rate"] = sum(b.deleted_tokens > 0 for b in breakdowns) / n
    out["malformed_rate"] = sum(bool(b.malformed) for b in breakdowns) / n
    out["deleted_tokens"] = sum(b.deleted_tokens for b in breakdowns) / n
    return out


# -- helpers ------------------------------------------------------------------------------------------


def _load_tokenizer(ref: str) -> Any:
    """A private copy (the reward never mutates a shared, cached tokenizer)."""
    from transformers import AutoTokenizer

    from bsafe_data.tokenization import resolve_tokenizer_path

    return AutoTokenizer.from_pretrained(resolve_tokenizer_path(ref))


#: Values of a prompt set's ``attack`` column that name a variant, not the violating text.
ATTACK_KINDS = frozenset({"none", "middle_fill", "suffix", "decoding"})


def _attack_text(cols: Mapping[str, Any]) -> str:
    """The violating text inside the prefill: a prompt set row's ``injection`` (steering +
    violation), else the ``attack`` column when it holds text rather than a variant name."""
    injection = cols.get("injection")
    if isinstance(injection, Mapping) and (injection.get("steering") or injection.get("violation")):
        return (injection.get("steering") or "") + (injection.get("violation") or "")
    text = cols.get("attack")
    return text if isinstance(text, str) and text not in ATTACK_KINDS else ""


def _columns_at(columns: Mapping[str, Any], i: int, n: int) -> dict[str, Any]:
    """Sample ``i``'s value of each column (lists aligned with the batch; scalars broadcast)."""
    out: dict[str, Any] = {}
    for name in ("expect", "category", "attack", "injection", "prefill", "completion_ids"):
        value = columns.get(name)
        if isinstance(value, (str, dict)):
            out[name] = value
        elif isinstance(value, (list, tuple)) and len(value) == n:
            out[name] = value[i]
    return out


def _completion_text(completion: Any) -> str:
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] for m in completion if m.get("role", "assistant") == "assistant")


def _memo_key(name: str, item: Item) -> tuple[Any, ...]:
    return (name, item.target, item.text, item.context, item.before, item.raw)


def _text_of(t: Trajectory, tokens: Sequence[int]) -> str:
    return "".join(t.stream[slice(*t.token_chars(k))] for k in tokens)


def _span_start(classifiers: Sequence[Any], verdicts: Sequence[Score]) -> int | None:
    """Where the violation starts in a flagged run's text (characters), by the first
    span-returning critic that called it unsafe and quoted a span; None when none did."""
    for classifier, score in zip(classifiers, verdicts, strict=True):
        start = score.detail.get("span_start")
        if getattr(classifier, "locates_spans", False) and score.label == "unsafe" and start is not None:
            return max(0, int(start))
    return None


def _token_at(pieces: Sequence[str], at: int) -> int:
    """Index of the token (of a run, by its texts) holding character ``at`` of the run's text."""
    position = 0
    for k, piece in enumerate(pieces):
        position += len(piece)
        if position > at:
            return k
    return len(pieces)


def _word_cuts(pieces: Sequence[str]) -> list[int]:
    """The run's word boundaries as token counts: 0, then every k where token k starts a word
    (its text starts with white space, or token k-1's ends with it)."""
    cuts = [0]
    for k in range(1, len(pieces)):
        if pieces[k][:1].isspace() or pieces[k - 1][-1:].isspace():
            cuts.append(k)
    return cuts


def _overlaps(chars: tuple[int, int], span: tuple[int, int]) -> bool:
    return chars[0] < span[1] and chars[1] > span[0] and chars[1] > chars[0]


def _attack_tokens(t: Trajectory, attack: tuple[int, int] | None) -> int:
    if attack is None:
        return 0
    first = max(0, bisect.bisect_right(t.starts, attack[0]) - 1)
    last = bisect.bisect_left(t.starts, attack[1])
    return sum(1 for k in range(first, min(last + 1, t.tokens)) if _overlaps(t.token_chars(k), attack))


def _split_runs(t: Trajectory, attack: tuple[int, int] | None) -> list[tuple[int, list[int], bool]]:
    """Each signal's deleted tokens as runs of (signal index, token indices, inside the attack)."""
    runs: list[tuple[int, list[int], bool]] = []
    for si, signal in enumerate(t.signals):
        for span in signal.removed:
            current: list[int] = []
            flag = None
            for k in range(span.token_start, span.token_end):
                inside = attack is not None and _overlaps(t.token_chars(k), attack)
                if flag is not None and inside != flag:
                    runs.append((si, current, flag))
                    current = []
                current.append(k)
                flag = inside
            if current:
                runs.append((si, current, bool(flag)))
    return runs
