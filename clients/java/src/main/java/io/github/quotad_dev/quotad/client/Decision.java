package io.github.quotad_dev.quotad.client;

import io.github.quotad_dev.quotad.v1.CheckAndReserveResponse;
import io.github.quotad_dev.quotad.v1.Cost;
import io.github.quotad_dev.quotad.v1.DenyReason;
import io.github.quotad_dev.quotad.v1.LimitStatus;
import java.time.Duration;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Optional;

/**
 * The answer to {@link QuotaClient#reserve}: allowed with a reservation to commit or release, or
 * denied with the binding limit and when to retry. A denial is a value, not an exception.
 *
 * @param allowed the cost was reserved on every limit
 * @param reservationId the reservation to commit or release (allowed only)
 * @param reserved the cost reserved (allowed only)
 * @param replayed the idempotency key matched an earlier reservation, which is returned: e.g. an
 *     attempt that quotad answered UNAVAILABLE had reserved after all; it is charged once
 * @param bindingLimit the limit that decided the denial (denied only)
 * @param denyReason LIMIT_EXCEEDED (retry after {@code retryAfter}), EXCEEDS_CAPACITY (never fits),
 *     BUDGET_EXHAUSTED (retry after {@code retryAfter}, when the budget resets) or QUEUE_FULL (it
 *     asked to wait, but the binding limit's waiting line was full)
 * @param retryAfter when this same request fits; empty when allowed or when it never can
 * @param remaining remaining units per limit name: after this request when allowed, before it when denied
 * @param response the full answer
 */
public record Decision(
    boolean allowed,
    String reservationId,
    Cost reserved,
    boolean replayed,
    String bindingLimit,
    DenyReason denyReason,
    Optional<Duration> retryAfter,
    Map<String, Long> remaining,
    CheckAndReserveResponse response) {

  static Decision of(CheckAndReserveResponse response) {
    Optional<Duration> retryAfter =
        response.hasRetryAfter()
            ? Optional.of(
                Duration.ofSeconds(
                    response.getRetryAfter().getSeconds(), response.getRetryAfter().getNanos()))
            : Optional.empty();
    return new Decision(
        response.getDecision() == io.github.quotad_dev.quotad.v1.Decision.DECISION_ALLOWED,
        response.getReservationId(),
        response.getReserved(),
        response.getReplayed(),
        response.getBindingLimit(),
        response.getDenyReason(),
        retryAfter,
        remaining(response.getLimitsList()),
        response);
  }

  /** How long the request waited in quotad's line before this answer (zero if it did not wait). */
  public Duration waited() {
    return QuotaClient.duration(response.getWaited());
  }

  /** Remaining units per limit name, in policy order. */
  public static Map<String, Long> remaining(List<LimitStatus> limits) {
    Map<String, Long> remaining = new LinkedHashMap<>();
    for (LimitStatus limit : limits) {
      remaining.put(limit.getName(), limit.getRemaining());
    }
    return remaining;
  }

  @Override
  public String toString() {
    if (allowed) {
      return "allowed " + reservationId;
    }
    String reason = denyReason.name().replaceFirst("^DENY_REASON_", "");
    return "denied by "
        + bindingLimit
        + " ("
        + reason
        + ")"
        + retryAfter.map(d -> ", retry after " + d).orElse("");
  }
}
