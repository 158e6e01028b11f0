"""A deferred task's jobs, split where each part belongs: the images in XCom, the statuses in the trigger.

Why: Airflow 3's triggerer hands each trigger's kwargs to its runner process and logs each event
whole, through sockets of about 200 KB that one thread serves; a message that does not fit while
the other side waits can stop every trigger of the triggerer (apache/airflow#65286). A task of a
thousand images carried about 300 KB of jobs both ways, one entry per image. So what does not
change while Doc2X works (each image's source and sha256) stays with the task, in an XCom of its
own, written at each deferral; and what the trigger polls and reports travels *packed*: one group per
set of images that share everything else (in the PDF lane, one group per PDF), the images named by
their place in the task's list. A task of a thousand images in five PDFs then defers with about
1 KB of kwargs and resumes with an event of the same size.

The formats, each versioned (a reader refuses a format it does not know, naming it)::

    XCom "doc2x_wait"   {"format": 1, "token": "<16 hex>-<8 hex>", "images": [[<source>, <sha256 or null>], ...]}
                        (an image-lane job's entry has its uid third: the trigger never changes it)
    packed jobs         {"format": 1, "images": "<the token>", "count": <n>, "groups": [
                           {"job": {<a job's keys but source, sha256, page_idx and an image-lane uid>},
                            "at": [[<first place>, <how many>], ...],
                            "page_idx": [[<first page>, <how many>], ...],
                            "uids": [<uid>, ...]}, ...]}

``at`` and ``page_idx`` are runs of consecutive whole numbers (a PDF's images are mostly
consecutive places and pages): the n-th place of a group has its n-th page. ``uids`` are the image
lane's, in the trigger's kwargs only (it polls them); its event leaves them out, so that an event
stays small in either lane, while the kwargs of an image-lane task grow by a uid an image.
``token`` is a digest of the images and a random part of each wait, so that a packed event is never
joined to another list of images, nor taken for the event of a later wait. An image-lane job's
``trace_id`` is its own too: a group lists those it has (``trace_ids``: ``[[<n-th of the group>,
<trace id>], ...]``), in the event as well. The XCom is emptied when the task ends. Events and kwargs of earlier releases (one job per
image, under ``jobs``) are still read as they are.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from typing import Any

from airflow_provider_doc2x import protocol
from airflow_provider_doc2x.events import Job, compact, is_pdf
from airflow_provider_doc2x.exceptions import Doc2XError

#: The XCom key of a deferred task's images.
WAIT_XCOM_KEY = "doc2x_wait"
#: The format of the XCom and of the packed jobs.
WAIT_FORMAT = 1
#: Most jobs a packed list may stand for: a deferrable task of more images is refused before anything
#: is sent (map over chunks), and a reader never builds more (a few bytes of runs could ask for millions).
MAX_JOBS = 100_000
#: What a trigger's placeholder source says in its log lines: the image's place in the task's list.
PLACE = "image #{place}"


def images_of(jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """The XCom value of these jobs' images, and their token.

    Each image's source and sha256; and an image-lane job's uid too, which the trigger polls but
    never changes, so that its event need not carry it back.
    """
    images = [
        [entry["source"], entry.get("sha256")] + ([] if is_pdf(entry) else [entry.get("uid")])
        for entry in jobs
    ]
    token = hashlib.sha256(json.dumps(images, separators=(",", ":")).encode()).hexdigest()[:16]
    return {"format": WAIT_FORMAT, "token": token, "images": images}


def pack(jobs: list[dict[str, Any]], token: str, *, uids: bool = True) -> dict[str, Any]:
    """The jobs without their images' sources and sha256, grouped by all they share.

    An image-lane job's uid and trace id are its own: the group lists them. Its uids (``uids``)
    are for the trigger, which polls them; an event leaves them out (``uids=False``), the task has
    them in its XCom. Its trace ids (``trace_ids``, only those it has) travel both ways.
    """
    groups: dict[str, dict[str, Any]] = {}
    for place, entry in enumerate(jobs):
        shared = compact(entry)
        del shared["source"], shared["sha256"]
        page_idx = shared.pop("page_idx", None)
        image_lane = not is_pdf(entry)
        uid = shared.pop("uid", None) if image_lane else None
        trace_id = shared.pop("trace_id", None) if image_lane else None
        # What the group's jobs share: ``compact`` writes keys in one order, and repr tells 1, 1.0
        # and True apart (and takes any value, as the JSON of the kwargs must anyway).
        group = groups.setdefault(
            repr((shared, page_idx is None, image_lane)),
            {
                "job": shared,
                "at": [],
                **({} if page_idx is None else {"page_idx": []}),
                **({"uids": []} if image_lane and uids else {}),
            },
        )
        if trace_id is not None:
            group.setdefault("trace_ids", []).append([_count(group["at"]), trace_id])
        _extend(group["at"], place)
        if page_idx is not None:
            _extend(group["page_idx"], int(page_idx))
        if image_lane and uids:
            group["uids"].append(uid)
    return {"format": WAIT_FORMAT, "images": token, "count": len(jobs), "groups": list(groups.values())}


def unpack(packed: Any, images: list[list[Any]] | None = None) -> list[dict[str, Any]]:
    """The jobs again, one per image, in the task's order.

    With ``images`` (the task's XCom), each job gets its source and sha256 back (and an image-lane
    job its uid, when the packed jobs leave it out); without (the trigger), a placeholder: the
    image's place (:data:`PLACE`), which is all its log lines need.

    Raises:
        Doc2XError: the packed jobs are not this format (or not this task's images), named.
    """
    count, groups = _checked(packed)
    if images is not None and len(images) != count:
        raise Doc2XError(
            f"The Doc2X trigger's jobs name {count} images, the task's XCom {WAIT_XCOM_KEY!r} {len(images)}; "
            "clear the task to start a new try (it reconnects to what was submitted)"
        )
    jobs: list[dict[str, Any] | None] = [None] * count
    for group in groups:
        places = _expanded(group["at"], count)
        pages = _expanded(group["page_idx"], MAX_JOBS) if "page_idx" in group else None
        uids = group.get("uids")
        traces = _traces(group.get("trace_ids", []), len(places))
        # A PDF-lane group's jobs differ only in their image and page: its own keys are checked once.
        template = _pdf_template(group["job"], pages is not None) if is_pdf(group["job"]) else None
        # An image-lane uid is taken as the job had it (a reused result's may be what its sidecar
        # says); a status call checks it before it is sent (protocol.check_uid).
        if (pages is not None and len(pages) != len(places)) or (
            uids is not None and (not isinstance(uids, list) or len(uids) != len(places))
        ):
            raise _malformed(packed)
        for index, place in enumerate(places):
            if jobs[place] is not None:
                raise _malformed(packed)
            image = images[place] if images is not None else [PLACE.format(place=place), ""]
            if template is not None and isinstance(image[1], str):
                job = {**template, "source": image[0], "sha256": image[1]}
                if pages is not None:
                    job["page_idx"] = pages[index]  # a whole number (_expanded)
                jobs[place] = job
                continue
            entry = {**group["job"], "source": image[0], "sha256": image[1]}
            if pages is not None:
                entry["page_idx"] = pages[index]
            if not is_pdf(entry):
                if uids is None and len(image) != 3:
                    raise _malformed(packed)  # an image-lane job's uid is in the group or the XCom
                entry["uid"] = uids[index] if uids is not None else image[2]
                if index in traces:
                    entry["trace_id"] = traces[index]
            jobs[place] = Job.from_json(entry).to_json()
    if any(entry is None for entry in jobs):
        raise _malformed(packed)
    return [entry for entry in jobs if entry is not None]


def _pdf_template(job: dict[str, Any], paged: bool) -> dict[str, Any]:
    """A PDF-lane group's job in its checked compact form, its image and page to be filled in.

    What :meth:`Job.from_json` checks of each job: the shared keys here, once; the source (a
    string) and sha256 come from the task's XCom (checked by :func:`read_images`) or are a
    placeholder, and a page from the group's runs (whole numbers). A job whose sha256 is not a
    string is checked on its own (a queued job needs one).
    """
    return Job.from_json({**job, "source": "", "sha256": "", **({"page_idx": 0} if paged else {})}).to_json()


def check_task_size(count: int) -> None:
    """Refuse a deferrable task of more than :data:`MAX_JOBS` images, before anything is sent."""
    if count > MAX_JOBS:
        raise Doc2XError(
            f"A deferrable Doc2X task takes at most {MAX_JOBS:,} images, and this one has {count:,}: "
            "map the task over chunks of the sources (nothing was sent)"
        )


def read_images(value: Any, token: Any) -> list[list[Any]]:
    """The images of a task's XCom, checked against a packed list's token.

    Raises:
        Doc2XError: the XCom is missing, of another format, or of other images, named, with what to do.
    """
    if not isinstance(value, dict) or not _is_format(value.get("format")) or value.get("token") != token:
        found = "missing" if value is None else f"of format {protocol.quote(_format_of(value))}"
        raise Doc2XError(
            f"The task's XCom {WAIT_XCOM_KEY!r}, which names the images a deferred Doc2X task waits for, is "
            f"{found} or of other images (token {protocol.quote(token)}); clear the task to start a new try "
            "(it reconnects to what was submitted)"
        )
    images = value.get("images")
    if not isinstance(images, list) or not all(
        isinstance(image, list)
        and len(image) in (2, 3)
        and isinstance(image[0], str)
        and (image[1] is None or isinstance(image[1], str))
        for image in images
    ):
        raise Doc2XError(
            f"The task's XCom {WAIT_XCOM_KEY!r} holds malformed images; clear the task to start a new try"
        )
    return images


class WaitImages:
    """A task's images in its XCom: written before a deferral, read when it resumes, emptied at the end.

    :param ti: the task instance (its ``xcom_push`` and ``xcom_pull``).
    """

    def __init__(self, ti: Any) -> None:
        """Nothing is read or written until asked."""
        self.ti = ti
        self.token: str | None = None

    @classmethod
    def for_context(cls, context: Any) -> WaitImages | None:
        """The task's, or None outside a task (no task instance with XCom): jobs then travel unpacked.

        Any mapping: Airflow 3's context is a dict, Airflow 2's a ``MutableMapping`` of its own.
        """
        ti = context.get("ti") if hasattr(context, "get") else None
        if callable(getattr(ti, "xcom_push", None)) and callable(getattr(ti, "xcom_pull", None)):
            return cls(ti)
        return None

    def pack(self, jobs: list[dict[str, Any]]) -> dict[str, Any]:
        """The jobs packed for the trigger, their images written to XCom first under a token of this wait's.

        Written at each deferral: the token is the images' digest and a random part of this wait,
        so that an event of an earlier wait, delivered again, is refused instead of resumed on.
        """
        value = images_of(jobs)
        value["token"] = f"{value['token']}-{secrets.token_hex(4)}"
        self.ti.xcom_push(key=WAIT_XCOM_KEY, value=value)
        self.token = value["token"]
        return pack(jobs, value["token"])

    def unpacked(self, event: Any) -> Any:
        """An event with its jobs one per image again (an event of earlier releases, or no event, as it is)."""
        if not isinstance(event, dict) or not is_packed(event.get("jobs")):
            return event
        value = self.ti.xcom_pull(task_ids=self.ti.task_id, key=WAIT_XCOM_KEY, map_indexes=self.ti.map_index)
        images = read_images(value, event["jobs"].get("images"))
        self.token = event["jobs"]["images"]
        return {**event, "jobs": unpack(event["jobs"], images)}

    def forget(self) -> None:
        """Empty the XCom once the task no longer waits (its images are in its records by then).

        Emptied to ``{}``, not ``None``: Airflow 3.0's execution API refuses an XCom whose value is
        null (HTTP 422), which failed the task at its end.
        """
        if self.token is not None:
            self.ti.xcom_push(key=WAIT_XCOM_KEY, value={})
            self.token = None


def is_packed(jobs: Any) -> bool:
    """Whether an event or kwargs carry packed jobs (this release's form) rather than one job per image."""
    return isinstance(jobs, dict) and "groups" in jobs


def _checked(packed: Any) -> tuple[int, list[dict[str, Any]]]:
    if not isinstance(packed, dict) or not _is_format(packed.get("format")):
        raise Doc2XError(
            f"The Doc2X jobs are packed in format {protocol.quote(_format_of(packed))}, which this release "
            f"does not read (it reads format {WAIT_FORMAT})"
        )
    count: Any = packed.get("count")
    groups: Any = packed.get("groups")
    if (
        not _whole(count)
        or count > MAX_JOBS
        or not isinstance(packed.get("images"), str)
        or not isinstance(groups, list)
        or not all(
            isinstance(group, dict)
            and isinstance(group.get("job"), dict)
            and not any(key in group["job"] for key in ("source", "sha256", "page_idx"))
            and isinstance(group.get("at"), list)
            and isinstance(group.get("page_idx", []), list)
            for group in groups
        )
    ):
        raise _malformed(packed)
    return count, groups


def _count(runs: list[list[int]]) -> int:
    """How many numbers runs hold."""
    return sum(run[1] for run in runs)


def _traces(pairs: Any, members: int) -> dict[int, Any]:
    """A group's trace ids by the place of their job in the group, checked (each job's at most once)."""
    if not isinstance(pairs, list) or not all(
        isinstance(pair, list) and len(pair) == 2 and _whole(pair[0]) and pair[0] < members for pair in pairs
    ):
        raise Doc2XError(f"The Doc2X jobs hold malformed trace ids: {protocol.quote(pairs)}")
    traces = {pair[0]: pair[1] for pair in pairs}
    if len(traces) != len(pairs):
        raise Doc2XError(f"The Doc2X jobs name a trace id twice for one job: {protocol.quote(pairs)}")
    return traces


def _extend(runs: list[list[int]], value: int) -> None:
    """Add a number to runs of consecutive numbers: the last run grows, or a new one starts."""
    if runs and runs[-1][0] + runs[-1][1] == value:
        runs[-1][1] += 1
    else:
        runs.append([value, 1])


def _expanded(runs: list[Any], limit: int) -> list[int]:
    """The numbers of runs, each run checked: whole numbers below ``limit``, at most ``limit`` in all."""
    numbers: list[int] = []
    for run in runs:
        if (
            not isinstance(run, list)
            or len(run) != 2
            or not all(_whole(value) for value in run)
            or run[1] < 1
            or run[0] + run[1] > limit
            or len(numbers) + run[1] > limit
        ):
            raise Doc2XError(f"The Doc2X jobs hold a malformed run of places or pages: {protocol.quote(run)}")
        numbers.extend(range(run[0], run[0] + run[1]))
    return numbers


def _is_format(value: Any) -> bool:
    """This release's format: the whole number itself (``True`` and ``1.0`` are not it)."""
    return type(value) is int and value == WAIT_FORMAT


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _format_of(value: Any) -> Any:
    return value.get("format") if isinstance(value, dict) else type(value).__name__


def _malformed(packed: Any) -> Doc2XError:
    return Doc2XError(f"The Doc2X trigger's packed jobs are malformed: {protocol.quote(packed)}")
