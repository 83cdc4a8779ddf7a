// Command conformance plays Envoy against a live quotad: it sends ShouldRateLimit with the
// messages Envoy itself sends (go-control-plane's generated stubs) and checks the answers.
//
// Scenarios (policy.yaml beside this file is the policy quotad serves):
//
//	boundary   callers firing across a window boundary are admitted exactly the limit
//	allornone  one descriptor over the limit: nothing is charged on the others
//	hits       hits_addend per request and per descriptor; tokens charged after the response
//	shadow     a shadow limit is evaluated but never denies
//
// Usage: conformance -addr 127.0.0.1:50051 [-run boundary,allornone,hits,shadow]
// It prints one JSON line per scenario and exits 1 if any failed.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	ratelimitcommon "github.com/envoyproxy/go-control-plane/envoy/extensions/common/ratelimit/v3"
	rls "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

const (
	ok   = rls.RateLimitResponse_OK
	over = rls.RateLimitResponse_OVER_LIMIT
)

// These match policy.yaml.
const (
	burstLimit    = 40
	burstWindow   = 3 * time.Second
	userLimit     = 2
	tenantLimit   = 5
	tokenLimit    = 1000
	shadowedLimit = 1
)

type result struct {
	Scenario string         `json:"scenario"`
	Passed   bool           `json:"passed"`
	Failures []string       `json:"failures,omitempty"`
	Figures  map[string]any `json:"figures,omitempty"`
}

type check struct {
	client rls.RateLimitServiceClient
	run    string // distinguishes this run's subjects and tenants from earlier runs'
	res    *result
}

func (c *check) expect(cond bool, format string, args ...any) {
	if !cond {
		c.res.Failures = append(c.res.Failures, fmt.Sprintf(format, args...))
	}
}

func entry(key, value string) *ratelimitcommon.RateLimitDescriptor_Entry {
	return &ratelimitcommon.RateLimitDescriptor_Entry{Key: key, Value: value}
}

func desc(entries ...*ratelimitcommon.RateLimitDescriptor_Entry) *ratelimitcommon.RateLimitDescriptor {
	return &ratelimitcommon.RateLimitDescriptor{Entries: entries}
}

func withHits(d *ratelimitcommon.RateLimitDescriptor, hits uint64) *ratelimitcommon.RateLimitDescriptor {
	d.HitsAddend = wrapperspb.UInt64(hits)
	return d
}

func (c *check) ask(domain string, hits uint32, descriptors ...*ratelimitcommon.RateLimitDescriptor) *rls.RateLimitResponse {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	response, err := c.client.ShouldRateLimit(ctx, &rls.RateLimitRequest{
		Domain: domain, Descriptors: descriptors, HitsAddend: hits,
	})
	if err != nil {
		c.expect(false, "ShouldRateLimit(%s): %v", domain, err)
		return &rls.RateLimitResponse{}
	}
	return response
}

func codes(response *rls.RateLimitResponse) []rls.RateLimitResponse_Code {
	found := make([]rls.RateLimitResponse_Code, len(response.GetStatuses()))
	for i, status := range response.GetStatuses() {
		found[i] = status.GetCode()
	}
	return found
}

