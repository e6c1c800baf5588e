"""One thread owns the model pair; requests wait in a bounded queue and talk back through events.

A job's events, in order:  ("start", prompt_tokens)  ("text", piece)*  ("done", GenerationResult)
or, at any point, ("error", exception); a cancelled job simply stops sending events.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import BildError

try:  # transformers renders chat templates with jinja2, and raises its TemplateError for messages they refuse
    from jinja2 import TemplateError
    _TEMPLATE_ERRORS: tuple[type[Exception], ...] = (TemplateError,)
except ImportError:
    _TEMPLATE_ERRORS = ()

log = logging.getLogger("bild.server")


@dataclass(slots=True, eq=False)
class Job:
    prompt: object                      # a string, token ids or chat messages, as BigLittle takes them
    settings: dict                      # GenerationConfig keyword arguments, already validated
    emit: Callable[[tuple], None]       # thread-safe: hands one event to the waiting request
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)


class QueueFull(Exception):
    pass


class Stopped(Exception):
    pass


class Worker:
    """Runs jobs one at a time on its own thread; `submit` never blocks."""

    def __init__(self, pair, queue_size: int, monitor):
        self.pair, self.monitor = pair, monitor
        self.jobs: queue.Queue[Job | None] = queue.Queue(maxsize=queue_size)
        self.busy = False
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="bild-worker", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        if self.stopping:
            raise Stopped()
        try:
            self.jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None

    def stop(self, timeout: float | None = None) -> None:
        """Finish every queued job, then end the thread."""
        self.stopping = True
        if self.thread.is_alive():
            self.jobs.put(None)  # behind the queued jobs, so they still run
            self.thread.join(timeout)

    @property
    def queued(self) -> int:
        return self.jobs.qsize()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not None:
            self.busy = True
            try:
                self._run(job)
            except Exception:  # a bug here must not take the worker down with it
                log.exception("bild worker: job failed outside generation")
            finally:
                self.busy = False

    def _run(self, job: Job) -> None:
        started = time.perf_counter()
        self.monitor.queue_seconds.observe(started - job.arrived)
        if job.cancelled.is_set():  # the client left while waiting
            self.monitor.cancelled.inc()
            return
        try:
            ids = prompt_ids(self.pair, job.prompt)
            stream = self.pair.stream(ids, cancel=job.cancelled, **job.settings)  # ends within a round once set
            job.emit(("start", len(ids)))
            for piece in stream:
                job.emit(("text", piece))
        except Exception as e:  # reported to this request only; the worker keeps serving
            job.emit(("error", e))
            return
        if stream.result.finish_reason == "cancelled":
            self.monitor.cancelled.inc()
            return
        self.monitor.record(stream.result.stats, time.perf_counter() - job.arrived)
        job.emit(("done", stream.result))


def prompt_ids(pair, prompt) -> list[int]:
    """The prompt's token ids; what fails here is the prompt's fault: a BildError about the "prompt" field."""
    try:
        return pair.encode(prompt)
    except BildError as e:
        if e.field is None:
            e.field = "prompt"
        raise
    except (UnicodeError, *_TEMPLATE_ERRORS) as e:  # text that does not encode; a chat template that refuses it
        raise BildError((str(e).splitlines() or [type(e).__name__])[0], field="prompt") from e


def is_bad_input(e: Exception) -> bool:
    """Errors caused by the request itself (bad settings, bad prompts): BildErrors."""
    return isinstance(e, BildError)
