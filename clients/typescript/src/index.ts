/**
 * A thin TypeScript client for quotad, the quota-decision service for LLM calls, over
 * `@grpc/grpc-js` and the stubs `buf generate` makes with ts-proto (`./gen`).
 *
 * `reserve()` resolves to a decision: a denial is a value (`allowed: false`), not an
 * error. Error statuses reject with a `QuotadError` carrying the gRPC code and, for
 * INVALID_ARGUMENT, the server's field violations.
 *
 * Every call is retried when quotad answers UNAVAILABLE (its Redis was slow or down, or the
 * answer was lost), with jittered exponential backoff, within one deadline for all attempts
 * (`timeoutMs`). Safe: `reserve` sends one idempotency key on every attempt, so a retry of a
 * reservation that was made after all returns it (`replayed`); commit and release are
 * idempotent; usage changes nothing.
 *
 * A `reserve` with `serverWaitMs` may wait that long in quotad's waiting line, so its deadline is
 * `timeoutMs` plus `serverWaitMs`; a retry asks only for what is left of the wait.
 *
 * TLS, a client certificate (mutual TLS) and a bearer token: `tls` and `token` in ClientOptions.
 */
import { randomUUID } from "node:crypto";
import {
  type CallOptions,
  type ChannelCredentials,
  type ChannelOptions,
  type Interceptor,
  type ServiceError,
  CallCredentials,
  Metadata,
  credentials,
  status,
} from "@grpc/grpc-js";
import { BinaryReader } from "@bufbuild/protobuf/wire";
import {
  type ChatMessage,
  CheckAndReserveRequest,
  type CheckAndReserveResponse,
  CommitRequest,
  type CommitResponse,
  Cost,
  type GetUsageResponse,
  type LimitStatus,
  type ReleaseResponse,
  Decision,
  DenyReason,
  Priority as PriorityValue,
  QuotaServiceClient,
} from "./gen/quotad/v1/quota";
import type { Duration } from "./gen/google/protobuf/duration";

export * as v1 from "./gen/quotad/v1/quota";

/**
 * The deadline of a call, in milliseconds: all of its attempts and the backoff between them.
 * quotad answers UNAVAILABLE within its Redis timeout (250 ms by default), so two seconds ride
 * out a Redis hiccup of about a second and still fail fast enough to fail open or closed.
 */
export const DEFAULT_TIMEOUT_MS = 2000;

/**
 * How a call that quotad answered UNAVAILABLE is tried again. The client retries itself rather
 * than through gRPC's retry service config, which caps a call at five attempts whatever its
 * deadline.
 */
export interface RetryOptions {
  /** Attempts of one call at most, the first included; 0 (default): as many as fit in the deadline. */
  maxAttempts?: number;
  /** Backoff before the first retry (default 50); it doubles for each next one. Each sleep is
   * 50 to 100 % of the backoff, at random, so clients that failed together spread out. */
  initialBackoffMs?: number;
  /** The longest backoff (default 1000). */
  maxBackoffMs?: number;
}

/**
 * TLS to quotad, and a client certificate for mutual TLS. Each is PEM, as Node's `tls` takes it:
 * `readFileSync("ca.crt")`. The client reads nothing itself; a certificate renewed on disk takes
 * a new client.
 */
export interface TlsOptions {
  /** The CA bundle that verifies quotad's certificate; omitted: Node's root certificates. */
  ca?: Buffer;
  /** A client certificate (chain), for a quotad that requires one (QUOTAD_TLS_CLIENT_CA); with `key`.
   * quotad knows the caller by its first SAN URI (a SPIFFE ID), else its first DNS name. */
  cert?: Buffer;
  /** The client certificate's private key; with `cert`. */
  key?: Buffer;
  /** The name quotad's certificate must carry, when it is not the target's host (an IP address, a
   * port-forward to localhost), e.g. "quotad.llm.svc"; also sent as the call's authority. */
  serverName?: string;
}

/** A bearer token, or a function that returns the current one (called before every attempt). */
export type Token = string | (() => string | Promise<string>);

