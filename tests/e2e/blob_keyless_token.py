"""A stand-in Entra ID token endpoint for tests/e2e/blob-keyless.sh.

POST /<tenant>/oauth2/v2.0/token with a client-credentials form. The client assertion
must equal the federated token file's content at that moment (the gateway must re-read
it); the answer is an unsigned JWT with the claims Azurite's `--oauth basic` checks
(issuer, audience, nbf/exp). Standard library only.

Usage: blob_keyless_token.py PORT CERT KEY TOKEN_FILE TENANT CLIENT_ID LIFETIME_SECONDS
"""

import base64
import http.server
import json
import ssl
import sys
import time
import urllib.parse

port, cert, key, token_file, tenant, client_id, lifetime = sys.argv[1:8]
lifetime = int(lifetime)
issued = 0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt() -> str:
    now = int(time.time())
    claims = {
        "aud": "https://storage.azure.com",
        "iss": f"https://sts.windows.net/{tenant}/",
        "iat": now - 1,
        "nbf": now - 1,
        "exp": now + lifetime,
        "tid": tenant,
        "appid": client_id,
        "n": issued,
    }
    header = b64url(b'{"alg":"RS256","typ":"JWT"}')
    return f"{header}.{b64url(json.dumps(claims).encode())}.{b64url(b'unsigned')}"


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (the stdlib's name)
        global issued
        length = int(self.headers.get("Content-Length", "0"))
        form = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
        with open(token_file) as f:
            current = f.read().strip()
        expected = {
            "grant_type": "client_credentials",
            "client_id": client_id,
            "scope": "https://storage.azure.com/.default",
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": current,
        }
        wrong = [k for k, v in expected.items() if form.get(k) != v]
        if self.path != f"/{tenant}/oauth2/v2.0/token":
            wrong.append("path")
        if wrong or not current:
            print(f"refused: {wrong}", flush=True)
            self.answer(400, {"error": "invalid_client", "error_description": f"AADSTS700024: wrong {wrong}"})
            return
        issued += 1
        print(f"issued {issued} for assertion {form['client_assertion']}", flush=True)
        self.answer(200, {"token_type": "Bearer", "expires_in": lifetime, "access_token": jwt()})

    def answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server.socket = context.wrap_socket(server.socket, server_side=True)
print(f"listening on {port}", flush=True)
server.serve_forever()
