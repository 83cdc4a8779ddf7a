// Reserve quota for one LLM call, commit what it used, print the caller's limits.
// With quotad running (`make run` at the repository root): `npm run example`.
import { randomBytes } from "node:crypto";
import { QuotaClient, QuotadError } from "../src";

async function main(): Promise<void> {
  // 10 s per call: a first call also connects. Each call's retries of UNAVAILABLE stay within it.
  const quota = new QuotaClient(process.env.QUOTAD_ADDR ?? "localhost:50051", { timeoutMs: 10_000 });
  // Your user's id. A new one each run here, so that running the example again within a minute
  // starts from full limits instead of being denied.
  const subject = `user-${randomBytes(4).toString("hex")}`;
  try {
    const decision = await quota.reserve({ subject, model: "gpt-4o", inputTokens: 300, maxOutputTokens: 200 });
    if (!decision.allowed) {
      // A denial is a value: say when to come back (retryAfterMs is undefined when it never fits).
      console.log(`denied by ${decision.bindingLimit} (${decision.reason}), retry after ${decision.retryAfterMs} ms`);
      return;
    }
    // ... call the LLM here; if it fails: await quota.release(decision.reservationId) ...
    await quota.commit(decision.reservationId, { inputTokens: 300, outputTokens: 97 });

    const usage = await quota.usage({ subject, model: "gpt-4o" });
    for (const limit of usage.limits) console.log(`${limit.name}: ${limit.remaining} of ${limit.limit} left`);
  } catch (error) {
    if (error instanceof QuotadError) {
      // e.g. INVALID_ARGUMENT with error.fieldViolations, or UNAVAILABLE: fail open or closed, your call.
      console.error(error.message, error.fieldViolations);
      process.exitCode = 1;
      return;
    }
    throw error;
  } finally {
    quota.close();
  }
}

void main();
