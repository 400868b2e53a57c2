"""The e2e test's Python side: reads the webhook's output, drives the Azure SDK, and plays
an in-cluster HTTPS service. Run with the venv's python (tests/e2e/.venv).

  pod.py env INJECTED.yaml [CONTAINER...]  -> KEY=VALUE lines: the proxy env those containers
                                           share (default: the CNPG instance's two)
  pod.py container-create NAME             (Azure SDK, through whatever HTTPS_PROXY says;
                                           AZURE_STORAGE_CONNECTION_STRING if set)
  pod.py blob-count NAME [PREFIX]          -> number of blobs
  pod.py roundtrip NAME FILE               upload FILE, download it, compare SHA-256
  pod.py serve ADDR PORT CERT KEY          an HTTPS server that logs each request's client
  pod.py get URL                           GET with requests (honours https_proxy/no_proxy)
  pod.py sas NAME                          -> a SAS query string for container NAME (1 hour)
"""

import hashlib
import http.server
import os
import ssl
import sys
import time

PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy")
CONTAINERS = ("postgres", "plugin-barman-cloud")


def env_from_injected(path, *containers):
    containers = containers or CONTAINERS
    import yaml

    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    pods = [d for d in docs if d.get("kind") == "Pod"]
    if len(pods) != 1:
        sys.exit(f"expected one Pod in {path}, found {len(pods)}")
    spec = pods[0]["spec"]
    found = {}
    for c in spec.get("initContainers", []) + spec.get("containers", []):
        if c["name"] in containers:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            missing = [v for v in PROXY_VARS if not env.get(v)]
            if missing:
                sys.exit(f"container {c['name']}: webhook set no {', '.join(missing)}")
            found[c["name"]] = {v: env[v] for v in PROXY_VARS}
    for name in containers:
        if name not in found:
            sys.exit(f"no container {name} in the injected pod")
    a = found[containers[0]]
    for name in containers[1:]:
        if found[name] != a:
            sys.exit(f"{containers[0]} and {name} got different proxy env: {a} vs {found[name]}")
    if a["HTTPS_PROXY"] != a["https_proxy"] or a["NO_PROXY"] != a["no_proxy"]:
        sys.exit(f"upper and lower case differ: {a}")
    for k in PROXY_VARS:
        print(f"{k}={a[k]}")


def service():
    """The pod's storage client: the connection string when it has one (CNPG's
    `azureCredentials.connectionString`, as for the blob gateway), else account and key."""
    from azure.storage.blob import BlobServiceClient

    if conn := os.environ.get("AZURE_STORAGE_CONNECTION_STRING"):
        return BlobServiceClient.from_connection_string(conn)
    account = os.environ["AZURE_STORAGE_ACCOUNT"]
    return BlobServiceClient(
        f"https://{account}.blob.core.windows.net",
        credential={"account_name": account, "account_key": os.environ["AZURE_STORAGE_KEY"]},
    )


def container_create(name):
    service().create_container(name)


def blob_count(name, prefix=None):
    print(sum(1 for _ in service().get_container_client(name).list_blobs(name_starts_with=prefix)))


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def roundtrip(name, path):
    size = os.path.getsize(path)
    want = sha256_file(path)
    blob = service().get_blob_client(name, os.path.basename(path))
    t0 = time.monotonic()
    with open(path, "rb") as f:
        blob.upload_blob(f, length=size, overwrite=True, max_concurrency=4)
    t1 = time.monotonic()
    h = hashlib.sha256()
    got_size = 0
    for chunk in blob.download_blob(max_concurrency=4).chunks():
        h.update(chunk)
        got_size += len(chunk)
    t2 = time.monotonic()
    mib = size / (1 << 20)
    print(f"up {mib:.0f} MiB in {t1 - t0:.1f}s, down in {t2 - t1:.1f}s, sha256 {want[:16]}...")
    if got_size != size or h.hexdigest() != want:
        sys.exit(f"downloaded {got_size} bytes sha256 {h.hexdigest()}, uploaded {size} {want}")


def serve(addr, port, cert, key):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's naming)
            body = b"in-cluster service\n"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, fmt, *args):
            print(f"request from {self.client_address[0]}: {fmt % args}", file=sys.stderr, flush=True)

    httpd = http.server.HTTPServer((addr, int(port)), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    httpd.serve_forever()


def get(url):
    import requests

    r = requests.get(url, timeout=10)
    print(r.status_code, r.text.strip())
    r.raise_for_status()


def sas(name):
    from datetime import datetime, timedelta, timezone

    from azure.storage.blob import ContainerSasPermissions, generate_container_sas

    account = os.environ["AZURE_STORAGE_ACCOUNT"]
    print(
        generate_container_sas(
            account,
            name,
            account_key=os.environ["AZURE_STORAGE_KEY"],
            permission=ContainerSasPermissions(read=True, write=True, create=True),
            expiry=datetime.now(timezone.utc) + timedelta(hours=1),
        )
    )


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    {
        "env": env_from_injected,
        "container-create": container_create,
        "blob-count": blob_count,
        "roundtrip": roundtrip,
        "serve": serve,
        "get": get,
        "sas": sas,
    }[cmd](*args)


if __name__ == "__main__":
    main()