export interface ClientOptions {
  /** Deadline of each call in milliseconds, all of its attempts included (default 2000); a
   * `reserve` with `serverWaitMs` gets that much longer. */
  timeoutMs?: number;
  /** How UNAVAILABLE is retried; see RetryOptions. */
  retry?: RetryOptions;
  /** TLS (`true`: verified against Node's root certificates), with a client certificate for mutual
   * TLS; plaintext when neither `tls` nor `credentials` is given. */
  tls?: TlsOptions | true;
  /**
   * Sent as `authorization: Bearer <token>` with every attempt of every call, as gRPC call
   * credentials. Refused over plaintext (the constructor throws) unless `allowPlaintextToken`. A
   * token function that throws fails the attempt with UNAVAILABLE, retried as any.
   */
  token?: Token;
  /** Send `token` over a plaintext channel: only where the network encrypts for you (a mesh
   * sidecar) or on loopback. Default false. */
  allowPlaintextToken?: boolean;
  /** Channel credentials of your own instead of `tls` (e.g. `credentials.createSsl(...)`). */
  credentials?: ChannelCredentials;
  /** Metadata sent with every call, or a function called before every call (e.g. a fresh token). */
  metadata?: Record<string, string> | (() => Record<string, string>);
  /** gRPC channel options. */
  channelOptions?: ChannelOptions;
  /** gRPC client interceptors (logging, tracing); each attempt of a call passes through them. */
  interceptors?: Interceptor[];
}

export interface ReserveRequest {
  subject: string;
  tenant?: string;
  tier?: string;
  model?: string;
  inputTokens?: number;
  maxOutputTokens?: number;
  /** Lease of the reservation in milliseconds; the policy's default when omitted. */
  leaseMs?: number;
  /** Makes retries safe; one is generated for the call when omitted or empty, and every attempt
   * sends it. Give your own to retry past the call's deadline yourself. */
  idempotencyKey?: string;
  /** Instead of inputTokens: the prompt text, counted by the server. */
  prompt?: string;
  /** Instead of inputTokens: chat messages, counted by the server. */
  messages?: ChatMessage[];
  /** Orders shared (tenant and global) capacity and the waiting line; the tier's default when omitted. */
  priority?: Priority;
  /**
   * How long quotad may hold the request in its waiting line (in priority, then arrival order) and
   * admit it as soon as it fits, instead of denying it at once; bounded by the policy's
   * `waiting.max_wait`. Omitted or 0: decided at once. The call's deadline is `timeoutMs` plus this,
   * so the wait is not cut short; a retry after UNAVAILABLE asks only for what is left of it.
   */
  serverWaitMs?: number;
}

/** A request's priority: "low" for batch work, "normal", "high" for paid or interactive users. */
export type Priority = "low" | "normal" | "high";

const PRIORITIES: Record<Priority, PriorityValue> = {
  low: PriorityValue.PRIORITY_LOW,
  normal: PriorityValue.PRIORITY_NORMAL,
  high: PriorityValue.PRIORITY_HIGH,
};

interface DecisionCommon {
  /** Remaining units per limit name: after this request when allowed, before it when denied. */
  remaining: Record<string, number>;
  /** How long the request waited in quotad's line before this answer, in milliseconds. */
  waitedMs: number;
  response: CheckAndReserveResponse;
}

export interface Allowed extends DecisionCommon {
  allowed: true;
  reservationId: string;
  reserved: Cost;
  /** The idempotency key matched an earlier reservation, which is returned: e.g. an attempt that
   * quotad answered UNAVAILABLE had reserved after all. It is charged once. */
  replayed: boolean;
}

export interface Denied extends DecisionCommon {
  allowed: false;
  /** "queue_full": it asked to wait, but the binding limit's waiting line was full. */
  reason: "limit_exceeded" | "exceeds_capacity" | "budget_exhausted" | "queue_full";
  bindingLimit: string;
  /** When this same request fits, in milliseconds; undefined when it never can. */
  retryAfterMs: number | undefined;
}

/** The answer to `reserve()`. */
export type ReserveDecision = Allowed | Denied;

export interface UsageRequest {
  subject: string;
  tenant?: string;
  tier?: string;
  model?: string;
}

export interface FieldViolation {
  field: string;
  description: string;
}

/** An error status from quotad (or from the way to it). */
export class QuotadError extends Error {
  readonly code: status;
  /** The status name, e.g. "INVALID_ARGUMENT". */
  readonly codeName: string;
  readonly details: string;
  /** INVALID_ARGUMENT: the server's google.rpc.BadRequest field violations. */
  readonly fieldViolations: FieldViolation[];

