"""Mutual TLS for nodes on real networks: the experiment's certificates and gRPC credentials.

``testbed certs DIR`` makes an experiment CA and two certificates signed by it:

- ``ca.pem`` / ``ca.key``: the CA. Its key signs the certificates and nothing else; it stays
  with the experimenter and is never copied to a device (whoever holds it can mint
  certificates every node accepts).
- ``node.pem`` / ``node.key``: ONE certificate shared by every device of the experiment. Key
  usage server AND client auth: a node serves the orchestrator and its peers, and it is a
  client of its peers (data-plane streams, testbed.comm.grpc).
- ``orchestrator.pem`` / ``orchestrator.key``: client auth only; the orchestrator's.

What is authenticated. Devices are reached by addresses unknown when the certificates are
made (IPs handed out by DHCP, DNS names, Kubernetes pod names), so the node certificate
carries one fixed DNS name, :data:`SERVER_NAME`, and every client checks the server against
that name (gRPC's ``grpc.ssl_target_name_override``) instead of the address it dialled.
Authentication therefore means "holds a certificate signed by this experiment's CA" (in
both directions: the server requires a client certificate from the same CA), which is the
property wanted: nobody outside the experiment can load jobs, read results or join a job's
streams. It does NOT tell one device from another (all share node.pem), nor pin a device to
an address. The role is told apart by the certificate's common name: the control plane (the
Node service) answers only the orchestrator's certificate, the data plane (Peer streams)
only the node certificate (:func:`require_role`); a call with the other one gets
PERMISSION_DENIED.

Credentials are built here and only here (:func:`server_credentials`,
:func:`channel_credentials`, :func:`channel_options`, :func:`open_channel`); the node server,
the orchestrator and the GrpcCommunicator call these. Without TLS the channels stay plain
(``grpc.insecure_channel``), exactly as before.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import grpc

from testbed.errors import ConfigError, check

#: the DNS name in the node certificate, which every client checks the server against
SERVER_NAME = "testbed-node"
#: common names of the two roles (the node's and the orchestrator's certificates)
NODE_CN, ORCHESTRATOR_CN = SERVER_NAME, "testbed-orchestrator"
ROLES = {"node": NODE_CN, "orchestrator": ORCHESTRATOR_CN}
#: what `testbed certs` writes, per part: (certificate, key)
FILES = {"ca": ("ca.pem", "ca.key"), "node": ("node.pem", "node.key"),
         "orchestrator": ("orchestrator.pem", "orchestrator.key")}
DEFAULT_DAYS = 365
# certificates start this long before "now": a device whose clock lags a little still accepts them
_CLOCK_SKEW = datetime.timedelta(minutes=10)


# -- making certificates -----------------------------------------------------------------------

def make_certs(directory: str | os.PathLike, days: int = DEFAULT_DAYS, force: bool = False) -> list[Path]:
    """Write a new CA and the node and orchestrator certificates into ``directory`` (created if
    missing). Keys are written 0600. Existing files are replaced only with ``force``; otherwise
    one ConfigError names them and nothing is written. Returns the paths written."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    check(isinstance(days, int) and not isinstance(days, bool) and days >= 1, "days", days, "an integer >= 1")
    d = Path(directory)
    check(not d.exists() or d.is_dir(), "DIR", str(d), "a directory (or a path to create)")
    paths = [d / name for pair in FILES.values() for name in pair]
    present = [p.name for p in paths if os.path.lexists(p)]
    if present and not force:
        raise ConfigError("DIR", str(d), f"a directory without {', '.join(present)} (or --force to replace them)")
    now = datetime.datetime.now(datetime.timezone.utc)
    not_before, not_after = now - _CLOCK_SKEW, now + datetime.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "testbed experiment"),
                          x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    # a random serial in the CA's name too: two experiments' CAs never look alike
    ca_name = name(f"testbed experiment CA {x509.random_serial_number():x}"[:64])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usages: list) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(not_before)
                .not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=False, crl_sign=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)

    contents = {
        "ca": (ca.public_bytes(serialization.Encoding.PEM), _key_pem(ca_key)),
        "node": leaf(NODE_CN, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
        "orchestrator": leaf(ORCHESTRATOR_CN, [ExtendedKeyUsageOID.CLIENT_AUTH]),
    }
    d.mkdir(parents=True, exist_ok=True)
    written = []
    for part, (cert_name, key_name) in FILES.items():
        cert_pem, key_pem = contents[part]
        written += [_write(d / cert_name, cert_pem, 0o644), _write(d / key_name, key_pem, 0o600)]
    return written


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> Path:
    """Write a new file with ``mode`` from its creation (a key is never readable by others, not
    even for a moment); a file already there (--force) is removed first."""
    if os.path.lexists(path):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)  # the umask may have taken bits away from a certificate's 0644
    return path


# -- loading them -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    """One role's PEM bytes from a certificate directory: the CA certificate, its own chain and key."""
    role: str
    ca: bytes
    cert: bytes
    key: bytes


