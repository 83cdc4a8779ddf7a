// The conformance scenario (tests/conformance/scenario.json), replayed through this client
// against a live quotad at $QUOTAD_ADDR, and again over mutual TLS against $QUOTAD_MTLS_ADDR.
// The Python, Go and Java clients replay the same file.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import { test } from "node:test";
import { QuotaClient, QuotadError, remainingOf, v1 } from "../src";
import { quotadAddress, secure, unique } from "./live";

interface Step {
  call: "reserve" | "commit" | "release" | "usage";
  save_as?: string;
  reservation?: string;
  input_tokens?: number;
  max_output_tokens?: number;
  output_tokens?: number;
  idempotency_key?: string;
  expect: Record<string, unknown>;
}

interface Scenario {
  subject: string;
  tenant: string;
  model: string;
  steps: Step[];
}

const SCENARIO: Scenario = JSON.parse(
  readFileSync(resolve(__dirname, "..", "..", "..", "..", "tests", "conformance", "scenario.json"), "utf8"),
);

function cost(c: v1.Cost | undefined): Record<string, number> {
  return { requests: c?.requests ?? 0, input_tokens: c?.inputTokens ?? 0, output_tokens: c?.outputTokens ?? 0 };
}

test("conformance scenario", async () => {
  await replay(new QuotaClient(quotadAddress(), { timeoutMs: 5000 }));
});

test("conformance scenario over mutual TLS", async () => {
  const { mtlsAddress, ca, cert, key } = secure();
  await replay(new QuotaClient(mtlsAddress, { timeoutMs: 5000, tls: { ca, cert, key } }));
});

/** Replays the scenario through `client`, then closes it. */
async function replay(client: QuotaClient): Promise<void> {
  try {
    const runId = unique("ts");
    const subject = `${SCENARIO.subject}-${runId}`;
    const tenant = `${SCENARIO.tenant}-${runId}`;
    const saved: Record<string, string> = {};

    for (const [index, step] of SCENARIO.steps.entries()) {
      const where = `step ${index} (${step.call})`;
      const seen: Record<string, unknown> = {};
      let reservationId = "";
      try {
        if (step.call === "reserve") {
          const decision = await client.reserve({
            subject,
            tenant,
            model: SCENARIO.model,
            inputTokens: step.input_tokens,
            maxOutputTokens: step.max_output_tokens,
            idempotencyKey: step.idempotency_key ?? "",
          });
          const r = decision.response;
          seen.decision = v1.decisionToJSON(r.decision).replace(/^DECISION_/, "");
          if (r.denyReason !== v1.DenyReason.DENY_REASON_UNSPECIFIED) {
            seen.deny_reason = v1.denyReasonToJSON(r.denyReason).replace(/^DENY_REASON_/, "");
          }
          seen.binding_limit = r.bindingLimit;
          seen.retry_after = r.retryAfter !== undefined;
          seen.reserved = cost(r.reserved);
          seen.replayed = r.replayed;
          seen.remaining = decision.remaining;
          reservationId = r.reservationId;
        } else if (step.call === "commit") {
          const r = await client.commit(saved[step.reservation ?? ""], {
            inputTokens: step.input_tokens ?? 0,
            outputTokens: step.output_tokens ?? 0,
          });
          Object.assign(seen, { repeat: r.repeat, reserved: cost(r.reserved), committed: cost(r.committed) });
        } else if (step.call === "release") {
          const r = await client.release(saved[step.reservation ?? ""]);
          Object.assign(seen, { repeat: r.repeat, refunded: cost(r.refunded) });
        } else if (step.call === "usage") {
          const r = await client.usage({ subject, tenant, model: SCENARIO.model });
          seen.remaining = remainingOf(r.limits);
        } else {
          assert.fail(`${where}: unknown call`);
        }
      } catch (error) {
        if (!(error instanceof QuotadError)) throw error;
        seen.error = error.codeName;
        seen.field_violations = error.fieldViolations.map((v) => v.field);
      }
      if (step.save_as) saved[step.save_as] = reservationId;
      for (const [key, want] of Object.entries(step.expect)) {
        if (key === "same_reservation_as") {
          assert.equal(reservationId, saved[want as string], `${where}: not the reservation ${String(want)}`);
          assert.ok(reservationId, `${where}: no reservation id`);
          continue;
        }
        assert.ok(key in seen, `${where}: unknown or missing expectation ${key} (seen ${JSON.stringify(seen)})`);
        assert.deepEqual(seen[key], want, `${where}: ${key}`);
      }
    }
  } finally {
    client.close();
  }
}
