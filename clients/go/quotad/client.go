// Package quotad is a thin Go client for quotad, the quota-decision service for LLM calls.
//
// Ask Reserve before an LLM call; a denial is a value (Decision.Allowed == false), not an
// error. Then Commit the call's actual usage, or Release the reservation when the call
// never happened. Error statuses come back as *Error, which carries the gRPC code and the
// server's field violations for INVALID_ARGUMENT.
//
// Every call is retried when quotad answers UNAVAILABLE (its Redis was slow or down, or the
// answer was lost), with jittered exponential backoff, until the call's deadline: the
// context's, or DefaultTimeout. The retries are safe: Reserve sends one idempotency key on
// every attempt, so a retry of a reservation that was made after all returns it (Replayed);
// Commit and Release are idempotent; Usage changes nothing.
//
// A Reserve with a ServerWait may wait that long in quotad's waiting line, so the deadline it
// gets when its context has none is the client's timeout plus the ServerWait; a retry asks only
// for what is left of the wait.
//
// TLS, a client certificate (mutual TLS) and a bearer token: WithTLSFiles (or WithTLS) and
// WithToken.
//
// The generated stubs are in github.com/quotad-dev/quotad/clients/go/gen/quotad/v1.
package quotad

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	mathrand "math/rand/v2"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	quotadv1 "github.com/quotad-dev/quotad/clients/go/gen/quotad/v1"
)

// DefaultTimeout is the deadline of a call whose context has none: all of its attempts and the
// backoff between them. quotad answers UNAVAILABLE within its Redis timeout (250 ms by
// default), so two seconds ride out a Redis hiccup of about a second and still fail fast
// enough to fail open or closed.
const DefaultTimeout = 2 * time.Second

// RetryPolicy says how a call that quotad answered UNAVAILABLE is tried again. The client
// retries itself rather than through gRPC's retry service config, which caps a call at five
// attempts whatever its deadline, and does not apply to a connection passed to New.
type RetryPolicy struct {
	// MaxAttempts caps the attempts of one call, the first included; 0: as many as fit before
	// the deadline.
	MaxAttempts int
	// InitialBackoff is the backoff before the first retry (zero: 50 ms). It doubles for each
	// next retry, up to MaxBackoff (zero: one second); each sleep is 50 to 100 % of it, at random.
	InitialBackoff time.Duration
	MaxBackoff     time.Duration
}

// DefaultRetryPolicy retries until the deadline, from 50 ms up to one second between attempts.
var DefaultRetryPolicy = RetryPolicy{InitialBackoff: 50 * time.Millisecond, MaxBackoff: time.Second}

// Client calls one quotad. It is safe for concurrent use.
type Client struct {
	conn    *grpc.ClientConn // nil when the caller owns the connection
	stub    quotadv1.QuotaServiceClient
	timeout time.Duration
	retry   RetryPolicy
}

// Option configures Dial.
type Option func(*settings)

type settings struct {
	timeout        time.Duration
	retry          RetryPolicy
	dialOptions    []grpc.DialOption
	tlsFiles       *TLSFiles
	tlsConfig      *tls.Config
	token          func(context.Context) (string, error)
	plaintextToken bool
}

// WithTimeout sets the deadline of each call whose context has none (default DefaultTimeout),
// all of its attempts included; a Reserve with a ServerWait gets that much longer. Zero or less:
// no deadline but the context's (and without one, UNAVAILABLE is retried until the context is
// cancelled, unless RetryPolicy.MaxAttempts caps it).
func WithTimeout(d time.Duration) Option { return func(s *settings) { s.timeout = d } }

// WithRetry sets how UNAVAILABLE is retried (default DefaultRetryPolicy).
func WithRetry(p RetryPolicy) Option { return func(s *settings) { s.retry = p } }

// WithDialOptions adds gRPC dial options: interceptors, keepalive, grpc.WithAuthority, other
// transport (grpc.WithTransportCredentials) or per-RPC credentials. TLS and tokens have options
// of their own (WithTLSFiles, WithTLS, WithToken); without any, the connection is plaintext.
func WithDialOptions(opts ...grpc.DialOption) Option {
	return func(s *settings) { s.dialOptions = append(s.dialOptions, opts...) }
}

