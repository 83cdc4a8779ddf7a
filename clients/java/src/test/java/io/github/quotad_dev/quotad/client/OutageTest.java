package io.github.quotad_dev.quotad.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import io.github.quotad_dev.quotad.v1.CheckAndReserveRequest;
import io.github.quotad_dev.quotad.v1.GetUsageRequest;
import io.github.quotad_dev.quotad.v1.QuotaServiceGrpc;
import io.grpc.CallOptions;
import io.grpc.Channel;
import io.grpc.ClientCall;
import io.grpc.ClientInterceptor;
import io.grpc.Deadline;
import io.grpc.ForwardingClientCall;
import io.grpc.ForwardingClientCallListener;
import io.grpc.Metadata;
import io.grpc.MethodDescriptor;
import io.grpc.Status;
import java.io.IOException;
import java.time.Duration;
import java.util.List;
import java.util.Map;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.TimeUnit;
import java.util.stream.Collectors;
import org.junit.jupiter.api.Test;

/**
 * A real Redis outage during reserve: quotad's Redis is paused (SIGSTOP: its connections stay
 * open and nothing is answered), so quotad answers UNAVAILABLE, and it is resumed once that has
 * been seen. Needs $QUOTAD_REDIS_PID, the pid of that Redis ({@code make test} sets it).
 */
class OutageTest {
  /** The call's deadline: far longer than the pause, reached only if broken. */
  private static final Duration OUTAGE_DEADLINE = Duration.ofSeconds(60);

  /** One attempt of a call, as a client interceptor saw it. */
  private record Attempt(
      String method, Status.Code code, String idempotencyKey, Deadline deadline) {}

  /** Every attempt: the client retries by calling again, so each one passes through here. */
  private static final class AttemptLog implements ClientInterceptor {
    final List<Attempt> attempts = new CopyOnWriteArrayList<>();
    final CompletableFuture<Void> unavailable = new CompletableFuture<>();

    @Override
    public <ReqT, RespT> ClientCall<ReqT, RespT> interceptCall(
        MethodDescriptor<ReqT, RespT> method, CallOptions options, Channel next) {
      return new ForwardingClientCall.SimpleForwardingClientCall<>(next.newCall(method, options)) {
        private String idempotencyKey = "";

        @Override
        public void sendMessage(ReqT message) {
          if (message instanceof CheckAndReserveRequest request) {
            idempotencyKey = request.getIdempotencyKey();
          }
          super.sendMessage(message);
        }

        @Override
        public void start(Listener<RespT> listener, Metadata headers) {
          super.start(
              new ForwardingClientCallListener.SimpleForwardingClientCallListener<>(listener) {
                @Override
                public void onClose(Status status, Metadata trailers) {
                  attempts.add(
                      new Attempt(
                          method.getFullMethodName(),
                          status.getCode(),
                          idempotencyKey,
                          options.getDeadline()));
                  if (status.getCode() == Status.Code.UNAVAILABLE) {
                    unavailable.complete(null);
                  }
                  super.onClose(status, trailers);
                }
              },
              headers);
        }
      };
    }
  }

  private static String redisPid() {
    String pid = System.getenv("QUOTAD_REDIS_PID");
    if (pid == null || !pid.matches("[1-9][0-9]*")) {
      fail(
          "QUOTAD_REDIS_PID is not set: this test pauses the Redis of the quotad at $QUOTAD_ADDR"
              + " (`make test` sets both)");
    }
    return pid;
  }

  /** Sends a signal with kill(1): the JDK can only terminate processes, not stop or resume them. */
  private static void signal(String signal, String pid) throws IOException, InterruptedException {
    Process kill = new ProcessBuilder("kill", "-" + signal, pid).inheritIO().start();
    assertEquals(0, kill.waitFor(), "kill -" + signal + " " + pid);
  }

  @Test
  void reserveRetriesThroughARedisOutageAndReservesOnce() throws Exception {
    String pid = redisPid();
    AttemptLog log = new AttemptLog();
    String subject = Live.unique("java-outage");
    try (QuotaClient quota =
        QuotaClient.builder(Live.address()).timeout(OUTAGE_DEADLINE).intercept(log).build()) {
      CompletableFuture<Decision> reserving;
      signal("STOP", pid);
      try {
        reserving =
            CompletableFuture.supplyAsync(
                () ->
                    quota.reserve(
                        CheckAndReserveRequest.newBuilder()
                            .setSubject(subject)
                            .setModel("gpt-4o")
                            .setInputTokens(100)
                            .setMaxOutputTokens(50)
                            .build()));
        CompletableFuture.anyOf(log.unavailable, reserving)
            .get(OUTAGE_DEADLINE.toSeconds(), TimeUnit.SECONDS);
        assertTrue(
            log.unavailable.isDone(),
            "reserve ended before quotad answered UNAVAILABLE: " + outcome(reserving));
      } finally {
        signal("CONT", pid); // whatever happened, Redis runs again
      }
      Decision decision = reserving.get(OUTAGE_DEADLINE.toSeconds(), TimeUnit.SECONDS);
      assertTrue(decision.allowed(), decision.toString());

      String checkAndReserve = QuotaServiceGrpc.getCheckAndReserveMethod().getFullMethodName();
      List<Attempt> reserves =
          log.attempts.stream().filter(a -> a.method().equals(checkAndReserve)).toList();
      System.out.println(
          "CheckAndReserve attempts through the outage: "
              + reserves.stream().map(a -> a.code().name()).collect(Collectors.joining(", ")));
      assertEquals(Status.Code.UNAVAILABLE, reserves.get(0).code());
      assertEquals(Status.Code.OK, reserves.get(reserves.size() - 1).code(), "a retry got through");
      String key = reserves.get(0).idempotencyKey();
      assertFalse(key.isEmpty(), "reserve sends an idempotency key");
      for (Attempt attempt : reserves) {
        assertEquals(key, attempt.idempotencyKey(), "every attempt sends the call's one key");
        assertEquals(reserves.get(0).deadline(), attempt.deadline(), "and shares its one deadline");
      }

      // Exactly one reservation holds: 150 tokens and one slot (replayed says whether an attempt
      // that was answered UNAVAILABLE had reserved after all; either way it counts once).
      GetUsageRequest usage =
          GetUsageRequest.newBuilder().setSubject(subject).setModel("gpt-4o").build();
      Map<String, Long> left = Decision.remaining(quota.usage(usage).getLimitsList());
      assertEquals(850L, left.get("tokens-per-day"));
      assertEquals(1L, left.get("in-flight"));
      quota.release(decision.reservationId());
    }
  }

  private static String outcome(CompletableFuture<Decision> reserving) {
    try {
      return String.valueOf(reserving.getNow(null));
    } catch (RuntimeException e) {
      return e.toString();
    }
  }
}