  constructor(error: ServiceError) {
    const codeName = status[error.code] ?? String(error.code);
    super(`quotad: ${codeName}: ${error.details}`, { cause: error });
    this.name = "QuotadError";
    this.code = error.code;
    this.codeName = codeName;
    this.details = error.details;
    this.fieldViolations = fieldViolations(error.metadata);
  }
}

/** One channel to quotad. Call `close()` when done. */
export class QuotaClient {
  private readonly stub: QuotaServiceClient;
  private readonly timeoutMs: number;
  private readonly retry: Required<RetryOptions>;
  private readonly metadata: ClientOptions["metadata"];
  private readonly callCredentials: CallCredentials | undefined;

  /** Throws for options that do not go together (e.g. a token over plaintext), before connecting. */
  constructor(target: string, options: ClientOptions = {}) {
    this.timeoutMs = options.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const initialBackoffMs = options.retry?.initialBackoffMs ?? 50;
    this.retry = {
      maxAttempts: options.retry?.maxAttempts ?? 0,
      initialBackoffMs,
      maxBackoffMs: Math.max(options.retry?.maxBackoffMs ?? 1000, initialBackoffMs),
    };
    this.metadata = options.metadata;
    const channel = channelCredentials(options);
    this.callCredentials = bearerCredentials(options, channel._isSecure());
    const serverName = options.tls === true ? undefined : options.tls?.serverName;
    this.stub = new QuotaServiceClient(target, channel, {
      ...(serverName
        ? { "grpc.ssl_target_name_override": serverName, "grpc.default_authority": serverName }
        : {}),
      ...options.channelOptions,
      interceptors: options.interceptors ?? [],
    });
  }

  close(): void {
    this.stub.close();
  }

  /**
   * Reserve the estimated cost of one call on every limit; a denial resolves, it does not reject.
   * With `serverWaitMs`, quotad holds a request that does not fit yet in its waiting line and
   * answers when it is admitted or when the wait is over; the call's deadline is longer by as much.
   */
  async reserve(request: ReserveRequest): Promise<ReserveDecision> {
    const serverWaitMs = request.serverWaitMs ?? 0;
    // Built once, outside the attempts: every attempt sends this call's one idempotency key.
    const message = CheckAndReserveRequest.fromPartial({
      subject: request.subject,
      tenant: request.tenant ?? "",
      tier: request.tier ?? "",
      model: request.model ?? "",
      inputTokens: request.inputTokens ?? 0,
      maxOutputTokens: request.maxOutputTokens ?? 0,
      lease: request.leaseMs === undefined ? undefined : duration(request.leaseMs),
      idempotencyKey: request.idempotencyKey || randomUUID(),
      prompt: request.prompt ?? "",
      messages: request.messages ?? [],
      priority: request.priority === undefined ? undefined : PRIORITIES[request.priority],
      maxWait: serverWaitMs === 0 ? undefined : duration(serverWaitMs),
    });
    // The wait ends at the same time however many attempts it takes: a retry asks for what is
    // left of it, so its answer still comes within the call's deadline.
    const waitEnds = Date.now() + serverWaitMs;
    const response = await this.call<CheckAndReserveResponse>(
      (metadata, options, done, attempt) =>
        this.stub.checkAndReserve(
          attempt === 1 || serverWaitMs <= 0
            ? message
            : { ...message, maxWait: duration(Math.max(0, Math.min(serverWaitMs, waitEnds - Date.now()))) },
          metadata,
          options,
          done,
        ),
      Math.max(0, serverWaitMs),
    );
    const remaining = remainingOf(response.limits);
    const waitedMs = milliseconds(response.waited) ?? 0;
    if (response.decision === Decision.DECISION_ALLOWED) {
      return {
        allowed: true,
        reservationId: response.reservationId,
        reserved: response.reserved ?? Cost.fromPartial({}),
        replayed: response.replayed,
        remaining,
        waitedMs,
        response,
      };
    }
    return {
      allowed: false,
      reason:
        response.denyReason === DenyReason.DENY_REASON_EXCEEDS_CAPACITY
          ? "exceeds_capacity"
          : response.denyReason === DenyReason.DENY_REASON_BUDGET_EXHAUSTED
            ? "budget_exhausted"
            : response.denyReason === DenyReason.DENY_REASON_QUEUE_FULL
              ? "queue_full"
              : "limit_exceeded",
      bindingLimit: response.bindingLimit,
      retryAfterMs: milliseconds(response.retryAfter),
      remaining,
      waitedMs,
      response,
    };
  }