// Dial returns a Client for target ("host:port"); it connects lazily. Close it when done. It
// returns an error for TLS files that do not load, and for a token over plaintext (unless
// WithPlaintextToken).
func Dial(target string, opts ...Option) (*Client, error) {
	s := settings{timeout: DefaultTimeout, retry: DefaultRetryPolicy}
	for _, opt := range opts {
		opt(&s)
	}
	dialOptions, err := s.transportOptions()
	if err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient(target, append(dialOptions, s.dialOptions...)...)
	if err != nil && s.token != nil && strings.Contains(err.Error(), "transport level security") {
		return nil, fmt.Errorf("quotad: a bearer token over plaintext would travel in the clear "+
			"(WithTLSFiles or WithTLS; or WithPlaintextToken where the network is trusted): %w", err)
	}
	if err != nil {
		return nil, fmt.Errorf("quotad: %w", err)
	}
	return &Client{
		conn: conn, stub: quotadv1.NewQuotaServiceClient(conn), timeout: s.timeout, retry: s.retry.withDefaults(),
	}, nil
}

// New wraps a connection the caller made (and closes); calls retry as DefaultRetryPolicy says.
func New(conn grpc.ClientConnInterface, timeout time.Duration) *Client {
	return &Client{stub: quotadv1.NewQuotaServiceClient(conn), timeout: timeout, retry: DefaultRetryPolicy.withDefaults()}
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
	// IdempotencyKey makes retries safe; empty: one is generated for this call, and every
	// attempt of the call sends it. Set your own to retry past the call's deadline yourself.
	IdempotencyKey string
	// Priority orders shared (tenant and global) capacity and the waiting line; unspecified
	// (the zero value): the tier's default.
	Priority quotadv1.Priority
	// ServerWait is how long quotad may hold the request in its waiting line (in priority, then
	// arrival order) and admit it as soon as it fits, instead of denying it at once; bounded by
	// the policy's waiting.max_wait (CheckAndReserveRequest.max_wait). Zero: decided at once.
	// Without a deadline of ctx's own, the call's deadline is the client's timeout plus
	// ServerWait, so the wait is not cut short; a retry after UNAVAILABLE asks only for what is
	// left of it. A deadline of ctx's own still wins: give it room for the wait.
	ServerWait time.Duration
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
	// Replayed: the idempotency key matched an earlier reservation, which is returned; e.g. an
	// attempt that quotad answered UNAVAILABLE had reserved after all. It is charged once.
	Replayed bool
	// Denied only: the binding limit, why, and when the same request fits
	// (RetryAfter is zero when it never can: DenyReason is DENY_REASON_EXCEEDS_CAPACITY).
	BindingLimit string
	DenyReason   quotadv1.DenyReason
	RetryAfter   time.Duration
	// Remaining units per limit name, after this request when allowed, before it when denied.
	Remaining map[string]int64
	// Waited is how long the request waited in quotad's line before this answer.
	Waited   time.Duration
	Response *quotadv1.CheckAndReserveResponse
}

// Reserve asks whether a call may go ahead and reserves its estimated cost on every limit.
// UNAVAILABLE is retried with the same idempotency key until the call's deadline (see the
// package doc). With r.ServerWait, quotad holds a request that does not fit yet in its waiting
// line and answers when it is admitted or when the wait is over.
func (c *Client) Reserve(ctx context.Context, r ReserveRequest) (*Decision, error) {
	request := &quotadv1.CheckAndReserveRequest{
		Subject:         r.Subject,
		Tenant:          r.Tenant,
		Tier:            r.Tier,
		Model:           r.Model,
		InputTokens:     r.InputTokens,
		MaxOutputTokens: r.MaxOutputTokens,
		IdempotencyKey:  r.IdempotencyKey,
		Priority:        r.Priority,
	}
	if request.IdempotencyKey == "" {
		request.IdempotencyKey = newIdempotencyKey()
	}
	if r.Lease != 0 {
		request.Lease = durationpb.New(r.Lease)
	}
	if r.ServerWait != 0 {
		request.MaxWait = durationpb.New(r.ServerWait) // quotad refuses a negative one: INVALID_ARGUMENT
	}
	ctx, cancel := c.deadline(ctx, max(r.ServerWait, 0))
	defer cancel()
	response, err := invoke(ctx, c, c.checkAndReserve(r.ServerWait), request)
	if err != nil {
		return nil, err
	}
	decision := &Decision{
		Allowed:       response.GetDecision() == quotadv1.Decision_DECISION_ALLOWED,
		ReservationID: response.GetReservationId(),
		Reserved:      cost(response.GetReserved()),
		Replayed:      response.GetReplayed(),
		BindingLimit:  response.GetBindingLimit(),
		DenyReason:    response.GetDenyReason(),
		Remaining:     remaining(response.GetLimits()),
		Waited:        response.GetWaited().AsDuration(),
		Response:      response,
	}
	if response.GetRetryAfter() != nil {
		decision.RetryAfter = response.GetRetryAfter().AsDuration()
	}
	return decision, nil
}

