"""The stages a method's rows go through, each one small unit over an explicit ``Record``:

segment → sample (plan) → generate → count X → classify → adjust spans → rules → rows, then the
dataset-wide dedupe pass. ``stats`` holds the counters every stage updates.
"""
