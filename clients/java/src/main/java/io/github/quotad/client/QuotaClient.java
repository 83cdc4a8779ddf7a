package io.github.quotad.client;

import io.github.quotad.v1.CheckAndReserveRequest;
import io.github.quotad.v1.CommitRequest;
import io.github.quotad.v1.CommitResponse;
import io.github.quotad.v1.GetUsageRequest;
import io.github.quotad.v1.GetUsageResponse;
import io.github.quotad.v1.QuotaServiceGrpc;
import io.github.quotad.v1.ReleaseRequest;
import io.github.quotad.v1.ReleaseResponse;
import io.grpc.CallCredentials;
import io.grpc.ClientInterceptor;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.StatusRuntimeException;
import io.grpc.stub.MetadataUtils;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Map;
import java.util.UUID;
import java.util.concurrent.TimeUnit;
import java.util.function.Supplier;

/**
 * A thin blocking client for quotad, the quota-decision service for LLM calls.
 *
 * <p>{@link #reserve} returns a {@link Decision}: a denial is a value ({@code allowed() ==
 * false}), not an exception. Error statuses throw {@link QuotadException}, which carries the gRPC
 * code and, for INVALID_ARGUMENT, the server's field violations. Requests are the generated
 * messages ({@code io.github.quotad.v1}), built with their builders.
 *
 * <pre>{@code
 * try (QuotaClient quota = QuotaClient.builder("localhost:50051").build()) {
 *   Decision decision = quota.reserve(CheckAndReserveRequest.newBuilder()
 *       .setSubject("user-42").setModel("gpt-4o").setInputTokens(300).setMaxOutputTokens(200).build());
 *   if (!decision.allowed()) { ... decision.bindingLimit(), decision.retryAfter() ... }
 *   quota.commit(decision.reservationId(), 300, 97);
 * }
 * }</pre>
 */
public final class QuotaClient implements AutoCloseable {
  /**
   * UNAVAILABLE is retried twice by grpc-java's retry policy. Safe: every reserve carries an
   * idempotency key, Commit and Release are idempotent, GetUsage changes nothing.
   */
  public static final Map<String, ?> RETRY_SERVICE_CONFIG =
      Map.of(
          "methodConfig",
          List.of(
              Map.of(
                  "name", List.of(Map.of("service", "quotad.v1.QuotaService")),
                  "retryPolicy",
                      Map.of(
                          "maxAttempts", 3.0,
                          "initialBackoff", "0.05s",
                          "maxBackoff", "1s",
                          "backoffMultiplier", 2.0,
                          "retryableStatusCodes", List.of("UNAVAILABLE")))));

  private final ManagedChannel channel;
  private final boolean ownsChannel;
  private final QuotaServiceGrpc.QuotaServiceBlockingStub stub;
  private final Duration timeout;

  private QuotaClient(Builder builder) {
    if (builder.channel != null) {
      this.channel = builder.channel;
      this.ownsChannel = false;
    } else {
      ManagedChannelBuilder<?> channelBuilder =
          ManagedChannelBuilder.forTarget(builder.target)
              .defaultServiceConfig(RETRY_SERVICE_CONFIG)
              .enableRetry();
      if (builder.tls) {
        channelBuilder.useTransportSecurity();
      } else {
        channelBuilder.usePlaintext();
      }
      this.channel = channelBuilder.build();
      this.ownsChannel = true;
    }
    QuotaServiceGrpc.QuotaServiceBlockingStub stub =
        QuotaServiceGrpc.newBlockingStub(channel)
            .withInterceptors(builder.interceptors().toArray(new ClientInterceptor[0]));
    if (builder.callCredentials != null) {
      stub = stub.withCallCredentials(builder.callCredentials);
    }
    this.stub = stub;
    this.timeout = builder.timeout;
  }

  /** A builder for a client of {@code target} ("host:port"): plaintext, one-second deadlines. */
  public static Builder builder(String target) {
    return new Builder(target);
  }

