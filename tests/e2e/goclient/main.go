// The e2e test's Go side: the HTTP stack Velero reaches Azure with. Velero's Azure plugin
// uses the Azure SDK for Go, whose default transport is net/http's with the proxy taken from
// the environment (http.ProxyFromEnvironment: HTTPS_PROXY, then https_proxy; NO_PROXY with
// host names, ".suffix" entries, IP literals and CIDRs) and the system CA roots, which Go
// on Linux also reads from SSL_CERT_FILE. This program uses exactly that transport.
//
//	goclient roundtrip URL FILE   PUT FILE as a block blob at URL (a SAS URL), GET it back,
//	                              compare SHA-256
//	goclient get URL              GET URL, print the status and the body's first line
//
// Standard library only, so it builds with Debian's golang-go and no module download.
package main

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"
)

// client is net/http's default transport, as the Azure SDK's default one is built on it.
func client() *http.Client {
	return &http.Client{Transport: http.DefaultTransport, Timeout: 120 * time.Second}
}

func fail(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "goclient: "+format+"\n", args...)
	os.Exit(1)
}

func roundtrip(url, path string) {
	data, err := os.ReadFile(path)
	if err != nil {
		fail("%v", err)
	}
	want := sha256.Sum256(data)
	put, err := http.NewRequest(http.MethodPut, url, bytes.NewReader(data))
	if err != nil {
		fail("%v", err)
	}
	put.Header.Set("x-ms-blob-type", "BlockBlob")
	put.Header.Set("x-ms-version", "2021-08-06")
	t0 := time.Now()
	resp, err := client().Do(put)
	if err != nil {
		fail("PUT: %v", err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusCreated {
		fail("PUT: %s: %s", resp.Status, strings.TrimSpace(string(body)))
	}
	t1 := time.Now()
	get, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		fail("%v", err)
	}
	get.Header.Set("x-ms-version", "2021-08-06")
	resp, err = client().Do(get)
	if err != nil {
		fail("GET: %v", err)
	}
	h := sha256.New()
	n, err := io.Copy(h, resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusOK {
		fail("GET: %s after %d bytes: %v", resp.Status, n, err)
	}
	if got := h.Sum(nil); n != int64(len(data)) || !bytes.Equal(got, want[:]) {
		fail("downloaded %d bytes sha256 %x, uploaded %d bytes %x", n, got, len(data), want)
	}
	fmt.Printf("Go net/http: up %d MiB in %.1fs, down in %.1fs, sha256 %s...\n",
		len(data)>>20, t1.Sub(t0).Seconds(), time.Since(t1).Seconds(), hex.EncodeToString(want[:8]))
}

func get(url string) {
	resp, err := client().Get(url)
	if err != nil {
		fail("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	line, _ := bufio.NewReader(resp.Body).ReadString('\n')
	fmt.Println(resp.StatusCode, strings.TrimSpace(line))
	if resp.StatusCode != http.StatusOK {
		os.Exit(1)
	}
}

func main() {
	args := os.Args[1:]
	switch {
	case len(args) == 3 && args[0] == "roundtrip":
		roundtrip(args[1], args[2])
	case len(args) == 2 && args[0] == "get":
		get(args[1])
	default:
		fail("usage: goclient roundtrip URL FILE | goclient get URL")
	}
}