// checkAndReserve makes the attempts of one CheckAndReserve. With a server wait, the wait ends
// at the same time however many attempts it takes: a retry asks for what is left of it, so its
// answer still comes before the call's deadline (with the same idempotency key: the same
// reservation, if an earlier attempt made one).
func (c *Client) checkAndReserve(serverWait time.Duration) func(
	context.Context, *quotadv1.CheckAndReserveRequest, ...grpc.CallOption,
) (*quotadv1.CheckAndReserveResponse, error) {
	if serverWait <= 0 {
		return c.stub.CheckAndReserve
	}
	waitEnds, retry := time.Now().Add(serverWait), false
	return func(ctx context.Context, request *quotadv1.CheckAndReserveRequest, opts ...grpc.CallOption) (*quotadv1.CheckAndReserveResponse, error) {
		if retry {
			request = proto.Clone(request).(*quotadv1.CheckAndReserveRequest)
			request.MaxWait = durationpb.New(min(serverWait, max(time.Until(waitEnds), 0)))
		}
		retry = true
		return c.stub.CheckAndReserve(ctx, request, opts...)
	}
}

// Commit settles a reservation with the tokens the call really used.
func (c *Client) Commit(ctx context.Context, reservationID string, inputTokens, outputTokens int64) (*quotadv1.CommitResponse, error) {
	return invoke(ctx, c, c.stub.Commit, &quotadv1.CommitRequest{
		ReservationId: reservationID, InputTokens: inputTokens, OutputTokens: outputTokens,
	})
}

// Release gives a reservation back: the call never happened.
func (c *Client) Release(ctx context.Context, reservationID string) (*quotadv1.ReleaseResponse, error) {
	return invoke(ctx, c, c.stub.Release, &quotadv1.ReleaseRequest{ReservationId: reservationID})
}

// UsageRequest names a caller whose limits to report.
type UsageRequest struct {
	Subject, Tenant, Tier, Model string
}

// Usage reports every limit that applies to a caller, changing nothing.
func (c *Client) Usage(ctx context.Context, r UsageRequest) (*quotadv1.GetUsageResponse, error) {
	return invoke(ctx, c, c.stub.GetUsage, &quotadv1.GetUsageRequest{
		Subject: r.Subject, Tenant: r.Tenant, Tier: r.Tier, Model: r.Model,
	})
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

// invoke makes one logical call: one deadline for all of its attempts, and UNAVAILABLE retried
// with backoff until it. Every attempt sends the same request (so the same idempotency key).
func invoke[Req, Resp any](
	ctx context.Context, c *Client, rpc func(context.Context, Req, ...grpc.CallOption) (Resp, error), request Req,
) (Resp, error) {
	ctx, cancel := c.deadline(ctx, 0)
	defer cancel()
	backoff := c.retry.InitialBackoff
	for attempt := 1; ; attempt++ {
		response, err := rpc(ctx, request)
		if status.Code(err) != codes.Unavailable || (c.retry.MaxAttempts > 0 && attempt >= c.retry.MaxAttempts) {
			return response, wrap(err)
		}
		sleep := backoff/2 + mathrand.N(backoff/2+1) // 50 to 100 %: clients that failed together spread out
		if deadline, ok := ctx.Deadline(); ok && time.Until(deadline) <= sleep {
			return response, wrap(err) // the next attempt would have no time left
		}
		timer := time.NewTimer(sleep)
		select {
		case <-ctx.Done():
			timer.Stop()
			return response, wrap(err)
		case <-timer.C:
		}
		backoff = min(2*backoff, c.retry.MaxBackoff)
	}
}

func (p RetryPolicy) withDefaults() RetryPolicy {
	if p.InitialBackoff <= 0 {
		p.InitialBackoff = DefaultRetryPolicy.InitialBackoff
	}
	if p.MaxBackoff <= 0 {
		p.MaxBackoff = DefaultRetryPolicy.MaxBackoff
	}
	p.MaxBackoff = max(p.MaxBackoff, p.InitialBackoff)
	return p
}

// deadline gives ctx the client's timeout plus extra, unless it has a deadline of its own (or
// the client has no timeout).
func (c *Client) deadline(ctx context.Context, extra time.Duration) (context.Context, context.CancelFunc) {
	if _, ok := ctx.Deadline(); ok || c.timeout <= 0 {
		return ctx, func() {}
	}
	return context.WithTimeout(ctx, c.timeout+extra)
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
