"""Foreign EST clients: curl and openssl command lines against the server on loopback TLS.

These are the recipes an operator would type; each issued certificate is
checked with `openssl verify` against the factory root.
"""

from __future__ import annotations

import shlex

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from certfleet.est import wire
from certfleet.pki.keys import cert_sha256

from .est_fixtures import EstEnv, run_shell, running_env

TLS_FLAGS = {"1.2": "--tlsv1.2 --tls-max 1.2", "1.3": "--tlsv1.3"}


@pytest.fixture
async def env(db_url, tmp_path):
    async with running_env(db_url, tmp_path) as running:
        yield running


async def sh(env: EstEnv, command: str) -> str:
    """Run a pipeline in the test folder; fail with its stderr if it fails."""
    code, out, err = await run_shell(f"set -o pipefail; {command}", cwd=env.tmp)
    assert code == 0, f"{command}\nexit {code}: {err}"
    return out.decode()


def _curl(env: EstEnv, tls: str = "1.3") -> str:
    return f"curl -sS --cacert {shlex.quote(str(env.root()))} {TLS_FLAGS[tls]}"


async def _new_csr(env: EstEnv, name: str, subject: str, wrap: bool = True) -> None:
    """`name`.key and `name`.b64 (the CSR as base64 DER, wrapped or on one line)."""
    base64_cmd = "base64" if wrap else "base64 -w0"
    await sh(
        env,
        "openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -noenc "
        f"-keyout {name}.key -subj {shlex.quote(subject)} -outform DER | {base64_cmd} > {name}.b64",
    )


async def _post(
    env: EstEnv, op: str, csr: str, out: str, auth: str, tls: str, extra: str = ""
) -> str:
    status = await sh(
        env,
        f"{_curl(env, tls)} {auth} --data-binary @{csr}.b64 "
        f"-H 'Content-Type: application/pkcs10' {extra} -o {out}.b64 -w '%{{http_code}}' "
        f"{env.url(op)}",
    )
    return status


async def _verified_pem(env: EstEnv, name: str) -> str:
    """Decode `name`.b64 into `name`.crt and openssl-verify it against the root."""
    await sh(env, f"base64 -d {name}.b64 | openssl pkcs7 -inform DER -print_certs -out {name}.crt")
    verified = await sh(
        env,
        f"openssl verify -CAfile {env.root()} -untrusted {env.chain_file()} {name}.crt",
    )
    assert verified.strip().endswith(": OK")
    return (env.tmp / f"{name}.crt").read_text()


async def _check_stored(env: EstEnv, name: str, operation: str, device_uuid: str) -> None:
    cert = x509.load_pem_x509_certificate((env.tmp / f"{name}.crt").read_bytes())
    row = await env.recorded(cert)
    assert row.device_uuid == device_uuid
    assert row.issued_by_request.startswith(f"est:{operation}:")
    assert row.sha256 == cert_sha256(cert)


async def test_cacerts_with_curl_and_openssl(env):
    out = await sh(
        env,
        f"{_curl(env)} {env.url('cacerts')} | base64 -d | openssl pkcs7 -inform DER -print_certs",
    )
    assert "subject=CN = Online-CA, OU = acme" in out
    assert "subject=CN = Factory-CA, OU = acme" in out
    headers = await sh(env, f"{_curl(env)} -D - -o /dev/null {env.url('cacerts')}")
    assert "content-type: application/pkcs7-mime; smime-type=certs-only" in headers.lower()
    assert "content-transfer-encoding: base64" in headers.lower()


async def test_csrattrs_with_curl_and_openssl(env):
    out = await sh(
        env, f"{_curl(env)} {env.url('csrattrs')} | base64 -d | openssl asn1parse -inform DER"
    )
    assert "prime256v1" in out and "ecdsa-with-SHA256" in out


