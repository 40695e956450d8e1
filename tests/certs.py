"""Certificates made in the test: a CA, a server certificate for 127.0.0.1/localhost, and
client certificates (mutual TLS) with a given common name."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(k) -> bytes:
    return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                           serialization.NoEncryption())


def _cert(subject_cn, key, issuer_cn, issuer_key, *, ca=False, san=None):
    now = datetime.datetime.now(datetime.UTC)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
         .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_cn)]))
         .public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


class PKI:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ca_key = _key()
        self.ca = _cert("ttmm-test-ca", self.ca_key, "ttmm-test-ca", self.ca_key, ca=True)
        self.ca_pem = self.ca.public_bytes(serialization.Encoding.PEM)
        (self.root / "ca.pem").write_bytes(self.ca_pem)
        skey = _key()
        scert = _cert("localhost", skey, "ttmm-test-ca", self.ca_key,
                      san=[x509.DNSName("localhost"),
                           x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        (self.root / "server.pem").write_bytes(scert.public_bytes(serialization.Encoding.PEM))
        (self.root / "server.key").write_bytes(_pem_key(skey))

    @property
    def server_cert(self) -> str:
        return str(self.root / "server.pem")

    @property
    def server_key(self) -> str:
        return str(self.root / "server.key")

    @property
    def ca_file(self) -> str:
        return str(self.root / "ca.pem")

    def client(self, cn: str) -> tuple[bytes, bytes]:
        """(private key PEM, certificate PEM) for a client called `cn`."""
        k = _key()
        c = _cert(cn, k, "ttmm-test-ca", self.ca_key)
        return _pem_key(k), c.public_bytes(serialization.Encoding.PEM)
