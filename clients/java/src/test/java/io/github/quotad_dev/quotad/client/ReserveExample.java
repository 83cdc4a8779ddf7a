package io.github.quotad_dev.quotad.client;

import io.github.quotad_dev.quotad.v1.CheckAndReserveRequest;
import io.github.quotad_dev.quotad.v1.GetUsageRequest;
import io.github.quotad_dev.quotad.v1.LimitStatus;
import java.time.Duration;
import java.util.UUID;

/**
 * Reserve quota for one LLM call, commit what it used, print the caller's limits. With quotad
 * running ({@code make run} at the repository root), ExampleTest runs it: {@code
 * QUOTAD_ADDR=localhost:50051 mvn test -Dtest=ExampleTest}.
 */
public final class ReserveExample {
  private ReserveExample() {}

  public static void main(String[] args) {
    String address = System.getenv().getOrDefault("QUOTAD_ADDR", "localhost:50051");
    // Your user's id. A new one each run here, so that running the example again within a minute
    // starts from full limits instead of being denied.
    String subject = "user-" + UUID.randomUUID().toString().substring(0, 8);
    // 30 s per call: the first one also connects, and in a fresh JVM loads gRPC and Netty, which
    // on a busy machine takes longer than the two-second default. Retries of UNAVAILABLE stay
    // within it. A long-lived service pays that once, at its first call.
    try (QuotaClient quota = QuotaClient.builder(address).timeout(Duration.ofSeconds(30)).build()) {
      Decision decision =
          quota.reserve(
              CheckAndReserveRequest.newBuilder()
                  .setSubject(subject)
                  .setModel("gpt-4o")
                  .setInputTokens(300)
                  .setMaxOutputTokens(200)
                  .build());
      if (!decision.allowed()) {
        System.out.println(decision); // "denied by tokens-per-minute (LIMIT_EXCEEDED), retry after PT1.2S"
        return;
      }
      // ... call the LLM here; if it fails: quota.release(decision.reservationId()) ...
      quota.commit(decision.reservationId(), 300, 97);

      var usage =
          quota.usage(GetUsageRequest.newBuilder().setSubject(subject).setModel("gpt-4o").build());
      for (LimitStatus limit : usage.getLimitsList()) {
        System.out.printf(
            "%s: %d of %d left%n", limit.getName(), limit.getRemaining(), limit.getLimit());
      }
    } catch (QuotadException e) {
      // INVALID_ARGUMENT with e.fieldViolations(), or UNAVAILABLE: fail open or closed, your call.
      System.err.println(e.getMessage() + " " + e.fieldViolations());
    }
  }
}
