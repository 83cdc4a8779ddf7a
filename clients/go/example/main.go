// Command example reserves quota for one LLM call, commits what it used, and prints the
// caller's limits. Run it against a quotad (`make run` serves one on localhost:50051):
//
//	go run ./example
package main

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log"
	"os"
	"time"

	"github.com/quotad-dev/quotad/clients/go/quotad"
)

func main() {
	addr := os.Getenv("QUOTAD_ADDR")
	if addr == "" {
		addr = "localhost:50051"
	}
	client, err := quotad.Dial(addr)
	if err != nil {
		log.Fatal(err)
	}
	defer client.Close()
	// One deadline for the whole program: a first call also connects, and each call's retries
	// of UNAVAILABLE stay within what is left of it.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// Your user's id. A new one each run here, so that running the example again within a
	// minute starts from full limits instead of being denied.
	subject := "user-" + rand.Text()[:8]

	decision, err := client.Reserve(ctx, quotad.ReserveRequest{
		Subject: subject, Model: "gpt-4o", InputTokens: 300, MaxOutputTokens: 200,
	})
	var qerr *quotad.Error
	if errors.As(err, &qerr) {
		log.Fatalf("quotad refused the request: %v (fields: %v)", qerr, qerr.FieldViolations)
	} else if err != nil {
		log.Fatal(err) // e.g. UNAVAILABLE: fail open or closed, your call
	}
	if !decision.Allowed {
		fmt.Println(decision) // "denied by tokens-per-minute (LIMIT_EXCEEDED), retry after 1.2s"
		return
	}

	// ... call the LLM here; on failure: client.Release(ctx, decision.ReservationID) ...
	if _, err := client.Commit(ctx, decision.ReservationID, 300, 97); err != nil {
		log.Fatal(err)
	}

	usage, err := client.Usage(ctx, quotad.UsageRequest{Subject: subject, Model: "gpt-4o"})
	if err != nil {
		log.Fatal(err)
	}
	for _, limit := range usage.GetLimits() {
		fmt.Printf("%s: %d of %d left\n", limit.GetName(), limit.GetRemaining(), limit.GetLimit())
	}
}
