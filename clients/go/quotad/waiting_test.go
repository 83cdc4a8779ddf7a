package quotad_test

// Server-side waiting (ReserveRequest.ServerWait) against a live quotad at $QUOTAD_ADDR serving
// tests/conformance/policy.yaml, whose tier "wait" has one limit: one reservation at a time. One
// reservation holds the slot, so the next waits in quotad's line; the tests free the slot once
// that request has a place in the line (read from quotad's Redis at $QUOTAD_REDIS_ADDR), so no
// step depends on how fast the machine is.

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	quotadv1 "github.com/quotad-dev/quotad/clients/go/gen/quotad/v1"
	"github.com/quotad-dev/quotad/clients/go/quotad"
)

const waitTier = "wait"

// countPlaces counts the places in the waiting lines whose keys match ARGV[1]: each limit's
// line is a sorted set, its key the limit's key plus ":q".
const countPlaces = "local n = 0 for _, line in ipairs(redis.call('KEYS', ARGV[1])) do n = n + redis.call('ZCARD', line) end return n"

// placesInLine counts the places taken in the waiting lines of subject's limits, with one EVAL
// over a plain connection to quotad's Redis (the tests need no Redis client).
func placesInLine(t *testing.T, subject string) int64 {
	t.Helper()
	addr := os.Getenv("QUOTAD_REDIS_ADDR")
	if addr == "" {
		t.Fatal("QUOTAD_REDIS_ADDR is not set: the Redis of the quotad at $QUOTAD_ADDR (`make test` sets it)")
	}
	conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	args := []string{"EVAL", countPlaces, "0", "*:" + subject + ":*:q"}
	command := fmt.Sprintf("*%d\r\n", len(args))
	for _, arg := range args {
		command += fmt.Sprintf("$%d\r\n%s\r\n", len(arg), arg)
	}
	if _, err := conn.Write([]byte(command)); err != nil {
		t.Fatal(err)
	}
	reply, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	reply = strings.TrimSuffix(reply, "\r\n")
	n, err := strconv.ParseInt(strings.TrimPrefix(reply, ":"), 10, 64)
	if !strings.HasPrefix(reply, ":") || err != nil {
		t.Fatalf("Redis answered %q", reply)
	}
	return n
}

// reserveResult is what a Reserve under way came to.
type reserveResult struct {
	decision *quotad.Decision
	err      error
}

// startReserve runs Reserve in the background; it returns when the call began (just before
// the call sets its deadline), and the channel gets the call's result.
func startReserve(client *quotad.Client, r quotad.ReserveRequest) (time.Time, <-chan reserveResult) {
	began, done := make(chan time.Time, 1), make(chan reserveResult, 1)
	go func() {
		began <- time.Now()
		decision, err := client.Reserve(context.Background(), r)
		done <- reserveResult{decision, err}
	}()
	return <-began, done
}

