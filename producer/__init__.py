"""queuebert's client side: submit texts, read results. No torch here; the contract it shares with
the worker (keys, schemas, serializer, settings) is in :mod:`queuebert`."""

from __future__ import annotations

from queuebert import logs
from queuebert.schema import JobError
from queuebert.settings import ClientSettings, SettingError, WorkerSettings

from .async_client import AsyncClient, AsyncHandle, AsyncRun, AsyncSubscription
from .client import Client, Handle, JobFailed, RedisFull, ResumeError, Run, Subscription
from .jobs import LostWrites

# A library logs through the application's `logging`, not on its stdout. Module loggers are lazy,
# so setting this after the imports above still precedes their first event.
logs.route_to_stdlib()

__all__ = ["AsyncClient", "AsyncHandle", "AsyncRun", "AsyncSubscription", "Client", "ClientSettings", "Handle",
           "JobError", "JobFailed", "LostWrites", "RedisFull", "ResumeError", "Run", "SettingError", "Subscription",
           "WorkerSettings"]
