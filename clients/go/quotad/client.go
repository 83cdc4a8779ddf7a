// Package quotad is a thin Go client for quotad, the quota-decision service for LLM calls.
//
// Ask Reserve before an LLM call; a denial is a value (Decision.Allowed == false), not an
// error. Then Commit the call's actual usage, or Release the reservation when the call
// never happened. Error statuses come back as *Error, which carries the gRPC code and the
// server's field violations for INVALID_ARGUMENT.
//
// The generated stubs are in github.com/quotad/quotad/clients/go/gen/quotad/v1.
package quotad

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	quotadv1 "github.com/quotad/quotad/clients/go/gen/quotad/v1"
)

// DefaultTimeout bounds each call that has no earlier deadline in its context.
const DefaultTimeout = time.Second

// RetryServiceConfig retries UNAVAILABLE up to twice with backoff. Safe for every method:
// Reserve always sends an idempotency key, Commit and Release are idempotent on the server,
// GetUsage changes nothing.
const RetryServiceConfig = `{"methodConfig": [{
  "name": [{"service": "quotad.v1.QuotaService"}],
  "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.05s", "maxBackoff": "1s",
                  "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}]}`

// Client calls one quotad. It is safe for concurrent use.
type Client struct {
	conn    *grpc.ClientConn // nil when the caller owns the connection
	stub    quotadv1.QuotaServiceClient
	timeout time.Duration
}

// Option configures Dial.
type Option func(*settings)

type settings struct {
	timeout     time.Duration
	dialOptions []grpc.DialOption
}

// WithTimeout sets the deadline of each call whose context has none (default one second).
func WithTimeout(d time.Duration) Option { return func(s *settings) { s.timeout = d } }

// WithDialOptions adds gRPC dial options: TLS (grpc.WithTransportCredentials), auth
// (grpc.WithPerRPCCredentials), interceptors, keepalive. Without transport credentials
// the connection is plaintext.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(s *settings) { s.dialOptions = append(s.dialOptions, opts...) }
}

// Dial returns a Client for target ("host:port"); it connects lazily. Close it when done.
func Dial(target string, opts ...Option) (*Client, error) {
	s := settings{timeout: DefaultTimeout}
	for _, opt := range opts {
		opt(&s)
	}
	dialOptions := append([]grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultServiceConfig(RetryServiceConfig),
	}, s.dialOptions...)
	conn, err := grpc.NewClient(target, dialOptions...)
	if err != nil {
		return nil, fmt.Errorf("quotad: %w", err)
	}
	return &Client{conn: conn, stub: quotadv1.NewQuotaServiceClient(conn), timeout: s.timeout}, nil
}

// New wraps a connection the caller made (and closes).
func New(conn grpc.ClientConnInterface, timeout time.Duration) *Client {
	return &Client{stub: quotadv1.NewQuotaServiceClient(conn), timeout: timeout}
}

// Close closes the connection Dial opened.
func (c *Client) Close() error {
	if c.conn == nil {
		return nil
	}
	return c.conn.Close()
}

// ReserveRequest describes one LLM call about to be made (see CheckAndReserveRequest).
type ReserveRequest struct {
	Subject         string
	Tenant          string // empty: the policy's default
	Tier            string // empty: the policy's default
	Model           string
	InputTokens     int64
	MaxOutputTokens int64
	Lease           time.Duration // zero: the policy's default
	// IdempotencyKey makes retries safe; empty: one is generated for this call.
	IdempotencyKey string
}

// Cost is an amount of requests and tokens.
type Cost struct {
	Requests     int64
	InputTokens  int64
	OutputTokens int64
}

// Decision is the answer to Reserve. A denial is a Decision with Allowed false.
type Decision struct {
	Allowed       bool
	ReservationID string // set when allowed
	Reserved      Cost   // set when allowed
	Replayed      bool   // the idempotency key matched an earlier reservation
	// Denied only: the binding limit, why, and when the same request fits
	// (RetryAfter is zero when it never can: DenyReason is DENY_REASON_EXCEEDS_CAPACITY).
	BindingLimit string
	DenyReason   quotadv1.DenyReason
	RetryAfter   time.Duration
	// Remaining units per limit name, after this request when allowed, before it when denied.
	Remaining map[string]int64
	Response  *quotadv1.CheckAndReserveResponse
}

