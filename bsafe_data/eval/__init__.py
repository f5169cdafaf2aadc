"""Evaluating backtracking models: attack success rate with the backtracks executed.

``bsafe-data eval RECIPE`` reads an ``eval`` recipe (``recipe.EvalRecipe``): the model under test
(an OpenAI-compatible endpoint, or a local checkpoint run in-process), prompt sources, attacks and
classifiers. Every generation is decoded with ``rl.apply_backtracks`` and judged by the recipe's
classifiers through ``rl.BacktrackReward`` (which also gives each generation its reward); the
report (``report``) and the Hub-layout folder (``run``) follow. Modules: ``recipe`` (the model),
``prompts`` (prompt sources), ``attacks`` (what each prompt becomes), ``model`` (the model under
test), ``report`` (Wilson intervals, tables), ``run`` (orchestration, the folder), ``plan``.
"""
