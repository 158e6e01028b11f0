"""How far a long batch is, and how long the rest will take: a line at most every few seconds.

"Doc2X: 420/3000 done" says nothing of when a batch of thousands will end. Each line here also
says the time left, from one of two paces:

- the key's own pace, when it is what bounds the batch: the image lane's uploads go at the key's
  rate limit (``rate_limit_images`` per ``rate_limit_window``, 30 per 30 s by default), so the
  images left take that long at least (other tasks on the same key make it longer);
- the observed pace otherwise: what finished since the wait began, over the time it took (the PDF
  lane's pages, Doc2X's parsing of images submitted). No estimate before the first job ends.

A task of ten thousand images, or a triggerer of a thousand waiting tasks, must not write a line per
job: a line is written when the count changed and ``[doc2x] progress_interval`` seconds
(:data:`PROGRESS_INTERVAL` by default) passed since the last one, and always for the last job.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

#: Least seconds between two progress lines of one batch (the last line is always written).
PROGRESS_INTERVAL = 10.0


class Progress:
    """A batch's count of finished jobs, logged with the time left (see the module's doc).

    :param log: the task's (or trigger's) logger.
    :param total: the jobs of the batch.
    :param verb: what a finished job is: ``"submitted"``, ``"done"``.
    :param per_second: the key's pace in jobs per second when it bounds the batch; None to use the
        observed pace.
    :param pace: how that pace is named in the line (``"30 images per 30 s"``).
    :param interval: least seconds between two lines; ``[doc2x] progress_interval`` by default.
    :param done: the jobs already finished when counting starts (a wait resumed after a deferral):
        the observed pace counts from there.
    :param clock: seconds, monotonic (tests give their own).
    """

    def __init__(
        self,
        log: Any,
        total: int,
        verb: str,
        *,
        per_second: float | None = None,
        pace: str = "",
        interval: float | None = None,
        done: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Start counting now; nothing is logged yet."""
        self.log = log
        self.total = total
        self.verb = verb
        self.per_second = per_second if per_second and per_second > 0 else None
        self.pace = pace
        self.interval = progress_interval() if interval is None else interval
        self.clock = clock
        self.done = done
        self._started = clock()
        self._done_at_start = done
        self._logged_at = self._started
        self._reported = done

    def one_done(self) -> None:
        """One more job finished."""
        self.update(self.done + 1)

    def update(self, done: int) -> None:
        """The batch's count is now ``done``; log it if it changed and it is time (or it is the last)."""
        self.done = done
        now = self.clock()
        if done == self._reported or (done < self.total and now - self._logged_at < self.interval):
            return
        self._logged_at, self._reported = now, done
        self.log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """``Doc2X: 420/3000 done; about 12 min left at the observed pace`` (no estimate at the end)."""
        line = f"Doc2X: {self.done}/{self.total} {self.verb}"
        left = self.seconds_left(self.clock() if now is None else now)
        if left is None or self.done >= self.total:
            return line
        if self.per_second is not None:
            return f"{line}; about {duration(left)} left at the key's pace ({self.pace})"
        return f"{line}; about {duration(left)} left at the observed pace"

    def seconds_left(self, now: float) -> float | None:
        """Seconds until the last job at the pace: None when no job finished yet to observe one."""
        remaining = self.total - self.done
        if self.per_second is not None:
            return remaining / self.per_second
        finished = self.done - self._done_at_start
        elapsed = now - self._started
        if finished <= 0 or elapsed <= 0:
            return None
        return remaining * elapsed / finished


def progress_interval() -> float:
    """``[doc2x] progress_interval``: least seconds between two progress lines."""
    from airflow.providers.common.compat.sdk import conf

    return conf.getfloat("doc2x", "progress_interval", fallback=PROGRESS_INTERVAL)


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``2 h 05 min``: what a reader of a log takes in at a glance."""
    if seconds < 60:
        return f"{max(1, round(seconds))} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d} min"