// Reserve asks whether a call may go ahead and reserves its estimated cost on every limit.
func (c *Client) Reserve(ctx context.Context, r ReserveRequest) (*Decision, error) {
	request := &quotadv1.CheckAndReserveRequest{
		Subject:         r.Subject,
		Tenant:          r.Tenant,
		Tier:            r.Tier,
		Model:           r.Model,
		InputTokens:     r.InputTokens,
		MaxOutputTokens: r.MaxOutputTokens,
		IdempotencyKey:  r.IdempotencyKey,
	}
	if request.IdempotencyKey == "" {
		request.IdempotencyKey = newIdempotencyKey()
	}
	if r.Lease != 0 {
		request.Lease = durationpb.New(r.Lease)
	}
	ctx, cancel := c.deadline(ctx)
	defer cancel()
	response, err := c.stub.CheckAndReserve(ctx, request)
	if err != nil {
		return nil, wrap(err)
	}
	decision := &Decision{
		Allowed:       response.GetDecision() == quotadv1.Decision_DECISION_ALLOWED,
		ReservationID: response.GetReservationId(),
		Reserved:      cost(response.GetReserved()),
		Replayed:      response.GetReplayed(),
		BindingLimit:  response.GetBindingLimit(),
		DenyReason:    response.GetDenyReason(),
		Remaining:     remaining(response.GetLimits()),
		Response:      response,
	}
	if response.GetRetryAfter() != nil {
		decision.RetryAfter = response.GetRetryAfter().AsDuration()
	}
	return decision, nil
}

// Commit settles a reservation with the tokens the call really used.
func (c *Client) Commit(ctx context.Context, reservationID string, inputTokens, outputTokens int64) (*quotadv1.CommitResponse, error) {
	ctx, cancel := c.deadline(ctx)
	defer cancel()
	response, err := c.stub.Commit(ctx, &quotadv1.CommitRequest{
		ReservationId: reservationID, InputTokens: inputTokens, OutputTokens: outputTokens,
	})
	return response, wrap(err)
}

// Release gives a reservation back: the call never happened.
func (c *Client) Release(ctx context.Context, reservationID string) (*quotadv1.ReleaseResponse, error) {
	ctx, cancel := c.deadline(ctx)
	defer cancel()
	response, err := c.stub.Release(ctx, &quotadv1.ReleaseRequest{ReservationId: reservationID})
	return response, wrap(err)
}

// UsageRequest names a caller whose limits to report.
type UsageRequest struct {
	Subject, Tenant, Tier, Model string
}

// Usage reports every limit that applies to a caller, changing nothing.
func (c *Client) Usage(ctx context.Context, r UsageRequest) (*quotadv1.GetUsageResponse, error) {
	ctx, cancel := c.deadline(ctx)
	defer cancel()
	response, err := c.stub.GetUsage(ctx, &quotadv1.GetUsageRequest{
		Subject: r.Subject, Tenant: r.Tenant, Tier: r.Tier, Model: r.Model,
	})
	return response, wrap(err)
}

// Remaining maps each limit's name to its remaining units.
func Remaining(response *quotadv1.GetUsageResponse) map[string]int64 {
	return remaining(response.GetLimits())
}

// FieldViolation is one bad field of a request, as the server named it.
type FieldViolation struct {
	Field       string
	Description string
}

// Error is an error status from quotad (or from the way to it).
type Error struct {
	Code            codes.Code
	Message         string
	FieldViolations []FieldViolation // INVALID_ARGUMENT: google.rpc.BadRequest from the server
	err             error
}

func (e *Error) Error() string { return fmt.Sprintf("quotad: %s: %s", e.Code, e.Message) }

// Unwrap returns the gRPC status error.
func (e *Error) Unwrap() error { return e.err }

// Code returns the gRPC code of err: codes.OK for nil, codes.Unknown for a non-quotad error.
func Code(err error) codes.Code {
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return status.Code(err)
}

func wrap(err error) error {
	if err == nil {
		return nil
	}
	st, ok := status.FromError(err)
	if !ok {
		return err
	}
	e := &Error{Code: st.Code(), Message: st.Message(), err: err}
	for _, detail := range st.Details() {
		if badRequest, ok := detail.(*errdetails.BadRequest); ok {
			for _, v := range badRequest.GetFieldViolations() {
				e.FieldViolations = append(e.FieldViolations, FieldViolation{v.GetField(), v.GetDescription()})
			}
		}
	}
	return e
}

func (c *Client) deadline(ctx context.Context) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok || c.timeout <= 0 {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, c.timeout)
}

func cost(c *quotadv1.Cost) Cost {
	return Cost{Requests: c.GetRequests(), InputTokens: c.GetInputTokens(), OutputTokens: c.GetOutputTokens()}
}

func remaining(limits []*quotadv1.LimitStatus) map[string]int64 {
	out := make(map[string]int64, len(limits))
	for _, limit := range limits {
		out[limit.GetName()] = limit.GetRemaining()
	}
	return out
}

func newIdempotencyKey() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on supported platforms
	return hex.EncodeToString(b[:])
}

// String describes a decision in one line, e.g. for logs.
func (d *Decision) String() string {
	if d.Allowed {
		return "allowed " + d.ReservationID
	}
	reason := strings.TrimPrefix(d.DenyReason.String(), "DENY_REASON_")
	if d.RetryAfter > 0 {
		return fmt.Sprintf("denied by %s (%s), retry after %s", d.BindingLimit, reason, d.RetryAfter)
	}
	return fmt.Sprintf("denied by %s (%s)", d.BindingLimit, reason)
}
