"""queuebert's client side and the contract: key names, schemas, serializer. No torch here."""

from __future__ import annotations

from . import logs
from .client import Client, Handle, JobFailed, RedisFull, ResumeError, Run, Subscription
from .settings import ClientSettings, WorkerSettings

# A library logs through the application's `logging`, not on its stdout. Module loggers are lazy,
# so setting this after the imports above still precedes their first event.
logs.route_to_stdlib()

__all__ = ["Client", "ClientSettings", "Handle", "JobFailed", "RedisFull", "ResumeError", "Run", "Subscription",
           "WorkerSettings"]
