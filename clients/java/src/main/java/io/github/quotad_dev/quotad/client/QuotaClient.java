package io.github.quotad_dev.quotad.client;

import io.github.quotad_dev.quotad.v1.CheckAndReserveRequest;
import io.github.quotad_dev.quotad.v1.CommitRequest;
import io.github.quotad_dev.quotad.v1.CommitResponse;
import io.github.quotad_dev.quotad.v1.GetUsageRequest;
import io.github.quotad_dev.quotad.v1.GetUsageResponse;
import io.github.quotad_dev.quotad.v1.QuotaServiceGrpc;
import io.github.quotad_dev.quotad.v1.ReleaseRequest;
import io.github.quotad_dev.quotad.v1.ReleaseResponse;
import io.grpc.CallCredentials;
import io.grpc.ChannelCredentials;
import io.grpc.ClientInterceptor;
import io.grpc.CompositeCallCredentials;
import io.grpc.Deadline;
import io.grpc.Grpc;
import io.grpc.InsecureChannelCredentials;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.Metadata;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.TlsChannelCredentials;
import io.grpc.stub.MetadataUtils;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.file.Path;
import java.time.Duration;
import java.util.ArrayList;
import java.util.List;
import java.util.Objects;
import java.util.UUID;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.TimeUnit;
import java.util.function.Supplier;