// boundary: with a limit of burstLimit per burstWindow, 32 callers in flight fire from a quarter
// of a second before a window boundary (aligned as fixed windows are: there envoy ratelimit
// admits up to twice the limit) to a quarter of a second after it, and admit exactly the limit.
func (c *check) boundary() {
	user := desc(entry("x-tenant", "burst-"+c.run), entry("user_id", "burster"))
	now := time.Now()
	boundary := now.Truncate(burstWindow).Add(burstWindow)
	if boundary.Sub(now) < 500*time.Millisecond {
		boundary = boundary.Add(burstWindow)
	}
	stop := boundary.Add(250 * time.Millisecond)
	const maxCalls = 50 * burstLimit
	time.Sleep(time.Until(boundary.Add(-250 * time.Millisecond)))
	var sent, admitted, denied, failed, admittedBefore atomic.Int64
	started := time.Now()
	var wg sync.WaitGroup
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) && sent.Add(1) <= maxCalls {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				asked := time.Now()
				response, err := c.client.ShouldRateLimit(ctx, &rls.RateLimitRequest{
					Domain: "burst", Descriptors: []*ratelimitcommon.RateLimitDescriptor{user}, HitsAddend: 1,
				})
				cancel()
				switch {
				case err != nil:
					failed.Add(1)
				case response.GetOverallCode() == ok:
					admitted.Add(1)
					if asked.Before(boundary) {
						admittedBefore.Add(1)
					}
				default:
					denied.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(started)
	calls := min(sent.Load(), maxCalls)
	c.res.Figures = map[string]any{
		"limit": burstLimit, "window_s": burstWindow.Seconds(), "calls": calls,
		"admitted": admitted.Load(), "admitted_asked_before_boundary": admittedBefore.Load(),
		"denied": denied.Load(), "errors": failed.Load(), "burst_s": elapsed.Seconds(),
		"straddled_boundary": started.Before(boundary) && time.Now().After(boundary),
	}
	c.expect(failed.Load() == 0, "%d calls failed", failed.Load())
	c.expect(calls > burstLimit, "only %d calls were made", calls)
	c.expect(admitted.Load() <= burstLimit, "admitted %d in one window, over the limit %d", admitted.Load(), burstLimit)
	// All of the burst fell in one window, so no admission left it: the limit is admitted, no less.
	if elapsed < burstWindow {
		c.expect(admitted.Load() == burstLimit, "admitted %d, not exactly %d", admitted.Load(), burstLimit)
	} else {
		c.expect(false, "the burst took %s, longer than the window: exactness cannot be judged", elapsed)
	}
}

// allornone: a user over its limit is denied, and its tenant's descriptor is not charged.
func (c *check) allornone() {
	// Only tenant acme has a tenant limit (5 a minute): run this against a fresh quotad.
	t := desc(entry("x-tenant", "acme"))
	user := func(name string) *ratelimitcommon.RateLimitDescriptor {
		return desc(entry("x-tenant", "acme"), entry("user_id", name+"-"+c.run))
	}
	for i := 0; i < userLimit; i++ {
		r := c.ask("api", 1, t, user("u1"))
		c.expect(r.GetOverallCode() == ok, "u1 call %d: %v", i+1, r.GetOverallCode())
	}
	denied := c.ask("api", 1, t, user("u1"))
	c.expect(denied.GetOverallCode() == over, "u1 over its limit: got %v", denied.GetOverallCode())
	c.expect(fmt.Sprint(codes(denied)) == fmt.Sprint([]rls.RateLimitResponse_Code{ok, over}),
		"u1 over: statuses %v, want [OK OVER_LIMIT]", codes(denied))
	if statuses := denied.GetStatuses(); len(statuses) == 2 {
		c.expect(statuses[0].GetLimitRemaining() == tenantLimit-userLimit,
			"the tenant was charged for a denied call: %d left", statuses[0].GetLimitRemaining())
		c.expect(statuses[1].GetDurationUntilReset().AsDuration() > 0, "no duration_until_reset on the denial")
		c.expect(statuses[1].GetCurrentLimit().GetRequestsPerUnit() == userLimit &&
			statuses[1].GetCurrentLimit().GetUnit() == rls.RateLimitResponse_RateLimit_MINUTE,
			"current_limit %v", statuses[1].GetCurrentLimit())
	}
	retry := ""
	for _, header := range denied.GetResponseHeadersToAdd() {
		if header.GetKey() == "retry-after" {
			retry = header.GetValue()
		}
	}
	c.expect(retry != "", "no retry-after header on OVER_LIMIT")
	// The tenant still has exactly tenantLimit - userLimit: u2 takes 2, u3 1, then the tenant is full.
	for _, name := range []string{"u2", "u2", "u3"} {
		r := c.ask("api", 1, t, user(name))
		c.expect(r.GetOverallCode() == ok, "%s: %v", name, r.GetOverallCode())
	}
	full := c.ask("api", 1, t, user("u4"))
	c.expect(fmt.Sprint(codes(full)) == fmt.Sprint([]rls.RateLimitResponse_Code{over, ok}),
		"tenant full: statuses %v, want [OVER_LIMIT OK]", codes(full))
	// u4's own count was not charged either: it still has its whole limit once the tenant frees up.
	c.res.Figures = map[string]any{"retry_after": retry}
}

// hits: a descriptor's hits_addend overrides the request's; 0 only checks; tokens spent after
// the response are charged even past the limit (debt), which the next check reports.
func (c *check) hits() {
	u := func(hits uint64) *ratelimitcommon.RateLimitDescriptor {
		return withHits(desc(entry("x-tenant", "acme-"+c.run), entry("user_id", "t1")), hits)
	}
	plain := desc(entry("x-tenant", "acme-"+c.run), entry("user_id", "t1"))
	r := c.ask("llm", 0, u(0))
	c.expect(r.GetOverallCode() == ok && r.GetStatuses()[0].GetLimitRemaining() == tokenLimit,
		"check before any usage: %v remaining %d", r.GetOverallCode(), r.GetStatuses()[0].GetLimitRemaining())
	r = c.ask("llm", 0, u(600))
	c.expect(r.GetOverallCode() == ok && r.GetStatuses()[0].GetLimitRemaining() == tokenLimit-600,
		"charge 600: %v remaining %d", r.GetOverallCode(), r.GetStatuses()[0].GetLimitRemaining())
	r = c.ask("llm", 300, plain) // the request's hits_addend, no descriptor's
	c.expect(r.GetOverallCode() == ok && r.GetStatuses()[0].GetLimitRemaining() == tokenLimit-900,
		"charge 300 (request level): %v remaining %d", r.GetOverallCode(), r.GetStatuses()[0].GetLimitRemaining())
	r = c.ask("llm", 1, u(250)) // the descriptor's 250 overrides the request's 1
	c.expect(r.GetOverallCode() == over && r.GetStatuses()[0].GetLimitRemaining() == 0,
		"charge 250 past the limit: %v remaining %d", r.GetOverallCode(), r.GetStatuses()[0].GetLimitRemaining())
	r = c.ask("llm", 0, u(0))
	c.expect(r.GetOverallCode() == over, "check after the limit was spent: %v", r.GetOverallCode())
}

// shadow: a shadow limit of 1 a minute never denies; the enforced limit beside it still does.
func (c *check) shadow() {
	u := desc(entry("x-tenant", "shadow-"+c.run), entry("user_id", "s1"))
	for i := 0; i < 3; i++ {
		r := c.ask("shadowed", 1, u)
		c.expect(r.GetOverallCode() == ok, "call %d past the shadow limit of %d: %v", i+1, shadowedLimit, r.GetOverallCode())
		if statuses := r.GetStatuses(); len(statuses) == 1 {
			c.expect(statuses[0].GetCurrentLimit().GetName() == "enforced", "status speaks for %q", statuses[0].GetCurrentLimit().GetName())
		}
	}
	for i := 3; i < 5; i++ {
		c.ask("shadowed", 1, u)
	}
	r := c.ask("shadowed", 1, u)
	c.expect(r.GetOverallCode() == over, "the enforced limit of 5 still denies the sixth: %v", r.GetOverallCode())
}

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "quotad's address")
	run := flag.String("run", "boundary,allornone,hits,shadow", "the scenarios to run")
	flag.Parse()
	conn, err := grpc.NewClient(*addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	defer conn.Close()
	scenarios := map[string]func(*check){
		"boundary": (*check).boundary, "allornone": (*check).allornone, "hits": (*check).hits, "shadow": (*check).shadow,
	}
	failed := false
	id := fmt.Sprintf("%d", time.Now().UnixNano())
	for _, name := range strings.Split(*run, ",") {
		scenario, known := scenarios[name]
		if !known {
			fmt.Fprintf(os.Stderr, "unknown scenario %q\n", name)
			os.Exit(2)
		}
		c := &check{client: rls.NewRateLimitServiceClient(conn), run: id, res: &result{Scenario: name}}
		scenario(c)
		c.res.Passed = len(c.res.Failures) == 0
		failed = failed || !c.res.Passed
		line, _ := json.Marshal(c.res)
		fmt.Println(string(line))
	}
	if failed {
		os.Exit(1)
	}
}
