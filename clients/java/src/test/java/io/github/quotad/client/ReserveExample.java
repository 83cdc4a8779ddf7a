package io.github.quotad.client;

import io.github.quotad.v1.CheckAndReserveRequest;
import io.github.quotad.v1.GetUsageRequest;
import io.github.quotad.v1.LimitStatus;

/**
 * Reserve quota for one LLM call, commit what it used, print the caller's limits. With quotad
 * running ({@code make run} at the repository root), ExampleTest runs it: {@code
 * QUOTAD_ADDR=localhost:50051 mvn test -Dtest=ExampleTest}.
 */
public final class ReserveExample {
  private ReserveExample() {}

  public static void main(String[] args) {
    String address = System.getenv().getOrDefault("QUOTAD_ADDR", "localhost:50051");
    try (QuotaClient quota = QuotaClient.builder(address).build()) {
      Decision decision =
          quota.reserve(
              CheckAndReserveRequest.newBuilder()
                  .setSubject("user-42")
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
          quota.usage(GetUsageRequest.newBuilder().setSubject("user-42").setModel("gpt-4o").build());
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
