#!/usr/bin/env python3
"""Make a throw-away CA, a nats-server certificate and a client certificate for TLS tests and local stacks.

    python deploy/nats/gen-certs.py OUT_DIR [--host nats --host localhost --ip 127.0.0.1]

Writes ca.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem (keys 0600). Production
certificates come from your PKI (cert-manager on Kubernetes); these are for tests and a laptop only.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    usage: list[x509.ObjectIdentifier],
    names: list[x509.GeneralName],
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if usage:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usage), critical=False)
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
    return builder.sign(issuer_key, hashes.SHA256())


def generate(out: Path, hosts: list[str], ips: list[str]) -> None:
    """Write the CA, server and client material into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("llamaduo-test-ca", ca_key, _name("llamaduo-test-ca"), ca_key, ca=True, usage=[], names=[])
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _cert(
        "nats", server_key, ca.subject, ca_key, ca=False, usage=[ExtendedKeyUsageOID.SERVER_AUTH], names=names
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = _cert(
        "llamaduo-client", client_key, ca.subject, ca_key, ca=False, usage=[ExtendedKeyUsageOID.CLIENT_AUTH], names=[]
    )
    (out / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (out / "server-cert.pem").write_bytes(server.public_bytes(serialization.Encoding.PEM))
    (out / "client-cert.pem").write_bytes(client.public_bytes(serialization.Encoding.PEM))
    _write_key(out / "server-key.pem", server_key)
    _write_key(out / "client-key.pem", client_key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--host", action="append", default=None, help="DNS name of the server (repeatable)")
    parser.add_argument("--ip", action="append", default=None, help="IP address of the server (repeatable)")
    args = parser.parse_args()
    generate(args.out, args.host or ["nats", "localhost"], args.ip or ["127.0.0.1"])
    print(f"wrote test TLS material to {args.out}")


if __name__ == "__main__":
    main()
