package io.github.quotad_dev.quotad.client;

import com.google.protobuf.Any;
import com.google.protobuf.InvalidProtocolBufferException;
import com.google.rpc.BadRequest;
import io.grpc.Status;
import io.grpc.StatusRuntimeException;
import io.grpc.protobuf.StatusProto;
import java.util.ArrayList;
import java.util.List;

/**
 * An error status from quotad (or from the way to it): the gRPC code, the server's message and,
 * for INVALID_ARGUMENT, the field violations of its {@code google.rpc.BadRequest}.
 *
 * <p>UNAVAILABLE and DEADLINE_EXCEEDED mean quotad or its Redis did not answer in time: fail open
 * or closed, the caller's call.
 */
public final class QuotadException extends RuntimeException {
  private static final long serialVersionUID = 1L;

  /** One bad field of a request, as the server named it. */
  public record FieldViolation(String field, String description) {
    @Override
    public String toString() {
      return field + ": " + description;
    }
  }

  private final Status.Code code;
  private final transient List<FieldViolation> fieldViolations;

  private QuotadException(StatusRuntimeException cause, List<FieldViolation> fieldViolations) {
    super(
        "quotad: "
            + cause.getStatus().getCode()
            + ": "
            + (cause.getStatus().getDescription() == null ? "" : cause.getStatus().getDescription()),
        cause);
    this.code = cause.getStatus().getCode();
    this.fieldViolations = List.copyOf(fieldViolations);
  }

  static QuotadException of(StatusRuntimeException e) {
    List<FieldViolation> violations = new ArrayList<>();
    com.google.rpc.Status status = StatusProto.fromThrowable(e);
    if (status != null) {
      for (Any detail : status.getDetailsList()) {
        if (detail.is(BadRequest.class)) {
          try {
            for (BadRequest.FieldViolation v : detail.unpack(BadRequest.class).getFieldViolationsList()) {
              violations.add(new FieldViolation(v.getField(), v.getDescription()));
            }
          } catch (InvalidProtocolBufferException ignored) {
            // A malformed detail leaves the list empty; the message still says what was wrong.
          }
        }
      }
    }
    return new QuotadException(e, violations);
  }

  /** The gRPC status code. */
  public Status.Code code() {
    return code;
  }

  /** INVALID_ARGUMENT: the fields the server refused and why; otherwise empty. */
  public List<FieldViolation> fieldViolations() {
    return fieldViolations;
  }
}
