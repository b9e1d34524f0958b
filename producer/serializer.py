"""JSON for jobs and results; RQ's default pickle is never used.

With pickle, anyone who can write to Redis can run code in the worker. A payload that is not JSON
(a pickled job, say) fails to load here, so the job fails with a clear error and is never executed.
"""

from __future__ import annotations

import json
from typing import Any

_encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, allow_nan=True)


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
        return json.loads(data)


SERIALIZER_PATH = f"{__name__}.JSONSerializer"
