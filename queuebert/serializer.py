"""JSON for jobs and results; RQ's default pickle is never used.

With pickle, anyone who can write to Redis can run code in the worker. A payload that is not JSON
(a pickled job, say) fails to load here, so the job fails with a clear error and is never executed.

JSON alone stops pickle gadgets, not a job that names another function: RQ imports and calls
whatever name the payload carries. So a job payload (RQ's ``[func_name, instance, args, kwargs]``)
that names anything but :data:`queuebert.keys.JOB_FUNC`, or carries an instance, is refused here,
before RQ sees the name. Every worker that loads jobs through this serializer (the batching worker,
a stock ``rq worker --serializer queuebert.serializer.JSONSerializer``) refuses it the same way.
Callbacks are plain strings in the job hash that no serializer sees; ``queuebert.job.QueuebertJob``
guards those.
"""

from __future__ import annotations

import json
from typing import Any

from .keys import JOB_FUNC
from .schema import JobError

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=True)


class ForeignJobError(JobError):
    """A job names a function, instance or callback that is not queuebert's: it is never imported."""


def check_job_function(func_name: Any, instance: Any) -> None:
    """Raise :class:`ForeignJobError` unless the job calls queuebert's own job function."""
    if instance is not None:
        raise ForeignJobError(f"job carries an instance ({type(instance).__name__}); queuebert jobs call "
                              f"{JOB_FUNC} only, so it is refused without being called")
    if func_name != JOB_FUNC:
        raise ForeignJobError(f"job names function {str(func_name)[:200]!r}; queuebert workers run only "
                              f"{JOB_FUNC}, so it is refused without being imported")


def is_job_payload(obj: Any) -> bool:
    """Whether a loaded value has the shape of RQ's job payload, ``[func_name, instance, args, kwargs]``.

    Nothing else queuebert stores through this serializer has it: meta is an object, a job's result
    is a list of result objects (a 4-item job's result starts with an object, not a name).
    """
    return type(obj) is list and len(obj) == 4 and not isinstance(obj[0], dict)


class JSONSerializer:
    """RQ serializer protocol (``dumps``/``loads``) over compact JSON.

    ``ensure_ascii`` keeps lone surrogates encodable: they round-trip as ``\\udXXX`` escapes and are
    then refused per item by the worker instead of failing a whole enqueue.
    """

    @staticmethod
    def dumps(obj: Any) -> bytes:
        return _encoder.encode(obj).encode("ascii")

    @staticmethod
    def loads(data: bytes | str) -> Any:
        if isinstance(data, bytes) and data[:1] == b"\x80":
            raise ValueError("payload is a pickle; queuebert only accepts JSON and never unpickles")
        obj = json.loads(data)
        if is_job_payload(obj):
            check_job_function(obj[0], obj[1])
        return obj


SERIALIZER_PATH = f"{__name__}.JSONSerializer"
