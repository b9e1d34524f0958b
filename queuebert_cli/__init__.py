"""The ``queuebert`` command: an application on top of both sides.

It enqueues and reads (``producer``), runs workers (``worker``), serves the gateway and the exporter
(``producer``), builds the default model (``modelbuild``), and starts a private Redis for
``queuebert run``. Nothing in those packages, nor in the contract (``queuebert``), imports it
(``tests/test_layout.py``).
"""
