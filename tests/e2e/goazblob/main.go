// The e2e test's Velero-shaped client of the blob gateway: Shared Key signing by an Azure SDK
// for Go, configured from the same fields a Velero BackupStorageLocation gives the Azure
// plugin. With `storageAccountKeyEnvVar` set, the plugin reads the key from that entry of the
// credentials file, takes the service URL verbatim from `storageAccountURI` (path style at
// the gateway: https://egress-gate-blob.<ns>.svc:<port>/<virtual account>) and signs with a
// Shared Key credential for `storageAccount`.
//
// The SDK here is github.com/Azure/azure-storage-blob-go (azblob, Debian's
// golang-github-azure-azure-storage-blob-go-dev), built in GOPATH mode from
// /usr/share/gocode: no Go module can be downloaded in CI. Velero's plugin uses its successor,
// github.com/Azure/azure-sdk-for-go/sdk/storage/azblob, whose Shared Key policy builds the
// same string to sign (x-ms-* headers in byte order, "/" + account + escaped path, sorted
// decoded query, Content-Length 0 as empty). Its HTTP transport takes the proxy from the
// environment (HTTPS_PROXY, NO_PROXY) and the CA roots from SSL_CERT_FILE, as the plugin's.
//
//	goazblob STORAGE_ACCOUNT STORAGE_ACCOUNT_URI CREDENTIALS_FILE KEY_ENTRY CONTAINER FILE
//
// creates CONTAINER if missing, uploads FILE as staged blocks (Put Block, Put Block List, as
// the plugin's UploadStream), lists it, downloads it and compares SHA-256, then deletes it
// and checks the listing no longer shows it.
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"io"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/Azure/azure-storage-blob-go/azblob"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "goazblob: "+format+"\n", args...)
	os.Exit(1)
}

// credentialsEntry reads KEY=VALUE lines as Velero's credentials file holds them.
func credentialsEntry(path, name string) string {
	f, err := os.Open(path)
	if err != nil {
		fail("%v", err)
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		k, v, ok := strings.Cut(strings.TrimSpace(s.Text()), "=")
		if ok && k == name {
			return v
		}
	}
	fail("no %s in %s", name, path)
	return ""
}

// names lists the blobs under prefix with their sizes.
func names(ctx context.Context, c azblob.ContainerURL, prefix string) map[string]int64 {
	out := map[string]int64{}
	for marker := (azblob.Marker{}); marker.NotDone(); {
		page, err := c.ListBlobsFlatSegment(ctx, marker, azblob.ListBlobsSegmentOptions{Prefix: prefix})
		if err != nil {
			fail("List Blobs: %v", err)
		}
		for _, b := range page.Segment.BlobItems {
			out[b.Name] = *b.Properties.ContentLength
		}
		marker = page.NextMarker
	}
	return out
}

func main() {
	if len(os.Args) != 7 {
		fail("usage: goazblob STORAGE_ACCOUNT STORAGE_ACCOUNT_URI CREDENTIALS_FILE KEY_ENTRY CONTAINER FILE")
	}
	account, uri, credFile, keyEntry, container, path := os.Args[1], os.Args[2], os.Args[3], os.Args[4], os.Args[5], os.Args[6]
	cred, err := azblob.NewSharedKeyCredential(account, credentialsEntry(credFile, keyEntry))
	if err != nil {
		fail("account key: %v", err)
	}
	u, err := url.Parse(uri)
	if err != nil {
		fail("storageAccountURI: %v", err)
	}
	pipeline := azblob.NewPipeline(cred, azblob.PipelineOptions{Retry: azblob.RetryOptions{MaxTries: 1}})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c := azblob.NewServiceURL(*u, pipeline).NewContainerURL(container)
	if _, err := c.Create(ctx, nil, azblob.PublicAccessNone); err != nil {
		if se, ok := err.(azblob.StorageError); !ok || se.ServiceCode() != azblob.ServiceCodeContainerAlreadyExists {
			fail("Create Container: %v", err)
		}
	}

	data, err := os.ReadFile(path)
	if err != nil {
		fail("%v", err)
	}
	want := sha256.Sum256(data)
	name := "backups/go/" + time.Now().UTC().Format("20060102T150405") + "/data.bin"
	blob := c.NewBlockBlobURL(name)
	t0 := time.Now()
	if _, err := azblob.UploadStreamToBlockBlob(ctx, bytes.NewReader(data), blob,
		azblob.UploadStreamToBlockBlobOptions{BufferSize: 4 << 20, MaxBuffers: 2}); err != nil {
		fail("upload: %v", err)
	}
	up := time.Since(t0)
	if got := names(ctx, c, "backups/go/"); got[name] != int64(len(data)) {
		fail("listing after upload: want %s of %d bytes, got %v", name, len(data), got)
	}
	t1 := time.Now()
	resp, err := blob.Download(ctx, 0, azblob.CountToEnd, azblob.BlobAccessConditions{}, false, azblob.ClientProvidedKeyOptions{})
	if err != nil {
		fail("Get Blob: %v", err)
	}
	body := resp.Body(azblob.RetryReaderOptions{})
	h := sha256.New()
	n, err := io.Copy(h, body)
	body.Close()
	if err != nil {
		fail("Get Blob body after %d bytes: %v", n, err)
	}
	if got := h.Sum(nil); n != int64(len(data)) || !bytes.Equal(got, want[:]) {
		fail("downloaded %d bytes sha256 %x, uploaded %d bytes %x", n, got, len(data), want)
	}
	down := time.Since(t1)
	if _, err := blob.Delete(ctx, azblob.DeleteSnapshotsOptionNone, azblob.BlobAccessConditions{}); err != nil {
		fail("Delete Blob: %v", err)
	}
	if got := names(ctx, c, "backups/go/"); len(got) != 0 {
		fail("listing after delete still shows %v", got)
	}
	fmt.Printf("azblob (Go, Shared Key as %s at %s): %s: up %d MiB in staged blocks %.1fs, listed, down %.1fs, sha256 %x..., deleted\n",
		account, uri, name, len(data)>>20, up.Seconds(), down.Seconds(), want[:8])
}
