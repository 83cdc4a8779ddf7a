package io.github.quotad_dev.quotad.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.github.quotad_dev.quotad.v1.CheckAndReserveRequest;
import io.github.quotad_dev.quotad.v1.CommitResponse;
import io.github.quotad_dev.quotad.v1.Cost;
import io.github.quotad_dev.quotad.v1.DenyReason;
import io.github.quotad_dev.quotad.v1.GetUsageRequest;
import io.grpc.Status;
import java.util.Set;
import java.util.stream.Collectors;
import org.junit.jupiter.api.AfterAll;
import org.junit.jupiter.api.BeforeAll;
import org.junit.jupiter.api.Test;

/** reserve -> commit, a denial and an INVALID_ARGUMENT against a live quotad ($QUOTAD_ADDR). */
class QuotaClientTest {
  private static final String MODEL = "gpt-4o";
  private static QuotaClient quota;

  @BeforeAll
  static void connect() {
    quota = Live.client();
  }

  @AfterAll
  static void close() {
    if (quota != null) {
      quota.close();
    }
  }

  private static CheckAndReserveRequest request(String subject, long input, long output) {
    return CheckAndReserveRequest.newBuilder()
        .setSubject(subject)
        .setModel(MODEL)
        .setInputTokens(input)
        .setMaxOutputTokens(output)
        .build();
  }

  @Test
  void reserveThenCommit() {
    String subject = Live.unique("java-commit");
    Decision decision = quota.reserve(request(subject, 300, 200));
    assertTrue(decision.allowed(), decision.toString());
    assertEquals(
        // gpt-4o at $2.50 / $10 per million tokens (the price catalog): 750 + 2,000 micro-dollars
        Cost.newBuilder()
            .setRequests(1)
            .setInputTokens(300)
            .setOutputTokens(200)
            .setCostMicroUsd(2750)
            .build(),
        decision.reserved());

    CommitResponse committed = quota.commit(decision.reservationId(), 300, 50);
    assertFalse(committed.getRepeat());
    assertEquals(50, committed.getCommitted().getOutputTokens());

    var usage =
        quota.usage(GetUsageRequest.newBuilder().setSubject(subject).setModel(MODEL).build());
    assertEquals(650L, Decision.remaining(usage.getLimitsList()).get("tokens-per-day"));
  }

  @Test
  void aDenialIsAValue() {
    String subject = Live.unique("java-denial");
    assertTrue(quota.reserve(request(subject, 600, 100)).allowed());

    Decision denied = quota.reserve(request(subject, 300, 100));
    assertFalse(denied.allowed());
    assertEquals(DenyReason.DENY_REASON_LIMIT_EXCEEDED, denied.denyReason());
    assertEquals("tokens-per-day", denied.bindingLimit());
    assertTrue(denied.retryAfter().orElseThrow().toNanos() > 0);
    assertEquals(300L, denied.remaining().get("tokens-per-day"), "a denial charges nothing");
    assertTrue(denied.toString().startsWith("denied by tokens-per-day (LIMIT_EXCEEDED)"));
  }

  @Test
  void invalidArgumentCarriesTheFieldViolations() {
    CheckAndReserveRequest bad =
        CheckAndReserveRequest.newBuilder()
            .setSubject(Live.unique("java-invalid"))
            .setModel("gpt-5-ultra")
            .setInputTokens(-1)
            .build();
    QuotadException error = assertThrows(QuotadException.class, () -> quota.reserve(bad));
    assertEquals(Status.Code.INVALID_ARGUMENT, error.code());
    Set<String> fields =
        error.fieldViolations().stream()
            .map(QuotadException.FieldViolation::field)
            .collect(Collectors.toSet());
    assertEquals(Set.of("input_tokens", "model"), fields);
    assertTrue(
        error.getMessage().startsWith("quotad: INVALID_ARGUMENT: ")
            && error.getMessage().contains("input_tokens: must be between 0"),
        error.getMessage());
    System.out.println("INVALID_ARGUMENT as the Java client shows it: " + error.getMessage());
  }
}
