package io.github.quotad_dev.quotad.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertNotNull;
import static org.junit.jupiter.api.Assertions.assertSame;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import io.github.quotad_dev.quotad.v1.CheckAndReserveRequest;
import io.github.quotad_dev.quotad.v1.GetUsageRequest;
import io.github.quotad_dev.quotad.v1.Priority;
import io.grpc.CallOptions;
import io.grpc.Channel;
import io.grpc.ClientCall;
import io.grpc.ClientInterceptor;
import io.grpc.Deadline;
import io.grpc.ForwardingClientCall;
import io.grpc.ManagedChannel;
import io.grpc.ManagedChannelBuilder;
import io.grpc.MethodDescriptor;
import io.grpc.Status;
import java.io.IOException;
import java.net.ServerSocket;
import java.time.Duration;
import java.util.List;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.CopyOnWriteArrayList;
import java.util.concurrent.TimeUnit;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/**
 * Server-side waiting ({@link QuotaClient#reserve(CheckAndReserveRequest, Duration)}) against a
 * live quotad at $QUOTAD_ADDR serving tests/conformance/policy.yaml, whose tier "wait" has one
 * limit: one reservation at a time. One reservation holds the slot, so the next waits in quotad's
 * line; the tests free the slot once that request has a place in the line (read from quotad's
 * Redis at $QUOTAD_REDIS_ADDR), so no step depends on how fast the machine is.
 */
class WaitingTest {
  private static final String TIER = "wait";
  private static final String MODEL = "gpt-4o";

  /** One channel for both clients, connected before any test, so no deadline pays for it. */
  private static ManagedChannel channel;

  /** The client under test: the default deadline (two seconds). */
  private static QuotaClient quota;

  /** Holds and frees the slot, with all the time a loaded machine may need. */
  private static QuotaClient helper;

  @BeforeAll
  static void connect() {
    channel = ManagedChannelBuilder.forTarget(Live.address()).usePlaintext().build();
    quota = QuotaClient.builder(Live.address()).channel(channel).build();
    helper =
        QuotaClient.builder(Live.address())
            .channel(channel)
            .timeout(Duration.ofSeconds(30))
            .build();
    helper.usage(
        GetUsageRequest.newBuilder()
            .setSubject(Live.unique("java-connect"))
            .setTier(TIER)
            .setModel(MODEL)
            .build());
  }

  @AfterAll
  static void close() throws InterruptedException {
    if (channel != null) {
      channel.shutdown();
      if (!channel.awaitTermination(5, TimeUnit.SECONDS)) {
        channel.shutdownNow();
      }
    }
  }

  private static CheckAndReserveRequest request(String subject) {
    return CheckAndReserveRequest.newBuilder()
        .setSubject(subject)
        .setTier(TIER)
        .setModel(MODEL)
        .setMaxOutputTokens(10)
        .build();
  }

  /** A reserve under way in another thread, and when it began (before it set its deadline). */
  private record Waiter(long beganNanos, CompletableFuture<Decision> decision) {}

  private static Waiter startReserve(CheckAndReserveRequest request, Duration serverWait)
      throws Exception {
    CompletableFuture<Long> began = new CompletableFuture<>();
    CompletableFuture<Decision> decision =
        CompletableFuture.supplyAsync(
            () -> {
              began.complete(System.nanoTime());
              return quota.reserve(request, serverWait);
            });
    return new Waiter(began.get(30, TimeUnit.SECONDS), decision);
  }

  /** Until a request of {@code subject} has a place in a waiting line; fails if it ends first. */
  private static void untilWaitingInLine(String subject, Waiter waiter) throws Exception {
    long giveUp = System.nanoTime() + TimeUnit.SECONDS.toNanos(30);
    while (Live.placesInLine(subject) == 0) {
      if (waiter.decision().isDone()) {
        fail("the waiting reserve ended before it waited in line: " + outcome(waiter));
      }
      assertTrue(System.nanoTime() < giveUp, "the reserve did not wait in line within 30 s");
      TimeUnit.MILLISECONDS.sleep(10);
    }
  }

  private static String outcome(Waiter waiter) {
    try {
      return String.valueOf(waiter.decision().getNow(null));
    } catch (RuntimeException e) {
      return e.toString();
    }
  }

  @Test
  void aServerWaitIsAdmittedWhenCapacityFrees() throws Exception {
    String subject = Live.unique("java-wait");
    Decision holder = helper.reserve(request(subject));
    assertTrue(holder.allowed(), holder.toString());

    CheckAndReserveRequest high =
        request(subject).toBuilder().setPriority(Priority.PRIORITY_HIGH).build();
    Waiter waiter = startReserve(high, Duration.ofSeconds(3));
    untilWaitingInLine(subject, waiter);
    helper.release(holder.reservationId());

    Decision admitted = waiter.decision().get(30, TimeUnit.SECONDS);
    assertTrue(admitted.allowed(), admitted.toString());
    assertTrue(admitted.waited().toNanos() > 0, "waited " + admitted.waited());
    assertEquals(Priority.PRIORITY_HIGH, admitted.response().getPriority());
    helper.release(admitted.reservationId());
  }

