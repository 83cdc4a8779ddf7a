package quotad

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"os"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// TLSFiles configures TLS to quotad from PEM files, read when Dial is called (a certificate
// renewed on disk takes a new Client; for rotation without one, pass WithTLS a tls.Config
// whose GetClientCertificate reloads it).
type TLSFiles struct {
	// CAFile is the CA bundle that verifies quotad's certificate; empty: the system's roots.
	CAFile string
	// CertFile and KeyFile are a client certificate (chain) and its key, for a quotad that
	// requires one (QUOTAD_TLS_CLIENT_CA); both or neither. quotad knows the caller by the
	// certificate's first SAN URI (a SPIFFE ID), else its first DNS name.
	CertFile, KeyFile string
	// ServerName is the name quotad's certificate must carry when it is not the target's host
	// (an IP address, a port-forward to localhost), e.g. "quotad.llm.svc".
	ServerName string
}

// WithTLSFiles connects over TLS configured from PEM files (see TLSFiles); Dial returns an
// error for files that do not load.
func WithTLSFiles(files TLSFiles) Option {
	return func(s *settings) { s.tlsFiles = &files }
}

// WithTLS connects over TLS with config: nil verifies quotad against the system's roots. A
// config of your own carries a client certificate (Certificates, or GetClientCertificate for
// one that rotates), RootCAs, ServerName; e.g. go-spiffe's tlsconfig.MTLSClientConfig.
func WithTLS(config *tls.Config) Option {
	return func(s *settings) {
		if config == nil {
			config = &tls.Config{MinVersion: tls.VersionTLS12}
		}
		s.tlsConfig = config
	}
}

// WithToken sends token as "authorization: Bearer <token>" with every call, as per-RPC
// credentials. Over plaintext Dial refuses it (gRPC's own check), unless WithPlaintextToken.
func WithToken(token string) Option {
	return WithTokenSource(func(context.Context) (string, error) { return token, nil })
}

// WithTokenSource is WithToken for a token that changes: source is called before every
// attempt of every call, with its context. An error it returns fails the attempt with
// UNAVAILABLE, retried as any.
func WithTokenSource(source func(ctx context.Context) (string, error)) Option {
	return func(s *settings) { s.token = source }
}

// WithPlaintextToken lets WithToken's token travel over a plaintext connection: only where the
// network encrypts for you (a mesh sidecar) or on loopback.
func WithPlaintextToken() Option {
	return func(s *settings) { s.plaintextToken = true }
}

// transportOptions are the dial options for the TLS and token settings: the transport
// credentials first (plaintext by default), so that WithDialOptions can still replace them.
func (s *settings) transportOptions() ([]grpc.DialOption, error) {
	if s.tlsFiles != nil && s.tlsConfig != nil {
		return nil, errors.New("quotad: WithTLS and WithTLSFiles: use one")
	}
	transport := insecure.NewCredentials()
	if s.tlsFiles != nil {
		config, err := s.tlsFiles.config()
		if err != nil {
			return nil, err
		}
		transport = credentials.NewTLS(config)
	} else if s.tlsConfig != nil {
		transport = credentials.NewTLS(s.tlsConfig)
	}
	options := []grpc.DialOption{grpc.WithTransportCredentials(transport)}
	if s.token != nil {
		options = append(options, grpc.WithPerRPCCredentials(bearer{s.token, !s.plaintextToken}))
	}
	return options, nil
}

func (f *TLSFiles) config() (*tls.Config, error) {
	config := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: f.ServerName}
	if f.CAFile != "" {
		pem, err := os.ReadFile(f.CAFile)
		if err != nil {
			return nil, fmt.Errorf("quotad: TLS CA: %w", err)
		}
		config.RootCAs = x509.NewCertPool()
		if !config.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("quotad: TLS CA %s: no PEM certificate in it", f.CAFile)
		}
	}
	if (f.CertFile == "") != (f.KeyFile == "") {
		return nil, errors.New("quotad: a client certificate needs its key: set both CertFile and KeyFile, or neither")
	}
	if f.CertFile != "" {
		pair, err := tls.LoadX509KeyPair(f.CertFile, f.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("quotad: TLS client certificate: %w", err)
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return config, nil
}

// bearer is the token as per-RPC credentials. Requiring transport security makes gRPC refuse
// it on a plaintext connection, at Dial and again on every call.
type bearer struct {
	source                   func(context.Context) (string, error)
	requireTransportSecurity bool
}

func (b bearer) GetRequestMetadata(ctx context.Context, _ ...string) (map[string]string, error) {
	if b.requireTransportSecurity {
		info, _ := credentials.RequestInfoFromContext(ctx)
		if err := credentials.CheckSecurityLevel(info.AuthInfo, credentials.PrivacyAndIntegrity); err != nil {
			return nil, status.Errorf(codes.Unauthenticated, "quotad: a bearer token is not sent over this connection: %v", err)
		}
	}
	token, err := b.source(ctx)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "quotad: the bearer token: %v", err)
	}
	return map[string]string{"authorization": "Bearer " + token}, nil
}

func (b bearer) RequireTransportSecurity() bool { return b.requireTransportSecurity }
