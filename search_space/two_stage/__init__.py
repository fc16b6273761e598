"""The classic two-stage pruner's stage 1 (importance criteria) and stage 2 (budget allocators)."""
