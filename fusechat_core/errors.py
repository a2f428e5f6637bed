"""Which failures are worth trying again: the one rule behind every stage's retries.

A retry helps only when the world may change in the meantime: a network that drops,
an S3 server answering 5xx or "slow down", a judge answering 429 or 5xx. A bad config,
a bad data file, a model that cannot load, a NaN fail the same way every time; retrying
them only delays the one line the user needs (by the retry delays, with a traceback
each time). So: transient when the exception, or one it was raised from, says so.
"""

from __future__ import annotations

from collections.abc import Iterator

# HTTP statuses that say "not now" rather than "no".
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
# S3 error codes that say the same without a status (botocore ClientError).
_TRANSIENT_S3_CODES = frozenset({"SlowDown", "RequestTimeout", "RequestTimeTooSkewed", "InternalError",
                                 "ServiceUnavailable", "Throttling", "ThrottlingException"})
# Network failures of the client libraries the stages use (httpx, aiohttp, botocore,
# urllib3, requests), by class name: none of them is imported just to ask.
_TRANSIENT_NAMES = frozenset({
    "TransportError", "TimeoutException", "NetworkError", "RemoteProtocolError",  # httpx
    "ClientConnectionError", "ServerDisconnectedError", "ServerTimeoutError", "ClientPayloadError",  # aiohttp
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",  # botocore
    "ProtocolError", "NewConnectionError", "MaxRetryError",  # urllib3
    "ChunkedEncodingError",  # requests (its ConnectionError/Timeout share names with the above)
})


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it was raised from or during, each once."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        todo += [e.__cause__, e.__context__]


def _status(exc: BaseException) -> int | None:
    resp = getattr(exc, "response", None)
    code = getattr(resp, "status_code", None) or getattr(exc, "status", None)
    if code is None and isinstance(resp, dict):  # botocore ClientError
        code = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code if isinstance(code, int) else None


def s3_answer(exc: BaseException) -> tuple[str | None, int | None]:
    """(error code, HTTP status) of the S3 answer behind ``exc`` (botocore's ClientError,
    which s3fs wraps in an OSError), or (None, None) when no answer is in its chain."""
    for e in _chain(exc):
        resp = getattr(e, "response", None)
        if isinstance(resp, dict) and isinstance(resp.get("Error"), dict):
            return resp["Error"].get("Code"), resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return None, None


def is_transient(exc: BaseException) -> bool:
    """Whether trying again later may succeed (see the module's doc)."""
    for e in _chain(exc):
        marked = getattr(e, "transient", None)
        if isinstance(marked, bool):  # the raiser knows best (e.g. JudgeError)
            return marked
        if isinstance(e, (ConnectionError, TimeoutError)):  # refused, reset, timed out
            return True
        if any(c.__name__ in _TRANSIENT_NAMES for c in type(e).__mro__):
            return True
        if type(e).__name__ in ("ConnectionError", "Timeout") and type(e).__module__.startswith("requests"):
            return True
        if _status(e) in TRANSIENT_STATUS:
            return True
        resp = getattr(e, "response", None)
        if isinstance(resp, dict) and resp.get("Error", {}).get("Code") in _TRANSIENT_S3_CODES:
            return True
    return False
