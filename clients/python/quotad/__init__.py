"""Python client for quotad, the quota-decision service for LLM calls.

    from quotad import QuotaClient, QuotaDenied

    async with QuotaClient("localhost:50051") as quota:
        async with quota.reserve("user-42", model="gpt-4o", input_tokens=812, max_output_tokens=256) as r:
            response = await openai.chat.completions.create(...)
            r.record(response.usage)       # committed on exit, even if the body then raises

Nothing recorded: the estimate is committed on exit, or the reservation released if the body
raises. UNAVAILABLE is retried, with one idempotency key per reservation, within each call's
`timeout` (see QuotaClient). `SyncQuotaClient` is the same for blocking code. TLS, mutual TLS
and a bearer token: `QuotaClient(target, tls=TlsConfig(ca=..., cert=..., key=...), token=...)`.
`quotad.v1.quota_pb2` (also exported as `pb`) holds the generated messages.
"""

from quotad._transport import TlsConfig
from quotad.client import AsyncReservation, QuotaClient
from quotad.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    NotFound,
    QuotaDenied,
    QuotadError,
    Unavailable,
)
from quotad.sync import Reservation, SyncQuotaClient
from quotad.usage import Usage
from quotad.v1 import quota_pb2 as pb

__all__ = [
    "AsyncReservation",
    "FailedPrecondition",
    "FieldViolation",
    "InvalidArgument",
    "NotFound",
    "QuotaClient",
    "QuotaDenied",
    "QuotadError",
    "Reservation",
    "SyncQuotaClient",
    "TlsConfig",
    "Unavailable",
    "Usage",
    "pb",
]