  /**
   * Reserves the estimated cost of one LLM call on every limit, or returns a denial. Without an
   * idempotency key one is generated, so retries never reserve twice.
   */
  public Decision reserve(CheckAndReserveRequest request) {
    if (request.getIdempotencyKey().isEmpty()) {
      request = request.toBuilder().setIdempotencyKey(UUID.randomUUID().toString()).build();
    }
    CheckAndReserveRequest withKey = request;
    return Decision.of(call(() -> stub().checkAndReserve(withKey)));
  }

  /** Settles a reservation with the tokens the call really used. */
  public CommitResponse commit(String reservationId, long inputTokens, long outputTokens) {
    CommitRequest request =
        CommitRequest.newBuilder()
            .setReservationId(reservationId)
            .setInputTokens(inputTokens)
            .setOutputTokens(outputTokens)
            .build();
    return call(() -> stub().commit(request));
  }

  /** Gives a reservation back: the call never happened. */
  public ReleaseResponse release(String reservationId) {
    ReleaseRequest request = ReleaseRequest.newBuilder().setReservationId(reservationId).build();
    return call(() -> stub().release(request));
  }

  /** Every limit that applies to a caller; changes nothing. */
  public GetUsageResponse usage(GetUsageRequest request) {
    return call(() -> stub().getUsage(request));
  }

  @Override
  public void close() {
    if (ownsChannel) {
      channel.shutdown();
      try {
        if (!channel.awaitTermination(5, TimeUnit.SECONDS)) {
          channel.shutdownNow();
        }
      } catch (InterruptedException e) {
        channel.shutdownNow();
        Thread.currentThread().interrupt();
      }
    }
  }

  private QuotaServiceGrpc.QuotaServiceBlockingStub stub() {
    return stub.withDeadlineAfter(timeout.toNanos(), TimeUnit.NANOSECONDS);
  }

  private static <T> T call(Supplier<T> rpc) {
    try {
      return rpc.get();
    } catch (StatusRuntimeException e) {
      throw QuotadException.of(e);
    }
  }

  /** Configures a {@link QuotaClient}. */
  public static final class Builder {
    private final String target;
    private Duration timeout = Duration.ofSeconds(1);
    private boolean tls;
    private ManagedChannel channel;
    private CallCredentials callCredentials;
    private final Metadata headers = new Metadata();
    private final List<ClientInterceptor> interceptors = new ArrayList<>();

    private Builder(String target) {
      this.target = target;
    }

    /** The deadline of each call (default one second). */
    public Builder timeout(Duration timeout) {
      this.timeout = timeout;
      return this;
    }

    /** Use TLS with the platform's trust store (plaintext otherwise). */
    public Builder useTransportSecurity() {
      this.tls = true;
      return this;
    }

    /** A header sent with every call, e.g. {@code header("authorization", "Bearer ...")}. */
    public Builder header(String key, String value) {
      headers.put(Metadata.Key.of(key, Metadata.ASCII_STRING_MARSHALLER), value);
      return this;
    }

    /** Credentials applied to every call, e.g. tokens that refresh. */
    public Builder callCredentials(CallCredentials callCredentials) {
      this.callCredentials = callCredentials;
      return this;
    }

    /** An interceptor for every call (logging, tracing, custom auth). */
    public Builder intercept(ClientInterceptor interceptor) {
      interceptors.add(interceptor);
      return this;
    }

    /** Use this channel (the caller closes it) instead of opening one. */
    public Builder channel(ManagedChannel channel) {
      this.channel = channel;
      return this;
    }

    public QuotaClient build() {
      return new QuotaClient(this);
    }

    private List<ClientInterceptor> interceptors() {
      List<ClientInterceptor> all = new ArrayList<>(interceptors);
      if (!headers.keys().isEmpty()) {
        all.add(MetadataUtils.newAttachHeadersInterceptor(headers));
      }
      return all;
    }
  }
}