  /**
   * Settle a reservation with the tokens the call really used. `inputTokens` counts every prompt
   * token; `cachedInputTokens` (cache reads) and `cacheWriteInputTokens` (cache writes, Anthropic's
   * cache_creation_input_tokens) are parts of it, priced at their own rates.
   */
  commit(
    reservationId: string,
    usage: {
      inputTokens: number;
      outputTokens: number;
      cachedInputTokens?: number;
      cacheWriteInputTokens?: number;
    },
  ): Promise<CommitResponse> {
    return this.call<CommitResponse>((metadata, options, done) =>
      this.stub.commit(
        CommitRequest.fromPartial({
          reservationId,
          inputTokens: usage.inputTokens,
          outputTokens: usage.outputTokens,
          cachedInputTokens: usage.cachedInputTokens ?? 0,
          cacheWriteInputTokens: usage.cacheWriteInputTokens ?? 0,
        }),
        metadata,
        options,
        done,
      ),
    );
  }

  /** Give a reservation back: the call never happened. */
  release(reservationId: string): Promise<ReleaseResponse> {
    return this.call<ReleaseResponse>((metadata, options, done) =>
      this.stub.release({ reservationId }, metadata, options, done),
    );
  }

  /** Every limit that applies to a caller; changes nothing. */
  usage(request: UsageRequest): Promise<GetUsageResponse> {
    return this.call<GetUsageResponse>((metadata, options, done) =>
      this.stub.getUsage(
        {
          subject: request.subject,
          tenant: request.tenant ?? "",
          tier: request.tier ?? "",
          model: request.model ?? "",
        },
        metadata,
        options,
        done,
      ),
    );
  }

  /**
   * One logical call: one deadline for all of its attempts, `timeoutMs` plus `extraMs` from now,
   * and UNAVAILABLE retried with backoff until it. `start` makes one attempt; every attempt sends
   * the same message (a reserve's one idempotency key), but for what is left of a server wait.
   */
  private async call<T>(start: Attempt<T>, extraMs = 0): Promise<T> {
    const deadline = new Date(Date.now() + this.timeoutMs + extraMs);
    let backoffMs = this.retry.initialBackoffMs;
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.attempt(start, deadline, attempt);
      } catch (error) {
        const failed = error as ServiceError;
        const last = this.retry.maxAttempts > 0 && attempt >= this.retry.maxAttempts;
        if (failed.code !== status.UNAVAILABLE || last) throw new QuotadError(failed);
        const sleepMs = backoffMs * (0.5 + Math.random() / 2); // clients that failed together spread out
        if (Date.now() + sleepMs >= deadline.getTime()) throw new QuotadError(failed); // no time left
        await new Promise((resolve) => setTimeout(resolve, sleepMs));
        backoffMs = Math.min(2 * backoffMs, this.retry.maxBackoffMs);
      }
    }
  }

  private attempt<T>(start: Attempt<T>, deadline: Date, attempt: number): Promise<T> {
    const metadata = new Metadata();
    const extra = typeof this.metadata === "function" ? this.metadata() : (this.metadata ?? {});
    for (const [key, value] of Object.entries(extra)) metadata.set(key, value);
    const options: CallOptions = { deadline, credentials: this.callCredentials };
    return new Promise<T>((resolve, reject) => {
      start(metadata, options, (error, response) => (error ? reject(error) : resolve(response)), attempt);
    });
  }
}

/** The channel's credentials: TLS from `tls`, or the caller's own, or plaintext. */
function channelCredentials(options: ClientOptions): ChannelCredentials {
  if (options.tls !== undefined && options.credentials !== undefined) {
    throw new Error("quotad: pass tls or credentials, not both");
  }
  if (options.tls === undefined) return options.credentials ?? credentials.createInsecure();
  const tls = options.tls === true ? {} : options.tls;
  if ((tls.cert === undefined) !== (tls.key === undefined)) {
    throw new Error("quotad: a client certificate needs its key: set both tls.cert and tls.key, or neither");
  }
  return credentials.createSsl(tls.ca ?? null, tls.key ?? null, tls.cert ?? null);
}

