package io.github.quotad_dev.quotad.client;

import io.grpc.CallCredentials;
import io.grpc.Metadata;
import io.grpc.SecurityLevel;
import io.grpc.Status;
import java.util.concurrent.Executor;
import java.util.function.Supplier;

/**
 * A bearer token as call credentials: {@code authorization: Bearer <token>} on every call, asked
 * of the supplier before each; refused on a connection that is not encrypted unless allowed.
 */
final class BearerToken extends CallCredentials {
  private static final Metadata.Key<String> AUTHORIZATION =
      Metadata.Key.of("authorization", Metadata.ASCII_STRING_MARSHALLER);

  private final Supplier<String> token;
  private final boolean requirePrivacy;

  BearerToken(Supplier<String> token, boolean requirePrivacy) {
    this.token = token;
    this.requirePrivacy = requirePrivacy;
  }

  @Override
  public void applyRequestMetadata(
      RequestInfo requestInfo, Executor appExecutor, MetadataApplier applier) {
    if (requirePrivacy && requestInfo.getSecurityLevel() != SecurityLevel.PRIVACY_AND_INTEGRITY) {
      applier.fail(
          Status.UNAUTHENTICATED.withDescription(
              "quotad: a bearer token is not sent over a connection that is not encrypted"));
      return;
    }
    appExecutor.execute(
        () -> {
          String value;
          try {
            value = token.get();
          } catch (RuntimeException e) {
            // UNAVAILABLE: a token source that failed is retried as a server that did not answer.
            applier.fail(
                Status.UNAVAILABLE
                    .withDescription("quotad: the bearer token: " + e.getMessage())
                    .withCause(e));
            return;
          }
          Metadata headers = new Metadata();
          headers.put(AUTHORIZATION, "Bearer " + value);
          applier.apply(headers);
        });
  }
}