// untilWaitingInLine returns once a request of subject has a place in a waiting line; it fails
// if the waiting Reserve ends first.
func untilWaitingInLine(t *testing.T, subject string, waiting <-chan reserveResult) {
	t.Helper()
	giveUp := time.Now().Add(30 * time.Second)
	for placesInLine(t, subject) == 0 {
		select {
		case result := <-waiting:
			t.Fatalf("the waiting Reserve ended before it waited in line: %v, %v", result.decision, result.err)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(giveUp) {
			t.Fatal("the Reserve did not wait in line within 30 s")
		}
	}
}

// connectedClient is a client with the default deadline, connected by a first call that has all
// the time it needs (a first call also connects, which may take long on a loaded machine).
func connectedClient(t *testing.T) *quotad.Client {
	t.Helper()
	addr := os.Getenv("QUOTAD_ADDR")
	if addr == "" {
		t.Fatal("QUOTAD_ADDR is not set: these tests need a live quotad serving tests/conformance/policy.yaml (`make test` starts one)")
	}
	client, err := quotad.Dial(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := client.Usage(ctx, quotad.UsageRequest{Subject: unique("go-connect"), Tier: waitTier, Model: model}); err != nil {
		t.Fatal(err)
	}
	return client
}

// holdTheSlot reserves the tier's only slot for subject.
func holdTheSlot(t *testing.T, client *quotad.Client, subject string) *quotad.Decision {
	t.Helper()
	holder, err := client.Reserve(context.Background(), quotad.ReserveRequest{Subject: subject, Tier: waitTier, Model: model, MaxOutputTokens: 10})
	if err != nil || !holder.Allowed {
		t.Fatalf("holding the slot: %v, %v", holder, err)
	}
	return holder
}

func release(t *testing.T, client *quotad.Client, reservationID string) {
	t.Helper()
	if _, err := client.Release(context.Background(), reservationID); err != nil {
		t.Fatal(err)
	}
}

func TestServerWaitIsAdmittedWhenCapacityFrees(t *testing.T) {
	client, subject := connectedClient(t), unique("go-wait")
	holder := holdTheSlot(t, client, subject)

	_, waiting := startReserve(client, quotad.ReserveRequest{
		Subject: subject, Tier: waitTier, Model: model, MaxOutputTokens: 10,
		Priority: quotadv1.Priority_PRIORITY_HIGH, ServerWait: 3 * time.Second,
	})
	untilWaitingInLine(t, subject, waiting)
	release(t, client, holder.ReservationID)

	result := <-waiting
	if result.err != nil || !result.decision.Allowed {
		t.Fatalf("expected the waiter to be admitted, got %v, %v", result.decision, result.err)
	}
	if result.decision.Waited <= 0 {
		t.Fatalf("admitted after waiting %s", result.decision.Waited)
	}
	if got := result.decision.Response.GetPriority(); got != quotadv1.Priority_PRIORITY_HIGH {
		t.Fatalf("decided at priority %s, want PRIORITY_HIGH", got)
	}
	release(t, client, result.decision.ReservationID)
}

// Capacity frees only after the default deadline (2 s) has passed: a call whose deadline were not
// lengthened by its 5 s server wait would fail DeadlineExceeded before then.
func TestServerWaitLongerThanTheDefaultDeadlineIsNotCutOff(t *testing.T) {
	client, subject := connectedClient(t), unique("go-long-wait")
	holder := holdTheSlot(t, client, subject)

	began, waiting := startReserve(client, quotad.ReserveRequest{
		Subject: subject, Tier: waitTier, Model: model, MaxOutputTokens: 10, ServerWait: 5 * time.Second,
	})
	untilWaitingInLine(t, subject, waiting)
	select {
	case result := <-waiting:
		t.Fatalf("the waiting Reserve ended after %s: %v, %v", time.Since(began), result.decision, result.err)
	case <-time.After(time.Until(began.Add(quotad.DefaultTimeout + 500*time.Millisecond))):
	}
	release(t, client, holder.ReservationID)

	result := <-waiting
	elapsed := time.Since(began)
	if result.err != nil || !result.decision.Allowed {
		t.Fatalf("expected the waiter to be admitted, got %v, %v", result.decision, result.err)
	}
	if result.decision.Waited <= 0 || elapsed <= quotad.DefaultTimeout {
		t.Fatalf("admitted after %s, waited %s", elapsed, result.decision.Waited)
	}
	t.Logf("admitted after %s, %s of it in quotad's line", elapsed.Round(time.Millisecond), result.decision.Waited.Round(time.Millisecond))
	release(t, client, result.decision.ReservationID)
}

// refusedAddress is a local port nothing listens on: every attempt is refused, UNAVAILABLE.
func refusedAddress(t *testing.T) string {
	t.Helper()
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := listener.Addr().String()
	_ = listener.Close()
	return addr
}

func TestRetriesKeepTheDeadlineOfTimeoutPlusServerWait(t *testing.T) {
	type sent struct {
		at, deadline time.Time
		maxWait      time.Duration
	}
	var mu sync.Mutex
	var attempts []sent
	record := func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn,
		invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		deadline, _ := ctx.Deadline()
		mu.Lock()
		attempts = append(attempts, sent{time.Now(), deadline, req.(*quotadv1.CheckAndReserveRequest).GetMaxWait().AsDuration()})
		mu.Unlock()
		return invoker(ctx, method, req, reply, cc, opts...)
	}
	client, err := quotad.Dial(refusedAddress(t), quotad.WithTimeout(time.Second),
		quotad.WithDialOptions(grpc.WithUnaryInterceptor(record)))
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()

	before := time.Now()
	_, err = client.Reserve(context.Background(), quotad.ReserveRequest{Subject: unique("go-refused"), ServerWait: time.Second})
	ended := time.Now()
	if code := quotad.Code(err); code != codes.Unavailable && code != codes.DeadlineExceeded {
		t.Fatalf("expected UNAVAILABLE, got %v", err)
	}

	mu.Lock()
	defer mu.Unlock()
	if len(attempts) < 2 {
		t.Fatalf("expected retries, saw %d attempt(s)", len(attempts))
	}
	deadline := attempts[0].deadline
	if deadline.Before(before.Add(2*time.Second)) || deadline.After(attempts[0].at.Add(2*time.Second)) {
		t.Fatalf("deadline %s after the call began, want the timeout plus the server wait (2 s)", deadline.Sub(before))
	}
	if ended.After(deadline.Add(time.Second)) {
		t.Fatalf("the call ended %s past its deadline", ended.Sub(deadline))
	}
	if attempts[0].maxWait != time.Second {
		t.Fatalf("the first attempt asked to wait %s, want 1s", attempts[0].maxWait)
	}
	for i, a := range attempts[1:] {
		if !a.deadline.Equal(deadline) {
			t.Fatalf("retry %d has deadline %s, the call's is %s", i+1, a.deadline, deadline)
		}
		if a.maxWait >= time.Second || a.maxWait > attempts[i].maxWait {
			t.Fatalf("retry %d asked to wait %s after %s", i+1, a.maxWait, attempts[i].maxWait)
		}
	}
}
