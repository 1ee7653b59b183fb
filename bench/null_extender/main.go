// Command null-extender is the floor of the kube-scheduler extender protocol for bench/scheduling_bench.py
// (--null-extender): an extender in Go that decides nothing. Filter passes the first N node names it is sent,
// prioritize scores every node 0, and bind posts the Binding to the API server, as fuyao's exact-devices profile
// does (filterVerb, prioritizeVerb, bindVerb; nodeCacheCapable). What kube-scheduler, the API server and this
// process spend per pod is what the protocol itself costs on the machine; fuyao's extender is measured against it.
//
// Wire types: k8s.io/kube-scheduler/extender/v1 (ExtenderArgs, ExtenderFilterResult, HostPriorityList,
// ExtenderBindingArgs, ExtenderBindingResult): untagged Go structs, so the JSON keys are the Go field names.
package main

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http"
	"os"
	"strings"
	"sync/atomic"
	"time"
)

type extenderArgs struct {
	NodeNames *[]string
}

type filterResult struct {
	Nodes                      *json.RawMessage // a NodeList when nodeCacheCapable is false; null here
	NodeNames                  *[]string
	FailedNodes                map[string]string
	FailedAndUnresolvableNodes map[string]string
	Error                      string
}

type hostPriority struct {
	Host  string
	Score int64
}

type bindingArgs struct {
	PodName      string
	PodNamespace string
	PodUID       string
	Node         string
}

type bindingResult struct {
	Error string
}

type server struct {
	shortlist int
	delay     time.Duration // filter's added latency (experiments: what the filter's time costs the scheduler)
	spin      bool          // the delay burns CPU instead of sleeping
	annotate  bool          // the binding carries an assignment annotation of fuyao's size
	apiServer string
	token     string
	client    *http.Client
	binds     atomic.Int64
	bindNanos atomic.Int64 // time in the API server's binding calls
}

func (s *server) filter(w http.ResponseWriter, r *http.Request) {
	var args extenderArgs
	if err := json.NewDecoder(r.Body).Decode(&args); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	names := []string{}
	if args.NodeNames != nil {
		names = *args.NodeNames
	}
	if s.shortlist > 0 && len(names) > s.shortlist {
		names = names[:s.shortlist]
	}
	if s.delay > 0 {
		if s.spin {
			for until := time.Now().Add(s.delay); time.Now().Before(until); {
			}
		} else {
			time.Sleep(s.delay)
		}
	}
	writeJSON(w, filterResult{NodeNames: &names, FailedNodes: map[string]string{},
		FailedAndUnresolvableNodes: map[string]string{}})
}

func (s *server) prioritize(w http.ResponseWriter, r *http.Request) {
	var args extenderArgs
	if err := json.NewDecoder(r.Body).Decode(&args); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	scores := []hostPriority{}
	if args.NodeNames != nil {
		for _, name := range *args.NodeNames {
			scores = append(scores, hostPriority{Host: name})
		}
	}
	writeJSON(w, scores)
}

func (s *server) bind(w http.ResponseWriter, r *http.Request) {
	var args bindingArgs
	if err := json.NewDecoder(r.Body).Decode(&args); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	binding := map[string]any{
		"apiVersion": "v1", "kind": "Binding",
		"metadata": map[string]any{"name": args.PodName, "namespace": args.PodNamespace, "uid": args.PodUID},
		"target":   map[string]any{"apiVersion": "v1", "kind": "Node", "name": args.Node},
	}
	if s.annotate {
		binding["metadata"].(map[string]any)["annotations"] = map[string]string{"npu.openfuyao.com/assigned": fmt.Sprintf(
			`{"containers":[{"container":"main","devices":["Ascend910-%d"],"resource":"npu.huawei.com/NPU"}],`+
				`"node":%q,"schema_version":1}`, s.binds.Load()%8, args.Node)}
	}
	body, _ := json.Marshal(binding)
	url := fmt.Sprintf("%s/api/v1/namespaces/%s/pods/%s/binding", s.apiServer, args.PodNamespace, args.PodName)
	req, _ := http.NewRequest(http.MethodPost, url, bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", "Bearer "+s.token)
	result := bindingResult{}
	started := time.Now()
	resp, err := s.client.Do(req)
	if err != nil {
		result.Error = err.Error()
	} else {
		answer, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK {
			result.Error = fmt.Sprintf("binding %s/%s: HTTP %d: %s", args.PodNamespace, args.PodName, resp.StatusCode,
				strings.TrimSpace(string(answer)))
		}
	}
	s.binds.Add(1)
	s.bindNanos.Add(int64(time.Since(started)))
	writeJSON(w, result)
}

// stats answers what the bench reads: binds made and the mean time of their API calls.
func (s *server) stats(w http.ResponseWriter, _ *http.Request) {
	binds := s.binds.Load()
	mean := 0.0
	if binds > 0 {
		mean = float64(s.bindNanos.Load()) / float64(binds) / 1e6
	}
	writeJSON(w, map[string]any{"api_bind": map[string]any{"count": binds, "mean_ms": mean}})
}

func writeJSON(w http.ResponseWriter, v any) {
	body, _ := json.Marshal(v)
	w.Header().Set("Content-Type", "application/json")
	w.Write(body)
}

func main() {
	listen := flag.String("listen", "127.0.0.1:8888", "address to serve the extender verbs on")
	apiServer := flag.String("server", "", "the API server's URL (https://HOST:PORT)")
	caFile := flag.String("ca", "", "the API server's CA certificate (PEM)")
	tokenFile := flag.String("token-file", "", "a file holding a bearer token allowed to create pods/binding")
	shortlist := flag.Int("shortlist", 16, "filter passes the first N node names (0: all)")
	delay := flag.Duration("filter-delay", 0, "experiments: filter answers this much later")
	spin := flag.Bool("filter-spin", false, "experiments: the filter's delay burns CPU instead of sleeping")
	annotate := flag.Bool("annotate", false, "experiments: bind with an assignment annotation of fuyao's size")
	flag.Parse()
	if *apiServer == "" || *caFile == "" || *tokenFile == "" {
		log.Fatal("null-extender: --server, --ca and --token-file are required")
	}
	ca, err := os.ReadFile(*caFile)
	if err != nil {
		log.Fatalf("null-extender: %v", err)
	}
	token, err := os.ReadFile(*tokenFile)
	if err != nil {
		log.Fatalf("null-extender: %v", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(ca) {
		log.Fatalf("null-extender: no certificate in %s", *caFile)
	}
	transport := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}, MaxIdleConnsPerHost: 64,
		ForceAttemptHTTP2: true}
	s := &server{shortlist: *shortlist, delay: *delay, spin: *spin, annotate: *annotate, apiServer: strings.TrimRight(*apiServer, "/"),
		token: strings.TrimSpace(string(token)), client: &http.Client{Transport: transport, Timeout: 30 * time.Second}}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /filter", s.filter)
	mux.HandleFunc("POST /prioritize", s.prioritize)
	mux.HandleFunc("POST /bind", s.bind)
	mux.HandleFunc("GET /stats", s.stats)
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) { w.Write([]byte("ok")) })
	log.Printf("null-extender on %s (shortlist %d)", *listen, *shortlist)
	log.Fatal(http.ListenAndServe(*listen, mux))
}
