"""The blob gateway through the Azure SDK for Python (step 9 of tests/e2e/run.sh, from
tests/e2e/blob-gateway.sh, in the pod's network namespace).

The gateway holds the real key of the account on Azurite; this client holds only the
gateway-only key of the virtual account `pg-prod`, from the connection string
`egress-proxy blob client-config` printed (AZURE_STORAGE_CONNECTION_STRING). Positive calls
must succeed (Azurite accepting the re-signed request is the proof of the signature); every
negative must be a 403 from the gateway with nothing reaching Azurite, which the caller checks
in Azurite's debug log by the marker each negative carries in its path or query.

Usage: blob_gateway.py sdk GATEWAY_URL REAL_KEY RO_KEY CA_FILE
       blob_gateway.py batch GATEWAY_URL REAL_KEY RO_KEY CA_FILE   (after sdk)
       blob_gateway.py big GATEWAY_URL CA_FILE MIB
       blob_gateway.py client-config FILE OUTDIR
`big` sends one Put Blob of MIB MiB (the caller samples the proxy's RSS meanwhile).
`client-config` writes the fields a user pastes from `blob client-config`'s output, one file
each, to OUTDIR: connection-string, destination-path, storage-account, storage-account-uri,
key-entry, credentials (the Velero credentials file).
"""

import base64
import json
import os
import ssl
import sys
import time
import urllib.error
import urllib.request

from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobServiceClient, ContainerClient
import azure.storage.blob._shared.policies as sdk_policies


def client_config(path, outdir):
    """Splits `blob client-config`'s objects into the fields the clients are given."""
    import yaml

    with open(path) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    secrets = {k: v for d in docs if d["kind"] == "Secret" for k, v in d["stringData"].items()}
    store = next(d for d in docs if d["kind"] == "ObjectStore")["spec"]["configuration"]
    bsl = next(d for d in docs if d["kind"] == "BackupStorageLocation")["spec"]["config"]
    fields = {
        "connection-string": secrets["AZURE_STORAGE_CONNECTION_STRING"] + "\n",
        "destination-path": store["destinationPath"] + "\n",
        "storage-account": bsl["storageAccount"] + "\n",
        "storage-account-uri": bsl["storageAccountURI"] + "\n",
        "key-entry": bsl["storageAccountKeyEnvVar"] + "\n",
        "credentials": secrets["cloud"],
    }
    for name, value in fields.items():
        with open(os.path.join(outdir, name), "w") as f:
            f.write(value)


if sys.argv[1:2] == ["client-config"]:
    client_config(*sys.argv[2:4])
    sys.exit(0)

