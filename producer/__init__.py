"""queuebert's client side and the contract: key names, schemas, serializer. No torch here."""

from __future__ import annotations

from .client import Client, Handle, JobFailed, RedisFull, ResumeError, Run, Subscription
from .settings import ClientSettings, WorkerSettings

__all__ = ["Client", "ClientSettings", "Handle", "JobFailed", "RedisFull", "ResumeError", "Run", "Subscription",
           "WorkerSettings"]
