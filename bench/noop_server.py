"""The ceiling: a grpc.aio server that answers QuotaService calls with canned responses.

Same generated servicer, same request parsing and the same response messages
(bytes captured from quotad in the same benchmark run), and no decision at
all: what Python gRPC alone costs on this machine.

With --redis-ping URL it is the second ceiling, the floor of any Redis-backed
decision: CheckAndReserve first awaits one Redis round trip (PING) through the
client quotad itself uses, then answers the same canned response.

With --redis-script URL it is the third, the floor of quotad's own decision with
none of quotad's Python: CheckAndReserve awaits one of quotad's scenario-1 reserve
EVALSHAs (built at start, each for a random subject with its own reservation id),
then answers the same canned response. Between the second and the third is what
Redis running the script costs a server that shares its machine with Redis.

    python bench/noop_server.py --listen 127.0.0.1:50052 --responses DIR [--processes N]
        [--redis-ping URL | --redis-script URL]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from quotad.v1 import quota_pb2 as pb
from quotad.v1 import quota_pb2_grpc as pb_grpc
from quotad_server.core import QuotaCore, ReserveRequest
from quotad_server.policy import load_policy
from quotad_server.store.redis import RedisStore
from quotad_server.store.resp import RedisAddress, RespClient

LUA = Path(__file__).resolve().parent.parent / "server" / "quotad_server" / "store" / "lua"
SCRIPT_COMMANDS = 50_000


def script_commands(redis_url: str, count: int) -> list[tuple[Any, ...]]:
    """`count` scenario-1 reserve EVALSHAs, each as quotad would send it for a random subject."""
    store = RedisStore.from_url(redis_url, timeout_s=1)
    core = QuotaCore(load_policy(Path(__file__).parent / "policy.yaml"), store)
    rng = random.Random(os.getpid())  # workers each send their own reservations
    commands = []
    for _ in range(count):
        request = ReserveRequest(
            subject=f"user-{rng.randrange(100_000)}", model="gpt-4o", input_tokens=812, max_output_tokens=256
        )
        sha, _, keys, args = store.reserve_command(core.plan_for(request, request.input_tokens))
        commands.append(("EVALSHA", sha, len(keys), *keys, *args))
    return commands


class NoopServicer(pb_grpc.QuotaServiceServicer):
    def __init__(
        self, responses: Path, redis: RespClient | None = None, commands: list[tuple[Any, ...]] | None = None
    ) -> None:
        self._reserve = pb.CheckAndReserveResponse.FromString((responses / "reserve.bin").read_bytes())
        self._commit = pb.CommitResponse.FromString((responses / "commit.bin").read_bytes())
        self._redis = redis
        self._commands = commands or [("PING",)]
        self._next = 0

    async def CheckAndReserve(
        self, request: pb.CheckAndReserveRequest, context: Any
    ) -> pb.CheckAndReserveResponse:
        if self._redis is not None:
            command = self._commands[self._next]
            self._next = (self._next + 1) % len(self._commands)
            await self._redis.call(*command)
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


async def serve(listen: str, responses: Path, redis_url: str | None, script: bool) -> None:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1)])
    redis = RespClient(RedisAddress.from_url(redis_url), timeout_s=1.0) if redis_url else None
    commands = None
    if redis is not None and script:
        commands = script_commands(redis_url or "", SCRIPT_COMMANDS)
        await redis.call("SCRIPT", "LOAD", (LUA / "reserve.lua").read_bytes())
    # Only the methods the harness drives are answered; the others stay UNIMPLEMENTED.
    servicer = NoopServicer(responses, redis, commands)  # type: ignore[abstract]
    pb_grpc.add_QuotaServiceServicer_to_server(servicer, server)
    server.add_insecure_port(listen)
    await server.start()
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    await stopping.wait()
    await server.stop(0)


def run(listen: str, responses: Path, redis_url: str | None = None, script: bool = False) -> None:
    asyncio.run(serve(listen, responses, redis_url, script))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--responses", type=Path, required=True)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--redis-ping", metavar="URL", help="await one Redis PING per CheckAndReserve")
    parser.add_argument("--redis-script", metavar="URL", help="await quotad's reserve script instead")
    args = parser.parse_args()
    redis_url, script = args.redis_script or args.redis_ping, args.redis_script is not None
    if args.processes == 1:
        run(args.listen, args.responses, redis_url, script)
        return
    context = multiprocessing.get_context("spawn")
    children = [
        context.Process(target=run, args=(args.listen, args.responses, redis_url, script))
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
