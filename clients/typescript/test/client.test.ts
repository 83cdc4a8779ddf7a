// Integration tests against a live quotad at $QUOTAD_ADDR serving tests/conformance/policy.yaml
// (`make test` starts one). Without it they fail: they never pass without a server.
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { QuotaClient, QuotadError } from "../src";
import { quotadAddress, unique } from "./live";

const MODEL = "gpt-4o";
let client: QuotaClient;

before(() => {
  client = new QuotaClient(quotadAddress(), { timeoutMs: 5000 });
});
after(() => client.close());

test("reserve then commit", async () => {
  const subject = unique("ts-commit");
  const decision = await client.reserve({ subject, model: MODEL, inputTokens: 300, maxOutputTokens: 200 });
  assert.ok(decision.allowed, `expected an allowed reservation, got ${JSON.stringify(decision)}`);
  assert.deepEqual(decision.reserved, {
    requests: 1,
    inputTokens: 300,
    outputTokens: 200,
    cachedInputTokens: 0,
    costMicroUsd: 2750, // gpt-4o at $2.50 / $10 per million tokens (the price catalog)
    cacheWriteInputTokens: 0,
  });

  const committed = await client.commit(decision.reservationId, { inputTokens: 300, outputTokens: 50 });
  assert.equal(committed.repeat, false);
  assert.equal(committed.committed?.outputTokens, 50);

  const usage = await client.usage({ subject, model: MODEL });
  const tokens = usage.limits.find((limit) => limit.name === "tokens-per-day");
  assert.equal(tokens?.remaining, 650); // 350 of 1000 committed
});

test("a denial is a value, not an error", async () => {
  const subject = unique("ts-denial");
  const first = await client.reserve({ subject, model: MODEL, inputTokens: 600, maxOutputTokens: 100 });
  assert.ok(first.allowed);

  const denied = await client.reserve({ subject, model: MODEL, inputTokens: 300, maxOutputTokens: 100 });
  assert.equal(denied.allowed, false);
  if (denied.allowed) return;
  assert.equal(denied.reason, "limit_exceeded");
  assert.equal(denied.bindingLimit, "tokens-per-day");
  assert.ok((denied.retryAfterMs ?? 0) > 0, "a limit that is exhausted for now says when to retry");
  assert.equal(denied.remaining["tokens-per-day"], 300, "a denial charges nothing");
});

test("INVALID_ARGUMENT carries the server's field violations", async () => {
  const error = await client
    .reserve({ subject: unique("ts-invalid"), model: "gpt-5-ultra", inputTokens: -1 })
    .then(
      () => assert.fail("expected INVALID_ARGUMENT"),
      (e: unknown) => e,
    );
  assert.ok(error instanceof QuotadError, String(error));
  assert.equal(error.codeName, "INVALID_ARGUMENT");
  assert.deepEqual(error.fieldViolations.map((v) => v.field).sort(), ["input_tokens", "model"]);
  assert.match(error.message, /^quotad: INVALID_ARGUMENT: .*input_tokens: must be between 0/);
  console.log(`INVALID_ARGUMENT as the TypeScript client shows it: ${error.message}`);
});
