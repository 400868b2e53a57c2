"""The blob gateway through the Azure SDK for Python (tests/e2e/blob-gateway.sh runs it).

The gateway holds the real key of `realacct` on Azurite; this client holds only its
gateway-only key for the virtual account `pg-prod`. Positive calls must succeed (Azurite
accepting the re-signed request is the proof of the signature); every negative must be a
403 from the gateway with nothing reaching Azurite, which the caller checks in Azurite's
debug log by the marker each negative carries in its path.

Usage: blob_gateway.py GATEWAY_URL CLIENT_KEY REAL_KEY RO_KEY CA_FILE
       blob_gateway.py GATEWAY_URL CLIENT_KEY REAL_KEY RO_KEY CA_FILE big MIB
The second form sends one Put Blob of MIB MiB (the caller samples the proxy's RSS meanwhile).
"""

import base64
import json
import os
import sys
import urllib.error
import urllib.request
import ssl

from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobServiceClient, ContainerClient
import azure.storage.blob._shared.policies as sdk_policies

gateway, client_key, real_key, ro_key, ca_file = sys.argv[1:6]
os.environ["REQUESTS_CA_BUNDLE"] = ca_file  # the gateway's TLS listener has a private CA


def conn_str(account, key):
    return (
        f"DefaultEndpointsProtocol=https;AccountName={account};AccountKey={key};"
        f"BlobEndpoint={gateway}/{account};"
    )


def container(account="pg-prod", key=client_key, name="pgbackups"):
    return ContainerClient.from_connection_string(conn_str(account, key), name)


results = {}

if sys.argv[6:7] == ["big"]:
    size = int(sys.argv[7]) * 1024 * 1024
    big = ContainerClient.from_connection_string(
        conn_str("pg-prod", client_key), "pgbackups", max_single_put_size=size + 1
    )
    chunk = os.urandom(1024 * 1024)

    class Source:
        """size bytes, read as the SDK asks, never held whole."""

        def __init__(self):
            self.left = size

        def read(self, n=-1):
            n = self.left if n is None or n < 0 else min(n, self.left)
            self.left -= n
            return (chunk * (n // len(chunk) + 1))[:n]

    big.upload_blob("big/upload", Source(), length=size)
    got = big.get_blob_client("big/upload").get_blob_properties().size
    assert got == size, (got, size)
    print(json.dumps({"big_put_blob_bytes": got}))
    sys.exit(0)

# Positive: create, upload (single put and staged blocks), list, download, batch delete,
# with the connection string `egress-proxy blob client-config` printed.
c = ContainerClient.from_connection_string(os.environ["CLIENT_CONNECTION_STRING"], "pgbackups")
c.create_container()
payload = os.urandom(5 * 1024 * 1024 + 3)
c.upload_blob("wals/000000010000000000000001", payload, metadata={"test_a": "1", "Test_B": "2", "test_": "3"})
c.upload_blob("base/data.tar", payload * 2, max_concurrency=1)  # staged: Put Block + list
c.upload_blob("keep/me", b"kept")
names = sorted(b.name for b in c.list_blobs())
assert names == ["base/data.tar", "keep/me", "wals/000000010000000000000001"], names
assert c.download_blob("wals/000000010000000000000001").readall() == payload
results["positive"] = "ok"
# Blob Batch delete, as barman-cloud-backup-delete sends it.
c.delete_blobs("wals/000000010000000000000001", "base/data.tar")
names = sorted(b.name for b in c.list_blobs())
assert names == ["keep/me"], names
results["batch_delete"] = "ok"


def refused(name, fn, code):
    try:
        fn()
    except HttpResponseError as e:
        assert e.status_code == 403, f"{name}: {e.status_code} {e}"
        assert e.error_code == code, f"{name}: {e.error_code}"
        results[name] = f"403 {e.error_code}"
        return
    raise AssertionError(f"{name}: not refused")


wrong = base64.b64encode(b"w" * 64).decode()
auth = "AuthenticationFailed"
perm = "AuthorizationPermissionMismatch"
refused("wrong_client_key", lambda: container(key=wrong).get_blob_client("neg-wrongkey").get_blob_properties(), auth)
refused("real_key_at_gateway", lambda: container(key=real_key).get_blob_client("neg-realkey").get_blob_properties(), auth)
refused("unknown_account", lambda: container(account="nobody").get_blob_client("neg-unknown").get_blob_properties(), auth)
refused("unlisted_container", lambda: container(name="negother").get_blob_client("x").get_blob_properties(), perm)
refused("delete_without_permission", lambda: container(account="pg-ro", key=ro_key).delete_blob("keep/me"), perm)
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

print(json.dumps(results, indent=1))
