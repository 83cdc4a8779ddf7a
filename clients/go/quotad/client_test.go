package quotad_test

// Integration tests against a live quotad at $QUOTAD_ADDR serving tests/conformance/policy.yaml
// (`make test` starts one). Without it they fail: they never pass without a server.

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	quotadv1 "github.com/quotad-dev/quotad/clients/go/gen/quotad/v1"
	"github.com/quotad-dev/quotad/clients/go/quotad"
)

const model = "gpt-4o"

func dial(t *testing.T) *quotad.Client {
	t.Helper()
	addr := os.Getenv("QUOTAD_ADDR")
	if addr == "" {
		t.Fatal("QUOTAD_ADDR is not set: these tests need a live quotad serving tests/conformance/policy.yaml (`make test` starts one)")
	}
	client, err := quotad.Dial(addr, quotad.WithTimeout(5*time.Second))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

func unique(prefix string) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return prefix + "-" + hex.EncodeToString(b[:])
}

func TestReserveThenCommit(t *testing.T) {
	client, ctx, subject := dial(t), context.Background(), unique("go-commit")

	decision, err := client.Reserve(ctx, quotad.ReserveRequest{Subject: subject, Model: model, InputTokens: 300, MaxOutputTokens: 200})
	if err != nil {
		t.Fatal(err)
	}
	if !decision.Allowed || decision.ReservationID == "" {
		t.Fatalf("expected an allowed reservation, got %v", decision)
	}
	if want := (quotad.Cost{Requests: 1, InputTokens: 300, OutputTokens: 200}); decision.Reserved != want {
		t.Fatalf("reserved %+v, want %+v", decision.Reserved, want)
	}
	committed, err := client.Commit(ctx, decision.ReservationID, 300, 50)
	if err != nil {
		t.Fatal(err)
	}
	if committed.GetCommitted().GetOutputTokens() != 50 || committed.GetRepeat() {
		t.Fatalf("unexpected commit answer %v", committed)
	}
	usage, err := client.Usage(ctx, quotad.UsageRequest{Subject: subject, Model: model})
	if err != nil {
		t.Fatal(err)
	}
	if got := quotad.Remaining(usage)["tokens-per-day"]; got != 650 {
		t.Fatalf("tokens-per-day remaining %d after committing 350 of 1000, want 650", got)
	}
}

func TestDenialIsAValue(t *testing.T) {
	client, ctx, subject := dial(t), context.Background(), unique("go-denial")

	first, err := client.Reserve(ctx, quotad.ReserveRequest{Subject: subject, Model: model, InputTokens: 600, MaxOutputTokens: 100})
	if err != nil || !first.Allowed {
		t.Fatalf("first reservation: %v, %v", first, err)
	}
	denied, err := client.Reserve(ctx, quotad.ReserveRequest{Subject: subject, Model: model, InputTokens: 300, MaxOutputTokens: 100})
	if err != nil {
		t.Fatalf("a denial must not be an error: %v", err)
	}
	if denied.Allowed || denied.BindingLimit != "tokens-per-day" || denied.RetryAfter <= 0 ||
		denied.DenyReason != quotadv1.DenyReason_DENY_REASON_LIMIT_EXCEEDED {
		t.Fatalf("expected a denial by tokens-per-day with a retry-after, got %v", denied)
	}
	if !strings.Contains(denied.String(), "denied by tokens-per-day") {
		t.Fatalf("unreadable decision %q", denied.String())
	}
	if got := denied.Remaining["tokens-per-day"]; got != 300 {
		t.Fatalf("a denial charged something: %d remaining, want 300", got)
	}
}

func TestInvalidArgumentCarriesFieldViolations(t *testing.T) {
	client := dial(t)
	_, err := client.Reserve(context.Background(), quotad.ReserveRequest{Subject: unique("go-invalid"), Model: "gpt-5-ultra", InputTokens: -1})
	var qerr *quotad.Error
	if !errors.As(err, &qerr) || qerr.Code != codes.InvalidArgument {
		t.Fatalf("expected INVALID_ARGUMENT, got %v", err)
	}
	fields := map[string]string{}
	for _, v := range qerr.FieldViolations {
		fields[v.Field] = v.Description
	}
	if _, ok := fields["input_tokens"]; !ok {
		t.Fatalf("no input_tokens violation in %v", qerr.FieldViolations)
	}
	if _, ok := fields["model"]; !ok {
		t.Fatalf("no model violation in %v", qerr.FieldViolations)
	}
	if !strings.Contains(err.Error(), "InvalidArgument") || !strings.Contains(err.Error(), "input_tokens: must be between 0") {
		t.Fatalf("unreadable error %q", err.Error())
	}
	t.Logf("INVALID_ARGUMENT as the Go client shows it: %v", err)
}

// The conformance scenario, replayed through this client (see tests/conformance/scenario.json).

type scenario struct {
	Subject, Tenant, Model string
	Steps                  []step
}

type step struct {
	Call            string                     `json:"call"`
	SaveAs          string                     `json:"save_as"`
	Reservation     string                     `json:"reservation"`
	InputTokens     int64                      `json:"input_tokens"`
	MaxOutputTokens int64                      `json:"max_output_tokens"`
	OutputTokens    int64                      `json:"output_tokens"`
	IdempotencyKey  string                     `json:"idempotency_key"`
	Expect          map[string]json.RawMessage `json:"expect"`
}

