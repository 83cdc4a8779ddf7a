//go:build unix

package quotad_test

// A real Redis outage during Reserve: quotad's Redis is paused (SIGSTOP: its connections stay
// open and nothing is answered), so quotad answers UNAVAILABLE, and it is resumed once that
// has been seen. Needs $QUOTAD_REDIS_PID, the pid of that Redis (`make test` sets it).

import (
	"context"
	"os"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	quotadv1 "github.com/quotad-dev/quotad/clients/go/gen/quotad/v1"
	"github.com/quotad-dev/quotad/clients/go/quotad"
)

// outageDeadline is the call's deadline: far longer than the pause, reached only if broken.
const outageDeadline = 60 * time.Second

// attempt is one try of a call, as a client interceptor saw it (the client retries by calling
// again, so every attempt passes through the interceptor).
type attempt struct {
	method         string
	code           codes.Code
	idempotencyKey string
	deadline       time.Time
}

// attemptLog records every attempt, and closes unavailable at the first UNAVAILABLE answer.
type attemptLog struct {
	mu          sync.Mutex
	attempts    []attempt
	once        sync.Once
	unavailable chan struct{}
}

func (l *attemptLog) intercept(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn,
	invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
	err := invoker(ctx, method, req, reply, cc, opts...)
	seen := attempt{method: method, code: status.Code(err)}
	seen.deadline, _ = ctx.Deadline()
	if r, ok := req.(*quotadv1.CheckAndReserveRequest); ok {
		seen.idempotencyKey = r.GetIdempotencyKey()
	}
	l.mu.Lock()
	l.attempts = append(l.attempts, seen)
	l.mu.Unlock()
	if seen.code == codes.Unavailable {
		l.once.Do(func() { close(l.unavailable) })
	}
	return err
}

func (l *attemptLog) of(method string) []attempt {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []attempt
	for _, a := range l.attempts {
		if a.method == method {
			out = append(out, a)
		}
	}
	return out
}

func redisPID(t *testing.T) int {
	t.Helper()
	pid, err := strconv.Atoi(os.Getenv("QUOTAD_REDIS_PID"))
	if err != nil || pid <= 0 {
		t.Fatal("QUOTAD_REDIS_PID is not set: this test pauses the Redis of the quotad at $QUOTAD_ADDR (`make test` sets both)")
	}
	return pid
}

func sendSignal(t *testing.T, pid int, sig syscall.Signal) {
	t.Helper()
	if err := syscall.Kill(pid, sig); err != nil {
		t.Fatalf("kill -%v %d: %v", sig, pid, err)
	}
}

func TestReserveRetriesThroughARedisOutage(t *testing.T) {
	pid := redisPID(t)
	calls := &attemptLog{unavailable: make(chan struct{})}
	client, err := quotad.Dial(os.Getenv("QUOTAD_ADDR"),
		quotad.WithTimeout(outageDeadline),
		quotad.WithDialOptions(grpc.WithChainUnaryInterceptor(calls.intercept)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	subject := unique("go-outage")

	type result struct {
		decision *quotad.Decision
		err      error
	}
	done := make(chan result, 1)
	sendSignal(t, pid, syscall.SIGSTOP)
	resumed := false
	resume := func() {
		if !resumed {
			resumed = true
			sendSignal(t, pid, syscall.SIGCONT)
		}
	}
	defer resume() // whatever happens below, Redis runs again
	go func() {
		d, err := client.Reserve(context.Background(), quotad.ReserveRequest{
			Subject: subject, Model: model, InputTokens: 100, MaxOutputTokens: 50,
		})
		done <- result{d, err}
	}()
	select {
	case <-calls.unavailable: // quotad could not decide: the client is now retrying
	case r := <-done:
		t.Fatalf("Reserve ended before quotad answered UNAVAILABLE: %v, %v", r.decision, r.err)
	case <-time.After(outageDeadline):
		t.Fatalf("quotad did not answer UNAVAILABLE within %v", outageDeadline)
	}
	resume()
	r := <-done
	if r.err != nil {
		t.Fatalf("Reserve did not get through once Redis was back: %v", r.err)
	}
	if !r.decision.Allowed {
		t.Fatalf("expected an allowed reservation, got %v", r.decision)
	}

	reserves := calls.of(quotadv1.QuotaService_CheckAndReserve_FullMethodName)
	if len(reserves) < 2 || reserves[0].code != codes.Unavailable || reserves[len(reserves)-1].code != codes.OK {
		t.Fatalf("expected UNAVAILABLE, then retries until OK; got %+v", reserves)
	}
	codesSeen := make([]codes.Code, len(reserves))
	for i, a := range reserves {
		codesSeen[i] = a.code
	}
	t.Logf("CheckAndReserve attempts through the outage: %v", codesSeen)
	for _, a := range reserves {
		if a.idempotencyKey == "" || a.idempotencyKey != reserves[0].idempotencyKey {
			t.Fatalf("every attempt must send the call's one idempotency key: %+v", reserves)
		}
		if !a.deadline.Equal(reserves[0].deadline) {
			t.Fatalf("every attempt must share the call's one deadline: %+v", reserves)
		}
	}

	// Exactly one reservation holds: 150 tokens and one slot (Replayed says whether an attempt
	// that was answered UNAVAILABLE had reserved after all; either way it counts once).
	usage, err := client.Usage(context.Background(), quotad.UsageRequest{Subject: subject, Model: model})
	if err != nil {
		t.Fatal(err)
	}
	left := quotad.Remaining(usage)
	if left["tokens-per-day"] != 850 || left["in-flight"] != 1 {
		t.Fatalf("expected one reservation (850 tokens-per-day, 1 in-flight left), got %v", left)
	}
	if _, err := client.Release(context.Background(), r.decision.ReservationID); err != nil {
		t.Fatal(err)
	}
}
