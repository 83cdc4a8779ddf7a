// Command quotad-loadgen drives a gRPC server at a fixed concurrency with
// pre-encoded requests and reads the grpc-status of every call (a load
// generator that counts HTTP 200 as success would count errors as work).
//
// Requests come from a file of length-prefixed protobuf messages (uint32
// big-endian length, then the bytes), made by bench/run.py with the real
// generated classes; they are sent as they are, so the generator spends no
// CPU on encoding. Modes:
//
//	unary   one RPC per request (-batch-response: each result of a batch is a decision)
//	pair    CheckAndReserve, then Commit of the reservation when allowed
//	stream  one bidirectional stream per worker, one request in flight on each
//
// With -rls the requests are Envoy's rate limit service's instead
// (envoy.service.ratelimit.v3.RateLimitRequest, the API envoyproxy/ratelimit
// serves): the file holds one request a line in protobuf JSON, which the
// generator encodes once at start with go-control-plane's generated types, and
// every RateLimitResponse's overall_code is read (OK allowed, OVER_LIMIT
// denied, anything else an item error). Unary mode only.
//
// Plaintext by default. -tls-ca (the roots that verify the server; the
// system's with -tls alone) switches to TLS, -tls-cert and -tls-key add a
// client certificate (mutual TLS), -tls-server-name overrides the name checked
// against the server's certificate (by default the host of -addr).
//
// It prints one JSON object: counts by outcome, decisions/s and latency
// percentiles in microseconds.
package main

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	rlsv3 "github.com/envoyproxy/go-control-plane/envoy/service/ratelimit/v3"
)

// rawCodec passes pre-encoded protobuf bytes through untouched.
type rawCodec struct{}

func (rawCodec) Marshal(v any) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v any) error {
	p := v.(*[]byte)
	*p = append((*p)[:0], data...)
	return nil
}
func (rawCodec) Name() string { return "proto" }

type result struct {
	Mode           string           `json:"mode"`
	Method         string           `json:"method"`
	TLS            string           `json:"tls"` // off, on or mutual
	Concurrency    int              `json:"concurrency"`
	Connections    int              `json:"connections"`
	DurationS      float64          `json:"duration_s"`
	RPCs           int64            `json:"rpcs"`
	RPCErrors      map[string]int64 `json:"rpc_errors"`
	Decisions      int64            `json:"decisions"`
	Allowed        int64            `json:"allowed"`
	Denied         int64            `json:"denied"`
	ItemErrors     int64            `json:"item_errors"`
	DecisionsPerS  float64          `json:"decisions_per_s"`
	RPCsPerS       float64          `json:"rpcs_per_s"`
	LatencyP50Us   float64          `json:"latency_p50_us"`
	LatencyP99Us   float64          `json:"latency_p99_us"`
	LatencyP999Us  float64          `json:"latency_p999_us"`
	LatencySamples int              `json:"latency_samples"`
	// Including the warm-up: to relate to server-side counters that see the whole run.
	AllRPCs      int64 `json:"all_rpcs"`
	AllDecisions int64 `json:"all_decisions"`
}

type tally struct {
	rpcs, allowed, denied, itemErrors int64
	errs                              map[string]int64
	latencies                         []int64
}

func readRequests(path string) ([][]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out [][]byte
	for len(data) > 0 {
		if len(data) < 4 {
			return nil, errors.New("truncated length prefix")
		}
		n := binary.BigEndian.Uint32(data)
		if int(n) > len(data)-4 {
			return nil, errors.New("truncated message")
		}
		out = append(out, data[4:4+n])
		data = data[4+n:]
	}
	if len(out) == 0 {
		return nil, errors.New("no requests in file")
	}
	return out, nil
}

