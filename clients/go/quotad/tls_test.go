package quotad_test

// TLS, mutual TLS and bearer tokens against the secure quotads `make test` starts beside the
// plaintext one (tests/clients/conftest.py): $QUOTAD_MTLS_ADDR requires a client certificate,
// $QUOTAD_TOKEN_ADDR serves TLS and knows its callers by bearer token ($QUOTAD_TOKEN). The CA
// at $QUOTAD_TLS_CA signed both servers' certificates and the client's ($QUOTAD_CLIENT_CERT,
// $QUOTAD_CLIENT_KEY).

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/quotad-dev/quotad/clients/go/quotad"
)

type secure struct {
	mtlsAddr, tokenAddr, ca, cert, key, token string
}

func secureEnv(t *testing.T) secure {
	t.Helper()
	names := []string{"QUOTAD_MTLS_ADDR", "QUOTAD_TOKEN_ADDR", "QUOTAD_TLS_CA", "QUOTAD_CLIENT_CERT", "QUOTAD_CLIENT_KEY", "QUOTAD_TOKEN"}
	values := make([]string, len(names))
	for i, name := range names {
		if values[i] = os.Getenv(name); values[i] == "" {
			t.Fatalf("%s is not set: the TLS tests need the secure quotads `make test` starts", name)
		}
	}
	return secure{values[0], values[1], values[2], values[3], values[4], values[5]}
}

func dialWith(t *testing.T, addr string, opts ...quotad.Option) *quotad.Client {
	t.Helper()
	client, err := quotad.Dial(addr, append([]quotad.Option{quotad.WithTimeout(5 * time.Second)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = client.Close() })
	return client
}

func TestConformanceOverMutualTLS(t *testing.T) {
	s := secureEnv(t)
	replay(t, dialWith(t, s.mtlsAddr, quotad.WithTLSFiles(quotad.TLSFiles{CAFile: s.ca, CertFile: s.cert, KeyFile: s.key})))
}

// usageCode is the code of one GetUsage through client (retries off: a refusal is final).
func usageCode(client *quotad.Client) (codes.Code, error) {
	_, err := client.Usage(context.Background(), quotad.UsageRequest{Subject: unique("go-refused"), Tenant: "tls", Model: model})
	return quotad.Code(err), err
}

func TestMutualTLSWithoutAClientCertificateIsRefused(t *testing.T) {
	s := secureEnv(t)
	once := quotad.WithRetry(quotad.RetryPolicy{MaxAttempts: 1})
	client := dialWith(t, s.mtlsAddr, once, quotad.WithTLSFiles(quotad.TLSFiles{CAFile: s.ca}))
	if code, err := usageCode(client); code != codes.Unavailable {
		t.Fatalf("without a client certificate: %v, want the handshake to fail (Unavailable)", err)
	}
	// The name quotad's certificate carries (127.0.0.1 and localhost) is checked.
	files := quotad.TLSFiles{CAFile: s.ca, CertFile: s.cert, KeyFile: s.key, ServerName: "quotad.invalid"}
	if code, err := usageCode(dialWith(t, s.mtlsAddr, once, quotad.WithTLSFiles(files))); code != codes.Unavailable {
		t.Fatalf("with a server name quotad's certificate does not carry: %v, want Unavailable", err)
	}
	files.ServerName = "localhost"
	if code, err := usageCode(dialWith(t, s.mtlsAddr, once, quotad.WithTLSFiles(files))); code != codes.OK {
		t.Fatalf("with the server name localhost: %v", err)
	}
}

func TestBearerTokenOverTLS(t *testing.T) {
	s := secureEnv(t)
	asked := 0
	client := dialWith(t, s.tokenAddr, quotad.WithTLSFiles(quotad.TLSFiles{CAFile: s.ca}),
		quotad.WithTokenSource(func(context.Context) (string, error) {
			asked++
			return s.token, nil
		}))
	ctx := context.Background()
	decision, err := client.Reserve(ctx, quotad.ReserveRequest{Subject: unique("go-token"), Tenant: "tokens", Model: model, InputTokens: 10, MaxOutputTokens: 10})
	if err != nil || !decision.Allowed {
		t.Fatalf("reserve with a token: %v, %v", decision, err)
	}
	if _, err := client.Commit(ctx, decision.ReservationID, 10, 1); err != nil {
		t.Fatal(err)
	}
	if asked != 2 {
		t.Fatalf("the token source was asked %d times for 2 calls", asked)
	}
	static := dialWith(t, s.tokenAddr, quotad.WithTLSFiles(quotad.TLSFiles{CAFile: s.ca}), quotad.WithToken(s.token))
	if code, err := usageCode(static); code != codes.OK {
		t.Fatalf("GetUsage with a token: %v", err)
	}
}

func TestWithoutAKnownTokenTheCallIsUnauthenticated(t *testing.T) {
	s := secureEnv(t)
	tls := quotad.WithTLSFiles(quotad.TLSFiles{CAFile: s.ca})
	if code, err := usageCode(dialWith(t, s.tokenAddr, tls)); code != codes.Unauthenticated {
		t.Fatalf("without a token: %v, want Unauthenticated", err)
	}
	if code, err := usageCode(dialWith(t, s.tokenAddr, tls, quotad.WithToken("not-a-known-token"))); code != codes.Unauthenticated {
		t.Fatalf("with an unknown token: %v, want Unauthenticated", err)
	}
	broken := quotad.WithTokenSource(func(context.Context) (string, error) { return "", errors.New("vault is down") })
	once := quotad.WithRetry(quotad.RetryPolicy{MaxAttempts: 1})
	if code, err := usageCode(dialWith(t, s.tokenAddr, tls, once, broken)); code != codes.Unavailable || !strings.Contains(err.Error(), "vault is down") {
		t.Fatalf("with a token source that fails: %v, want Unavailable", err)
	}
}

func TestTokenIsNotSentOverPlaintextUnlessAllowed(t *testing.T) {
	addr := os.Getenv("QUOTAD_ADDR")
	if _, err := quotad.Dial(addr, quotad.WithToken("secret")); err == nil || !strings.Contains(err.Error(), "plaintext") {
		t.Fatalf("a token over plaintext: %v, want Dial to refuse it", err)
	}
	if _, err := quotad.Dial(addr, quotad.WithTLSFiles(quotad.TLSFiles{CertFile: "client.crt"})); err == nil {
		t.Fatal("a client certificate without its key was accepted")
	}
	// Allowed (a mesh sidecar encrypts): the plaintext quotad knows no tokens and ignores it.
	client := dialWith(t, addr, quotad.WithToken("secret"), quotad.WithPlaintextToken())
	if _, err := client.Usage(context.Background(), quotad.UsageRequest{Subject: unique("go-plain"), Model: model}); err != nil {
		t.Fatal(err)
	}
}