if sys.argv[1:2] == ["big"]:
    gateway, ca_file, mib = sys.argv[2:5]
    os.environ["REQUESTS_CA_BUNDLE"] = ca_file  # the gateway's TLS listener has a private CA
    size = int(mib) * 1024 * 1024
    big = ContainerClient.from_connection_string(
        os.environ["AZURE_STORAGE_CONNECTION_STRING"], "pgbackups", max_single_put_size=size + 1
    )
    chunk = os.urandom(1024 * 1024)

    class Source:
        """size bytes, produced as the SDK reads them (for a single Put Blob it reads them
        all at once: the client holds the body, the gateway must not)."""

        def __init__(self):
            self.left = size

        def read(self, n=-1):
            n = self.left if n is None or n < 0 else min(n, self.left)
            self.left -= n
            return chunk * (n // len(chunk)) + chunk[: n % len(chunk)]

    t0 = time.monotonic()
    big.upload_blob("big/upload", Source(), length=size)
    took = time.monotonic() - t0
    got = big.get_blob_client("big/upload").get_blob_properties().size
    assert got == size, (got, size)
    big.delete_blob("big/upload")  # frees Azurite's disk
    print(f"one Put Blob of {got} bytes in {took:.1f}s ({got / took / (1 << 20):.0f} MiB/s)")
    sys.exit(0)

assert sys.argv[1] in ("sdk", "batch"), __doc__
gateway, real_key, ro_key, ca_file = sys.argv[2:6]
os.environ["REQUESTS_CA_BUNDLE"] = ca_file  # the gateway's TLS listener has a private CA
client_conn = os.environ["AZURE_STORAGE_CONNECTION_STRING"]
client_key = dict(p.split("=", 1) for p in client_conn.split(";") if p)["AccountKey"]


def conn_str(account, key):
    return (
        f"DefaultEndpointsProtocol=https;AccountName={account};AccountKey={key};"
        f"BlobEndpoint={gateway}/{account};"
    )


def container(account="pg-prod", key=client_key, name="pgbackups"):
    return ContainerClient.from_connection_string(conn_str(account, key), name)


results = {}
c = ContainerClient.from_connection_string(client_conn, "pgbackups")
wrong = base64.b64encode(b"w" * 64).decode()
auth = "AuthenticationFailed"
perm = "AuthorizationPermissionMismatch"


def refused(name, fn, code, says=""):
    """fn must fail with 403 and `code` (and `says` in the message); recorded in results."""
    try:
        fn()
    except HttpResponseError as e:
        assert e.status_code == 403, f"{name}: {e.status_code} {e}"
        assert e.error_code == code, f"{name}: {e.error_code}"
        assert says in str(e), f"{name}: refused, but not because of {says!r}: {e}"
        results[name] = f"403 {e.error_code}"
        return
    raise AssertionError(f"{name}: not refused")


def sdk():
    """Positives (create, single put, staged blocks, list, get), then the refusals."""
    c.create_container()
    payload = os.urandom(5 * 1024 * 1024 + 3)
    c.upload_blob("wals/000000010000000000000001", payload, metadata={"test_a": "1", "Test_B": "2", "test_": "3"})
    c.upload_blob("base/data.tar", payload * 2, max_concurrency=1)  # staged: Put Block + list
    c.upload_blob("keep/me", b"kept")
    names = sorted(b.name for b in c.list_blobs())
    assert names == ["base/data.tar", "keep/me", "wals/000000010000000000000001"], names
    assert c.download_blob("wals/000000010000000000000001").readall() == payload
    results["positive"] = "ok"

    ro = container(account="pg-ro", key=ro_key)
    refused("wrong_client_key", lambda: container(key=wrong).get_blob_client("neg-wrongkey").get_blob_properties(), auth)
    refused("real_key_at_gateway", lambda: container(key=real_key).get_blob_client("neg-realkey").get_blob_properties(), auth)
    refused("unknown_account", lambda: container(account="nobody").get_blob_client("neg-unknown").get_blob_properties(), auth)
    refused("unlisted_container", lambda: container(name="negother").get_blob_client("x").get_blob_properties(), perm)
    refused("delete_without_permission", lambda: ro.delete_blob("keep/me"), perm, "permission")
    refused("container_acl", lambda: c.get_container_access_policy(), perm)
    refused(
        "copy_source",
        lambda: c.get_blob_client("neg-copy").start_copy_from_url("https://elsewhere.blob.core.windows.net/c/b"),
        perm,
    )
    real_time = sdk_policies.time
    sdk_policies.time = lambda: real_time() - 20 * 60
    try:
        refused("stale_date", lambda: c.get_blob_client("neg-stale").get_blob_properties(), auth)
    finally:
        sdk_policies.time = real_time
    # An account-level call (List Containers): never forwarded, whatever the permissions.
    svc = BlobServiceClient.from_connection_string(client_conn)
    refused("account_level", lambda: list(svc.list_containers(name_starts_with="neg-account")), perm)
    anon = ContainerClient.from_container_url(f"{gateway}/pg-prod/pgbackups")
    refused("anonymous", lambda: anon.get_blob_client("neg-anon").get_blob_properties(), auth)

    # Bearer: the SDK refuses to build one without a token credential; send it as curl would.
    ctx = ssl.create_default_context(cafile=ca_file)
    req = urllib.request.Request(
        f"{gateway}/pg-prod/pgbackups/neg-bearer",
        headers={"Authorization": "Bearer eyJ0eXAiOiJKV1QifQ.e30.", "x-ms-version": "2021-08-06"},
    )
    try:
        urllib.request.urlopen(req, context=ctx)
        raise AssertionError("bearer: not refused")
    except urllib.error.HTTPError as e:
        assert e.code == 403 and e.headers["x-ms-error-code"] == auth, (e.code, dict(e.headers))
        results["bearer"] = f"403 {e.headers['x-ms-error-code']}"


def batch():
    """Blob Batch deletes, as barman-cloud-backup-delete sends them, after `sdk`. With a
    BlobEndpoint that is not localhost or 127.0.0.1 (a Service name), the SDK writes each
    part's path without the account: /<container>/<blob>."""
    c.delete_blobs("base/data.tar", "wals/000000010000000000000001")
    # The SAS part of the step leaves its own blobs under sas/ in this container.
    names = sorted(b.name for b in c.list_blobs() if not b.name.startswith("sas/"))
    assert names == ["keep/me"], names
    results["batch_delete"] = "ok"
    # A batch with a delete the account may not do: the whole batch is refused.
    ro = container(account="pg-ro", key=ro_key)
    refused("batch_without_delete", lambda: ro.delete_blobs("keep/me", "neg-batch"), perm, "permission")
    assert c.download_blob("keep/me").readall() == b"kept"


{"sdk": sdk, "batch": batch}[sys.argv[1]]()
print(json.dumps(results, indent=1))
