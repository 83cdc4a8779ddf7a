// Command example reserves quota for one LLM call, commits what it used, and prints the
// caller's limits. Run it against a quotad (`make run` serves one on localhost:50051):
//
//	go run ./example
package main

import (
	"context"
	"errors"
	"fmt"
	"log"
	"os"

	"github.com/quotad/quotad/clients/go/quotad"
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
	ctx := context.Background()

	decision, err := client.Reserve(ctx, quotad.ReserveRequest{
		Subject: "user-42", Model: "gpt-4o", InputTokens: 300, MaxOutputTokens: 200,
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

	usage, err := client.Usage(ctx, quotad.UsageRequest{Subject: "user-42", Model: "gpt-4o"})
	if err != nil {
		log.Fatal(err)
	}
	for _, limit := range usage.GetLimits() {
		fmt.Printf("%s: %d of %d left\n", limit.GetName(), limit.GetRemaining(), limit.GetLimit())
	}
}
