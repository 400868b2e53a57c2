"""Service SAS through the blob gateway (tests/e2e/blob-gateway.sh runs it after blob_gateway.py).

The client signs SAS URLs with its gateway-only key for the virtual account `pg-prod`, the
way Velero's Azure plugin signs the download URL behind `velero backup logs` (sr=b, sp=r,
start ten minutes back, spr=https), and fetches them with a plain HTTP GET as Velero's CLI
does. Azurite holds the real key and knows nothing of the SAS: a download that works proves
the gateway verified the SAS, stripped it and re-signed upstream. Every refused request names
a blob starting with `neg-sas-`; the caller checks that none of them reached Azurite.

Usage: blob_sas.py TLS_URL PLAIN_URL CLIENT_KEY REAL_KEY CA_FILE
"""

import base64
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from datetime import datetime, timedelta, timezone

from azure.storage.blob import (
    AccountSasPermissions,
    BlobClient,
    BlobSasPermissions,
    ContainerClient,
    ContainerSasPermissions,
    ResourceTypes,
    UserDelegationKey,
    generate_account_sas,
    generate_blob_sas,
    generate_container_sas,
)

tls_url, plain_url, client_key, real_key, ca_file = sys.argv[1:6]
os.environ["REQUESTS_CA_BUNDLE"] = ca_file
ACCOUNT, CONTAINER = "pg-prod", "pgbackups"
ctx = ssl.create_default_context(cafile=ca_file)
now = datetime.now(timezone.utc)
results = {}


def velero_url(blob, base=tls_url, key=client_key, **kw):
    """A download URL shaped like Velero's CreateSignedURL: read-only blob SAS, valid from
    ten minutes ago, https only."""
    args = dict(
        permission=BlobSasPermissions(read=True),
        start=now - timedelta(minutes=10),
        expiry=now + timedelta(minutes=30),
        protocol="https",
    )
    args.update(kw)
    sas = generate_blob_sas(ACCOUNT, CONTAINER, blob, account_key=key, **args)
    return f"{base}/{ACCOUNT}/{CONTAINER}/{blob}?{sas}"


def get(url, method="GET"):
    """(status, x-ms-error-code, body) of a plain request, as Velero's CLI downloads."""
    req = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(req, context=ctx) as r:
            return r.status, None, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("x-ms-error-code"), e.read()


def refused(name, url, code, why, method="GET"):
    """The gateway's 403: status, x-ms-error-code, and the XML message saying why."""
    status, error, body = get(url, method)
    assert status == 403 and error == code, f"{name}: {status} {error} {body[:200]!r}"
    assert b"<Error><Code>" + code.encode() + b"</Code>" in body, f"{name}: {body!r}"
    assert why.encode() in body, f"{name}: {why!r} not in {body!r}"
    results[name] = f"403 {error}"


# The blob to download, written with Shared Key (as the Velero server writes its logs).
payload = os.urandom(300 * 1024)
conn = (
    f"DefaultEndpointsProtocol=https;AccountName={ACCOUNT};AccountKey={client_key};"
    f"BlobEndpoint={tls_url}/{ACCOUNT};"
)
ContainerClient.from_connection_string(conn, CONTAINER).upload_blob(
    "sas/backup-logs.gz", payload, overwrite=True
)

# Positive: Velero's URL with a plain GET; the SDK with the same URL; a container SAS that
# lists; a write SAS that uploads.
status, error, body = get(velero_url("sas/backup-logs.gz"))
assert status == 200 and body == payload, (status, error, len(body))
results["velero_url_download"] = f"{status}, {len(body)} bytes"
sdk = BlobClient.from_blob_url(velero_url("sas/backup-logs.gz"))
assert sdk.download_blob().readall() == payload
results["sdk_download_with_sas_url"] = "ok"
container_sas = generate_container_sas(
    ACCOUNT,
    CONTAINER,
    account_key=client_key,
    permission=ContainerSasPermissions(read=True, list=True),
    expiry=now + timedelta(minutes=30),
)
listing = ContainerClient.from_container_url(f"{tls_url}/{ACCOUNT}/{CONTAINER}?{container_sas}")
names = [b.name for b in listing.list_blobs(name_starts_with="sas/")]
assert names == ["sas/backup-logs.gz"], names
results["container_sas_list"] = names
# The connection-string form docs/blob-gateway.md shows: BlobEndpoint plus a container SAS.
rw_sas = generate_container_sas(
    ACCOUNT,
    CONTAINER,
    account_key=client_key,
    permission=ContainerSasPermissions(read=True, write=True, list=True),
    expiry=now + timedelta(minutes=30),
    protocol="https",
)
sas_conn = f"BlobEndpoint={tls_url}/{ACCOUNT};SharedAccessSignature={rw_sas}"
via_conn = ContainerClient.from_connection_string(sas_conn, CONTAINER)
via_conn.upload_blob("sas/from-connection-string", b"conn", overwrite=True)
assert via_conn.download_blob("sas/from-connection-string").readall() == b"conn"
names = [b.name for b in via_conn.list_blobs(name_starts_with="sas/from-")]
assert names == ["sas/from-connection-string"], names
results["connection_string_with_sas"] = "ok"
upload = velero_url("sas/uploaded", permission=BlobSasPermissions(write=True))
BlobClient.from_blob_url(upload).upload_blob(b"written with a SAS", overwrite=True)
status, _, body = get(velero_url("sas/uploaded"))
assert status == 200 and body == b"written with a SAS", (status, body)
results["write_sas_upload"] = "ok"