// readRLSRequests reads one RateLimitRequest a line in protobuf JSON and returns each encoded.
func readRLSRequests(path string) ([][]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var out [][]byte
	for number, line := range bytes.Split(data, []byte("\n")) {
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		var request rlsv3.RateLimitRequest
		if err := protojson.Unmarshal(line, &request); err != nil {
			return nil, fmt.Errorf("line %d: %w", number+1, err)
		}
		encoded, err := proto.Marshal(&request)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", number+1, err)
		}
		out = append(out, encoded)
	}
	if len(out) == 0 {
		return nil, errors.New("no requests in file")
	}
	return out, nil
}

// fields returns the first occurrence of each top-level field number in a message.
func fields(msg []byte, want protowire.Number) (varint uint64, bytes []byte, found bool) {
	for len(msg) > 0 {
		num, typ, n := protowire.ConsumeTag(msg)
		if n < 0 {
			return 0, nil, false
		}
		msg = msg[n:]
		switch typ {
		case protowire.VarintType:
			v, m := protowire.ConsumeVarint(msg)
			if m < 0 {
				return 0, nil, false
			}
			if num == want {
				return v, nil, true
			}
			msg = msg[m:]
		case protowire.BytesType:
			b, m := protowire.ConsumeBytes(msg)
			if m < 0 {
				return 0, nil, false
			}
			if num == want {
				return 0, b, true
			}
			msg = msg[m:]
		default:
			m := protowire.ConsumeFieldValue(num, typ, msg)
			if m < 0 {
				return 0, nil, false
			}
			msg = msg[m:]
		}
	}
	return 0, nil, false
}

// countDecision reads a CheckAndReserveResponse: field 1 is the decision (1 allowed, 2 denied).
func (t *tally) countDecision(response []byte) {
	decision, _, _ := fields(response, 1)
	switch decision {
	case 1:
		t.allowed++
	case 2:
		t.denied++
	default:
		t.itemErrors++
	}
}

// countResult reads a CheckAndReserveResult: field 1 a response, field 2 an error.
func (t *tally) countResult(res []byte) {
	if _, response, ok := fields(res, 1); ok {
		t.countDecision(response)
	} else {
		t.itemErrors++
	}
}

// countRLS reads a RateLimitResponse: field 1 is the overall code.
func (t *tally) countRLS(response []byte) {
	code, _, _ := fields(response, 1)
	switch rlsv3.RateLimitResponse_Code(code) {
	case rlsv3.RateLimitResponse_OK:
		t.allowed++
	case rlsv3.RateLimitResponse_OVER_LIMIT:
		t.denied++
	default:
		t.itemErrors++
	}
}

// count reads one response of the given mode.
func (t *tally) count(response []byte, mode string, batchResponse, rls bool) {
	switch {
	case rls:
		t.countRLS(response)
	case mode == "stream":
		_, res, _ := fields(response, 2)
		t.countResult(res)
	case batchResponse:
		for rest := response; len(rest) > 0; {
			num, typ, n := protowire.ConsumeTag(rest)
			if n < 0 || typ != protowire.BytesType || num != 1 {
				break
			}
			res, m := protowire.ConsumeBytes(rest[n:])
			if m < 0 {
				break
			}
			t.countResult(res)
			rest = rest[n+m:]
		}
	default:
		t.countDecision(response)
	}
}

func (t *tally) countError(err error) {
	code := status.Code(err)
	if code == codes.OK {
		code = codes.Unknown
	}
	t.errs[code.String()]++
}

// tlsOptions are the -tls* flags.
type tlsOptions struct {
	on            bool
	ca, cert, key string
	serverName    string
}

// mode is "off", "on" or "mutual": what the connections will speak.
func (o tlsOptions) mode() string {
	switch {
	case o.cert != "":
		return "mutual"
	case o.on || o.ca != "" || o.serverName != "":
		return "on"
	default:
		return "off"
	}
}

