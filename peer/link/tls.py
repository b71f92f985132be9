"""TLS for the coordinator's gRPC API and HTTP server, one set of rules for every client.

A client uses TLS when it is given a CA file (`--tls-ca FILE`, e.g. the operator's self-signed
certificate: then only that CA is trusted) or `--tls` (the system's trust store); otherwise it
talks plaintext, as on a LAN. TLS asked for is never dropped silently: an http:// address with
`--tls`/`--tls-ca` is refused (`plaintext_refusal`), and so is a redirect out of https
(peer/link/download.py).
The server side (`--tls-cert`/`--tls-key`) is in the coordinator; both ends share these helpers.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from crowdtrain.peer.errors import CrowdtrainError


class TlsConfigError(CrowdtrainError):
    """A certificate, key or CA file is missing or unreadable."""


@dataclass(frozen=True)
class ClientTls:
    """How a client reaches the coordinator: plaintext, or TLS verified against `ca_file` (PEM)
    or, when `ca_file` is empty, the system's trust store."""

    enabled: bool = False
    ca_file: str = ""

    @classmethod
    def from_flags(cls, tls: bool, tls_ca: str) -> ClientTls:
        return cls(enabled=bool(tls or tls_ca), ca_file=tls_ca)

    def ca_pem(self) -> bytes | None:
        return read_pem(self.ca_file, "CA certificate (--tls-ca)") if self.ca_file else None

    def ssl_context(self) -> ssl.SSLContext | None:
        """For HTTPS downloads; None for plaintext. With `ca_file`, that CA alone is trusted (as for
        gRPC): a certificate some system CA issued for the host is refused."""
        if not self.enabled:
            return None
        if self.ca_file:  # given cadata, create_default_context loads no system certificates
            return ssl.create_default_context(cadata=self.ca_pem().decode("ascii", "replace"))
        return ssl.create_default_context()

    def grpc_credentials(self):
        """grpc.ChannelCredentials for a secure channel; None for plaintext."""
        if not self.enabled:
            return None
        import grpc

        return grpc.ssl_channel_credentials(root_certificates=self.ca_pem())


def plaintext_refusal(coordinator: str, tls: ClientTls | None) -> str:
    """Pure: why `coordinator` cannot be used with `tls` ("" when it can): TLS was asked for, but the
    address is an http:// URL, which would be fetched in plaintext."""
    if tls is None or not tls.enabled or not coordinator.lower().startswith("http://"):
        return ""
    flag = f"--tls-ca {tls.ca_file}" if tls.ca_file else "--tls"
    return (
        f"{flag} asks for TLS, but {coordinator} is plaintext HTTP; use "
        f"https://{coordinator[len('http://') :]} (a coordinator started with --tls-cert serves HTTPS on its "
        "HTTP port), or leave out --tls/--tls-ca to download in plaintext"
    )


def read_pem(path: str, what: str) -> bytes:
    """The file's bytes, or a TlsConfigError that names the flag and the problem."""
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as e:
        raise TlsConfigError(f"cannot read the {what} {path!r}: {e.strerror or e}") from e
    if b"-----BEGIN " not in data:
        raise TlsConfigError(f"the {what} {path!r} is not a PEM file (expected '-----BEGIN ...')")
    return data


def server_ssl_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """The HTTPS server's context from the coordinator's --tls-cert/--tls-key."""
    read_pem(cert_file, "certificate (--tls-cert)")
    read_pem(key_file, "private key (--tls-key)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(str(Path(cert_file).expanduser()), str(Path(key_file).expanduser()))
    except ssl.SSLError as e:
        raise TlsConfigError(f"--tls-cert and --tls-key do not form a usable pair: {e}") from e
    return context


def server_grpc_credentials(cert_file: str, key_file: str):
    """grpc.ServerCredentials from the coordinator's --tls-cert/--tls-key, checked first with
    `server_ssl_context` so a bad pair fails with the same clear message for gRPC and HTTP."""
    import grpc

    server_ssl_context(cert_file, key_file)
    key = read_pem(key_file, "private key (--tls-key)")
    cert = read_pem(cert_file, "certificate (--tls-cert)")
    return grpc.ssl_server_credentials([(key, cert)])


def connection_hint(tls: ClientTls | None, details: str) -> str:
    """What to try when a connection to the coordinator failed, given how the client connected
    (`details`: gRPC's or ssl's error text); "" when TLS is unlikely to be the cause."""
    lowered = details.lower()
    if tls is not None and tls.enabled:
        if any(w in lowered for w in ("certificate", "ssl", "handshake", "tls")):
            return (
                "the TLS handshake failed: the coordinator's certificate is not trusted "
                f"({'--tls-ca ' + tls.ca_file if tls.ca_file else 'the system trust store'}) or does "
                "not name this address - pass the run's CA with --tls-ca, or check the address"
            )
        return ""
    if any(w in lowered for w in ("socket closed", "connection reset", "eof", "ssl", "tls", "handshake")):
        return (
            "the coordinator may be serving TLS and this client talks plaintext - pass --tls-ca FILE "
            "(its certificate) or --tls"
        )
    return ""
