"""The batch budget, in one place: how many rows of what width one forward may take.

The engine's plan over a sorted list (:func:`worker.engine.plan_batches`) and the pool's cuts
(:class:`worker.scheduler.BatchScheduler`) both ask this, so a batch is bounded the same way
whichever path cuts it.
"""

from __future__ import annotations


def fits(rows: int, width: int, max_batch_size: int, max_batch_tokens: int) -> bool:
    """Whether ``rows`` rows padded to ``width`` tokens make one batch: at most ``max_batch_size``
    rows and ``rows x width`` padded tokens at most ``max_batch_tokens``. (A single row longer than
    the budget is still cut alone by the callers: something has to run it.)"""
    return rows <= max_batch_size and rows * width <= max_batch_tokens
