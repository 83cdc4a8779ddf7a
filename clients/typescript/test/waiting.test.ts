// Server-side waiting (`serverWaitMs`) against a live quotad at $QUOTAD_ADDR serving
// tests/conformance/policy.yaml, whose tier "wait" has one limit: one reservation at a time. One
// reservation holds the slot, so the next waits in quotad's line; the tests free the slot once
// that request has a place in the line (read from quotad's Redis), so no step depends on how fast
// the machine is.
import assert from "node:assert/strict";
import { createServer } from "node:net";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { InterceptingCall, type Interceptor } from "@grpc/grpc-js";
import { DEFAULT_TIMEOUT_MS, QuotaClient, QuotadError, v1 } from "../src";
import { placesInLine, quotadAddress, unique } from "./live";

const TIER = "wait";
const MODEL = "gpt-4o";

/** What became of a call still under way, checked without awaiting it. */
interface Outcome {
  settled: boolean;
  text: string;
}

function watch(call: Promise<unknown>): Outcome {
  const outcome: Outcome = { settled: false, text: "" };
  call.then(
    (value) => Object.assign(outcome, { settled: true, text: JSON.stringify(value) }),
    (error: unknown) => Object.assign(outcome, { settled: true, text: String(error) }),
  );
  return outcome;
}

/** A client with the default deadline, connected (a first call also connects, which may take long). */
async function connectedClient(): Promise<QuotaClient> {
  const client = new QuotaClient(quotadAddress());
  const giveUp = Date.now() + 30_000;
  for (;;) {
    try {
      await client.usage({ subject: unique("ts-connect"), tier: TIER, model: MODEL });
      return client;
    } catch (error) {
      if (Date.now() > giveUp) throw error;
    }
  }
}

/** Until a request of `subject` has a place in a waiting line; fails if `waiter` ends first. */
async function untilWaitingInLine(subject: string, waiter: Outcome): Promise<void> {
  const giveUp = Date.now() + 30_000;
  while ((await placesInLine(subject)) === 0) {
    assert.ok(!waiter.settled, `the waiting reserve ended before it waited in line: ${waiter.text}`);
    assert.ok(Date.now() < giveUp, "the reserve did not wait in line within 30 s");
    await sleep(10);
  }
}

test("a reserve with serverWaitMs waits in line and is admitted when capacity frees", async () => {
  const client = await connectedClient();
  try {
    const subject = unique("ts-wait");
    const holder = await client.reserve({ subject, tier: TIER, model: MODEL, maxOutputTokens: 10 });
    assert.ok(holder.allowed, JSON.stringify(holder));

    const waiting = client.reserve({
      subject,
      tier: TIER,
      model: MODEL,
      maxOutputTokens: 10,
      priority: "high",
      serverWaitMs: 3000,
    });
    await untilWaitingInLine(subject, watch(waiting));
    await client.release(holder.reservationId);

    const admitted = await waiting;
    assert.ok(admitted.allowed, JSON.stringify(admitted));
    assert.ok(admitted.waitedMs > 0, `waited ${admitted.waitedMs} ms`);
    assert.equal(admitted.response.priority, v1.Priority.PRIORITY_HIGH);
    await client.release(admitted.reservationId);
  } finally {
    client.close();
  }
});

test("a server wait longer than the default deadline is not cut off by it", async () => {
  // Capacity frees only after the default deadline (2 s) has passed: a call whose deadline were
  // not lengthened by its 5 s server wait would fail DEADLINE_EXCEEDED before then.
  const client = await connectedClient();
  try {
    const subject = unique("ts-long-wait");
    const holder = await client.reserve({ subject, tier: TIER, model: MODEL, maxOutputTokens: 10 });
    assert.ok(holder.allowed, JSON.stringify(holder));

    const began = Date.now(); // the waiting call's deadline is computed now, when reserve() is called
    const waiting = client.reserve({ subject, tier: TIER, model: MODEL, maxOutputTokens: 10, serverWaitMs: 5000 });
    const waiter = watch(waiting);
    await untilWaitingInLine(subject, waiter);
    while (Date.now() < began + DEFAULT_TIMEOUT_MS + 500) {
      assert.ok(!waiter.settled, `the waiting reserve ended at ${Date.now() - began} ms: ${waiter.text}`);
      await sleep(20);
    }
    await client.release(holder.reservationId);

    const admitted = await waiting;
    const elapsedMs = Date.now() - began;
    assert.ok(admitted.allowed, JSON.stringify(admitted));
    assert.ok(admitted.waitedMs > 0, `waited ${admitted.waitedMs} ms`);
    assert.ok(elapsedMs > DEFAULT_TIMEOUT_MS, `admitted after ${elapsedMs} ms`);
    console.log(`admitted after ${elapsedMs} ms, ${Math.round(admitted.waitedMs)} ms of it in quotad's line`);
    await client.release(admitted.reservationId);
  } finally {
    client.close();
  }
});

/** A local port nothing listens on: every attempt is refused, UNAVAILABLE. */
async function refusedAddress(): Promise<string> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  const address = server.address();
  await new Promise<void>((resolve) => server.close(() => resolve()));
  assert.ok(address !== null && typeof address === "object");
  return `127.0.0.1:${address.port}`;
}

test("retries after UNAVAILABLE keep the deadline of timeout plus server wait, and the wait's end", async () => {
  const attempts: { deadline: unknown; maxWaitMs: number }[] = [];
  const log: Interceptor = (options, nextCall) =>
    new InterceptingCall(nextCall(options), {
      sendMessage(message, next) {
        const maxWait = (message as v1.CheckAndReserveRequest).maxWait;
        attempts.push({
          deadline: options.deadline,
          maxWaitMs: maxWait === undefined ? 0 : maxWait.seconds * 1000 + maxWait.nanos / 1_000_000,
        });
        next(message);
      },
    });
  const client = new QuotaClient(await refusedAddress(), { timeoutMs: 1000, interceptors: [log] });
  try {
    const before = Date.now();
    const reserving = client.reserve({ subject: unique("ts-refused"), serverWaitMs: 1000 });
    const after = Date.now();
    const error = await reserving.then(
      (decision) => assert.fail(`expected UNAVAILABLE, got ${JSON.stringify(decision)}`),
      (e: unknown) => e,
    );
    const ended = Date.now();
    assert.ok(error instanceof QuotadError, String(error));
    assert.ok(["UNAVAILABLE", "DEADLINE_EXCEEDED"].includes(error.codeName), error.message);

    assert.ok(attempts.length >= 2, `expected retries, saw ${attempts.length} attempt(s)`);
    const deadline = attempts[0]?.deadline;
    assert.ok(deadline instanceof Date);
    assert.ok(attempts.every((a) => a.deadline === deadline), "every attempt has the call's one deadline");
    const budget = deadline.getTime();
    assert.ok(before + 2000 <= budget && budget <= after + 2000, "deadline: timeoutMs + serverWaitMs");
    assert.ok(ended <= budget + 1000, `ended ${ended - budget} ms past the deadline`);
    assert.equal(attempts[0]?.maxWaitMs, 1000);
    for (const [i, a] of attempts.entries()) {
      if (i === 0) continue;
      const previous = attempts[i - 1]?.maxWaitMs ?? 0;
      assert.ok(a.maxWaitMs < 1000 && a.maxWaitMs <= previous, `retry ${i} asked to wait ${a.maxWaitMs} ms`);
    }
  } finally {
    client.close();
  }
});