/**
 * A thin blocking client for quotad, the quota-decision service for LLM calls.
 *
 * <p>{@link #reserve} returns a {@link Decision}: a denial is a value ({@code allowed() ==
 * false}), not an exception. Error statuses throw {@link QuotadException}, which carries the gRPC
 * code and, for INVALID_ARGUMENT, the server's field violations. Requests are the generated
 * messages ({@code io.github.quotad_dev.quotad.v1}), built with their builders.
 *
 * <p>Every call is retried when quotad answers UNAVAILABLE (its Redis was slow or down, or the
 * answer was lost), with jittered exponential backoff, within one deadline for all of its attempts
 * ({@link Builder#timeout}). Safe: {@link #reserve} sends one idempotency key on every attempt, so
 * a retry of a reservation that was made after all returns it ({@link Decision#replayed()});
 * Commit and Release are idempotent; GetUsage changes nothing. The client retries itself rather
 * than through gRPC's retry service config, which caps a call at five attempts whatever its
 * deadline and does not apply to a channel passed to {@link Builder#channel}.
 *
 * <p>A reserve with a server wait ({@link #reserve(CheckAndReserveRequest, Duration)}, or a
 * request's {@code max_wait}) may wait that long in quotad's waiting line, so its deadline is the
 * client's timeout plus the wait; a retry asks only for what is left of the wait.
 *
 * <p>TLS, a client certificate (mutual TLS) and a bearer token: {@link
 * Builder#trustCertificates}, {@link Builder#clientCertificate} and {@link Builder#bearerToken}.
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
   * The deadline of a call: all of its attempts and the backoff between them. quotad answers
   * UNAVAILABLE within its Redis timeout (250 ms by default), so two seconds ride out a Redis
   * hiccup of about a second and still fail fast enough to fail open or closed.
   */
  public static final Duration DEFAULT_TIMEOUT = Duration.ofSeconds(2);

  /** The backoff before the first retry; it doubles for each next one, up to one second. */
  public static final Duration DEFAULT_INITIAL_BACKOFF = Duration.ofMillis(50);

  public static final Duration DEFAULT_MAX_BACKOFF = Duration.ofSeconds(1);

  private final ManagedChannel channel;
  private final boolean ownsChannel;
  private final QuotaServiceGrpc.QuotaServiceBlockingStub stub;
  private final Duration timeout;
  private final int maxAttempts;
  private final long initialBackoffNanos;
  private final long maxBackoffNanos;

  private QuotaClient(Builder builder) {
    if (builder.channel != null) {
      this.channel = builder.channel;
      this.ownsChannel = false;
    } else {
      ManagedChannelBuilder<?> channelBuilder =
          Grpc.newChannelBuilder(builder.target, builder.channelCredentials());
      if (builder.authority != null) {
        channelBuilder.overrideAuthority(builder.authority);
      }
      this.channel = channelBuilder.build();
      this.ownsChannel = true;
    }
    QuotaServiceGrpc.QuotaServiceBlockingStub stub =
        QuotaServiceGrpc.newBlockingStub(channel)
            .withInterceptors(builder.interceptors().toArray(new ClientInterceptor[0]));
    CallCredentials callCredentials = builder.allCallCredentials();
    if (callCredentials != null) {
      stub = stub.withCallCredentials(callCredentials);
    }
    this.stub = stub;
    this.timeout = builder.timeout;
    this.maxAttempts = builder.maxAttempts;
    this.initialBackoffNanos = builder.initialBackoff.toNanos();
    this.maxBackoffNanos = Math.max(builder.maxBackoff.toNanos(), initialBackoffNanos);
  }

  /** A builder for a client of {@code target} ("host:port"): plaintext, two-second deadlines. */
  public static Builder builder(String target) {
    return new Builder(target);
  }

  /**
   * Reserves the estimated cost of one LLM call on every limit, or returns a denial. Without an
   * idempotency key one is generated for this call, and every attempt sends it, so retries never
   * reserve twice. Set your own to retry past the call's deadline yourself.
   *
   * <p>A request with a {@code max_wait} (see {@link #reserve(CheckAndReserveRequest, Duration)})
   * gets a deadline longer by as much. Its {@code priority} ({@code setPriority}) orders shared
   * capacity and the waiting line; unspecified: the tier's default.
   */
  public Decision reserve(CheckAndReserveRequest request) {
    if (request.getIdempotencyKey().isEmpty()) {
      request = request.toBuilder().setIdempotencyKey(UUID.randomUUID().toString()).build();
    }
    CheckAndReserveRequest withKey = request;
    Duration wait = request.hasMaxWait() ? duration(request.getMaxWait()) : Duration.ZERO;
    if (wait.isNegative() || wait.isZero()) { // quotad refuses a negative one: INVALID_ARGUMENT
      return Decision.of(call(Duration.ZERO, (stub, attempt) -> stub.checkAndReserve(withKey)));
    }
    // The wait ends at the same time however many attempts it takes: a retry asks for what is
    // left of it, so its answer still comes before the call's deadline (with the same idempotency
    // key: the same reservation, if an earlier attempt made one).
    long waitEnds = System.nanoTime() + wait.toNanos();
    return Decision.of(
        call(
            wait,
            (stub, attempt) -> {
              if (attempt == 1) {
                return stub.checkAndReserve(withKey);
              }
              long left = Math.max(0, Math.min(wait.toNanos(), waitEnds - System.nanoTime()));
              return stub.checkAndReserve(
                  withKey.toBuilder().setMaxWait(protoDuration(Duration.ofNanos(left))).build());
            }));
  }

  /**
   * Reserves as {@link #reserve(CheckAndReserveRequest)}, letting quotad hold the request in its
   * waiting line (in priority, then arrival order) for up to {@code serverWait} and admit it as
   * soon as it fits, instead of denying it at once; bounded by the policy's {@code
   * waiting.max_wait}. Zero: decided at once. The call's deadline is the client's timeout plus
   * {@code serverWait}, so the wait is not cut short; a retry after UNAVAILABLE asks only for
   * what is left of it. It sets the request's {@code max_wait}.
   */
  public Decision reserve(CheckAndReserveRequest request, Duration serverWait) {
    Objects.requireNonNull(serverWait, "serverWait");
    return reserve(
        serverWait.isZero()
            ? request.toBuilder().clearMaxWait().build()
            : request.toBuilder().setMaxWait(protoDuration(serverWait)).build());
  }

  /** Settles a reservation with the tokens the call really used. */
  public CommitResponse commit(String reservationId, long inputTokens, long outputTokens) {
    CommitRequest request =
        CommitRequest.newBuilder()
            .setReservationId(reservationId)
            .setInputTokens(inputTokens)
            .setOutputTokens(outputTokens)
            .build();
    return call(Duration.ZERO, (stub, attempt) -> stub.commit(request));
  }

  /** Gives a reservation back: the call never happened. */
  public ReleaseResponse release(String reservationId) {
    ReleaseRequest request = ReleaseRequest.newBuilder().setReservationId(reservationId).build();
    return call(Duration.ZERO, (stub, attempt) -> stub.release(request));
  }

  /** Every limit that applies to a caller; changes nothing. */
  public GetUsageResponse usage(GetUsageRequest request) {
    return call(Duration.ZERO, (stub, attempt) -> stub.getUsage(request));
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

  /** Makes attempt {@code attempt} (1 for the first) of a call, on a stub with its deadline. */
  @FunctionalInterface
  private interface Attempt<T> {
    T make(QuotaServiceGrpc.QuotaServiceBlockingStub stub, int attempt);
  }

  /**
   * One logical call: one deadline for all of its attempts, the timeout plus {@code extra} from
   * now, and UNAVAILABLE retried with backoff until it. Every attempt sends the same request (so
   * the same idempotency key), but for what is left of a server wait.
   */
  private <T> T call(Duration extra, Attempt<T> rpc) {
    QuotaServiceGrpc.QuotaServiceBlockingStub withDeadline =
        stub.withDeadline(Deadline.after(timeout.plus(extra).toNanos(), TimeUnit.NANOSECONDS));
    Deadline deadline = withDeadline.getCallOptions().getDeadline();
    long backoffNanos = initialBackoffNanos;
    for (int attempt = 1; ; attempt++) {
      try {
        return rpc.make(withDeadline, attempt);
      } catch (StatusRuntimeException e) {
        boolean last = maxAttempts > 0 && attempt >= maxAttempts;
        if (e.getStatus().getCode() != Status.Code.UNAVAILABLE || last) {
          throw QuotadException.of(e);
        }
        // 50 to 100 % of the backoff, at random: clients that failed together spread out.
        long sleepNanos =
            backoffNanos / 2 + ThreadLocalRandom.current().nextLong(backoffNanos / 2 + 1);
        if (deadline.timeRemaining(TimeUnit.NANOSECONDS) <= sleepNanos) {
          throw QuotadException.of(e); // the next attempt would have no time left
        }
        try {
          TimeUnit.NANOSECONDS.sleep(sleepNanos);
        } catch (InterruptedException interrupted) {
          Thread.currentThread().interrupt();
          throw QuotadException.of(e);
        }
        backoffNanos = Math.min(2 * backoffNanos, maxBackoffNanos);
      }
    }
  }

  /** A google.protobuf.Duration as a java.time one. */
  static Duration duration(com.google.protobuf.Duration duration) {
    return Duration.ofSeconds(duration.getSeconds(), duration.getNanos());
  }

  /** A google.protobuf.Duration: seconds and nanos of the same sign, as the protobuf spec says. */
  static com.google.protobuf.Duration protoDuration(Duration duration) {
    long seconds = duration.getSeconds();
    int nanos = duration.getNano(); // java.time keeps nanos positive, even for a negative duration
    if (seconds < 0 && nanos > 0) {
      seconds += 1;
      nanos -= 1_000_000_000;
    }
    return com.google.protobuf.Duration.newBuilder().setSeconds(seconds).setNanos(nanos).build();
  }

  /** Configures a {@link QuotaClient}. */
  public static final class Builder {
    private final String target;
    private Duration timeout = DEFAULT_TIMEOUT;
    private int maxAttempts;
    private Duration initialBackoff = DEFAULT_INITIAL_BACKOFF;
    private Duration maxBackoff = DEFAULT_MAX_BACKOFF;
    private boolean tls;
    private Path trustCertificates;
    private Path certificateChain;
    private Path privateKey;
    private String authority;
    private Supplier<String> bearerToken;
    private boolean allowPlaintextToken;
    private ManagedChannel channel;
    private CallCredentials callCredentials;
    private final Metadata headers = new Metadata();
    private final List<ClientInterceptor> interceptors = new ArrayList<>();

    private Builder(String target) {
      this.target = target;
    }

    /**
     * The deadline of each call, all of its attempts included (default two seconds); a reserve with
     * a server wait gets that much longer.
     */
    public Builder timeout(Duration timeout) {
      if (timeout.isNegative() || timeout.isZero()) {
        throw new IllegalArgumentException("timeout must be positive, got " + timeout);
      }
      this.timeout = timeout;
      return this;
    }

    /**
     * The attempts of one call at most, the first included; 0 (the default): as many as fit in
     * its deadline.
     */
    public Builder maxAttempts(int maxAttempts) {
      if (maxAttempts < 0) {
        throw new IllegalArgumentException("maxAttempts must be 0 or more, got " + maxAttempts);
      }
      this.maxAttempts = maxAttempts;
      return this;
    }

    /**
     * The backoff before the first retry of UNAVAILABLE (default 50 ms), doubling for each next
     * one up to {@code max} (default one second); each sleep is 50 to 100 % of it, at random.
     */
    public Builder retryBackoff(Duration initial, Duration max) {
      if (initial.isNegative() || initial.isZero() || max.isNegative() || max.isZero()) {
        throw new IllegalArgumentException(
            "backoffs must be positive, got " + initial + " and " + max);
      }
      this.initialBackoff = initial;
      this.maxBackoff = max;
      return this;
    }

    /**
     * Use TLS, verifying quotad against the platform's trust store (plaintext when neither this,
     * {@link #trustCertificates} nor {@link #clientCertificate} is called).
     */
    public Builder useTransportSecurity() {
      this.tls = true;
      return this;
    }

    /**
     * Use TLS, verifying quotad's certificate against the CA bundle in {@code caPem} (PEM)
     * instead of the platform's trust store. Read when the client is built.
     */
    public Builder trustCertificates(Path caPem) {
      this.trustCertificates = Objects.requireNonNull(caPem, "caPem");
      this.tls = true;
      return this;
    }

    /**
     * Use TLS, presenting a client certificate (chain) and its private key (PEM; the key in PKCS#8,
     * {@code BEGIN PRIVATE KEY}; {@code openssl pkcs8 -topk8 -nocrypt} converts one), for a quotad that requires one
     * (QUOTAD_TLS_CLIENT_CA): mutual TLS. quotad knows the caller by the certificate's first SAN
     * URI (a SPIFFE ID), else its first DNS name. Read when the client is built: a certificate
     * renewed on disk takes a new client.
     */
    public Builder clientCertificate(Path certificateChainPem, Path privateKeyPem) {
      this.certificateChain = Objects.requireNonNull(certificateChainPem, "certificateChainPem");
      this.privateKey = Objects.requireNonNull(privateKeyPem, "privateKeyPem");
      this.tls = true;
      return this;
    }

    /**
     * The name quotad's certificate must carry (and the calls' authority) when it is not the
     * target's host: an IP address, a port-forward to localhost. E.g. {@code "quotad.llm.svc"}.
     */
    public Builder overrideAuthority(String authority) {
      this.authority = Objects.requireNonNull(authority, "authority");
      return this;
    }

    /**
     * Send {@code authorization: Bearer <token>} with every call, as call credentials. Over
     * plaintext {@link #build} refuses it unless {@link #allowPlaintextToken}, and on a channel of
     * your own ({@link #channel}) each call checks that its connection is encrypted.
     */
    public Builder bearerToken(String token) {
      Objects.requireNonNull(token, "token");
      if (token.isEmpty()) {
        throw new IllegalArgumentException("the bearer token is empty");
      }
      return bearerToken(() -> token);
    }

    /**
     * {@link #bearerToken(String)} for a token that changes: {@code token} is asked before every
     * attempt of every call, on the channel's executor. An exception it throws fails the attempt
     * with UNAVAILABLE, retried as any.
     */
    public Builder bearerToken(Supplier<String> token) {
      this.bearerToken = Objects.requireNonNull(token, "token");
      return this;
    }

    /**
     * Let the bearer token travel over a plaintext connection: only where the network encrypts
     * for you (a mesh sidecar) or on loopback.
     */
    public Builder allowPlaintextToken() {
      this.allowPlaintextToken = true;
      return this;
    }

    /** A header sent with every call, e.g. {@code header("authorization", "Bearer ...")}. */
    public Builder header(String key, String value) {
      headers.put(Metadata.Key.of(key, Metadata.ASCII_STRING_MARSHALLER), value);
      return this;
    }

    /** Credentials applied to every call (after a {@link #bearerToken}, if any). */
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

    /**
     * The client. Throws IllegalStateException for a bearer token over plaintext (unless allowed),
     * UncheckedIOException for TLS files that do not read.
     */
    public QuotaClient build() {
      if (bearerToken != null && !tls && channel == null && !allowPlaintextToken) {
        throw new IllegalStateException(
            "a bearer token over plaintext would travel in the clear: use trustCertificates,"
                + " clientCertificate or useTransportSecurity; or allowPlaintextToken() where the"
                + " network is trusted");
      }
      return new QuotaClient(this);
    }

    private ChannelCredentials channelCredentials() {
      if (!tls) {
        return InsecureChannelCredentials.create();
      }
      TlsChannelCredentials.Builder credentials = TlsChannelCredentials.newBuilder();
      try {
        if (trustCertificates != null) {
          credentials.trustManager(trustCertificates.toFile());
        }
        if (certificateChain != null) {
          credentials.keyManager(certificateChain.toFile(), privateKey.toFile());
        }
      } catch (IOException e) {
        throw new UncheckedIOException("quotad: the TLS files do not read: " + e.getMessage(), e);
      }
      return credentials.build();
    }

    private CallCredentials allCallCredentials() {
      if (bearerToken == null) {
        return callCredentials;
      }
      CallCredentials bearer = new BearerToken(bearerToken, !allowPlaintextToken);
      return callCredentials == null ? bearer : new CompositeCallCredentials(bearer, callCredentials);
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
