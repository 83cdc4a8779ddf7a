// What the integration tests share: the live quotad's address and unique names.
import { randomBytes } from "node:crypto";

/** $QUOTAD_ADDR, a quotad serving tests/conformance/policy.yaml; the tests fail without it. */
export function quotadAddress(): string {
  const address = process.env.QUOTAD_ADDR;
  if (!address) {
    throw new Error(
      "QUOTAD_ADDR is not set: these tests need a live quotad serving tests/conformance/policy.yaml (`make test` starts one)",
    );
  }
  return address;
}

export function unique(prefix: string): string {
  return `${prefix}-${randomBytes(4).toString("hex")}`;
}
