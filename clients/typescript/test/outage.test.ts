// A real Redis outage during reserve(): quotad's Redis is paused (SIGSTOP: its connections stay
// open and nothing is answered), so quotad answers UNAVAILABLE, and it is resumed once that has
// been seen. Needs $QUOTAD_REDIS_PID, the pid of that Redis (`make test` sets it); `npm test`
// runs the test files one at a time, so no other test is under way meanwhile.
import assert from "node:assert/strict";
import { test } from "node:test";
import { InterceptingCall, type Interceptor, status } from "@grpc/grpc-js";
import { QuotaClient, remainingOf, v1 } from "../src";
import { quotadAddress, unique } from "./live";

/** The call's deadline: far longer than the pause, reached only if broken. */
const OUTAGE_DEADLINE_MS = 60_000;

interface Attempt {
  method: string;
  code: status;
  idempotencyKey: string;
  deadline: unknown;
}

function redisPid(): number {
  const pid = Number(process.env.QUOTAD_REDIS_PID);
  if (!Number.isInteger(pid) || pid <= 0) {
    throw new Error(
      "QUOTAD_REDIS_PID is not set: this test pauses the Redis of the quotad at $QUOTAD_ADDR (`make test` sets both)",
    );
  }
  return pid;
}

test("reserve retries through a Redis outage and reserves once", async () => {
  const pid = redisPid();
  // Every attempt, as an interceptor sees it: the client retries by calling again.
  const attempts: Attempt[] = [];
  let sawUnavailable: () => void = () => {};
  const unavailable = new Promise<"unavailable">((resolve) => {
    sawUnavailable = () => resolve("unavailable");
  });
  const log: Interceptor = (options, nextCall) => {
    let idempotencyKey = "";
    return new InterceptingCall(nextCall(options), {
      sendMessage(message, next) {
        idempotencyKey = (message as Partial<v1.CheckAndReserveRequest>).idempotencyKey ?? "";
        next(message);
      },
      start(metadata, listener, next) {
        next(metadata, {
          onReceiveStatus(received, nextStatus) {
            const method = options.method_definition.path;
            attempts.push({ method, code: received.code, idempotencyKey, deadline: options.deadline });
            if (received.code === status.UNAVAILABLE) sawUnavailable();
            nextStatus(received);
          },
        });
      },
    });
  };
  const client = new QuotaClient(quotadAddress(), { timeoutMs: OUTAGE_DEADLINE_MS, interceptors: [log] });
  try {
    const subject = unique("ts-outage");
    process.kill(pid, "SIGSTOP");
    const reserving = client.reserve({ subject, model: "gpt-4o", inputTokens: 100, maxOutputTokens: 50 });
    try {
      const first = await Promise.race([
        unavailable,
        reserving.then(
          (decision) => `ended first: ${JSON.stringify(decision)}`,
          (error: unknown) => `ended first: ${String(error)}`,
        ),
      ]);
      assert.equal(first, "unavailable", "quotad must answer UNAVAILABLE before reserve() ends");
    } finally {
      process.kill(pid, "SIGCONT"); // whatever happened, Redis runs again
    }
    const decision = await reserving;
    assert.ok(decision.allowed, `expected an allowed reservation, got ${JSON.stringify(decision)}`);

    const reserves = attempts.filter((a) => a.method === "/quotad.v1.QuotaService/CheckAndReserve");
    console.log(`CheckAndReserve attempts through the outage: ${reserves.map((a) => status[a.code]).join(", ")}`);
    assert.equal(reserves[0]?.code, status.UNAVAILABLE);
    assert.equal(reserves.at(-1)?.code, status.OK, "a retry got through once Redis was back");
    const key = reserves[0]?.idempotencyKey;
    assert.ok(key, "reserve sends an idempotency key");
    assert.ok(
      reserves.every((a) => a.idempotencyKey === key && a.deadline === reserves[0]?.deadline),
      "every attempt sends the call's one idempotency key, within its one deadline",
    );

    // Exactly one reservation holds: 150 tokens and one slot (`replayed` says whether an attempt
    // that was answered UNAVAILABLE had reserved after all; either way it counts once).
    const left = remainingOf((await client.usage({ subject, model: "gpt-4o" })).limits);
    assert.equal(left["tokens-per-day"], 850);
    assert.equal(left["in-flight"], 1);
    await client.release(decision.reservationId);
  } finally {
    client.close();
  }
});
