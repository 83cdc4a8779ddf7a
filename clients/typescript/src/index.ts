/**
 * A thin TypeScript client for quotad, the quota-decision service for LLM calls, over
 * `@grpc/grpc-js` and the stubs `buf generate` makes with ts-proto (`./gen`).
 *
 * `reserve()` resolves to a decision: a denial is a value (`allowed: false`), not an
 * error. Error statuses reject with a `QuotadError` carrying the gRPC code and, for
 * INVALID_ARGUMENT, the server's field violations.
 */
import { randomUUID } from "node:crypto";
import {
  type ChannelCredentials,
  type ChannelOptions,
  type ServiceError,
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
  QuotaServiceClient,
} from "./gen/quotad/v1/quota";

export * as v1 from "./gen/quotad/v1/quota";

/** UNAVAILABLE is retried twice by gRPC's retry policy. Safe: every reserve sends an
 * idempotency key, Commit and Release are idempotent, GetUsage changes nothing. */
export const RETRY_SERVICE_CONFIG = {
  methodConfig: [
    {
      name: [{ service: "quotad.v1.QuotaService" }],
      retryPolicy: {
        maxAttempts: 3,
        initialBackoff: "0.05s",
        maxBackoff: "1s",
        backoffMultiplier: 2,
        retryableStatusCodes: ["UNAVAILABLE"],
      },
    },
  ],
};

export interface ClientOptions {
  /** Deadline of each call, in milliseconds (default 1000). */
  timeoutMs?: number;
  /** TLS: `credentials.createSsl(...)`; plaintext when omitted. */
  credentials?: ChannelCredentials;
  /** Metadata sent with every call, or a function called before every call (e.g. a fresh token). */
  metadata?: Record<string, string> | (() => Record<string, string>);
  /** gRPC channel options (merged over the retry service config). */
  channelOptions?: ChannelOptions;
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
  /** Makes retries safe; one is generated when omitted or empty. */
  idempotencyKey?: string;
  /** Instead of inputTokens: the prompt text, counted by the server. */
  prompt?: string;
  /** Instead of inputTokens: chat messages, counted by the server. */
  messages?: ChatMessage[];
}

interface DecisionCommon {
  /** Remaining units per limit name: after this request when allowed, before it when denied. */
  remaining: Record<string, number>;
  response: CheckAndReserveResponse;
}

export interface Allowed extends DecisionCommon {
  allowed: true;
  reservationId: string;
  reserved: Cost;
  /** The idempotency key matched an earlier reservation, which is returned. */
  replayed: boolean;
}

export interface Denied extends DecisionCommon {
  allowed: false;
  reason: "limit_exceeded" | "exceeds_capacity" | "budget_exhausted";
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
  private readonly metadata: ClientOptions["metadata"];

  constructor(target: string, options: ClientOptions = {}) {
    this.timeoutMs = options.timeoutMs ?? 1000;
    this.metadata = options.metadata;
    this.stub = new QuotaServiceClient(target, options.credentials ?? credentials.createInsecure(), {
      "grpc.service_config": JSON.stringify(RETRY_SERVICE_CONFIG),
      ...options.channelOptions,
    });
  }

  close(): void {
    this.stub.close();
  }

  /** Reserve the estimated cost of one call on every limit; a denial resolves, it does not reject. */
  async reserve(request: ReserveRequest): Promise<ReserveDecision> {
    const leaseMs = request.leaseMs;
    const response = await this.call<CheckAndReserveResponse>((metadata, options, done) =>
      this.stub.checkAndReserve(
        CheckAndReserveRequest.fromPartial({
          subject: request.subject,
          tenant: request.tenant ?? "",
          tier: request.tier ?? "",
          model: request.model ?? "",
          inputTokens: request.inputTokens ?? 0,
          maxOutputTokens: request.maxOutputTokens ?? 0,
          lease:
            leaseMs === undefined
              ? undefined
              : { seconds: Math.floor(leaseMs / 1000), nanos: (leaseMs % 1000) * 1_000_000 },
          idempotencyKey: request.idempotencyKey || randomUUID(),
          prompt: request.prompt ?? "",
          messages: request.messages ?? [],
        }),
        metadata,
        options,
        done,
      ),
    );
    const remaining = remainingOf(response.limits);
    if (response.decision === Decision.DECISION_ALLOWED) {
      return {
        allowed: true,
        reservationId: response.reservationId,
        reserved: response.reserved ?? Cost.fromPartial({}),
        replayed: response.replayed,
        remaining,
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
            : "limit_exceeded",
      bindingLimit: response.bindingLimit,
      retryAfterMs:
        response.retryAfter === undefined
          ? undefined
          : response.retryAfter.seconds * 1000 + response.retryAfter.nanos / 1_000_000,
      remaining,
      response,
    };
  }

  /** Settle a reservation with the tokens the call really used. */
  commit(
    reservationId: string,
    usage: { inputTokens: number; outputTokens: number; cachedInputTokens?: number },
  ): Promise<CommitResponse> {
    return this.call<CommitResponse>((metadata, options, done) =>
      this.stub.commit(
        CommitRequest.fromPartial({
          reservationId,
          inputTokens: usage.inputTokens,
          outputTokens: usage.outputTokens,
          cachedInputTokens: usage.cachedInputTokens ?? 0,
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

  private call<T>(
    start: (
      metadata: Metadata,
      options: { deadline: Date },
      done: (error: ServiceError | null, response: T) => void,
    ) => void,
  ): Promise<T> {
    const metadata = new Metadata();
    const extra = typeof this.metadata === "function" ? this.metadata() : (this.metadata ?? {});
    for (const [key, value] of Object.entries(extra)) metadata.set(key, value);
    return new Promise<T>((resolve, reject) => {
      start(metadata, { deadline: new Date(Date.now() + this.timeoutMs) }, (error, response) =>
        error ? reject(new QuotadError(error)) : resolve(response),
      );
    });
  }
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
