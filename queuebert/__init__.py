"""Shared code that both sides import: the producer (client) and the worker.

Nothing here imports ``producer`` or ``worker``, so either side can depend on it without pulling
in the other.
"""
