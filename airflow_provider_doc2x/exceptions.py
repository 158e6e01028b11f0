"""The errors a Doc2X call can end in, one class per meaning.

The class says what to do about it: a :class:`Doc2XTransientError` is retried by the hook with
back-off; a :class:`Doc2XPermanentError` is also an ``AirflowFailException``, so Airflow fails the
task without spending its retries on something that cannot succeed (a bad key, an invalid image,
no quota, an unknown uid). "Is this permanent?" is answered by the class alone, everywhere: the
operator, the trigger and the sensor ask :func:`is_permanent` (through
:func:`airflow_provider_doc2x.protocol.is_permanent_code` for a job that carries only its code).

The attributes carry what support and code need (``code``, ``http_status``, ``uid``, ``trace_id``,
``source``) rather than hiding it in the message. Each class also has a short fixed ``summary``:
what trigger kwargs, trigger events and failure summaries carry, since those are stored in
Airflow's database and must never hold the server's own words (a misbehaving server or proxy may
echo the API key back).
"""

from __future__ import annotations

from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException


class Doc2XError(AirflowException):
    """Base of every Doc2X error; the message names the code, the uid or file, and the trace id."""

    #: A fixed description of this kind of failure, safe to store anywhere.
    summary = "the Doc2X call failed"
    #: The code a failure of this class carries when Doc2X gave none (a local or transport failure).
    default_code = "doc2x_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        http_status: int | None = None,
        uid: str | None = None,
        trace_id: str | None = None,
        source: str | None = None,
    ) -> None:
        self.code = code
        self.http_status = http_status
        self.uid = uid
        self.trace_id = trace_id
        self.source = source
        self.message = message
        super().__init__(self._describe())

    @property
    def failure_code(self) -> str:
        """The Doc2X code of this failure, or this class's own code when Doc2X gave none."""
        return self.code or self.default_code

    def _describe(self) -> str:
        details = [
            f"{name}={printable(value)}"
            for name, value in (
                ("source", self.source),
                ("uid", self.uid),
                ("code", self.code),
                ("http_status", self.http_status),
                ("trace_id", self.trace_id),
            )
            if value is not None
        ]
        return f"{self.message} ({', '.join(details)})" if details else self.message

    def __reduce__(self):
        # Keyword-only attributes must survive pickling (task results, multiprocessing).
        return _rebuild, (type(self), self.message, self._attributes())

    def _attributes(self) -> dict:
        return {
            "code": self.code,
            "http_status": self.http_status,
            "uid": self.uid,
            "trace_id": self.trace_id,
            "source": self.source,
        }


def _rebuild(cls: type[Doc2XError], message: str, attributes: dict) -> Doc2XError:
    return cls(message, **attributes)


def printable(value: object) -> str:
    """A value as text that cannot forge a log line: control characters are escaped, as ``repr`` does."""
    text = str(value)
    if text.isprintable():
        return text
    return repr(text)[1:-1]


class Doc2XTransientError(Doc2XError):
    """A failure that may pass: 5xx, an HTML error page, a reset or timed-out connection."""

    summary = "a transient failure (a server error, a timeout or a reset connection)"
    default_code = "transient_error"

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs) -> None:
        """``retry_after``: the seconds the server asked for (``Retry-After``), a floor of the back-off."""
        super().__init__(message, **kwargs)
        self.retry_after = retry_after

    def _attributes(self) -> dict:
        return {**super()._attributes(), "retry_after": self.retry_after}


class Doc2XStorageError(Doc2XTransientError):
    """Object storage failed in a way that may pass (a 5xx, throttling, a reset, a timeout).

    Raised once a storage call has been tried a few times (:func:`airflow_provider_doc2x.storage.objects.
    storage_call`); it names the object. Never "no result", "corrupt" or a bad input: the task
    fails with Airflow's retries left, and nothing the storage did not answer is taken as an answer.
    """

    summary = "object storage failed for a while (a server error, throttling, a reset or a timeout)"
    default_code = "storage_error"