func costMap(c *quotadv1.Cost) map[string]int64 {
	return map[string]int64{"requests": c.GetRequests(), "input_tokens": c.GetInputTokens(), "output_tokens": c.GetOutputTokens()}
}

func TestConformance(t *testing.T) {
	replay(t, dial(t))
}

// replay replays the scenario through client.
func replay(t *testing.T, client *quotad.Client) {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join("..", "..", "..", "tests", "conformance", "scenario.json"))
	if err != nil {
		t.Fatal(err)
	}
	var sc scenario
	if err := json.Unmarshal(raw, &sc); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	runID := unique("go")
	subject, tenant := sc.Subject+"-"+runID, sc.Tenant+"-"+runID
	saved := map[string]string{}

	for i, s := range sc.Steps {
		seen := map[string]any{}
		var reservationID string
		var err error
		switch s.Call {
		case "reserve":
			var d *quotad.Decision
			d, err = client.Reserve(ctx, quotad.ReserveRequest{
				Subject: subject, Tenant: tenant, Model: sc.Model,
				InputTokens: s.InputTokens, MaxOutputTokens: s.MaxOutputTokens, IdempotencyKey: s.IdempotencyKey,
			})
			if err == nil {
				r := d.Response
				seen["decision"] = strings.TrimPrefix(r.GetDecision().String(), "DECISION_")
				if r.GetDenyReason() != quotadv1.DenyReason_DENY_REASON_UNSPECIFIED {
					seen["deny_reason"] = strings.TrimPrefix(r.GetDenyReason().String(), "DENY_REASON_")
				}
				seen["binding_limit"] = d.BindingLimit
				seen["retry_after"] = r.GetRetryAfter() != nil
				seen["reserved"] = costMap(r.GetReserved())
				seen["replayed"] = d.Replayed
				seen["remaining"] = d.Remaining
				reservationID = d.ReservationID
			}
		case "commit":
			var r *quotadv1.CommitResponse
			r, err = client.Commit(ctx, saved[s.Reservation], s.InputTokens, s.OutputTokens)
			if err == nil {
				seen["repeat"], seen["reserved"], seen["committed"] = r.GetRepeat(), costMap(r.GetReserved()), costMap(r.GetCommitted())
			}
		case "release":
			var r *quotadv1.ReleaseResponse
			r, err = client.Release(ctx, saved[s.Reservation])
			if err == nil {
				seen["repeat"], seen["refunded"] = r.GetRepeat(), costMap(r.GetRefunded())
			}
		case "usage":
			var r *quotadv1.GetUsageResponse
			r, err = client.Usage(ctx, quotad.UsageRequest{Subject: subject, Tenant: tenant, Model: sc.Model})
			if err == nil {
				seen["remaining"] = quotad.Remaining(r)
			}
		default:
			t.Fatalf("step %d: unknown call %q", i, s.Call)
		}
		if err != nil {
			var qerr *quotad.Error
			if !errors.As(err, &qerr) {
				t.Fatalf("step %d (%s): %v", i, s.Call, err)
			}
			seen["error"] = strings.ToUpper(toSnake(qerr.Code.String()))
			var fields []string
			for _, v := range qerr.FieldViolations {
				fields = append(fields, v.Field)
			}
			seen["field_violations"] = fields
		}
		if s.SaveAs != "" {
			saved[s.SaveAs] = reservationID
		}
		for key, rawWant := range s.Expect {
			if key == "same_reservation_as" {
				var name string
				_ = json.Unmarshal(rawWant, &name)
				if saved[name] == "" || saved[name] != reservationID {
					t.Fatalf("step %d (%s): reservation %q is not %s (%q)", i, s.Call, reservationID, name, saved[name])
				}
				continue
			}
			got, ok := seen[key]
			if !ok {
				t.Fatalf("step %d (%s): unknown or missing expectation %q (seen %v)", i, s.Call, key, seen)
			}
			// Compare as JSON values: decode the expectation into the type of what was seen.
			want := reflect.New(reflect.TypeOf(got))
			if err := json.Unmarshal(rawWant, want.Interface()); err != nil {
				t.Fatalf("step %d (%s): expectation %s: %v", i, s.Call, key, err)
			}
			if !reflect.DeepEqual(normalize(got), normalize(want.Elem().Interface())) {
				t.Fatalf("step %d (%s): %s is %v, expected %s", i, s.Call, key, got, rawWant)
			}
		}
	}
}

// normalize sorts string lists so that field violations compare as sets.
func normalize(v any) any {
	if list, ok := v.([]string); ok {
		sorted := append([]string(nil), list...)
		sort.Strings(sorted)
		return sorted
	}
	return v
}

// toSnake turns a codes.Code name (FailedPrecondition) into its status name (FAILED_PRECONDITION).
func toSnake(name string) string {
	var b strings.Builder
	for i, r := range name {
		if i > 0 && r >= 'A' && r <= 'Z' {
			b.WriteByte('_')
		}
		b.WriteRune(r)
	}
	return b.String()
}
