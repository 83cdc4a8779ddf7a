package io.github.quotad.v1;

import static io.grpc.MethodDescriptor.generateFullMethodName;

/**
 * <pre>
 * QuotaService decides whether an LLM call may proceed under every limit
 * that applies to it, and keeps the books once the call is done.
 * </pre>
 */
@io.grpc.stub.annotations.GrpcGenerated
public final class QuotaServiceGrpc {

  private QuotaServiceGrpc() {}

  public static final java.lang.String SERVICE_NAME = "quotad.v1.QuotaService";

  // Static method descriptors that strictly reflect the proto.
  private static volatile io.grpc.MethodDescriptor<io.github.quotad.v1.CheckAndReserveRequest,
      io.github.quotad.v1.CheckAndReserveResponse> getCheckAndReserveMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "CheckAndReserve",
      requestType = io.github.quotad.v1.CheckAndReserveRequest.class,
      responseType = io.github.quotad.v1.CheckAndReserveResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.UNARY)
  public static io.grpc.MethodDescriptor<io.github.quotad.v1.CheckAndReserveRequest,
      io.github.quotad.v1.CheckAndReserveResponse> getCheckAndReserveMethod() {
    io.grpc.MethodDescriptor<io.github.quotad.v1.CheckAndReserveRequest, io.github.quotad.v1.CheckAndReserveResponse> getCheckAndReserveMethod;
    if ((getCheckAndReserveMethod = QuotaServiceGrpc.getCheckAndReserveMethod) == null) {
      synchronized (QuotaServiceGrpc.class) {
        if ((getCheckAndReserveMethod = QuotaServiceGrpc.getCheckAndReserveMethod) == null) {
          QuotaServiceGrpc.getCheckAndReserveMethod = getCheckAndReserveMethod =
              io.grpc.MethodDescriptor.<io.github.quotad.v1.CheckAndReserveRequest, io.github.quotad.v1.CheckAndReserveResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.UNARY)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "CheckAndReserve"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.github.quotad.v1.CheckAndReserveRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.github.quotad.v1.CheckAndReserveResponse.getDefaultInstance()))
              .setSchemaDescriptor(new QuotaServiceMethodDescriptorSupplier("CheckAndReserve"))
              .build();
        }
      }
    }
    return getCheckAndReserveMethod;
  }

  private static volatile io.grpc.MethodDescriptor<io.github.quotad.v1.CommitRequest,
      io.github.quotad.v1.CommitResponse> getCommitMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "Commit",
      requestType = io.github.quotad.v1.CommitRequest.class,
      responseType = io.github.quotad.v1.CommitResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.UNARY)
  public static io.grpc.MethodDescriptor<io.github.quotad.v1.CommitRequest,
      io.github.quotad.v1.CommitResponse> getCommitMethod() {
    io.grpc.MethodDescriptor<io.github.quotad.v1.CommitRequest, io.github.quotad.v1.CommitResponse> getCommitMethod;
    if ((getCommitMethod = QuotaServiceGrpc.getCommitMethod) == null) {
      synchronized (QuotaServiceGrpc.class) {
        if ((getCommitMethod = QuotaServiceGrpc.getCommitMethod) == null) {
          QuotaServiceGrpc.getCommitMethod = getCommitMethod =
              io.grpc.MethodDescriptor.<io.github.quotad.v1.CommitRequest, io.github.quotad.v1.CommitResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.UNARY)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "Commit"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.github.quotad.v1.CommitRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.github.quotad.v1.CommitResponse.getDefaultInstance()))
              .setSchemaDescriptor(new QuotaServiceMethodDescriptorSupplier("Commit"))
              .build();
        }
      }
    }
    return getCommitMethod;
  }

  private static volatile io.grpc.MethodDescriptor<io.github.quotad.v1.ReleaseRequest,
      io.github.quotad.v1.ReleaseResponse> getReleaseMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "Release",
      requestType = io.github.quotad.v1.ReleaseRequest.class,
      responseType = io.github.quotad.v1.ReleaseResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.UNARY)
  public static io.grpc.MethodDescriptor<io.github.quotad.v1.ReleaseRequest,
      io.github.quotad.v1.ReleaseResponse> getReleaseMethod() {
    io.grpc.MethodDescriptor<io.github.quotad.v1.ReleaseRequest, io.github.quotad.v1.ReleaseResponse> getReleaseMethod;
    if ((getReleaseMethod = QuotaServiceGrpc.getReleaseMethod) == null) {
      synchronized (QuotaServiceGrpc.class) {
        if ((getReleaseMethod = QuotaServiceGrpc.getReleaseMethod) == null) {
          QuotaServiceGrpc.getReleaseMethod = getReleaseMethod =
              io.grpc.MethodDescriptor.<io.github.quotad.v1.ReleaseRequest, io.github.quotad.v1.ReleaseResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.UNARY)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "Release"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.github.quotad.v1.ReleaseRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.github.quotad.v1.ReleaseResponse.getDefaultInstance()))
              .setSchemaDescriptor(new QuotaServiceMethodDescriptorSupplier("Release"))
              .build();
        }
      }
    }
    return getReleaseMethod;
  }

  private static volatile io.grpc.MethodDescriptor<io.github.quotad.v1.GetUsageRequest,
      io.github.quotad.v1.GetUsageResponse> getGetUsageMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "GetUsage",
      requestType = io.github.quotad.v1.GetUsageRequest.class,
      responseType = io.github.quotad.v1.GetUsageResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.UNARY)
  public static io.grpc.MethodDescriptor<io.github.quotad.v1.GetUsageRequest,
      io.github.quotad.v1.GetUsageResponse> getGetUsageMethod() {
    io.grpc.MethodDescriptor<io.github.quotad.v1.GetUsageRequest, io.github.quotad.v1.GetUsageResponse> getGetUsageMethod;
    if ((getGetUsageMethod = QuotaServiceGrpc.getGetUsageMethod) == null) {
      synchronized (QuotaServiceGrpc.class) {
        if ((getGetUsageMethod = QuotaServiceGrpc.getGetUsageMethod) == null) {
          QuotaServiceGrpc.getGetUsageMethod = getGetUsageMethod =
              io.grpc.MethodDescriptor.<io.github.quotad.v1.GetUsageRequest, io.github.quotad.v1.GetUsageResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.UNARY)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "GetUsage"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.github.quotad.v1.GetUsageRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.github.quotad.v1.GetUsageResponse.getDefaultInstance()))
              .setSchemaDescriptor(new QuotaServiceMethodDescriptorSupplier("GetUsage"))
              .build();
        }
      }
    }
    return getGetUsageMethod;
  }

  private static volatile io.grpc.MethodDescriptor<io.github.quotad.v1.CheckAndReserveBatchRequest,
      io.github.quotad.v1.CheckAndReserveBatchResponse> getCheckAndReserveBatchMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "CheckAndReserveBatch",
      requestType = io.github.quotad.v1.CheckAndReserveBatchRequest.class,
      responseType = io.github.quotad.v1.CheckAndReserveBatchResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.UNARY)
  public static io.grpc.MethodDescriptor<io.github.quotad.v1.CheckAndReserveBatchRequest,
      io.github.quotad.v1.CheckAndReserveBatchResponse> getCheckAndReserveBatchMethod() {
    io.grpc.MethodDescriptor<io.github.quotad.v1.CheckAndReserveBatchRequest, io.github.quotad.v1.CheckAndReserveBatchResponse> getCheckAndReserveBatchMethod;
    if ((getCheckAndReserveBatchMethod = QuotaServiceGrpc.getCheckAndReserveBatchMethod) == null) {
      synchronized (QuotaServiceGrpc.class) {
        if ((getCheckAndReserveBatchMethod = QuotaServiceGrpc.getCheckAndReserveBatchMethod) == null) {
          QuotaServiceGrpc.getCheckAndReserveBatchMethod = getCheckAndReserveBatchMethod =
              io.grpc.MethodDescriptor.<io.github.quotad.v1.CheckAndReserveBatchRequest, io.github.quotad.v1.CheckAndReserveBatchResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.UNARY)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "CheckAndReserveBatch"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.github.quotad.v1.CheckAndReserveBatchRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.github.quotad.v1.CheckAndReserveBatchResponse.getDefaultInstance()))
              .setSchemaDescriptor(new QuotaServiceMethodDescriptorSupplier("CheckAndReserveBatch"))
              .build();
        }
      }
    }
    return getCheckAndReserveBatchMethod;
  }

  private static volatile io.grpc.MethodDescriptor<io.github.quotad.v1.CheckAndReserveStreamRequest,
      io.github.quotad.v1.CheckAndReserveStreamResponse> getCheckAndReserveStreamMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "CheckAndReserveStream",
      requestType = io.github.quotad.v1.CheckAndReserveStreamRequest.class,
      responseType = io.github.quotad.v1.CheckAndReserveStreamResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.BIDI_STREAMING)
  public static io.grpc.MethodDescriptor<io.github.quotad.v1.CheckAndReserveStreamRequest,
      io.github.quotad.v1.CheckAndReserveStreamResponse> getCheckAndReserveStreamMethod() {
    io.grpc.MethodDescriptor<io.github.quotad.v1.CheckAndReserveStreamRequest, io.github.quotad.v1.CheckAndReserveStreamResponse> getCheckAndReserveStreamMethod;
    if ((getCheckAndReserveStreamMethod = QuotaServiceGrpc.getCheckAndReserveStreamMethod) == null) {
      synchronized (QuotaServiceGrpc.class) {
        if ((getCheckAndReserveStreamMethod = QuotaServiceGrpc.getCheckAndReserveStreamMethod) == null) {
          QuotaServiceGrpc.getCheckAndReserveStreamMethod = getCheckAndReserveStreamMethod =
              io.grpc.MethodDescriptor.<io.github.quotad.v1.CheckAndReserveStreamRequest, io.github.quotad.v1.CheckAndReserveStreamResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.BIDI_STREAMING)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "CheckAndReserveStream"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.github.quotad.v1.CheckAndReserveStreamRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.github.quotad.v1.CheckAndReserveStreamResponse.getDefaultInstance()))
              .setSchemaDescriptor(new QuotaServiceMethodDescriptorSupplier("CheckAndReserveStream"))
              .build();
        }
      }
    }
    return getCheckAndReserveStreamMethod;
  }

  private static volatile io.grpc.MethodDescriptor<io.github.quotad.v1.CommitBatchRequest,
      io.github.quotad.v1.CommitBatchResponse> getCommitBatchMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "CommitBatch",
      requestType = io.github.quotad.v1.CommitBatchRequest.class,
      responseType = io.github.quotad.v1.CommitBatchResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.UNARY)
  public static io.grpc.MethodDescriptor<io.github.quotad.v1.CommitBatchRequest,
      io.github.quotad.v1.CommitBatchResponse> getCommitBatchMethod() {
    io.grpc.MethodDescriptor<io.github.quotad.v1.CommitBatchRequest, io.github.quotad.v1.CommitBatchResponse> getCommitBatchMethod;
    if ((getCommitBatchMethod = QuotaServiceGrpc.getCommitBatchMethod) == null) {
      synchronized (QuotaServiceGrpc.class) {
        if ((getCommitBatchMethod = QuotaServiceGrpc.getCommitBatchMethod) == null) {
          QuotaServiceGrpc.getCommitBatchMethod = getCommitBatchMethod =
              io.grpc.MethodDescriptor.<io.github.quotad.v1.CommitBatchRequest, io.github.quotad.v1.CommitBatchResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.UNARY)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "CommitBatch"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.github.quotad.v1.CommitBatchRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.github.quotad.v1.CommitBatchResponse.getDefaultInstance()))
              .setSchemaDescriptor(new QuotaServiceMethodDescriptorSupplier("CommitBatch"))
              .build();
        }
      }
    }
    return getCommitBatchMethod;
  }

  private static volatile io.grpc.MethodDescriptor<io.github.quotad.v1.CommitStreamRequest,
      io.github.quotad.v1.CommitStreamResponse> getCommitStreamMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "CommitStream",
      requestType = io.github.quotad.v1.CommitStreamRequest.class,
      responseType = io.github.quotad.v1.CommitStreamResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.BIDI_STREAMING)
  public static io.grpc.MethodDescriptor<io.github.quotad.v1.CommitStreamRequest,
      io.github.quotad.v1.CommitStreamResponse> getCommitStreamMethod() {
    io.grpc.MethodDescriptor<io.github.quotad.v1.CommitStreamRequest, io.github.quotad.v1.CommitStreamResponse> getCommitStreamMethod;
    if ((getCommitStreamMethod = QuotaServiceGrpc.getCommitStreamMethod) == null) {
      synchronized (QuotaServiceGrpc.class) {
        if ((getCommitStreamMethod = QuotaServiceGrpc.getCommitStreamMethod) == null) {
          QuotaServiceGrpc.getCommitStreamMethod = getCommitStreamMethod =
              io.grpc.MethodDescriptor.<io.github.quotad.v1.CommitStreamRequest, io.github.quotad.v1.CommitStreamResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.BIDI_STREAMING)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "CommitStream"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.github.quotad.v1.CommitStreamRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.github.quotad.v1.CommitStreamResponse.getDefaultInstance()))
              .setSchemaDescriptor(new QuotaServiceMethodDescriptorSupplier("CommitStream"))
              .build();
        }
      }
    }
    return getCommitStreamMethod;
  }

  private static volatile io.grpc.MethodDescriptor<io.github.quotad.v1.GetAccuracyRequest,
      io.github.quotad.v1.GetAccuracyResponse> getGetAccuracyMethod;

  @io.grpc.stub.annotations.RpcMethod(
      fullMethodName = SERVICE_NAME + '/' + "GetAccuracy",
      requestType = io.github.quotad.v1.GetAccuracyRequest.class,
      responseType = io.github.quotad.v1.GetAccuracyResponse.class,
      methodType = io.grpc.MethodDescriptor.MethodType.UNARY)
  public static io.grpc.MethodDescriptor<io.github.quotad.v1.GetAccuracyRequest,
      io.github.quotad.v1.GetAccuracyResponse> getGetAccuracyMethod() {
    io.grpc.MethodDescriptor<io.github.quotad.v1.GetAccuracyRequest, io.github.quotad.v1.GetAccuracyResponse> getGetAccuracyMethod;
    if ((getGetAccuracyMethod = QuotaServiceGrpc.getGetAccuracyMethod) == null) {
      synchronized (QuotaServiceGrpc.class) {
        if ((getGetAccuracyMethod = QuotaServiceGrpc.getGetAccuracyMethod) == null) {
          QuotaServiceGrpc.getGetAccuracyMethod = getGetAccuracyMethod =
              io.grpc.MethodDescriptor.<io.github.quotad.v1.GetAccuracyRequest, io.github.quotad.v1.GetAccuracyResponse>newBuilder()
              .setType(io.grpc.MethodDescriptor.MethodType.UNARY)
              .setFullMethodName(generateFullMethodName(SERVICE_NAME, "GetAccuracy"))
              .setSampledToLocalTracing(true)
              .setRequestMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.github.quotad.v1.GetAccuracyRequest.getDefaultInstance()))
              .setResponseMarshaller(io.grpc.protobuf.ProtoUtils.marshaller(
                  io.github.quotad.v1.GetAccuracyResponse.getDefaultInstance()))
              .setSchemaDescriptor(new QuotaServiceMethodDescriptorSupplier("GetAccuracy"))
              .build();
        }
      }
    }
    return getGetAccuracyMethod;
  }

  /**
   * Creates a new async stub that supports all call types for the service
   */
  public static QuotaServiceStub newStub(io.grpc.Channel channel) {
    io.grpc.stub.AbstractStub.StubFactory<QuotaServiceStub> factory =
      new io.grpc.stub.AbstractStub.StubFactory<QuotaServiceStub>() {
        @java.lang.Override
        public QuotaServiceStub newStub(io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
          return new QuotaServiceStub(channel, callOptions);
        }
      };
    return QuotaServiceStub.newStub(factory, channel);
  }

  /**
   * Creates a new blocking-style stub that supports all types of calls on the service
   */
  public static QuotaServiceBlockingV2Stub newBlockingV2Stub(
      io.grpc.Channel channel) {
    io.grpc.stub.AbstractStub.StubFactory<QuotaServiceBlockingV2Stub> factory =
      new io.grpc.stub.AbstractStub.StubFactory<QuotaServiceBlockingV2Stub>() {
        @java.lang.Override
        public QuotaServiceBlockingV2Stub newStub(io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
          return new QuotaServiceBlockingV2Stub(channel, callOptions);
        }
      };
    return QuotaServiceBlockingV2Stub.newStub(factory, channel);
  }

  /**
   * Creates a new blocking-style stub that supports unary and streaming output calls on the service
   */
  public static QuotaServiceBlockingStub newBlockingStub(
      io.grpc.Channel channel) {
    io.grpc.stub.AbstractStub.StubFactory<QuotaServiceBlockingStub> factory =
      new io.grpc.stub.AbstractStub.StubFactory<QuotaServiceBlockingStub>() {
        @java.lang.Override
        public QuotaServiceBlockingStub newStub(io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
          return new QuotaServiceBlockingStub(channel, callOptions);
        }
      };
    return QuotaServiceBlockingStub.newStub(factory, channel);
  }

  /**
   * Creates a new ListenableFuture-style stub that supports unary calls on the service
   */
  public static QuotaServiceFutureStub newFutureStub(
      io.grpc.Channel channel) {
    io.grpc.stub.AbstractStub.StubFactory<QuotaServiceFutureStub> factory =
      new io.grpc.stub.AbstractStub.StubFactory<QuotaServiceFutureStub>() {
        @java.lang.Override
        public QuotaServiceFutureStub newStub(io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
          return new QuotaServiceFutureStub(channel, callOptions);
        }
      };
    return QuotaServiceFutureStub.newStub(factory, channel);
  }

  /**
   * <pre>
   * QuotaService decides whether an LLM call may proceed under every limit
   * that applies to it, and keeps the books once the call is done.
   * </pre>
   */
  public interface AsyncService {

    /**
     * <pre>
     * CheckAndReserve estimates the cost of one LLM call and reserves it
     * atomically against every applicable limit: all of them, or none.
     * </pre>
     */
    default void checkAndReserve(io.github.quotad.v1.CheckAndReserveRequest request,
        io.grpc.stub.StreamObserver<io.github.quotad.v1.CheckAndReserveResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getCheckAndReserveMethod(), responseObserver);
    }

    /**
     * <pre>
     * Commit reconciles a reservation with the usage the call really had:
     * the difference is refunded or charged on every limit it touched.
     * Idempotent: a repeated Commit returns the first result.
     * </pre>
     */
    default void commit(io.github.quotad.v1.CommitRequest request,
        io.grpc.stub.StreamObserver<io.github.quotad.v1.CommitResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getCommitMethod(), responseObserver);
    }

    /**
     * <pre>
     * Release gives a whole reservation back: the LLM call never happened.
     * Idempotent.
     * </pre>
     */
    default void release(io.github.quotad.v1.ReleaseRequest request,
        io.grpc.stub.StreamObserver<io.github.quotad.v1.ReleaseResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getReleaseMethod(), responseObserver);
    }

    /**
     * <pre>
     * GetUsage reports the status of every limit that applies to a caller,
     * without changing anything.
     * </pre>
     */
    default void getUsage(io.github.quotad.v1.GetUsageRequest request,
        io.grpc.stub.StreamObserver<io.github.quotad.v1.GetUsageResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getGetUsageMethod(), responseObserver);
    }

    /**
     * <pre>
     * CheckAndReserveBatch decides many requests in one call, for high-volume
     * callers such as gateways. Each item is decided on its own, all or nothing
     * for that item, exactly as CheckAndReserve would; one failing item never
     * fails the others. Results come back in request order. The call itself
     * fails (INVALID_ARGUMENT) only when it holds more than 1000 items.
     * </pre>
     */
    default void checkAndReserveBatch(io.github.quotad.v1.CheckAndReserveBatchRequest request,
        io.grpc.stub.StreamObserver<io.github.quotad.v1.CheckAndReserveBatchResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getCheckAndReserveBatchMethod(), responseObserver);
    }

    /**
     * <pre>
     * CheckAndReserveStream decides requests sent over one long-lived stream.
     * Items are decided concurrently and answered in the order they were sent,
     * each answer echoing its request_id; a failing item gets an error result
     * and the stream goes on.
     * </pre>
     */
    default io.grpc.stub.StreamObserver<io.github.quotad.v1.CheckAndReserveStreamRequest> checkAndReserveStream(
        io.grpc.stub.StreamObserver<io.github.quotad.v1.CheckAndReserveStreamResponse> responseObserver) {
      return io.grpc.stub.ServerCalls.asyncUnimplementedStreamingCall(getCheckAndReserveStreamMethod(), responseObserver);
    }

    /**
     * <pre>
     * CommitBatch commits many reservations in one call, each on its own.
     * </pre>
     */
    default void commitBatch(io.github.quotad.v1.CommitBatchRequest request,
        io.grpc.stub.StreamObserver<io.github.quotad.v1.CommitBatchResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getCommitBatchMethod(), responseObserver);
    }

    /**
     * <pre>
     * CommitStream commits reservations sent over one long-lived stream,
     * answered in order.
     * </pre>
     */
    default io.grpc.stub.StreamObserver<io.github.quotad.v1.CommitStreamRequest> commitStream(
        io.grpc.stub.StreamObserver<io.github.quotad.v1.CommitStreamResponse> responseObserver) {
      return io.grpc.stub.ServerCalls.asyncUnimplementedStreamingCall(getCommitStreamMethod(), responseObserver);
    }

    /**
     * <pre>
     * GetAccuracy reports how far estimates were from actual usage for a model,
     * over a decaying window of the recent Commits that every replica has seen,
     * and the output reservation it has learned.
     * </pre>
     */
    default void getAccuracy(io.github.quotad.v1.GetAccuracyRequest request,
        io.grpc.stub.StreamObserver<io.github.quotad.v1.GetAccuracyResponse> responseObserver) {
      io.grpc.stub.ServerCalls.asyncUnimplementedUnaryCall(getGetAccuracyMethod(), responseObserver);
    }
  }

  /**
   * Base class for the server implementation of the service QuotaService.
   * <pre>
   * QuotaService decides whether an LLM call may proceed under every limit
   * that applies to it, and keeps the books once the call is done.
   * </pre>
   */
  public static abstract class QuotaServiceImplBase
      implements io.grpc.BindableService, AsyncService {

    @java.lang.Override public final io.grpc.ServerServiceDefinition bindService() {
      return QuotaServiceGrpc.bindService(this);
    }
  }

  /**
   * A stub to allow clients to do asynchronous rpc calls to service QuotaService.
   * <pre>
   * QuotaService decides whether an LLM call may proceed under every limit
   * that applies to it, and keeps the books once the call is done.
   * </pre>
   */
  public static final class QuotaServiceStub
      extends io.grpc.stub.AbstractAsyncStub<QuotaServiceStub> {
    private QuotaServiceStub(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      super(channel, callOptions);
    }

    @java.lang.Override
    protected QuotaServiceStub build(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      return new QuotaServiceStub(channel, callOptions);
    }

    /**
     * <pre>
     * CheckAndReserve estimates the cost of one LLM call and reserves it
     * atomically against every applicable limit: all of them, or none.
     * </pre>
     */
    public void checkAndReserve(io.github.quotad.v1.CheckAndReserveRequest request,
        io.grpc.stub.StreamObserver<io.github.quotad.v1.CheckAndReserveResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncUnaryCall(
          getChannel().newCall(getCheckAndReserveMethod(), getCallOptions()), request, responseObserver);
    }

    /**
     * <pre>
     * Commit reconciles a reservation with the usage the call really had:
     * the difference is refunded or charged on every limit it touched.
     * Idempotent: a repeated Commit returns the first result.
     * </pre>
     */
    public void commit(io.github.quotad.v1.CommitRequest request,
        io.grpc.stub.StreamObserver<io.github.quotad.v1.CommitResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncUnaryCall(
          getChannel().newCall(getCommitMethod(), getCallOptions()), request, responseObserver);
    }

    /**
     * <pre>
     * Release gives a whole reservation back: the LLM call never happened.
     * Idempotent.
     * </pre>
     */
    public void release(io.github.quotad.v1.ReleaseRequest request,
        io.grpc.stub.StreamObserver<io.github.quotad.v1.ReleaseResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncUnaryCall(
          getChannel().newCall(getReleaseMethod(), getCallOptions()), request, responseObserver);
    }

    /**
     * <pre>
     * GetUsage reports the status of every limit that applies to a caller,
     * without changing anything.
     * </pre>
     */
    public void getUsage(io.github.quotad.v1.GetUsageRequest request,
        io.grpc.stub.StreamObserver<io.github.quotad.v1.GetUsageResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncUnaryCall(
          getChannel().newCall(getGetUsageMethod(), getCallOptions()), request, responseObserver);
    }

    /**
     * <pre>
     * CheckAndReserveBatch decides many requests in one call, for high-volume
     * callers such as gateways. Each item is decided on its own, all or nothing
     * for that item, exactly as CheckAndReserve would; one failing item never
     * fails the others. Results come back in request order. The call itself
     * fails (INVALID_ARGUMENT) only when it holds more than 1000 items.
     * </pre>
     */
    public void checkAndReserveBatch(io.github.quotad.v1.CheckAndReserveBatchRequest request,
        io.grpc.stub.StreamObserver<io.github.quotad.v1.CheckAndReserveBatchResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncUnaryCall(
          getChannel().newCall(getCheckAndReserveBatchMethod(), getCallOptions()), request, responseObserver);
    }

    /**
     * <pre>
     * CheckAndReserveStream decides requests sent over one long-lived stream.
     * Items are decided concurrently and answered in the order they were sent,
     * each answer echoing its request_id; a failing item gets an error result
     * and the stream goes on.
     * </pre>
     */
    public io.grpc.stub.StreamObserver<io.github.quotad.v1.CheckAndReserveStreamRequest> checkAndReserveStream(
        io.grpc.stub.StreamObserver<io.github.quotad.v1.CheckAndReserveStreamResponse> responseObserver) {
      return io.grpc.stub.ClientCalls.asyncBidiStreamingCall(
          getChannel().newCall(getCheckAndReserveStreamMethod(), getCallOptions()), responseObserver);
    }

    /**
     * <pre>
     * CommitBatch commits many reservations in one call, each on its own.
     * </pre>
     */
    public void commitBatch(io.github.quotad.v1.CommitBatchRequest request,
        io.grpc.stub.StreamObserver<io.github.quotad.v1.CommitBatchResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncUnaryCall(
          getChannel().newCall(getCommitBatchMethod(), getCallOptions()), request, responseObserver);
    }

    /**
     * <pre>
     * CommitStream commits reservations sent over one long-lived stream,
     * answered in order.
     * </pre>
     */
    public io.grpc.stub.StreamObserver<io.github.quotad.v1.CommitStreamRequest> commitStream(
        io.grpc.stub.StreamObserver<io.github.quotad.v1.CommitStreamResponse> responseObserver) {
      return io.grpc.stub.ClientCalls.asyncBidiStreamingCall(
          getChannel().newCall(getCommitStreamMethod(), getCallOptions()), responseObserver);
    }

    /**
     * <pre>
     * GetAccuracy reports how far estimates were from actual usage for a model,
     * over a decaying window of the recent Commits that every replica has seen,
     * and the output reservation it has learned.
     * </pre>
     */
    public void getAccuracy(io.github.quotad.v1.GetAccuracyRequest request,
        io.grpc.stub.StreamObserver<io.github.quotad.v1.GetAccuracyResponse> responseObserver) {
      io.grpc.stub.ClientCalls.asyncUnaryCall(
          getChannel().newCall(getGetAccuracyMethod(), getCallOptions()), request, responseObserver);
    }
  }

  /**
   * A stub to allow clients to do synchronous rpc calls to service QuotaService.
   * <pre>
   * QuotaService decides whether an LLM call may proceed under every limit
   * that applies to it, and keeps the books once the call is done.
   * </pre>
   */
  public static final class QuotaServiceBlockingV2Stub
      extends io.grpc.stub.AbstractBlockingStub<QuotaServiceBlockingV2Stub> {
    private QuotaServiceBlockingV2Stub(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      super(channel, callOptions);
    }

    @java.lang.Override
    protected QuotaServiceBlockingV2Stub build(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      return new QuotaServiceBlockingV2Stub(channel, callOptions);
    }

    /**
     * <pre>
     * CheckAndReserve estimates the cost of one LLM call and reserves it
     * atomically against every applicable limit: all of them, or none.
     * </pre>
     */
    public io.github.quotad.v1.CheckAndReserveResponse checkAndReserve(io.github.quotad.v1.CheckAndReserveRequest request) throws io.grpc.StatusException {
      return io.grpc.stub.ClientCalls.blockingV2UnaryCall(
          getChannel(), getCheckAndReserveMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * Commit reconciles a reservation with the usage the call really had:
     * the difference is refunded or charged on every limit it touched.
     * Idempotent: a repeated Commit returns the first result.
     * </pre>
     */
    public io.github.quotad.v1.CommitResponse commit(io.github.quotad.v1.CommitRequest request) throws io.grpc.StatusException {
      return io.grpc.stub.ClientCalls.blockingV2UnaryCall(
          getChannel(), getCommitMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * Release gives a whole reservation back: the LLM call never happened.
     * Idempotent.
     * </pre>
     */
    public io.github.quotad.v1.ReleaseResponse release(io.github.quotad.v1.ReleaseRequest request) throws io.grpc.StatusException {
      return io.grpc.stub.ClientCalls.blockingV2UnaryCall(
          getChannel(), getReleaseMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * GetUsage reports the status of every limit that applies to a caller,
     * without changing anything.
     * </pre>
     */
    public io.github.quotad.v1.GetUsageResponse getUsage(io.github.quotad.v1.GetUsageRequest request) throws io.grpc.StatusException {
      return io.grpc.stub.ClientCalls.blockingV2UnaryCall(
          getChannel(), getGetUsageMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * CheckAndReserveBatch decides many requests in one call, for high-volume
     * callers such as gateways. Each item is decided on its own, all or nothing
     * for that item, exactly as CheckAndReserve would; one failing item never
     * fails the others. Results come back in request order. The call itself
     * fails (INVALID_ARGUMENT) only when it holds more than 1000 items.
     * </pre>
     */
    public io.github.quotad.v1.CheckAndReserveBatchResponse checkAndReserveBatch(io.github.quotad.v1.CheckAndReserveBatchRequest request) throws io.grpc.StatusException {
      return io.grpc.stub.ClientCalls.blockingV2UnaryCall(
          getChannel(), getCheckAndReserveBatchMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * CheckAndReserveStream decides requests sent over one long-lived stream.
     * Items are decided concurrently and answered in the order they were sent,
     * each answer echoing its request_id; a failing item gets an error result
     * and the stream goes on.
     * </pre>
     */
    @io.grpc.ExperimentalApi("https://github.com/grpc/grpc-java/issues/10918")
    public io.grpc.stub.BlockingClientCall<io.github.quotad.v1.CheckAndReserveStreamRequest, io.github.quotad.v1.CheckAndReserveStreamResponse>
        checkAndReserveStream() {
      return io.grpc.stub.ClientCalls.blockingBidiStreamingCall(
          getChannel(), getCheckAndReserveStreamMethod(), getCallOptions());
    }

    /**
     * <pre>
     * CommitBatch commits many reservations in one call, each on its own.
     * </pre>
     */
    public io.github.quotad.v1.CommitBatchResponse commitBatch(io.github.quotad.v1.CommitBatchRequest request) throws io.grpc.StatusException {
      return io.grpc.stub.ClientCalls.blockingV2UnaryCall(
          getChannel(), getCommitBatchMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * CommitStream commits reservations sent over one long-lived stream,
     * answered in order.
     * </pre>
     */
    @io.grpc.ExperimentalApi("https://github.com/grpc/grpc-java/issues/10918")
    public io.grpc.stub.BlockingClientCall<io.github.quotad.v1.CommitStreamRequest, io.github.quotad.v1.CommitStreamResponse>
        commitStream() {
      return io.grpc.stub.ClientCalls.blockingBidiStreamingCall(
          getChannel(), getCommitStreamMethod(), getCallOptions());
    }

    /**
     * <pre>
     * GetAccuracy reports how far estimates were from actual usage for a model,
     * over a decaying window of the recent Commits that every replica has seen,
     * and the output reservation it has learned.
     * </pre>
     */
    public io.github.quotad.v1.GetAccuracyResponse getAccuracy(io.github.quotad.v1.GetAccuracyRequest request) throws io.grpc.StatusException {
      return io.grpc.stub.ClientCalls.blockingV2UnaryCall(
          getChannel(), getGetAccuracyMethod(), getCallOptions(), request);
    }
  }

  /**
   * A stub to allow clients to do limited synchronous rpc calls to service QuotaService.
   * <pre>
   * QuotaService decides whether an LLM call may proceed under every limit
   * that applies to it, and keeps the books once the call is done.
   * </pre>
   */
  public static final class QuotaServiceBlockingStub
      extends io.grpc.stub.AbstractBlockingStub<QuotaServiceBlockingStub> {
    private QuotaServiceBlockingStub(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      super(channel, callOptions);
    }

    @java.lang.Override
    protected QuotaServiceBlockingStub build(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      return new QuotaServiceBlockingStub(channel, callOptions);
    }

    /**
     * <pre>
     * CheckAndReserve estimates the cost of one LLM call and reserves it
     * atomically against every applicable limit: all of them, or none.
     * </pre>
     */
    public io.github.quotad.v1.CheckAndReserveResponse checkAndReserve(io.github.quotad.v1.CheckAndReserveRequest request) {
      return io.grpc.stub.ClientCalls.blockingUnaryCall(
          getChannel(), getCheckAndReserveMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * Commit reconciles a reservation with the usage the call really had:
     * the difference is refunded or charged on every limit it touched.
     * Idempotent: a repeated Commit returns the first result.
     * </pre>
     */
    public io.github.quotad.v1.CommitResponse commit(io.github.quotad.v1.CommitRequest request) {
      return io.grpc.stub.ClientCalls.blockingUnaryCall(
          getChannel(), getCommitMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * Release gives a whole reservation back: the LLM call never happened.
     * Idempotent.
     * </pre>
     */
    public io.github.quotad.v1.ReleaseResponse release(io.github.quotad.v1.ReleaseRequest request) {
      return io.grpc.stub.ClientCalls.blockingUnaryCall(
          getChannel(), getReleaseMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * GetUsage reports the status of every limit that applies to a caller,
     * without changing anything.
     * </pre>
     */
    public io.github.quotad.v1.GetUsageResponse getUsage(io.github.quotad.v1.GetUsageRequest request) {
      return io.grpc.stub.ClientCalls.blockingUnaryCall(
          getChannel(), getGetUsageMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * CheckAndReserveBatch decides many requests in one call, for high-volume
     * callers such as gateways. Each item is decided on its own, all or nothing
     * for that item, exactly as CheckAndReserve would; one failing item never
     * fails the others. Results come back in request order. The call itself
     * fails (INVALID_ARGUMENT) only when it holds more than 1000 items.
     * </pre>
     */
    public io.github.quotad.v1.CheckAndReserveBatchResponse checkAndReserveBatch(io.github.quotad.v1.CheckAndReserveBatchRequest request) {
      return io.grpc.stub.ClientCalls.blockingUnaryCall(
          getChannel(), getCheckAndReserveBatchMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * CommitBatch commits many reservations in one call, each on its own.
     * </pre>
     */
    public io.github.quotad.v1.CommitBatchResponse commitBatch(io.github.quotad.v1.CommitBatchRequest request) {
      return io.grpc.stub.ClientCalls.blockingUnaryCall(
          getChannel(), getCommitBatchMethod(), getCallOptions(), request);
    }

    /**
     * <pre>
     * GetAccuracy reports how far estimates were from actual usage for a model,
     * over a decaying window of the recent Commits that every replica has seen,
     * and the output reservation it has learned.
     * </pre>
     */
    public io.github.quotad.v1.GetAccuracyResponse getAccuracy(io.github.quotad.v1.GetAccuracyRequest request) {
      return io.grpc.stub.ClientCalls.blockingUnaryCall(
          getChannel(), getGetAccuracyMethod(), getCallOptions(), request);
    }
  }

  /**
   * A stub to allow clients to do ListenableFuture-style rpc calls to service QuotaService.
   * <pre>
   * QuotaService decides whether an LLM call may proceed under every limit
   * that applies to it, and keeps the books once the call is done.
   * </pre>
   */
  public static final class QuotaServiceFutureStub
      extends io.grpc.stub.AbstractFutureStub<QuotaServiceFutureStub> {
    private QuotaServiceFutureStub(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      super(channel, callOptions);
    }

    @java.lang.Override
    protected QuotaServiceFutureStub build(
        io.grpc.Channel channel, io.grpc.CallOptions callOptions) {
      return new QuotaServiceFutureStub(channel, callOptions);
    }

    /**
     * <pre>
     * CheckAndReserve estimates the cost of one LLM call and reserves it
     * atomically against every applicable limit: all of them, or none.
     * </pre>
     */
    public com.google.common.util.concurrent.ListenableFuture<io.github.quotad.v1.CheckAndReserveResponse> checkAndReserve(
        io.github.quotad.v1.CheckAndReserveRequest request) {
      return io.grpc.stub.ClientCalls.futureUnaryCall(
          getChannel().newCall(getCheckAndReserveMethod(), getCallOptions()), request);
    }

    /**
     * <pre>
     * Commit reconciles a reservation with the usage the call really had:
     * the difference is refunded or charged on every limit it touched.
     * Idempotent: a repeated Commit returns the first result.
     * </pre>
     */
    public com.google.common.util.concurrent.ListenableFuture<io.github.quotad.v1.CommitResponse> commit(
        io.github.quotad.v1.CommitRequest request) {
      return io.grpc.stub.ClientCalls.futureUnaryCall(
          getChannel().newCall(getCommitMethod(), getCallOptions()), request);
    }

    /**
     * <pre>
     * Release gives a whole reservation back: the LLM call never happened.
     * Idempotent.
     * </pre>
     */
    public com.google.common.util.concurrent.ListenableFuture<io.github.quotad.v1.ReleaseResponse> release(
        io.github.quotad.v1.ReleaseRequest request) {
      return io.grpc.stub.ClientCalls.futureUnaryCall(
          getChannel().newCall(getReleaseMethod(), getCallOptions()), request);
    }

    /**
     * <pre>
     * GetUsage reports the status of every limit that applies to a caller,
     * without changing anything.
     * </pre>
     */
    public com.google.common.util.concurrent.ListenableFuture<io.github.quotad.v1.GetUsageResponse> getUsage(
        io.github.quotad.v1.GetUsageRequest request) {
      return io.grpc.stub.ClientCalls.futureUnaryCall(
          getChannel().newCall(getGetUsageMethod(), getCallOptions()), request);
    }

    /**
     * <pre>
     * CheckAndReserveBatch decides many requests in one call, for high-volume
     * callers such as gateways. Each item is decided on its own, all or nothing
     * for that item, exactly as CheckAndReserve would; one failing item never
     * fails the others. Results come back in request order. The call itself
     * fails (INVALID_ARGUMENT) only when it holds more than 1000 items.
     * </pre>
     */
    public com.google.common.util.concurrent.ListenableFuture<io.github.quotad.v1.CheckAndReserveBatchResponse> checkAndReserveBatch(
        io.github.quotad.v1.CheckAndReserveBatchRequest request) {
      return io.grpc.stub.ClientCalls.futureUnaryCall(
          getChannel().newCall(getCheckAndReserveBatchMethod(), getCallOptions()), request);
    }

    /**
     * <pre>
     * CommitBatch commits many reservations in one call, each on its own.
     * </pre>
     */
    public com.google.common.util.concurrent.ListenableFuture<io.github.quotad.v1.CommitBatchResponse> commitBatch(
        io.github.quotad.v1.CommitBatchRequest request) {
      return io.grpc.stub.ClientCalls.futureUnaryCall(
          getChannel().newCall(getCommitBatchMethod(), getCallOptions()), request);
    }

    /**
     * <pre>
     * GetAccuracy reports how far estimates were from actual usage for a model,
     * over a decaying window of the recent Commits that every replica has seen,
     * and the output reservation it has learned.
     * </pre>
     */
    public com.google.common.util.concurrent.ListenableFuture<io.github.quotad.v1.GetAccuracyResponse> getAccuracy(
        io.github.quotad.v1.GetAccuracyRequest request) {
      return io.grpc.stub.ClientCalls.futureUnaryCall(
          getChannel().newCall(getGetAccuracyMethod(), getCallOptions()), request);
    }
  }

  private static final int METHODID_CHECK_AND_RESERVE = 0;
  private static final int METHODID_COMMIT = 1;
  private static final int METHODID_RELEASE = 2;
  private static final int METHODID_GET_USAGE = 3;
  private static final int METHODID_CHECK_AND_RESERVE_BATCH = 4;
  private static final int METHODID_COMMIT_BATCH = 5;
  private static final int METHODID_GET_ACCURACY = 6;
  private static final int METHODID_CHECK_AND_RESERVE_STREAM = 7;
  private static final int METHODID_COMMIT_STREAM = 8;

  private static final class MethodHandlers<Req, Resp> implements
      io.grpc.stub.ServerCalls.UnaryMethod<Req, Resp>,
      io.grpc.stub.ServerCalls.ServerStreamingMethod<Req, Resp>,
      io.grpc.stub.ServerCalls.ClientStreamingMethod<Req, Resp>,
      io.grpc.stub.ServerCalls.BidiStreamingMethod<Req, Resp> {
    private final AsyncService serviceImpl;
    private final int methodId;

    MethodHandlers(AsyncService serviceImpl, int methodId) {
      this.serviceImpl = serviceImpl;
      this.methodId = methodId;
    }

    @java.lang.Override
    @java.lang.SuppressWarnings("unchecked")
    public void invoke(Req request, io.grpc.stub.StreamObserver<Resp> responseObserver) {
      switch (methodId) {
        case METHODID_CHECK_AND_RESERVE:
          serviceImpl.checkAndReserve((io.github.quotad.v1.CheckAndReserveRequest) request,
              (io.grpc.stub.StreamObserver<io.github.quotad.v1.CheckAndReserveResponse>) responseObserver);
          break;
        case METHODID_COMMIT:
          serviceImpl.commit((io.github.quotad.v1.CommitRequest) request,
              (io.grpc.stub.StreamObserver<io.github.quotad.v1.CommitResponse>) responseObserver);
          break;
        case METHODID_RELEASE:
          serviceImpl.release((io.github.quotad.v1.ReleaseRequest) request,
              (io.grpc.stub.StreamObserver<io.github.quotad.v1.ReleaseResponse>) responseObserver);
          break;
        case METHODID_GET_USAGE:
          serviceImpl.getUsage((io.github.quotad.v1.GetUsageRequest) request,
              (io.grpc.stub.StreamObserver<io.github.quotad.v1.GetUsageResponse>) responseObserver);
          break;
        case METHODID_CHECK_AND_RESERVE_BATCH:
          serviceImpl.checkAndReserveBatch((io.github.quotad.v1.CheckAndReserveBatchRequest) request,
              (io.grpc.stub.StreamObserver<io.github.quotad.v1.CheckAndReserveBatchResponse>) responseObserver);
          break;
        case METHODID_COMMIT_BATCH:
          serviceImpl.commitBatch((io.github.quotad.v1.CommitBatchRequest) request,
              (io.grpc.stub.StreamObserver<io.github.quotad.v1.CommitBatchResponse>) responseObserver);
          break;
        case METHODID_GET_ACCURACY:
          serviceImpl.getAccuracy((io.github.quotad.v1.GetAccuracyRequest) request,
              (io.grpc.stub.StreamObserver<io.github.quotad.v1.GetAccuracyResponse>) responseObserver);
          break;
        default:
          throw new AssertionError();
      }
    }

    @java.lang.Override
    @java.lang.SuppressWarnings("unchecked")
    public io.grpc.stub.StreamObserver<Req> invoke(
        io.grpc.stub.StreamObserver<Resp> responseObserver) {
      switch (methodId) {
        case METHODID_CHECK_AND_RESERVE_STREAM:
          return (io.grpc.stub.StreamObserver<Req>) serviceImpl.checkAndReserveStream(
              (io.grpc.stub.StreamObserver<io.github.quotad.v1.CheckAndReserveStreamResponse>) responseObserver);
        case METHODID_COMMIT_STREAM:
          return (io.grpc.stub.StreamObserver<Req>) serviceImpl.commitStream(
              (io.grpc.stub.StreamObserver<io.github.quotad.v1.CommitStreamResponse>) responseObserver);
        default:
          throw new AssertionError();
      }
    }
  }

  public static final io.grpc.ServerServiceDefinition bindService(AsyncService service) {
    return io.grpc.ServerServiceDefinition.builder(getServiceDescriptor())
        .addMethod(
          getCheckAndReserveMethod(),
          io.grpc.stub.ServerCalls.asyncUnaryCall(
            new MethodHandlers<
              io.github.quotad.v1.CheckAndReserveRequest,
              io.github.quotad.v1.CheckAndReserveResponse>(
                service, METHODID_CHECK_AND_RESERVE)))
        .addMethod(
          getCommitMethod(),
          io.grpc.stub.ServerCalls.asyncUnaryCall(
            new MethodHandlers<
              io.github.quotad.v1.CommitRequest,
              io.github.quotad.v1.CommitResponse>(
                service, METHODID_COMMIT)))
        .addMethod(
          getReleaseMethod(),
          io.grpc.stub.ServerCalls.asyncUnaryCall(
            new MethodHandlers<
              io.github.quotad.v1.ReleaseRequest,
              io.github.quotad.v1.ReleaseResponse>(
                service, METHODID_RELEASE)))
        .addMethod(
          getGetUsageMethod(),
          io.grpc.stub.ServerCalls.asyncUnaryCall(
            new MethodHandlers<
              io.github.quotad.v1.GetUsageRequest,
              io.github.quotad.v1.GetUsageResponse>(
                service, METHODID_GET_USAGE)))
        .addMethod(
          getCheckAndReserveBatchMethod(),
          io.grpc.stub.ServerCalls.asyncUnaryCall(
            new MethodHandlers<
              io.github.quotad.v1.CheckAndReserveBatchRequest,
              io.github.quotad.v1.CheckAndReserveBatchResponse>(
                service, METHODID_CHECK_AND_RESERVE_BATCH)))
        .addMethod(
          getCheckAndReserveStreamMethod(),
          io.grpc.stub.ServerCalls.asyncBidiStreamingCall(
            new MethodHandlers<
              io.github.quotad.v1.CheckAndReserveStreamRequest,
              io.github.quotad.v1.CheckAndReserveStreamResponse>(
                service, METHODID_CHECK_AND_RESERVE_STREAM)))
        .addMethod(
          getCommitBatchMethod(),
          io.grpc.stub.ServerCalls.asyncUnaryCall(
            new MethodHandlers<
              io.github.quotad.v1.CommitBatchRequest,
              io.github.quotad.v1.CommitBatchResponse>(
                service, METHODID_COMMIT_BATCH)))
        .addMethod(
          getCommitStreamMethod(),
          io.grpc.stub.ServerCalls.asyncBidiStreamingCall(
            new MethodHandlers<
              io.github.quotad.v1.CommitStreamRequest,
              io.github.quotad.v1.CommitStreamResponse>(
                service, METHODID_COMMIT_STREAM)))
        .addMethod(
          getGetAccuracyMethod(),
          io.grpc.stub.ServerCalls.asyncUnaryCall(
            new MethodHandlers<
              io.github.quotad.v1.GetAccuracyRequest,
              io.github.quotad.v1.GetAccuracyResponse>(
                service, METHODID_GET_ACCURACY)))
        .build();
  }

  private static abstract class QuotaServiceBaseDescriptorSupplier
      implements io.grpc.protobuf.ProtoFileDescriptorSupplier, io.grpc.protobuf.ProtoServiceDescriptorSupplier {
    QuotaServiceBaseDescriptorSupplier() {}

    @java.lang.Override
    public com.google.protobuf.Descriptors.FileDescriptor getFileDescriptor() {
      return io.github.quotad.v1.QuotaProto.getDescriptor();
    }

    @java.lang.Override
    public com.google.protobuf.Descriptors.ServiceDescriptor getServiceDescriptor() {
      return getFileDescriptor().findServiceByName("QuotaService");
    }
  }

  private static final class QuotaServiceFileDescriptorSupplier
      extends QuotaServiceBaseDescriptorSupplier {
    QuotaServiceFileDescriptorSupplier() {}
  }

  private static final class QuotaServiceMethodDescriptorSupplier
      extends QuotaServiceBaseDescriptorSupplier
      implements io.grpc.protobuf.ProtoMethodDescriptorSupplier {
    private final java.lang.String methodName;

    QuotaServiceMethodDescriptorSupplier(java.lang.String methodName) {
      this.methodName = methodName;
    }

    @java.lang.Override
    public com.google.protobuf.Descriptors.MethodDescriptor getMethodDescriptor() {
      return getServiceDescriptor().findMethodByName(methodName);
    }
  }

  private static volatile io.grpc.ServiceDescriptor serviceDescriptor;

  public static io.grpc.ServiceDescriptor getServiceDescriptor() {
    io.grpc.ServiceDescriptor result = serviceDescriptor;
    if (result == null) {
      synchronized (QuotaServiceGrpc.class) {
        result = serviceDescriptor;
        if (result == null) {
          serviceDescriptor = result = io.grpc.ServiceDescriptor.newBuilder(SERVICE_NAME)
              .setSchemaDescriptor(new QuotaServiceFileDescriptorSupplier())
              .addMethod(getCheckAndReserveMethod())
              .addMethod(getCommitMethod())
              .addMethod(getReleaseMethod())
              .addMethod(getGetUsageMethod())
              .addMethod(getCheckAndReserveBatchMethod())
              .addMethod(getCheckAndReserveStreamMethod())
              .addMethod(getCommitBatchMethod())
              .addMethod(getCommitStreamMethod())
              .addMethod(getGetAccuracyMethod())
              .build();
        }
      }
    }
    return result;
  }
}
