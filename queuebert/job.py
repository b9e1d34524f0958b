"""The RQ job class for queuebert's queues: a job hash can make a worker call queuebert's code only.

RQ imports and calls what a job hash in Redis names: the job function (in the serialized payload,
which :mod:`queuebert.serializer` checks as it loads it) and the success, failure and stopped
callbacks, which are plain strings in the hash (``success_callback_name`` ...) that no serializer
ever sees. RQ imports them in ``Job.success_callback`` / ``failure_callback`` / ``stopped_callback``,
from the worker's job path, its failure path and its abandoned-job recovery
(``StartedJobRegistry.cleanup``, run by every worker's maintenance). This class checks the name at
exactly those points, before anything is imported: only :data:`queuebert.keys.ON_FAILURE` may be a
failure callback, and queuebert sets no other callback.

It also sends no webhooks: RQ 3 sends an HTTP request to every URL listed in a job hash's
``webhooks`` field when the job ends, and queuebert never registers one, so a URL there was written
by someone else.

Start a stock worker with it: ``rq worker --serializer queuebert.serializer.JSONSerializer
--job-class queuebert.job.QueuebertJob QUEUE``.
"""

from __future__ import annotations

from typing import Any

import structlog
from rq.job import Job

from .keys import JOB_FUNC, ON_FAILURE
from .serializer import ForeignJobError, check_job_function
from .upstream import callback_name

log = structlog.get_logger(__name__)

#: What each callback kind may name. queuebert only ever sets the failure callback.
ALLOWED_CALLBACKS: dict[str, frozenset[str]] = {
    "success": frozenset(),
    "failure": frozenset({ON_FAILURE}),
    "stopped": frozenset(),
}

JOB_CLASS_PATH = f"{__name__}.QueuebertJob"


def check_callback(kind: str, name: str | None) -> None:
    """Raise :class:`ForeignJobError` if a job's ``kind`` callback names anything queuebert does not set."""
    if name and name not in ALLOWED_CALLBACKS[kind]:
        allowed = ", ".join(sorted(ALLOWED_CALLBACKS[kind])) or "none"
        raise ForeignJobError(f"job names {kind} callback {name[:200]!r}; queuebert jobs may name {allowed}, "
                              "so it is refused without being imported")


class QueuebertJob(Job):
    """An RQ :class:`~rq.job.Job` that refuses foreign functions, callbacks and webhooks."""

    def check_names(self) -> None:
        """Refuse the job unless everything it names is queuebert's (raises :class:`ForeignJobError`)."""
        check_callback("success", callback_name(self, "success"))
        check_callback("failure", callback_name(self, "failure"))
        check_callback("stopped", callback_name(self, "stopped"))
        # Loading the payload through queuebert's serializer already refuses a foreign function;
        # checking here too keeps the guard when this class is paired with another serializer.
        check_job_function(self.func_name, self.instance)

    def perform(self) -> Any:
        """Run the job only if it names nothing foreign: a job with a foreign success callback
        would otherwise do its work first and be refused only afterwards."""
        try:
            self.check_names()
        except ForeignJobError as exc:
            log.warning("refused job", job=self.id, reason=str(exc))
            raise
        return super().perform()

    @property
    def success_callback(self) -> Any:
        check_callback("success", callback_name(self, "success"))
        return super().success_callback

    @property
    def failure_callback(self) -> Any:
        check_callback("failure", callback_name(self, "failure"))
        return super().failure_callback

    @property
    def stopped_callback(self) -> Any:
        check_callback("stopped", callback_name(self, "stopped"))
        return super().stopped_callback

    def send_webhooks(self, status: Any, *, exc_string: str | None = None) -> None:
        """Send nothing: queuebert registers no webhooks, so any in the hash came from elsewhere."""
        if self.webhooks:
            log.warning("ignored webhooks in job hash", job=self.id, urls=[w.url[:200] for w in self.webhooks])


__all__ = ["ALLOWED_CALLBACKS", "JOB_CLASS_PATH", "JOB_FUNC", "QueuebertJob", "check_callback"]