  /**
   * Capacity frees only after the default deadline (two seconds) has passed: a call whose deadline
   * were not lengthened by its 5 s server wait would fail DEADLINE_EXCEEDED before then.
   */
  @Test
  void aServerWaitLongerThanTheDefaultDeadlineIsNotCutOff() throws Exception {
    String subject = Live.unique("java-long-wait");
    Decision holder = helper.reserve(request(subject));
    assertTrue(holder.allowed(), holder.toString());

    Waiter waiter = startReserve(request(subject), Duration.ofSeconds(5));
    untilWaitingInLine(subject, waiter);
    long releaseAt = waiter.beganNanos() + QuotaClient.DEFAULT_TIMEOUT.plusMillis(500).toNanos();
    while (System.nanoTime() < releaseAt) {
      assertFalse(
          waiter.decision().isDone(),
          "the waiting reserve ended after "
              + Duration.ofNanos(System.nanoTime() - waiter.beganNanos())
              + ": "
              + outcome(waiter));
      TimeUnit.MILLISECONDS.sleep(20);
    }
    helper.release(holder.reservationId());

    Decision admitted = waiter.decision().get(30, TimeUnit.SECONDS);
    Duration elapsed = Duration.ofNanos(System.nanoTime() - waiter.beganNanos());
    assertTrue(admitted.allowed(), admitted.toString());
    assertTrue(admitted.waited().toNanos() > 0, "waited " + admitted.waited());
    assertTrue(elapsed.compareTo(QuotaClient.DEFAULT_TIMEOUT) > 0, "admitted after " + elapsed);
    System.out.println(
        "admitted after "
            + elapsed.toMillis()
            + " ms, "
            + admitted.waited().toMillis()
            + " ms of it in quotad's line");
    helper.release(admitted.reservationId());
  }

  /** One attempt: when it was made, its deadline (System.nanoTime) and the wait it asked for. */
  private record Attempt(long atNanos, long deadlineNanos, Deadline deadline, Duration maxWait) {}

  @Test
  void retriesKeepTheDeadlineOfTimeoutPlusServerWait() throws Exception {
    List<Attempt> attempts = new CopyOnWriteArrayList<>();
    ClientInterceptor log =
        new ClientInterceptor() {
          @Override
          public <ReqT, RespT> ClientCall<ReqT, RespT> interceptCall(
              MethodDescriptor<ReqT, RespT> method, CallOptions options, Channel next) {
            ClientCall<ReqT, RespT> call = next.newCall(method, options);
            return new ForwardingClientCall.SimpleForwardingClientCall<>(call) {
              @Override
              public void sendMessage(ReqT message) {
                Deadline deadline = options.getDeadline();
                assertNotNull(deadline, "every attempt has a deadline");
                long remaining = deadline.timeRemaining(TimeUnit.NANOSECONDS);
                long at = System.nanoTime();
                CheckAndReserveRequest request = (CheckAndReserveRequest) message;
                Duration maxWait = QuotaClient.duration(request.getMaxWait());
                attempts.add(new Attempt(at, at + remaining, deadline, maxWait));
                super.sendMessage(message);
              }
            };
          }
        };
    try (QuotaClient refused =
        QuotaClient.builder(refusedAddress())
            .timeout(Duration.ofSeconds(1))
            .intercept(log)
            .build()) {
      long before = System.nanoTime();
      QuotadException error =
          assertThrows(
              QuotadException.class,
              () -> refused.reserve(request(Live.unique("java-refused")), Duration.ofSeconds(1)));
      long ended = System.nanoTime();
      assertTrue(
          error.code() == Status.Code.UNAVAILABLE || error.code() == Status.Code.DEADLINE_EXCEEDED,
          error.getMessage());

      assertTrue(attempts.size() >= 2, "expected retries, saw " + attempts.size() + " attempt(s)");
      Attempt first = attempts.get(0);
      long twoSeconds = TimeUnit.SECONDS.toNanos(2);
      assertTrue(
          before + twoSeconds <= first.deadlineNanos()
              && first.deadlineNanos() <= first.atNanos() + twoSeconds,
          "the deadline is the timeout plus the server wait");
      assertTrue(
          ended <= first.deadlineNanos() + TimeUnit.SECONDS.toNanos(1),
          "ended " + Duration.ofNanos(ended - first.deadlineNanos()) + " past the deadline");
      assertEquals(Duration.ofSeconds(1), first.maxWait());
      for (int i = 1; i < attempts.size(); i++) {
        Attempt retry = attempts.get(i);
        assertSame(first.deadline(), retry.deadline(), "every attempt has the call's one deadline");
        assertTrue(
            retry.maxWait().compareTo(Duration.ofSeconds(1)) < 0
                && retry.maxWait().compareTo(attempts.get(i - 1).maxWait()) <= 0,
            "retry " + i + " asked to wait " + retry.maxWait());
      }
    }
  }

  /** A local port nothing listens on: every attempt is refused, UNAVAILABLE. */
  private static String refusedAddress() throws IOException {
    try (ServerSocket socket = new ServerSocket(0)) {
      return "127.0.0.1:" + socket.getLocalPort();
    }
  }
}