def load_identity(directory: str | os.PathLike, role: str) -> Identity:
    """Read and check ``role``'s files in ``directory``: readable, the key matches the certificate,
    the certificate is signed by ca.pem, currently valid and made for that role. One ConfigError
    (field ``tls_dir``) says what is wrong."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    check(role in ROLES, "role", role, " | ".join(ROLES))
    d = Path(directory)
    cert_name, key_name = FILES[role]
    made_by = "a directory made by `testbed certs DIR`"

    def read(name: str) -> bytes:
        try:
            return (d / name).read_bytes()
        except OSError as e:
            raise ConfigError("tls_dir", str(d), f"{made_by} holding {FILES['ca'][0]}, {cert_name} and "
                              f"{key_name} ({e.strerror}: {name})") from None

    ca_pem, cert_pem, key_pem = read(FILES["ca"][0]), read(cert_name), read(key_name)
    try:
        ca = x509.load_pem_x509_certificate(ca_pem)
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as e:
        raise ConfigError("tls_dir", str(d), f"{made_by} (unreadable PEM: {e})") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.PEM, pub) != \
            cert.public_key().public_bytes(serialization.Encoding.PEM, pub):
        raise ConfigError("tls_dir", str(d), f"{made_by} ({key_name} is not the key of {cert_name})")
    try:
        if cert.issuer != ca.subject:
            raise ValueError("other issuer")
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes,
                               ec.ECDSA(cert.signature_hash_algorithm))
    except Exception:  # noqa: BLE001 - any mismatch means the same: another CA's certificate
        raise ConfigError("tls_dir", str(d), f"{made_by} ({cert_name} is not signed by its {FILES['ca'][0]}: "
                          "copy the files of one `testbed certs` run together)") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    for what, c in ((FILES["ca"][0], ca), (cert_name, cert)):
        start, end = _validity(c)
        if not start <= now <= end:
            raise ConfigError("tls_dir", str(d), f"{made_by} with certificates valid now ({what}: "
                              f"{start:%Y-%m-%d %H:%M} to {end:%Y-%m-%d %H:%M} UTC; "
                              "make new ones with `testbed certs DIR --force`)")
    cn = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cn != [ROLES[role]]:
        raise ConfigError("tls_dir", str(d), f"{made_by} whose {cert_name} is the {role}'s (common name "
                          f"{ROLES[role]!r}, got {cn})")
    return Identity(role, ca_pem, cert_pem, key_pem)


def _validity(cert) -> tuple[datetime.datetime, datetime.datetime]:
    """(not before, not after) as aware UTC datetimes (cryptography >= 42 has them; older ones naive)."""
    if hasattr(cert, "not_valid_before_utc"):
        return cert.not_valid_before_utc, cert.not_valid_after_utc
    utc = datetime.timezone.utc
    return cert.not_valid_before.replace(tzinfo=utc), cert.not_valid_after.replace(tzinfo=utc)


# -- gRPC credentials ------------------------------------------------------------------------------

def server_credentials(directory: str | os.PathLike) -> grpc.ServerCredentials:
    """A node server's credentials: node.pem, and a client certificate from ca.pem required."""
    ident = load_identity(directory, "node")
    return grpc.ssl_server_credentials([(ident.key, ident.cert)], root_certificates=ident.ca,
                                       require_client_auth=True)


def channel_credentials(directory: str | os.PathLike, role: str) -> grpc.ChannelCredentials:
    """A client's credentials as ``role`` (node: a node's peer streams; orchestrator): its own
    certificate, and the server verified against ca.pem (by name :data:`SERVER_NAME`)."""
    ident = load_identity(directory, role)
    return grpc.ssl_channel_credentials(root_certificates=ident.ca, private_key=ident.key,
                                        certificate_chain=ident.cert)


def channel_options() -> list[tuple[str, str]]:
    """Options every TLS channel adds: check the server's certificate against the fixed name, not the address."""
    return [("grpc.ssl_target_name_override", SERVER_NAME)]


def open_channel(address: str, options: Sequence[tuple[str, object]],
                 credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    """A channel to ``address``: plain without ``credentials`` (the channel of old, nothing added),
    else TLS with the server checked against :data:`SERVER_NAME`."""
    if credentials is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, credentials, options=[*options, *channel_options()])


def require_role(context: grpc.ServicerContext, role: str) -> None:
    """Abort the call with PERMISSION_DENIED unless its client holds ``role``'s certificate. A call
    over a plain connection passes (a server without TLS takes no other kind; one with TLS takes
    no plain connection at all)."""
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return
    cn = [v.decode(errors="replace") for v in auth.get("x509_common_name", [])]
    if cn != [ROLES[role]]:
        context.abort(grpc.StatusCode.PERMISSION_DENIED,
                      f"this service answers the {role}'s certificate only (the client's: {', '.join(cn) or 'none'})")


# -- `testbed certs` ---------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="testbed certs",
        description="Make an experiment CA and the certificates of its nodes and orchestrator (mutual TLS). "
                    "Copy node.pem, node.key and ca.pem to every device (`testbed node --tls-dir DIR`); the "
                    "orchestrator uses ca.pem, orchestrator.pem and orchestrator.key. ca.key stays with the "
                    "experimenter: whoever holds it can make certificates every node accepts.")
    ap.add_argument("dir", metavar="DIR", help="where to write the files (created if missing)")
    ap.add_argument("--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})")
    ap.add_argument("--force", action="store_true", help="replace certificate files already in DIR")
    args = ap.parse_args(argv)
    try:
        written = make_certs(args.dir, days=args.days, force=args.force)
    except ConfigError as e:
        print(f"testbed certs: {e}", file=sys.stderr)
        return 2
    for p in written:
        print(p)
    print(f"copy {FILES['ca'][0]}, {FILES['node'][0]} and {FILES['node'][1]} to every device "
          f"(testbed node --tls-dir DIR); keep {FILES['ca'][1]} here", file=sys.stderr)
    return 0
