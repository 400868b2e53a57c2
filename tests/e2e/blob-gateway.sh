# shellcheck shell=bash disable=SC2154,SC2153 # sourced by tests/e2e/run.sh: uses its names and helpers
# Step 9 of tests/e2e/run.sh: the blob gateway, with real clients, from the pod's network
# namespace (no route to Azurite). Azurite holds the REAL key of $ACCT; the clients hold only
# gateway-only keys printed by `egress-proxy blob client-config`, so Azurite accepting a
# request proves the gateway's re-signing. The gateway is the same egress-proxy process as
# the CONNECT proxy (its `blob:` section), on $PROXY_IP, as the Service egress-gate-blob
# selects the proxy's pods; its upstream is dialled through the same policy.
#
#   a) barman-cloud with the CNPG connection string: WAL archive, base backup, backup-list,
#      restore with WAL replay (rows compared), a second base backup;
#   b) the Azure SDK for Python: put, staged blocks, list, get, and eleven requests the
#      gateway must refuse with 403, none of which may appear in Azurite's log;
#   c) a Go client signing with Shared Key as Velero's Azure plugin does (storageAccount,
#      storageAccountURI, the key from the credentials file): blocks up, list, down, delete;
#   d) one 1 GiB Put Blob (GW_BIG_MIB changes it) while the proxy's RSS is sampled every
#      50 ms: it must grow by less than 16 MiB;
#   f) service SAS signed with the client key (Velero's download URLs, a container SAS, the
#      SharedAccessSignature= connection string) and eleven SAS refusals, none in Azurite's
#      log, no client `sig=` in any request Azurite received;
#   e) Blob Batch: the SDK's delete_blobs, a refused batch (the twelfth refusal), then
#      barman-cloud-backup-delete of the first backup, whose blobs must be gone from Azurite
#      (listed with the real key).

GW_HOST=egress-gate-blob.egress-gate.svc # the Service name a workload is given
GW_PORT=10443                            # blob.tls.listen's port
GW_URL=https://$GW_HOST:$GW_PORT
GW_PLAIN_PORT=10000                      # blob.listen's port: the https-only SAS refusal needs it
GW_RSS_LIMIT_KIB=$((16 * 1024)) # issue 13: memory stays flat however large the upload

GW_GO_BUILD="" # the Go client's build, started by gw_setup while barman-cloud runs

# The gateway's serving certificate (from the run's test CA, which the pod trusts through
# REQUESTS_CA_BUNDLE and SSL_CERT_FILE), its config and the clients' keys.
gw_setup() {
  local d=$run/blob
  mkdir -p "$d"
  # GOPATH mode over Debian's packaged sources: no module download (GOPROXY=off).
  GO111MODULE=off GOFLAGS="" GOPROXY=off GOPATH=$run/gopath:/usr/share/gocode GOCACHE=$run/gocache \
    CGO_ENABLED=0 go build -o "$run/goazblob" "$here/goazblob/main.go" 2>"$logs/go-build.log" &
  GW_GO_BUILD=$!
  (
    cd "$d" || exit 1
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$GW_HOST" -keyout gw.key -out gw.csr 2>/dev/null
    printf 'subjectAltName=DNS:%s\nextendedKeyUsage=serverAuth\n' "$GW_HOST" >gw.cnf
    openssl x509 -req -in gw.csr -CA "$run/ca.crt" -CAkey "$run/ca.key" -CAcreateserial -days 2 \
      -extfile gw.cnf -out gw.crt 2>/dev/null
  )
  printf '%s\n' "$KEY" >"$d/real.key" # the account's real key: only the gateway reads it
  head -c 64 /dev/urandom | base64 -w0 >"$d/pg-ro.key"
  # The pod resolves the Service name to the proxy's address (a ClusterIP in a cluster).
  printf '%s %s\n' "$PROXY_IP" "$GW_HOST" >>"/etc/netns/$POD/hosts"

  write_proxy_config "$HOST"
  cat >>"$run/proxy.yaml" <<YAML
blob:
  listen: $PROXY_IP:$GW_PLAIN_PORT
  tls: {listen: $PROXY_IP:$GW_PORT, certFile: $d/gw.crt, keyFile: $d/gw.key}
  accounts:
    - name: pg-prod
      clientKeyFile: $d/pg-prod.key
      containers: [pggw, pgbackups]
      permissions: [read, list, write, delete]
      upstream: &azure
        endpoint: https://$HOST
        account: $ACCT
        sharedKeyFile: $d/real.key
        caFile: $run/ca.crt
    - name: pg-ro
      clientKeyFile: $d/pg-ro.key
      containers: [pgbackups]
      permissions: [read, list]
      upstream: *azure
    - name: velero
      clientKeyFile: $d/velero.key
      containers: [velero-gw]
      permissions: [read, list, write, delete]
      upstream: *azure
YAML
  # Each workload's key and client settings come from `blob client-config`, as a user gets them.
  local acct
  for acct in pg-prod velero; do
    mkdir -p "$d/$acct"
    "$bin/egress-proxy" blob client-config --account "$acct" --config "$run/proxy.yaml" \
      --endpoint "$GW_URL" >"$d/$acct/client-config.yaml" 2>"$logs/client-config.log" ||
      die "egress-proxy blob client-config --account $acct failed: $(cat "$logs/client-config.log")"
    "$venv/bin/python" "$here/blob_gateway.py" client-config "$d/$acct/client-config.yaml" "$d/$acct"
    sed -n 's/.*;AccountKey=\([^;]*\);.*/\1/p' "$d/$acct/connection-string" >"$d/$acct.key"
    [[ -s $d/$acct.key ]] || die "no AccountKey in the connection string client-config printed for $acct"
  done
  chmod 644 "$d/velero/credentials"
  stop_proxy # listeners are bound at start: restart with the blob section
  start_proxy
  wait_tcp "$PRX" "$PROXY_IP" "$GW_PORT"
  wait_tcp "$PRX" "$PROXY_IP" "$GW_PLAIN_PORT"

  # The CNPG pod's env for the gateway: the webhook's proxy variables (its NO_PROXY keeps
  # `.svc` names off the proxy) and the connection string, no account key.
  grep -v '^AZURE_STORAGE_' "$run/env-proxy" >"$run/env-gw"
  echo "AZURE_STORAGE_CONNECTION_STRING=$(cat "$d/pg-prod/connection-string")" >>"$run/env-gw"
  grep -q "^NO_PROXY=.*\.svc\b" "$run/env-gw" || die "the pod's NO_PROXY does not cover $GW_HOST"
  note "gateway https://$GW_HOST:$GW_PORT on $PROXY_IP (egress-proxy $proxy_pid); keys from blob client-config"
}

