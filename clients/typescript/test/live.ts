// What the integration tests share: the live quotads' addresses, their credentials, unique names.
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { connect } from "node:net";

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

/**
 * The secure quotads `make test` starts beside the plaintext one (tests/clients/conftest.py), serving
 * the same policy with callers: `mtls` requires a client certificate, `token` serves TLS and knows
 * its callers by bearer token. Both certificates are signed by `ca`; `cert` and `key` are the
 * client's, `token` its bearer token.
 */
export interface Secure {
  mtlsAddress: string;
  tokenAddress: string;
  ca: Buffer;
  cert: Buffer;
  key: Buffer;
  token: string;
}

export function secure(): Secure {
  const names = ["QUOTAD_MTLS_ADDR", "QUOTAD_TOKEN_ADDR", "QUOTAD_TLS_CA", "QUOTAD_CLIENT_CERT", "QUOTAD_CLIENT_KEY", "QUOTAD_TOKEN"];
  const missing = names.filter((name) => !process.env[name]);
  if (missing.length > 0) {
    throw new Error(`${missing.join(", ")} not set: the TLS tests need the secure quotads \`make test\` starts`);
  }
  const env = (name: string): string => process.env[name] ?? "";
  return {
    mtlsAddress: env("QUOTAD_MTLS_ADDR"),
    tokenAddress: env("QUOTAD_TOKEN_ADDR"),
    ca: readFileSync(env("QUOTAD_TLS_CA")),
    cert: readFileSync(env("QUOTAD_CLIENT_CERT")),
    key: readFileSync(env("QUOTAD_CLIENT_KEY")),
    token: env("QUOTAD_TOKEN"),
  };
}

export function unique(prefix: string): string {
  return `${prefix}-${randomBytes(4).toString("hex")}`;
}

/**
 * Places taken in quotad's waiting lines on `subject`'s limits, read from the Redis of the quotad
 * under test at $QUOTAD_REDIS_ADDR (host:port): each limit's line is a sorted set, its key the
 * limit's key plus ":q". One EVAL over a plain socket, so the tests need no Redis client.
 */
export async function placesInLine(subject: string): Promise<number> {
  const address = process.env.QUOTAD_REDIS_ADDR;
  if (!address) {
    throw new Error("QUOTAD_REDIS_ADDR is not set: the Redis of the quotad at $QUOTAD_ADDR (`make test` sets it)");
  }
  const colon = address.lastIndexOf(":");
  const reply = await redisCommand(address.slice(0, colon), Number(address.slice(colon + 1)), ["EVAL", COUNT_PLACES, "0", `*:${subject}:*:q`]);
  if (!reply.startsWith(":")) throw new Error(`Redis answered ${JSON.stringify(reply)}`);
  return Number(reply.slice(1));
}

const COUNT_PLACES =
  "local n = 0 for _, line in ipairs(redis.call('KEYS', ARGV[1])) do n = n + redis.call('ZCARD', line) end return n";

/** One command over a fresh connection; its one-line reply without the CRLF. */
function redisCommand(host: string, port: number, args: string[]): Promise<string> {
  const command = `*${args.length}\r\n${args.map((a) => `$${Buffer.byteLength(a)}\r\n${a}\r\n`).join("")}`;
  return new Promise((resolve, reject) => {
    let received = "";
    const socket = connect({ host, port }, () => socket.write(command));
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      received += chunk;
      const end = received.indexOf("\r\n");
      if (end >= 0) {
        socket.end();
        resolve(received.slice(0, end));
      }
    });
    socket.on("error", reject);
  });
}
