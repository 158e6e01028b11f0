"""
The errors a Doc2X call can end in, one class per meaning.

The class says what to do about it: a :class:`Doc2XTransientError` is retried by the hook with
back-off; a :class:`Doc2XPermanentError` is also an ``AirflowFailException``, so Airflow fails the
task without spending its retries on something that cannot succeed (a bad key, an invalid image,
no quota, an unknown uid). The attributes carry what support and code need (``code``,
``http_status``, ``uid``, ``trace_id``, ``source``) rather than hiding it in the message.
"""

from __future__ import annotations

from airflow.providers.common.compat.sdk import AirflowException, AirflowFailException


class Doc2XError(AirflowException):
    """Base of every Doc2X error; the message names the code, the uid or file, and the trace id."""

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

    def _describe(self) -> str:
        details = [
            f"{name}={value}"
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
        return _rebuild, (
            type(self),
            self.message,
            {
                "code": self.code,
                "http_status": self.http_status,
                "uid": self.uid,
                "trace_id": self.trace_id,
                "source": self.source,
            },
        )


def _rebuild(cls: type[Doc2XError], message: str, attributes: dict) -> Doc2XError:
    return cls(message, **attributes)


class Doc2XTransientError(Doc2XError):
    """A failure that may pass: 5xx, an HTML error page, a reset or timed-out connection."""

    retry_after: float | None = None


class Doc2XRateLimitError(Doc2XTransientError):
    """Too many requests or tasks for the key (HTTP 429 and the limit codes); retried after a pause."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class Doc2XJobFailedError(Doc2XError):
    """
    Doc2X accepted the image but could not parse it (``parse_error``).

    Not retried by the hook (that would upload and bill again at once); the vendor advises a retry
    after a short wait, so Airflow's own task retries apply.
    """


class Doc2XSubmitUncertainError(Doc2XError):
    """
    The upload was sent whole but its answer was lost (read timeout, connection reset).

    Doc2X may have accepted and billed the image, and there is no call to find the uid again, so
    the hook never resends it on its own: a silent resend could bill the image twice. The task
    fails naming the file; a task retry submits it again knowingly, with a warning in the log.
    """


class Doc2XProtocolError(Doc2XError):
    """An answer the API notes do not describe: an unknown code, or a body that is not the API's JSON."""


class Doc2XPermanentError(AirflowFailException, Doc2XError):
    """A failure no retry can fix; Airflow fails the task at once."""


class Doc2XAuthError(Doc2XPermanentError):
    """The API key is missing or refused (HTTP 401, ``unauthorized``)."""


class Doc2XInputError(Doc2XPermanentError):
    """The image is missing, empty, not a JPEG/PNG or over 7 MB: checked locally or by Doc2X."""


class Doc2XQuotaError(Doc2XPermanentError):
    """The account has no page quota left (``parse_quota_limit``)."""


class Doc2XJobNotFoundError(Doc2XPermanentError):
    """Doc2X does not know the uid, or its result expired after 24 hours (``parse_status_not_found``)."""