# a) barman-cloud through the gateway, as CNPG runs it with `connectionString` and the
# printed destinationPath (barman's "emulated storage" form: /<account>/<container>).
GW_C=pggw     # the container
GW_DIGEST_SQL=$DIGEST_SQL # run.sh's row digest as defined, before step 7 extends it
GW_BID1=""    # the backup barman-cloud-backup-delete removes in gw_batch
GW_BID2=""    # the one that stays
gw_barman() {
  local dest base DIGEST_SQL=$GW_DIGEST_SQL # a local: cycle's digest() sees it
  dest=$(cat "$run/blob/pg-prod/destination-path")
  [[ $dest == "$GW_URL/pg-prod/$GW_C/" ]] || die "client-config's destinationPath is $dest, not $GW_URL/pg-prod/$GW_C/"
  base=$BARMAN_BASE
  BARMAN_BASE=${dest%/"$GW_C"/}
  cycle "$GW_C" "$run/env-gw" 5462
  GW_BID1=$(latest_backup_id "$run/env-gw" "$GW_C")
  # A second base backup; gw_batch deletes the first.
  pod_pg "$run/env-gw" barman-cloud-backup "${BARMAN[@]}" --immediate-checkpoint -h "$run/sock" \
    -p 5462 -U postgres "$(url "$GW_C")" pg >"$logs/barman-backup-gw2.log" 2>&1 || die "second barman-cloud-backup through the gateway failed"
  GW_BID2=$(latest_backup_id "$run/env-gw" "$GW_C")
  [[ $GW_BID2 != "$GW_BID1" ]] || die "the second backup has the first one's id $GW_BID1"
  pg_stop "$run/env-gw" "$run/$GW_C-primary"
  BARMAN_BASE=$base
  note "second base backup $GW_BID2 through the gateway"
}

