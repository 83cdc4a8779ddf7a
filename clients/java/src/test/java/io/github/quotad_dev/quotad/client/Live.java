package io.github.quotad_dev.quotad.client;

import static org.junit.jupiter.api.Assertions.fail;

import java.io.BufferedReader;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.nio.file.Path;
import java.time.Duration;
import java.util.HexFormat;
import java.util.List;
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

  /**
   * The secure quotads `make test` starts beside the plaintext one (tests/clients/conftest.py),
   * serving the same policy with callers: {@code mtlsAddress} requires a client certificate, {@code
   * tokenAddress} serves TLS and knows its callers by bearer token. The CA {@code ca} signed both
   * servers' certificates and the client's ({@code cert}, {@code key}).
   */
  record Secure(
      String mtlsAddress, String tokenAddress, Path ca, Path cert, Path key, String token) {
    /** A builder for the mutual-TLS quotad, with the client's certificate. */
    QuotaClient.Builder mtls() {
      return QuotaClient.builder(mtlsAddress)
          .timeout(Duration.ofSeconds(5))
          .trustCertificates(ca)
          .clientCertificate(cert, key);
    }
  }

  static Secure secure() {
    List<String> names =
        List.of(
            "QUOTAD_MTLS_ADDR",
            "QUOTAD_TOKEN_ADDR",
            "QUOTAD_TLS_CA",
            "QUOTAD_CLIENT_CERT",
            "QUOTAD_CLIENT_KEY",
            "QUOTAD_TOKEN");
    List<String> values = names.stream().map(name -> System.getenv().getOrDefault(name, "")).toList();
    for (int i = 0; i < names.size(); i++) {
      if (values.get(i).isEmpty()) {
        fail(names.get(i) + " is not set: the TLS tests need the secure quotads `make test` starts");
      }
    }
    return new Secure(
        values.get(0),
        values.get(1),
        Path.of(values.get(2)),
        Path.of(values.get(3)),
        Path.of(values.get(4)),
        values.get(5));
  }

  /**
   * Counts the places in the waiting lines whose keys match ARGV[1]: each limit's line is a sorted
   * set, its key the limit's key plus ":q".
   */
  private static final String COUNT_PLACES =
      "local n = 0 for _, line in ipairs(redis.call('KEYS', ARGV[1])) do"
          + " n = n + redis.call('ZCARD', line) end return n";

  /**
   * Places taken in the waiting lines of {@code subject}'s limits, read from the Redis of the
   * quotad under test at $QUOTAD_REDIS_ADDR (host:port) with one EVAL over a plain socket, so the
   * tests need no Redis client.
   */
  static long placesInLine(String subject) throws IOException {
    String address = System.getenv("QUOTAD_REDIS_ADDR");
    if (address == null || address.isEmpty()) {
      fail(
          "QUOTAD_REDIS_ADDR is not set: the Redis of the quotad at $QUOTAD_ADDR"
              + " (`make test` sets it)");
    }
    int colon = address.lastIndexOf(':');
    StringBuilder command = new StringBuilder();
    List<String> args = List.of("EVAL", COUNT_PLACES, "0", "*:" + subject + ":*:q");
    command.append('*').append(args.size()).append("\r\n");
    for (String arg : args) {
      command.append('$').append(arg.getBytes(StandardCharsets.UTF_8).length).append("\r\n");
      command.append(arg).append("\r\n");
    }
    try (Socket socket = new Socket()) {
      socket.connect(
          new InetSocketAddress(
              address.substring(0, colon), Integer.parseInt(address.substring(colon + 1))),
          10_000);
      socket.setSoTimeout(10_000);
      OutputStream out = socket.getOutputStream();
      out.write(command.toString().getBytes(StandardCharsets.UTF_8));
      out.flush();
      String reply =
          new BufferedReader(new InputStreamReader(socket.getInputStream(), StandardCharsets.UTF_8))
              .readLine();
      if (reply == null || !reply.matches(":[0-9]+")) {
        fail("Redis answered " + reply);
      }
      return Long.parseLong(reply.substring(1));
    }
  }

  static String unique(String prefix) {
    byte[] bytes = new byte[4];
    ThreadLocalRandom.current().nextBytes(bytes);
    return prefix + "-" + HexFormat.of().formatHex(bytes);
  }
}
