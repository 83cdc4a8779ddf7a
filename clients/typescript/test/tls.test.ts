// TLS, mutual TLS and bearer tokens against the secure quotads `make test` starts (see live.ts);
// the conformance scenario over mutual TLS is in conformance.test.ts.
import assert from "node:assert/strict";
import { test } from "node:test";
import { status } from "@grpc/grpc-js";
import { QuotaClient, QuotadError, type ClientOptions } from "../src";
import { quotadAddress, secure, unique } from "./live";

/** The error a call made with a fresh client rejects with (the client is closed after). */
async function refusal(address: string, options: ClientOptions): Promise<QuotadError> {
  const client = new QuotaClient(address, { timeoutMs: 5000, retry: { maxAttempts: 1 }, ...options });
  try {
    await client.usage({ subject: unique("ts-refused"), tenant: "tls", model: "gpt-4o" });
  } catch (error) {
    assert.ok(error instanceof QuotadError, String(error));
    return error;
  } finally {
    client.close();
  }
  assert.fail("the call was answered");
}

test("mutual TLS: a client certificate the CA signed is served, with the name checked", async () => {
  const { mtlsAddress, ca, cert, key } = secure();
  // quotad's certificate names 127.0.0.1 and localhost: serverName checks the latter.
  const client = new QuotaClient(mtlsAddress, { timeoutMs: 5000, tls: { ca, cert, key, serverName: "localhost" } });
  try {
    const decision = await client.reserve({ subject: unique("ts-mtls"), tenant: "tls", model: "gpt-4o", inputTokens: 10, maxOutputTokens: 10 });
    assert.ok(decision.allowed, JSON.stringify(decision.response));
    assert.equal(decision.response.tenant, "tls");
  } finally {
    client.close();
  }
  const wrongName = await refusal(mtlsAddress, { tls: { ca, cert, key, serverName: "quotad.invalid" } });
  assert.equal(wrongName.code, status.UNAVAILABLE);
});

test("mutual TLS: without a client certificate the handshake fails", async () => {
  const { mtlsAddress, ca } = secure();
  const error = await refusal(mtlsAddress, { tls: { ca } });
  assert.equal(error.code, status.UNAVAILABLE, error.message);
});

test("a bearer token over TLS names the caller; asked for before every call", async () => {
  const { tokenAddress, ca, token } = secure();
  let asked = 0;
  const client = new QuotaClient(tokenAddress, {
    timeoutMs: 5000,
    tls: { ca },
    token: async () => {
      asked += 1;
      return token;
    },
  });
  try {
    const subject = unique("ts-token");
    const decision = await client.reserve({ subject, tenant: "tokens", model: "gpt-4o", inputTokens: 10, maxOutputTokens: 10 });
    assert.ok(decision.allowed, JSON.stringify(decision.response));
    await client.commit(decision.reservationId, { inputTokens: 10, outputTokens: 1 });
    assert.equal(asked, 2);
  } finally {
    client.close();
  }
});

test("without a known token the call is UNAUTHENTICATED", async () => {
  const { tokenAddress, ca } = secure();
  for (const token of [undefined, "not-a-known-token"]) {
    const error = await refusal(tokenAddress, { tls: { ca }, token });
    assert.equal(error.code, status.UNAUTHENTICATED, error.message);
  }
});

test("a token is not sent over plaintext unless allowed", async () => {
  assert.throws(() => new QuotaClient(quotadAddress(), { token: "secret" }), /plaintext/);
  assert.throws(() => new QuotaClient(quotadAddress(), { tls: { cert: Buffer.from("x") } }), /both/);
  // Allowed (a mesh sidecar encrypts): the plaintext quotad knows no tokens and ignores it.
  const client = new QuotaClient(quotadAddress(), { timeoutMs: 5000, token: "secret", allowPlaintextToken: true });
  try {
    const usage = await client.usage({ subject: unique("ts-plain"), model: "gpt-4o" });
    assert.ok(usage.limits.length > 0);
  } finally {
    client.close();
  }
});