# e) Blob Batch: the Python SDK's delete_blobs, then barman-cloud-backup-delete of the first
# backup, whose blobs must then be gone from Azurite. Last, so that the other parts report
# first if the batch path fails.
gw_batch() {
  local before after wals_before wals_after seen base
  seen=$(wc -l <"$logs/azurite-debug.log")
  pod "$run/env-gw" "$venv/bin/python" "$here/blob_gateway.py" batch "$GW_URL" "$KEY" \
    "$(cat "$run/blob/pg-ro.key")" "$run/ca.crt" >"$logs/blob-batch.log" 2>&1 ||
    die "Blob Batch through the gateway (Python SDK delete_blobs) failed: $(tail -n 3 "$logs/blob-batch.log")"
  sed 's/^/   | /' "$logs/blob-batch.log"
  ! tail -n +$((seen + 1)) "$logs/azurite-debug.log" | grep -F neg-batch >/dev/null || die "the refused batch reached Azurite"

  # Azurite's own view, with the real key, through the CONNECT proxy (not the gateway).
  before=$(pod "$run/env-proxy" "$venv/bin/python" "$here/pod.py" blob-count "$GW_C" "pg/base/$GW_BID1/")
  wals_before=$(pod "$run/env-proxy" "$venv/bin/python" "$here/pod.py" blob-count "$GW_C" pg/wals/)
  ((before > 0)) || die "Azurite holds no blob of backup $GW_BID1"
  seen=$(wc -l <"$logs/azurite-debug.log")
  base=$BARMAN_BASE
  BARMAN_BASE=$GW_URL/pg-prod
  pod_pg "$run/env-gw" barman-cloud-backup-delete "${BARMAN[@]}" --backup-id "$GW_BID1" "$(url "$GW_C")" pg \
    >"$logs/barman-delete-gw.log" 2>&1 ||
    die "barman-cloud-backup-delete through the gateway failed: $(grep -m1 ERROR "$logs/barman-delete-gw.log")"
  after=$(pod "$run/env-proxy" "$venv/bin/python" "$here/pod.py" blob-count "$GW_C" "pg/base/$GW_BID1/")
  wals_after=$(pod "$run/env-proxy" "$venv/bin/python" "$here/pod.py" blob-count "$GW_C" pg/wals/)
  ((after == 0)) || die "$after blobs of the deleted backup $GW_BID1 are still in Azurite"
  ((wals_after < wals_before)) || die "no WAL before backup $GW_BID2 was deleted ($wals_before before, $wals_after after)"
  tail -n +$((seen + 1)) "$logs/azurite-debug.log" | grep 'comp=batch' >/dev/null ||
    die "Azurite saw no Blob Batch request from barman-cloud-backup-delete"
  grep 'blob request' "$logs/proxy.log" | grep '"operation":"blob-batch"' >/dev/null ||
    die "the gateway's access log shows no batch"
  pod_pg "$run/env-gw" barman-cloud-backup-list "${BARMAN[@]}" --format json "$(url "$GW_C")" pg |
    "$venv/bin/python" -c 'import json,sys; ids=[b["backup_id"] for b in json.load(sys.stdin)["backups_list"]]; assert ids == [sys.argv[1]], ids' "$GW_BID2" ||
    die "after the delete, barman-cloud-backup-list does not show exactly $GW_BID2"
  BARMAN_BASE=$base
  note "barman-cloud-backup-delete $GW_BID1 (Blob Batch): its $before blobs gone from Azurite, WALs $wals_before -> $wals_after, $GW_BID2 listed alone"
}

# b) the Azure SDK for Python: positives and the refusals, none of which may reach Azurite.
gw_python() {
  local seen marker
  seen=$(wc -l <"$logs/azurite-debug.log")
  pod "$run/env-gw" "$venv/bin/python" "$here/blob_gateway.py" sdk "$GW_URL" "$KEY" \
    "$(cat "$run/blob/pg-ro.key")" "$run/ca.crt" >"$logs/blob-sdk.log" 2>&1 ||
    die "the Azure SDK for Python through the gateway failed: $(tail -n 5 "$logs/blob-sdk.log")"
  sed 's/^/   | /' "$logs/blob-sdk.log"
  tail -n +$((seen + 1)) "$logs/azurite-debug.log" >"$logs/azurite-debug-sdk.log"
  grep -q "pgbackups" "$logs/azurite-debug-sdk.log" || die "Azurite's debug log shows none of the SDK's requests"
  for marker in neg-wrongkey neg-realkey neg-unknown negother neg-copy neg-stale neg-anon neg-bearer \
    neg-account comp=acl x-ms-copy-source nobody pg-ro; do
    ! grep -qF -- "$marker" "$logs/azurite-debug-sdk.log" || die "a refused request reached Azurite ($marker)"
  done
  ! grep -E "DELETE .*keep/me|keep%2Fme.*DELETE" "$logs/azurite-debug-sdk.log" >/dev/null ||
    die "the refused delete of keep/me reached Azurite"
  note "11 refusals, each 403; none in Azurite's debug log (the 12th, a batch, in gw_batch)"
}

