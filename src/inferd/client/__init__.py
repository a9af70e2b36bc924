"""A Python client of inferd: predictions, long-running requests and their event streams.

::

    from inferd.client import Client

    with Client("http://127.0.0.1:8000") as client:
        print(client.predict([5.1, 3.5, 1.4, 0.2], model="iris").label)
        job = client.submit("textgen", "the quick brown", {"max_new_tokens": 16})
        for chunk in client.follow(job.id):
            print(chunk, end="", flush=True)

The client retries what the server refused for now (503, 429, honouring ``Retry-After``)
and calls that got no answer, within a bounded budget, and resumes a broken event stream
with ``Last-Event-ID``. See docs/client.md.
"""

from inferd.client._async import AsyncClient
from inferd.client._retry import RetryPolicy
from inferd.client._sync import Client
from inferd.client.errors import (
    BadRequest,
    Conflict,
    ConnectionFailed,
    DeadlineExceeded,
    Forbidden,
    InferdClientError,
    ModelNotReady,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    QuotaExceeded,
    RateLimited,
    RequestFailed,
    ServerError,
    StreamInterrupted,
    Timeout,
    Unauthorized,
    Unavailable,
    UnsupportedMediaType,
    ValidationError,
)
from inferd.client.types import (
    Classification,
    ClassScore,
    DoneEvent,
    ErrorEvent,
    Event,
    Health,
    InferResult,
    ModelInfo,
    Prediction,
    RequestInfo,
    ResponseEvent,
    StatusEvent,
    Submitted,
    UnknownEvent,
    Usage,
)

__all__ = [
    "AsyncClient",
    "BadRequest",
    "ClassScore",
    "Classification",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "DeadlineExceeded",
    "DoneEvent",
    "ErrorEvent",
    "Event",
    "Forbidden",
    "Health",
    "InferResult",
    "InferdClientError",
    "ModelInfo",
    "ModelNotReady",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "Prediction",
    "QuotaExceeded",
    "RateLimited",
    "RequestFailed",
    "RequestInfo",
    "ResponseEvent",
    "RetryPolicy",
    "ServerError",
    "StatusEvent",
    "StreamInterrupted",
    "Submitted",
    "Timeout",
    "Unauthorized",
    "Unavailable",
    "UnknownEvent",
    "UnsupportedMediaType",
    "Usage",
    "ValidationError",
]