class Doc2XTaskStateError(Doc2XError):
    """Airflow's task state store could not be read or written (its API server or database failed).

    It stops the batch: an upload whose start cannot be recorded is not sent (a next try could not
    know of it). Not a :class:`Doc2XTransientError`, so the hook never retries an upload around it;
    Airflow's own task retries apply.
    """

    summary = "the task state store could not be read or written"
    default_code = "task_state_error"


class Doc2XBudgetUnavailableError(Doc2XError):
    """The store that keeps the key's daily page budget (Redis, or the host's file) cannot be reached.

    The budget fails closed: nothing is sent while it cannot be counted. Not transient for the
    hook (no upload is retried around it); Airflow's own task retries apply.
    """

    summary = "the daily page budget could not be read or booked"
    default_code = "budget_unavailable"


class Doc2XRateLimitError(Doc2XTransientError):
    """Too many requests or tasks for the key (HTTP 429 and the limit codes); retried after a pause."""

    summary = "the key's rate or task limit was reached"
    default_code = "request_limit_exceeded"


class Doc2XJobFailedError(Doc2XError):
    """Doc2X accepted the image but could not parse it (``parse_error``, or a ``failed`` status).

    Not retried by the hook (that would upload and bill again at once); the vendor advises a retry
    after a short wait, so Airflow's own task retries apply.
    """

    summary = "Doc2X could not parse it"
    default_code = "parse_error"


class Doc2XSubmitUncertainError(Doc2XError):
    """The upload was sent whole but its answer was lost or unreadable (timeout, reset, garbage).

    Doc2X may have accepted and billed the image, and there is no call to find the uid again, so
    the hook never resends it on its own: a silent resend could bill the image twice. The task
    fails naming the file; a task retry submits it again knowingly, with a warning in the log.
    """

    summary = "its upload was sent but the answer was lost, so Doc2X may have billed it"
    default_code = "upload_answer_lost"


class Doc2XProtocolError(Doc2XError):
    """An answer the API notes do not describe: an unknown code, a malformed body, an answer too large."""

    summary = "Doc2X answered something this provider does not understand"
    default_code = "protocol_error"


class Doc2XPermanentError(AirflowFailException, Doc2XError):
    """A failure no retry can fix; Airflow fails the task at once."""

    summary = "a failure no retry can fix"
    default_code = "permanent_error"


class Doc2XAuthError(Doc2XPermanentError):
    """The API key is missing or refused (HTTP 401, ``unauthorized``)."""

    summary = "Doc2X refused the API key"
    default_code = "unauthorized"


class Doc2XInputError(Doc2XPermanentError):
    """The image is missing, unreadable, empty, not a JPEG/PNG or over 7 MB: checked locally or by Doc2X."""

    summary = "the image cannot be parsed (missing, empty, too large, or not a JPEG/PNG)"
    default_code = "invalid_input"


class Doc2XQuotaError(Doc2XPermanentError):
    """The account has no page quota left (``parse_quota_limit``)."""

    summary = "the account has no page quota left"
    default_code = "parse_quota_limit"


class Doc2XJobNotFoundError(Doc2XPermanentError):
    """Doc2X does not know the uid, or its result expired after 24 hours (``parse_status_not_found``)."""

    summary = "Doc2X does not know the job, or its result expired (24 h)"
    default_code = "parse_status_not_found"


class Doc2XBudgetError(Doc2XPermanentError):
    """A page budget would be overrun: the task's ``max_pages``, or the key's ``daily_page_budget``.

    Nothing is sent past it; a new try would be refused the same way, so Airflow fails the task
    without its retries. The message names the count, the budget and how to raise it.
    """

    summary = "a page budget (max_pages or daily_page_budget) would be overrun"
    default_code = "budget_exceeded"


def is_permanent(error: BaseException | type[BaseException]) -> bool:
    """Whether no retry can fix this failure: the one rule, by class, for every component."""
    error_class = error if isinstance(error, type) else type(error)
    return issubclass(error_class, Doc2XPermanentError)
