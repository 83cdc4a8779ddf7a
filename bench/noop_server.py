"""The ceiling: a grpc.aio server that answers QuotaService calls with canned responses.

Same generated servicer, same request parsing and the same response messages
(bytes captured from quotad in the same benchmark run), and no decision at
all: what Python gRPC alone costs on this machine.

With --redis-ping URL it is the second ceiling, the floor of any Redis-backed
decision: CheckAndReserve first awaits one Redis round trip (PING) through the
client quotad itself uses, then answers the same canned response.

    python bench/noop_server.py --listen 127.0.0.1:50052 --responses DIR [--processes N] [--redis-ping URL]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from quotad.v1 import quota_pb2 as pb
from quotad.v1 import quota_pb2_grpc as pb_grpc
from quotad_server.store.resp import RedisAddress, RespClient


class NoopServicer(pb_grpc.QuotaServiceServicer):
    def __init__(self, responses: Path, redis: RespClient | None = None) -> None:
        self._reserve = pb.CheckAndReserveResponse.FromString((responses / "reserve.bin").read_bytes())
        self._commit = pb.CommitResponse.FromString((responses / "commit.bin").read_bytes())
        self._redis = redis

    async def CheckAndReserve(
        self, request: pb.CheckAndReserveRequest, context: Any
    ) -> pb.CheckAndReserveResponse:
        if self._redis is not None:
            await self._redis.call("PING")
        return self._reserve

    async def Commit(self, request: pb.CommitRequest, context: Any) -> pb.CommitResponse:
        return self._commit

    async def CheckAndReserveBatch(
        self, request: pb.CheckAndReserveBatchRequest, context: Any
    ) -> pb.CheckAndReserveBatchResponse:
        result = pb.CheckAndReserveResult(response=self._reserve)
        return pb.CheckAndReserveBatchResponse(results=[result] * len(request.requests))

    async def CheckAndReserveStream(
        self, request_iterator: AsyncIterator[pb.CheckAndReserveStreamRequest], context: Any
    ) -> AsyncIterator[pb.CheckAndReserveStreamResponse]:
        result = pb.CheckAndReserveResult(response=self._reserve)
        async for item in request_iterator:
            yield pb.CheckAndReserveStreamResponse(request_id=item.request_id, result=result)


async def serve(listen: str, responses: Path, redis_url: str | None) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    redis = RespClient(RedisAddress.from_url(redis_url), timeout_s=1.0) if redis_url else None
    # Only the methods the harness drives are answered; the others stay UNIMPLEMENTED.
    pb_grpc.add_QuotaServiceServicer_to_server(NoopServicer(responses, redis), server)  # type: ignore[abstract]
    server.add_insecure_port(listen)
    await server.start()
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    await server.stop(0)


def run(listen: str, responses: Path, redis_url: str | None = None) -> None:
    asyncio.run(serve(listen, responses, redis_url))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--responses", type=Path, required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--redis-ping", metavar="URL", help="await one Redis PING per CheckAndReserve")
    args = parser.parse_args()
    if args.processes == 1:
        run(args.listen, args.responses, args.redis_ping)
        return
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=run, args=(args.listen, args.responses, args.redis_ping))
        for _ in range(args.processes)
    ]
    for child in children:
        child.start()

    def stop(*_: object) -> None:
        for child in children:
            child.terminate()

    signal.signal(signal.SIGTERM, stop)
    for child in children:
        child.join()


if __name__ == "__main__":
    main()