@pytest.mark.parametrize(
    ("wrap", "chunked", "tls"),
    [(True, False, "1.3"), (False, False, "1.2"), (True, True, "1.2"), (False, True, "1.3")],
    ids=["wrapped-1.3", "unwrapped-1.2", "wrapped-chunked-1.2", "unwrapped-chunked-1.3"],
)
async def test_enroll_with_curl_basic_auth(env, wrap, chunked, tls):
    device_uuid, username, password = await env.credential()
    await _new_csr(env, "dev", f"/CN={device_uuid}", wrap)
    assert (b"\n" in (env.tmp / "dev.b64").read_bytes().strip()) == wrap
    extra = "-H 'Transfer-Encoding: chunked'" if chunked else ""
    auth = f"--user {shlex.quote(f'{username}:{password}')}"
    status = await _post(env, "simpleenroll", "dev", "cert", auth, tls, extra)
    assert status == "200", (env.tmp / "cert.b64").read_text()
    pem = await _verified_pem(env, "cert")
    assert pem.count("BEGIN CERTIFICATE") == 1
    await _check_stored(env, "cert", "simpleenroll", device_uuid)


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
async def test_a_device_lives_on_curl_alone(env, tls):
    """Enroll with Basic, then renew twice with the certificate just received."""
    device_uuid, username, password = await env.credential()
    await _new_csr(env, "dev0", f"/CN={device_uuid}")
    auth = f"--user {shlex.quote(f'{username}:{password}')}"
    assert await _post(env, "simpleenroll", "dev0", "cert0", auth, tls) == "200"
    await _verified_pem(env, "cert0")
    for n in (1, 2):
        # The subject must repeat the current certificate's exactly: CN then OU.
        await _new_csr(env, f"dev{n}", f"/CN={device_uuid}/OU=acme")
        auth = f"--cert cert{n - 1}.crt --key dev{n - 1}.key"
        status = await _post(env, "simplereenroll", f"dev{n}", f"cert{n}", auth, tls)
        assert status == "200", (env.tmp / f"cert{n}.b64").read_text()
        await _verified_pem(env, f"cert{n}")
        await _check_stored(env, f"cert{n}", "simplereenroll", device_uuid)


async def test_reenroll_with_curl_client_cert_of_a_registered_device(env):
    device = await env.device()
    await _new_csr(env, "new", f"/CN={device.uuid}/OU=acme", wrap=False)
    auth = f"--cert {device.cert_path} --key {device.key_path}"
    status = await _post(
        env, "simplereenroll", "new", "renewed", auth, "1.2", "-H 'Transfer-Encoding: chunked'"
    )
    assert status == "200", (env.tmp / "renewed.b64").read_text()
    await _verified_pem(env, "renewed")
    await _check_stored(env, "renewed", "simplereenroll", device.uuid)


async def test_serverkeygen_with_curl(env):
    await env.serve(serverkeygen_enabled=True)
    device_uuid, username, password = await env.credential()
    await _new_csr(env, "req", f"/CN={device_uuid}")
    auth = f"--user {shlex.quote(f'{username}:{password}')}"
    status = await _post(env, "serverkeygen", "req", "reply", auth, "1.3", "-D headers.txt")
    assert status == "200"
    headers = (env.tmp / "headers.txt").read_text().lower()
    content_type = next(
        line.split(":", 1)[1].strip()
        for line in headers.splitlines()
        if line.startswith("content-type:")
    )
    key_der, certs = wire.parse_serverkeygen_multipart(
        (env.tmp / "reply.b64").read_bytes(), content_type
    )
    (env.tmp / "key.der").write_bytes(key_der)
    key_pub = await sh(env, "openssl pkey -inform DER -in key.der -pubout")
    cert_pub = (
        certs[0]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert key_pub.encode() == cert_pub
    env.verify(certs[0])


async def test_curl_sees_a_one_line_refusal(env):
    device_uuid, username, _ = await env.credential()
    await _new_csr(env, "dev", f"/CN={device_uuid}")
    auth = f"--user {shlex.quote(f'{username}:wrong')}"
    assert await _post(env, "simpleenroll", "dev", "refusal", auth, "1.3") == "401"
    assert (env.tmp / "refusal.b64").read_text() == "EST username or password is wrong\n"