/**
 * The bearer token as call credentials, given with every attempt. grpc-js would send them over
 * plaintext too: refused here unless the caller allows it.
 */
function bearerCredentials(options: ClientOptions, secure: boolean): CallCredentials | undefined {
  const token = options.token;
  if (token === undefined) return undefined;
  if (token === "") throw new Error("quotad: the token is empty");
  if (!secure && !options.allowPlaintextToken) {
    throw new Error(
      "quotad: a bearer token over plaintext would travel in the clear: set tls (or credentials), " +
        "or allowPlaintextToken where the network is trusted",
    );
  }
  return CallCredentials.createFromMetadataGenerator((_, done) => {
    Promise.resolve()
      .then(() => (typeof token === "function" ? token() : token))
      .then(
        (value) => {
          const metadata = new Metadata();
          metadata.set("authorization", `Bearer ${value}`);
          done(null, metadata);
        },
        (error: unknown) => {
          // UNAVAILABLE: a token source that failed is retried as a server that did not answer.
          done(Object.assign(new Error(`the bearer token: ${String(error)}`), { code: status.UNAVAILABLE }));
        },
      );
  });
}

/** Makes attempt number `attempt` (1 for the first) of a call. */
type Attempt<T> = (
  metadata: Metadata,
  options: CallOptions,
  done: (error: ServiceError | null, response: T) => void,
  attempt: number,
) => void;

/** Milliseconds as a google.protobuf.Duration (seconds and nanos of the same sign). */
function duration(ms: number): Duration {
  const nanos = Math.round(ms * 1_000_000);
  const seconds = Math.trunc(nanos / 1_000_000_000);
  return { seconds, nanos: nanos - seconds * 1_000_000_000 };
}

function milliseconds(value: Duration | undefined): number | undefined {
  return value === undefined ? undefined : value.seconds * 1000 + value.nanos / 1_000_000;
}

/** Remaining units per limit name, from a response's limit statuses. */
export function remainingOf(limits: LimitStatus[]): Record<string, number> {
  return Object.fromEntries(limits.map((limit) => [limit.name, limit.remaining]));
}

const BAD_REQUEST_TYPE = "type.googleapis.com/google.rpc.BadRequest";

/**
 * The field violations in a call's `grpc-status-details-bin` trailer: a google.rpc.Status
 * (3: repeated Any details) whose Any (1: type_url, 2: value) holds a google.rpc.BadRequest
 * (1: repeated FieldViolation {1: field, 2: description}). Read with the protobuf wire reader,
 * so the client needs no googleapis dependency.
 */
export function fieldViolations(metadata: Metadata | undefined): FieldViolation[] {
  const found: FieldViolation[] = [];
  for (const value of metadata?.get("grpc-status-details-bin") ?? []) {
    if (typeof value === "string") continue;
    try {
      for (const detail of repeatedBytes(value, 3)) {
        const any = fields(detail);
        if (text(any, 1) !== BAD_REQUEST_TYPE) continue;
        for (const violation of repeatedBytes(any.get(2)?.[0] ?? new Uint8Array(), 1)) {
          const parts = fields(violation);
          found.push({ field: text(parts, 1), description: text(parts, 2) });
        }
      }
    } catch {
      // A malformed trailer leaves the violations empty; the status message still says what was wrong.
    }
  }
  return found;
}

/** The length-delimited fields of a message, by field number (others are skipped). */
function fields(bytes: Uint8Array): Map<number, Uint8Array[]> {
  const reader = new BinaryReader(bytes);
  const out = new Map<number, Uint8Array[]>();
  while (reader.pos < reader.len) {
    const [number, wireType] = reader.tag();
    if (wireType === 2) {
      out.set(number, [...(out.get(number) ?? []), reader.bytes()]);
    } else {
      reader.skip(wireType);
    }
  }
  return out;
}

function text(parts: Map<number, Uint8Array[]>, field: number): string {
  return new TextDecoder().decode(parts.get(field)?.[0] ?? new Uint8Array());
}

function repeatedBytes(bytes: Uint8Array, field: number): Uint8Array[] {
  return fields(bytes).get(field) ?? [];
}
