package io.github.quotad.client;

import static org.junit.jupiter.api.Assertions.fail;

import java.time.Duration;
import java.util.HexFormat;
import java.util.concurrent.ThreadLocalRandom;

/** The live quotad the tests run against: $QUOTAD_ADDR, serving tests/conformance/policy.yaml. */
final class Live {
  private Live() {}

  static String address() {
    String address = System.getenv("QUOTAD_ADDR");
    if (address == null || address.isEmpty()) {
      fail(
          "QUOTAD_ADDR is not set: these tests need a live quotad serving"
              + " tests/conformance/policy.yaml (`make test` starts one)");
    }
    return address;
  }

  static QuotaClient client() {
    return QuotaClient.builder(address()).timeout(Duration.ofSeconds(5)).build();
  }

  static String unique(String prefix) {
    byte[] bytes = new byte[4];
    ThreadLocalRandom.current().nextBytes(bytes);
    return prefix + "-" + HexFormat.of().formatHex(bytes);
  }
}