// credentials are the connections' transport credentials: insecure (plaintext) unless a -tls*
// flag is set, then TLS verifying the server with -tls-ca (else the system's roots).
func (o tlsOptions) credentials() (credentials.TransportCredentials, error) {
	if (o.cert == "") != (o.key == "") {
		return nil, errors.New("-tls-cert and -tls-key: set both (mutual TLS) or neither")
	}
	if o.mode() == "off" {
		return insecure.NewCredentials(), nil
	}
	config := &tls.Config{ServerName: o.serverName, MinVersion: tls.VersionTLS12}
	if o.ca != "" {
		pem, err := os.ReadFile(o.ca)
		if err != nil {
			return nil, err
		}
		config.RootCAs = x509.NewCertPool()
		if !config.RootCAs.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%s: no PEM certificate in it", o.ca)
		}
	}
	if o.cert != "" {
		pair, err := tls.LoadX509KeyPair(o.cert, o.key)
		if err != nil {
			return nil, err
		}
		config.Certificates = []tls.Certificate{pair}
	}
	return credentials.NewTLS(config), nil
}

// rlsMethod is the method envoyproxy/ratelimit serves.
const rlsMethod = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"

// methodSet says whether -method was given on the command line.
func methodSet() bool {
	set := false
	flag.Visit(func(f *flag.Flag) { set = set || f.Name == "method" })
	return set
}

func percentile(sorted []int64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(p * float64(len(sorted)-1))
	return float64(sorted[i]) / 1e3
}

