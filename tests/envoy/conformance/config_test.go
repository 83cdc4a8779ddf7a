package main

import (
	"os"
	"regexp"
	"testing"

	bootstrap "github.com/envoyproxy/go-control-plane/envoy/config/bootstrap/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ratelimit/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"sigs.k8s.io/yaml"
)

// The Envoy configuration docs/envoy.md shows (the YAML block after its envoy-config marker)
// is a valid Envoy bootstrap: every field and typed config known to go-control-plane, and
// every constraint of Envoy's own validation rules met.
func TestDocumentedEnvoyConfigIsValid(t *testing.T) {
	doc, err := os.ReadFile("../../../docs/envoy.md")
	if err != nil {
		t.Fatal(err)
	}
	block := regexp.MustCompile("(?s)<!-- envoy-config -->\n```yaml\n(.*?)```").FindSubmatch(doc)
	if block == nil {
		t.Fatal("docs/envoy.md has no yaml block after <!-- envoy-config -->")
	}
	asJSON, err := yaml.YAMLToJSON(block[1])
	if err != nil {
		t.Fatal(err)
	}
	var config bootstrap.Bootstrap
	if err := protojson.Unmarshal(asJSON, &config); err != nil {
		t.Fatalf("not an Envoy bootstrap: %v", err)
	}
	if err := config.ValidateAll(); err != nil {
		t.Fatalf("Envoy would refuse it: %v", err)
	}
}