# c) a Go client with Velero's BackupStorageLocation fields (Shared Key, path-style URI).
gw_go() {
  local d=$run/blob/velero
  # The Velero pod's env from the webhook; the plugin's key comes from the credentials file.
  inject_env "http://$PROXY_IP:3128" "$run/env-gw-velero" velero-install-server.json \
    velero velero-velero-plugin-for-microsoft-azure
  sed -i '/^AZURE_STORAGE_/d' "$run/env-gw-velero"
  echo "SSL_CERT_FILE=$run/ca.crt" >>"$run/env-gw-velero" # Go's way to the test CA
  wait "$GW_GO_BUILD" || die "building tests/e2e/goazblob failed: $(tail -n 5 "$logs/go-build.log")"
  head -c 24M /dev/urandom >"$run/blob-go"
  chmod 644 "$run/blob-go"
  note "$(pod "$run/env-gw-velero" "$run/goazblob" "$(cat "$d/storage-account")" \
    "$(cat "$d/storage-account-uri")" "$d/credentials" "$(cat "$d/key-entry")" velero-gw "$run/blob-go")"
  rm -f "$run/blob-go"
}

# d) 1 GiB in one Put Blob; the proxy's RSS sampled meanwhile.
gw_big() {
  local mib=${GW_BIG_MIB:-1024} rss_before rss_max samples sampler out
  rss() { awk '/^VmRSS/ { print $2 }' "/proc/$proxy_pid/status"; }
  rss_before=$(rss)
  (while :; do rss >>"$run/blob/rss.samples"; sleep 0.05; done) &
  sampler=$!
  out=$(pod "$run/env-gw" "$venv/bin/python" "$here/blob_gateway.py" big "$GW_URL" "$run/ca.crt" "$mib" 2>"$logs/blob-big.log") ||
    { kill "$sampler"; die "the $mib MiB Put Blob through the gateway failed: $(tail -n 5 "$logs/blob-big.log")"; }
  kill "$sampler"
  wait "$sampler" 2>/dev/null || true
  rss_max=$(sort -n "$run/blob/rss.samples" | tail -n1)
  samples=$(wc -l <"$run/blob/rss.samples")
  note "$mib MiB: $out"
  note "proxy RSS ${rss_before} KiB before, ${rss_max} KiB at most ($samples samples): growth $((rss_max - rss_before)) KiB (limit $GW_RSS_LIMIT_KIB)"
  ((rss_max - rss_before < GW_RSS_LIMIT_KIB)) || die "the proxy's RSS grew $((rss_max - rss_before)) KiB during the upload"
}

# f) SAS signed with the client key, on the TLS listener and (for the https-only refusal) the
# plain one; the refused ones must not reach Azurite, the accepted ones reach it re-signed.
gw_sas() {
  local seen marker
  seen=$(wc -l <"$logs/azurite-debug.log")
  pod "$run/env-gw" "$venv/bin/python" "$here/blob_sas.py" "$GW_URL" "http://$GW_HOST:$GW_PLAIN_PORT" \
    "$(cat "$run/blob/pg-prod.key")" "$KEY" "$run/ca.crt" >"$logs/blob-sas.log" 2>&1 ||
    die "SAS through the gateway failed: $(tail -n 5 "$logs/blob-sas.log")"
  sed 's/^/   | /' "$logs/blob-sas.log"
  tail -n +$((seen + 1)) "$logs/azurite-debug.log" >"$logs/azurite-debug-sas.log"
  grep -q "pgbackups" "$logs/azurite-debug-sas.log" || die "Azurite's debug log shows none of the SAS requests"
  ! grep -qF -- neg-sas- "$logs/azurite-debug-sas.log" || die "a refused SAS request reached Azurite"
  ! grep -qE '[?&]sig=' "$logs/azurite-debug-sas.log" || die "a client's SAS reached Azurite"
  note "SAS: accepted ones re-signed (no sig= upstream); refusals none in Azurite's debug log"
}

blob_gateway_step() {
  local t0 part
  gw_setup
  for part in gw_barman gw_python gw_sas gw_go gw_big gw_batch; do
    t0=$(date +%s.%N)
    "$part"
    note "($part: $(elapsed "$t0")s)"
  done
  # Every request came straight from the pod (NO_PROXY), never through a CONNECT tunnel.
  (($(proxy_log_lines "\"target\":\"$GW_HOST") == 0)) || die "a client reached the gateway through the CONNECT proxy"
  # Never a key or a signature in the proxy's log.
  local secret
  for secret in "$KEY" "$(cat "$run/blob/pg-prod.key")" "$(cat "$run/blob/velero.key")" "$(cat "$run/blob/pg-ro.key")" SharedKey; do
    ! grep -qF -- "$secret" "$logs/proxy.log" || die "the proxy's log holds a key or a signature"
  done
  note "gateway access-log lines: $(grep -c 'blob request' "$logs/proxy.log" || true); no key or signature in the log"
}
