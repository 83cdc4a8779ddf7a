"""`quotad health`: this pod's quotad is SERVING, asked over its local Unix socket(s).

For exec probes (Kubernetes' own gRPC probes cannot speak TLS). Kept apart from the rest of
the command line so that a probe, which runs every few seconds, imports only grpc and the
health stubs: the whole server costs three times the CPU to import.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping

import grpc
from grpc_health.v1 import health_pb2

EXIT_CONFIG = 2


def local_sockets(path: str, workers: int) -> list[str]:
    """The Unix sockets of a server of `workers` processes: the path itself, or one a worker."""
    return [path] if workers <= 1 else [f"{path}.{index}" for index in range(workers)]


def health(env: Mapping[str, str], service: str, timeout_s: float) -> int:
    """`quotad health`: 0 if every worker's health (for `service`) is SERVING, over the local
    socket (QUOTAD_LOCAL_SOCKET); else 1, saying why. For exec probes: Kubernetes' own gRPC
    probes cannot speak TLS."""
    path = env.get("QUOTAD_LOCAL_SOCKET", "").strip()
    if not path:
        print("quotad health: QUOTAD_LOCAL_SOCKET is not set", file=sys.stderr)
        return EXIT_CONFIG
    workers = int(env.get("QUOTAD_WORKERS", "1").strip() or "1")
    for socket_path in local_sockets(path, workers):
        with grpc.insecure_channel(f"unix:{socket_path}") as channel:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            try:
                answer = check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
            except grpc.RpcError as error:
                print(f"quotad health: {socket_path}: {error.code().name}", file=sys.stderr)
                return 1
            if answer.status != health_pb2.HealthCheckResponse.SERVING:
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
                print(f"quotad health: {socket_path}: {status}", file=sys.stderr)
                return 1
    return 0
