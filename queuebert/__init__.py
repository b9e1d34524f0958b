"""The contract both sides share, and the command line.

``keys`` (every Redis key), ``settings``, ``schema`` (items, results, jobs), ``serializer`` and
``job`` (what a worker may run), ``results`` and ``scripts`` with ``lua/`` (the run record and how
results are stored), ``connection`` and ``logs``, ``procs`` (child processes): the producer and the
worker both import these, and none of them imports ``producer`` or ``worker``. ``cli`` and
``run_command`` (``queuebert run``) are the command line: the only modules here that import both
sides, because the ``queuebert`` command starts either.
"""
