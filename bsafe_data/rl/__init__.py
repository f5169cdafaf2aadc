"""RLBF's reinforcement-learning stage: the reference backtrack decoder and the reward.

``apply_backtracks`` executes every ``[CATEGORY c][BACKTRACK_BY_X]`` signal of a token stream and
returns the final text with its trajectory; ``BacktrackReward`` is a TRL reward function that
scores the final text with the recipe's classifier backends. Nothing here imports torch.
"""

from bsafe_data.rl.apply import (
    MALFORMED_REASONS,
    Signal,
    Span,
    Trajectory,
    apply_backtracks,
    assistant_marker,
)
from bsafe_data.rl.reward import TERMS, BacktrackReward, CriticError, RewardBreakdown, summarize
from bsafe_data.rl.spec import RewardSpec

__all__ = [
    "MALFORMED_REASONS",
    "TERMS",
    "BacktrackReward",
    "CriticError",
    "RewardBreakdown",
    "RewardSpec",
    "Signal",
    "Span",
    "Trajectory",
    "apply_backtracks",
    "assistant_marker",
    "summarize",
]
