package io.github.quotad_dev.quotad.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertFalse;
import static org.junit.jupiter.api.Assertions.assertTrue;
import static org.junit.jupiter.api.Assertions.fail;

import com.google.gson.Gson;
import com.google.gson.JsonElement;
import com.google.gson.JsonObject;
import io.github.quotad_dev.quotad.v1.CheckAndReserveRequest;
import io.github.quotad_dev.quotad.v1.CommitResponse;
import io.github.quotad_dev.quotad.v1.Cost;
import io.github.quotad_dev.quotad.v1.DenyReason;
import io.github.quotad_dev.quotad.v1.GetUsageRequest;
import io.github.quotad_dev.quotad.v1.ReleaseResponse;
import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.Map;
import org.junit.jupiter.api.Test;

/**
 * The conformance scenario (tests/conformance/scenario.json), replayed through this client, in
 * plaintext and over mutual TLS. The Python, TypeScript and Go clients replay the same file; all
 * must agree with it.
 */
class ConformanceTest {
  private static final Path SCENARIO = Path.of("..", "..", "tests", "conformance", "scenario.json");
  private static final Gson GSON = new Gson();

  private static Map<String, Long> cost(Cost cost) {
    Map<String, Long> out = new LinkedHashMap<>();
    out.put("requests", cost.getRequests());
    out.put("input_tokens", cost.getInputTokens());
    out.put("output_tokens", cost.getOutputTokens());
    return out;
  }

  private static long number(JsonObject step, String key) {
    return step.has(key) ? step.get(key).getAsLong() : 0;
  }

  @Test
  void replaysTheScenario() throws IOException {
    try (QuotaClient quota = Live.client()) {
      replay(quota);
    }
  }

  @Test
  void replaysTheScenarioOverMutualTls() throws IOException {
    try (QuotaClient quota = Live.secure().mtls().build()) {
      replay(quota);
    }
  }

  private static void replay(QuotaClient quota) throws IOException {
    JsonObject scenario = GSON.fromJson(Files.readString(SCENARIO), JsonObject.class);
    String runId = Live.unique("java");
    String subject = scenario.get("subject").getAsString() + "-" + runId;
    String tenant = scenario.get("tenant").getAsString() + "-" + runId;
    String model = scenario.get("model").getAsString();
    Map<String, String> saved = new HashMap<>();

    int index = 0;
    for (JsonElement element : scenario.getAsJsonArray("steps")) {
      JsonObject step = element.getAsJsonObject();
      String call = step.get("call").getAsString();
      String where = "step " + index++ + " (" + call + ")";
      Map<String, Object> seen = new HashMap<>();
      String reservationId = "";
      try {
        switch (call) {
          case "reserve" -> {
            CheckAndReserveRequest.Builder request =
                CheckAndReserveRequest.newBuilder()
                    .setSubject(subject)
                    .setTenant(tenant)
                    .setModel(model)
                    .setInputTokens(number(step, "input_tokens"))
                    .setMaxOutputTokens(number(step, "max_output_tokens"));
            if (step.has("idempotency_key")) {
              request.setIdempotencyKey(step.get("idempotency_key").getAsString());
            }
            Decision decision = quota.reserve(request.build());
            var r = decision.response();
            seen.put("decision", r.getDecision().name().replaceFirst("^DECISION_", ""));
            if (r.getDenyReason() != DenyReason.DENY_REASON_UNSPECIFIED) {
              seen.put("deny_reason", r.getDenyReason().name().replaceFirst("^DENY_REASON_", ""));
            }
            seen.put("binding_limit", r.getBindingLimit());
            seen.put("retry_after", r.hasRetryAfter());
            seen.put("reserved", cost(r.getReserved()));
            seen.put("replayed", r.getReplayed());
            seen.put("remaining", decision.remaining());
            reservationId = r.getReservationId();
          }
          case "commit" -> {
            CommitResponse r =
                quota.commit(
                    saved.get(step.get("reservation").getAsString()),
                    number(step, "input_tokens"),
                    number(step, "output_tokens"));
            seen.put("repeat", r.getRepeat());
            seen.put("reserved", cost(r.getReserved()));
            seen.put("committed", cost(r.getCommitted()));
          }
          case "release" -> {
            ReleaseResponse r = quota.release(saved.get(step.get("reservation").getAsString()));
            seen.put("repeat", r.getRepeat());
            seen.put("refunded", cost(r.getRefunded()));
          }
          case "usage" -> {
            var r =
                quota.usage(
                    GetUsageRequest.newBuilder()
                        .setSubject(subject)
                        .setTenant(tenant)
                        .setModel(model)
                        .build());
            seen.put("remaining", Decision.remaining(r.getLimitsList()));
          }
          default -> fail(where + ": unknown call");
        }
      } catch (QuotadException e) {
        seen.put("error", e.code().name());
        seen.put(
            "field_violations",
            e.fieldViolations().stream().map(QuotadException.FieldViolation::field).toList());
      }
      if (step.has("save_as")) {
        saved.put(step.get("save_as").getAsString(), reservationId);
      }
      for (Map.Entry<String, JsonElement> expected : step.getAsJsonObject("expect").entrySet()) {
        String key = expected.getKey();
        if (key.equals("same_reservation_as")) {
          assertFalse(reservationId.isEmpty(), where + ": no reservation id");
          assertEquals(saved.get(expected.getValue().getAsString()), reservationId, where);
          continue;
        }
        assertTrue(seen.containsKey(key), where + ": unknown or missing expectation " + key + " in " + seen);
        // Compare as JSON: what was seen, serialized, against the expectation.
        assertEquals(expected.getValue(), GSON.toJsonTree(seen.get(key)), where + ": " + key);
      }
    }
  }
}
