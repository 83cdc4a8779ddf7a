"""Python client for quotad, the quota-decision service for LLM calls.

from quotad import QuotaClient

async with QuotaClient("localhost:50051") as quota:
    decision = await quota.check_and_reserve(subject="user-42", model="gpt-4o",
                                             input_tokens=812, max_output_tokens=256)
    if decision.decision == pb.DECISION_ALLOWED:
        ...  # call the LLM, then:
        await quota.commit(decision.reservation_id, input_tokens=812, output_tokens=97)
"""

from quotad.client import QuotaClient
from quotad.v1 import quota_pb2 as pb

__all__ = ["QuotaClient", "pb"]