# Refusals: 403 from the gateway, nothing upstream.
auth, perm = "AuthenticationFailed", "AuthorizationPermissionMismatch"
refused(
    "expired",
    velero_url(
        "neg-sas-expired",
        start=now - timedelta(hours=2),
        expiry=now - timedelta(minutes=20),
    ),
    auth,
    "the SAS expired at",
)
refused(
    "wrong_permission_read_with_write_sas",
    velero_url("neg-sas-perm", permission=BlobSasPermissions(write=True)),
    perm,
    "get-blob needs SAS permission &apos;r&apos;",
)
refused(
    "wrong_permission_delete_with_read_sas",
    velero_url("neg-sas-perm-del"),
    perm,
    "delete-blob needs SAS permission &apos;d&apos;",
    "DELETE",
)
signed = velero_url("neg-sas-tampered-a")
bad_sig = "the SAS signature does not match"
refused("tampered_blob_name", signed.replace("neg-sas-tampered-a", "neg-sas-tampered-b"), auth, bad_sig)
refused("tampered_permission", signed.replace("sp=r&", "sp=rwd&"), auth, bad_sig)
refused("signed_with_the_real_key", velero_url("neg-sas-realkey", key=real_key), auth, bad_sig)
account_sas = generate_account_sas(
    ACCOUNT,
    client_key,
    resource_types=ResourceTypes(container=True, object=True),
    permission=AccountSasPermissions(read=True, list=True),
    expiry=now + timedelta(minutes=30),
)
refused(
    "account_sas",
    f"{tls_url}/{ACCOUNT}/{CONTAINER}/neg-sas-account?{account_sas}",
    auth,
    "account SAS (ss/srt) is not accepted",
)
udk = UserDelegationKey()
udk.signed_oid, udk.signed_tid = "00000000-0000-0000-0000-000000000001", "00000000-0000-0000-0000-000000000002"
udk.signed_start = (now - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
udk.signed_expiry = (now + timedelta(minutes=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
udk.signed_service, udk.signed_version = "b", "2025-01-05"
udk.value = client_key
udk_sas = generate_blob_sas(
    ACCOUNT,
    CONTAINER,
    "neg-sas-udk",
    user_delegation_key=udk,
    permission=BlobSasPermissions(read=True),
    expiry=now + timedelta(minutes=30),
)
refused(
    "user_delegation_sas",
    f"{tls_url}/{ACCOUNT}/{CONTAINER}/neg-sas-udk?{udk_sas}",
    auth,
    "user delegation SAS is not accepted",
)
refused(
    "https_only_sas_on_the_plain_listener",
    velero_url("neg-sas-plain", base=plain_url),
    "AuthorizationProtocolMismatch",
    "the SAS allows https only",
)
refused(
    "client_outside_sip",
    velero_url("neg-sas-ip", ip="192.0.2.1-192.0.2.9"),
    "AuthorizationSourceIPMismatch",
    "is outside the SAS&apos;s allowed addresses",
)
refused(
    "list_with_a_blob_sas",
    velero_url("neg-sas-list").replace("/neg-sas-list?", "?restype=container&comp=list&prefix=neg-sas-list&"),
    auth,
    bad_sig,  # the blob SAS was signed for another resource: its signature fails first
)
print(json.dumps(results, indent=1))