func main() {
	addr := flag.String("addr", "127.0.0.1:50051", "server address")
	mode := flag.String("mode", "unary", "unary, pair or stream")
	method := flag.String("method", "/quotad.v1.QuotaService/CheckAndReserve", "full method name")
	commitMethod := flag.String("commit-method", "/quotad.v1.QuotaService/Commit", "pair mode: the commit method")
	requestsPath := flag.String("requests", "", "file of length-prefixed request messages")
	concurrency := flag.Int("concurrency", 8, "requests in flight at once")
	conns := flag.Int("connections", 4, "HTTP/2 connections (spread over SO_REUSEPORT workers)")
	duration := flag.Duration("duration", 5*time.Second, "measured time")
	warmup := flag.Duration("warmup", time.Second, "unmeasured time before it")
	batchResponse := flag.Bool("batch-response", false, "responses are CheckAndReserveBatchResponse")
	rls := flag.Bool("rls", false, "Envoy's rate limit service: -requests holds RateLimitRequests in JSON, "+
		"one a line, and -method defaults to "+rlsMethod)
	var secure tlsOptions
	flag.BoolVar(&secure.on, "tls", false, "TLS, verifying the server with the system's roots unless -tls-ca")
	flag.StringVar(&secure.ca, "tls-ca", "", "PEM roots that verify the server's certificate (implies -tls)")
	flag.StringVar(&secure.cert, "tls-cert", "", "PEM client certificate, for mutual TLS (with -tls-key)")
	flag.StringVar(&secure.key, "tls-key", "", "PEM key of -tls-cert")
	flag.StringVar(&secure.serverName, "tls-server-name", "",
		"the name to verify the server's certificate against (default: the host of -addr)")
	flag.Parse()

	read := readRequests
	if *rls {
		if *mode != "unary" {
			fmt.Fprintln(os.Stderr, "-rls: unary mode only")
			os.Exit(2)
		}
		if !methodSet() {
			*method = rlsMethod
		}
		read = readRLSRequests
	}
	requests, err := read(*requestsPath)
	if err != nil {
		fmt.Fprintln(os.Stderr, "requests:", err)
		os.Exit(2)
	}
	transport, err := secure.credentials()
	if err != nil {
		fmt.Fprintln(os.Stderr, "tls:", err)
		os.Exit(2)
	}
	connections := make([]*grpc.ClientConn, *conns)
	for i := range connections {
		connections[i], err = grpc.NewClient(*addr,
			grpc.WithTransportCredentials(transport),
			grpc.WithDefaultCallOptions(grpc.ForceCodec(rawCodec{})))
		if err != nil {
			fmt.Fprintln(os.Stderr, "connect:", err)
			os.Exit(2)
		}
		connections[i].Connect()
	}

	var next atomic.Uint64
	var measuring atomic.Bool
	stop := make(chan struct{})
	tallies := make([]*tally, *concurrency)
	var wg sync.WaitGroup
	warmups := make([]*tally, *concurrency)
	for w := 0; w < *concurrency; w++ {
		t := &tally{errs: map[string]int64{}, latencies: make([]int64, 0, 1<<16)}
		warm := &tally{errs: map[string]int64{}}
		tallies[w], warmups[w] = t, warm
		conn := connections[w%len(connections)]
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx := context.Background()
			var stream grpc.ClientStream
			if *mode == "stream" {
				desc := &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}
				var streamErr error
				if stream, streamErr = conn.NewStream(ctx, desc, *method); streamErr != nil {
					t.countError(streamErr)
					return
				}
				defer stream.CloseSend()
			}
			var response []byte
			for {
				select {
				case <-stop:
					return
				default:
				}
				request := requests[next.Add(1)%uint64(len(requests))]
				started := time.Now()
				var callErr error
				switch *mode {
				case "stream":
					if callErr = stream.SendMsg(&request); callErr == nil {
						callErr = stream.RecvMsg(&response)
					}
				default:
					callErr = conn.Invoke(ctx, *method, &request, &response)
				}
				if callErr == nil && *mode == "pair" {
					if _, id, ok := fields(response, 3); ok && len(id) > 0 {
						commit := protowire.AppendTag(nil, 1, protowire.BytesType)
						commit = protowire.AppendBytes(commit, id)
						commit = protowire.AppendTag(commit, 2, protowire.VarintType)
						commit = protowire.AppendVarint(commit, 100)
						commit = protowire.AppendTag(commit, 3, protowire.VarintType)
						commit = protowire.AppendVarint(commit, 50)
						var committed []byte
						callErr = conn.Invoke(ctx, *commitMethod, &commit, &committed)
					}
				}
				elapsed := time.Since(started)
				counted := t
				if !measuring.Load() {
					counted = warm
				} else {
					t.latencies = append(t.latencies, elapsed.Nanoseconds())
				}
				counted.rpcs++
				if callErr != nil {
					counted.countError(callErr)
					if *mode == "stream" {
						return
					}
					continue
				}
				counted.count(response, *mode, *batchResponse, *rls)
			}
		}()
	}

	time.Sleep(*warmup)
	measuring.Store(true)
	started := time.Now()
	time.Sleep(*duration)
	measuring.Store(false)
	elapsed := time.Since(started).Seconds()
	close(stop)
	wg.Wait()

	out := result{Mode: *mode, Method: *method, TLS: secure.mode(), Concurrency: *concurrency,
		Connections: *conns, DurationS: elapsed, RPCErrors: map[string]int64{}}
	var all []int64
	for _, t := range tallies {
		out.RPCs += t.rpcs
		out.Allowed += t.allowed
		out.Denied += t.denied
		out.ItemErrors += t.itemErrors
		for k, v := range t.errs {
			out.RPCErrors[k] += v
		}
		all = append(all, t.latencies...)
	}
	for _, w := range warmups {
		out.AllRPCs += w.rpcs
		out.AllDecisions += w.allowed + w.denied
	}
	out.AllRPCs += out.RPCs
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	out.Decisions = out.Allowed + out.Denied
	out.AllDecisions += out.Decisions
	out.DecisionsPerS = float64(out.Decisions) / elapsed
	out.RPCsPerS = float64(out.RPCs) / elapsed
	out.LatencyP50Us = percentile(all, 0.50)
	out.LatencyP99Us = percentile(all, 0.99)
	out.LatencyP999Us = percentile(all, 0.999)
	out.LatencySamples = len(all)
	enc := json.NewEncoder(os.Stdout)
	enc.SetIndent("", "  ")
	_ = enc.Encode(out)
}
