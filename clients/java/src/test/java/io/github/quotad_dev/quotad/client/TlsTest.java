package io.github.quotad_dev.quotad.client;

import static org.junit.jupiter.api.Assertions.assertEquals;
import static org.junit.jupiter.api.Assertions.assertThrows;
import static org.junit.jupiter.api.Assertions.assertTrue;

import io.github.quotad_dev.quotad.v1.CheckAndReserveRequest;
import io.github.quotad_dev.quotad.v1.GetUsageRequest;
import io.grpc.Status;
import java.nio.file.Path;
import java.util.concurrent.atomic.AtomicInteger;
import org.junit.jupiter.api.Test;

/**
 * TLS, mutual TLS and bearer tokens against the secure quotads (see {@link Live#secure()}); the
 * conformance scenario over mutual TLS is in {@link ConformanceTest}.
 */
class TlsTest {
  private static final String MODEL = "gpt-4o";

  /** The code of one GetUsage through a client built by {@code builder}, tried once. */
  private static Status.Code usageCode(QuotaClient.Builder builder) {
    try (QuotaClient quota = builder.maxAttempts(1).build()) {
      quota.usage(
          GetUsageRequest.newBuilder()
              .setSubject(Live.unique("java-tls"))
              .setTenant("tls")
              .setModel(MODEL)
              .build());
      return Status.Code.OK;
    } catch (QuotadException e) {
      return e.code();
    }
  }

  @Test
  void mutualTlsChecksTheNameQuotadsCertificateCarries() {
    Live.Secure secure = Live.secure();
    // quotad's certificate names 127.0.0.1 and localhost.
    assertEquals(Status.Code.OK, usageCode(secure.mtls().overrideAuthority("localhost")));
    assertEquals(
        Status.Code.UNAVAILABLE, usageCode(secure.mtls().overrideAuthority("quotad.invalid")));
  }

  @Test
  void withoutAClientCertificateTheHandshakeFails() {
    Live.Secure secure = Live.secure();
    QuotaClient.Builder noCertificate =
        QuotaClient.builder(secure.mtlsAddress()).trustCertificates(secure.ca());
    assertEquals(Status.Code.UNAVAILABLE, usageCode(noCertificate));
  }

  @Test
  void aBearerTokenOverTlsIsAskedForBeforeEveryCall() {
    Live.Secure secure = Live.secure();
    AtomicInteger asked = new AtomicInteger();
    try (QuotaClient quota =
        QuotaClient.builder(secure.tokenAddress())
            .trustCertificates(secure.ca())
            .bearerToken(
                () -> {
                  asked.incrementAndGet();
                  return secure.token();
                })
            .build()) {
      Decision decision =
          quota.reserve(
              CheckAndReserveRequest.newBuilder()
                  .setSubject(Live.unique("java-token"))
                  .setTenant("tokens")
                  .setModel(MODEL)
                  .setInputTokens(10)
                  .setMaxOutputTokens(10)
                  .build());
      assertTrue(decision.allowed(), decision.toString());
      quota.commit(decision.reservationId(), 10, 1);
    }
    assertEquals(2, asked.get());
  }

  @Test
  void withoutAKnownTokenTheCallIsUnauthenticated() {
    Live.Secure secure = Live.secure();
    QuotaClient.Builder noToken =
        QuotaClient.builder(secure.tokenAddress()).trustCertificates(secure.ca());
    assertEquals(Status.Code.UNAUTHENTICATED, usageCode(noToken));
    assertEquals(Status.Code.UNAUTHENTICATED, usageCode(noToken.bearerToken("not-a-known-token")));
    QuotaClient.Builder broken =
        QuotaClient.builder(secure.tokenAddress())
            .trustCertificates(secure.ca())
            .bearerToken(
                () -> {
                  throw new IllegalStateException("vault is down");
                });
    assertEquals(Status.Code.UNAVAILABLE, usageCode(broken));
  }

  @Test
  void aTokenIsNotSentOverPlaintextUnlessAllowed() {
    QuotaClient.Builder plaintext = QuotaClient.builder(Live.address()).bearerToken("secret");
    IllegalStateException refused = assertThrows(IllegalStateException.class, plaintext::build);
    assertTrue(refused.getMessage().contains("plaintext"), refused.getMessage());
    assertThrows(
        java.io.UncheckedIOException.class,
        () -> QuotaClient.builder(Live.address()).trustCertificates(Path.of("/nonexistent")).build());
    // Allowed (a mesh sidecar encrypts): the plaintext quotad knows no tokens and ignores it.
    assertEquals(Status.Code.OK, usageCode(plaintext.allowPlaintextToken()));
  }
}
