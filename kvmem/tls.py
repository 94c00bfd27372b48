"""TLS credentials for the server and the client (PEM files in, gRPC credentials out)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


def _read(path: str | Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials:
    """TLS with the server's certificate; with ``client_ca_file``, clients must present a
    certificate signed by that CA (mutual TLS)."""
    if not cert_file or not key_file:
        raise ValueError("TLS needs both tls.cert_file and tls.key_file")
    pair = (_read(key_file, "tls.key_file"), _read(cert_file, "tls.cert_file"))
    if client_ca_file:
        return grpc.ssl_server_credentials([pair], root_certificates=_read(client_ca_file, "tls.client_ca_file"), require_client_auth=True)
    return grpc.ssl_server_credentials([pair])


@dataclass(frozen=True)
class ClientTLS:
    """How a client verifies the server (ca_file; "" = the system roots) and, for mutual TLS,
    proves itself (cert_file + key_file). server_name overrides the name checked in the
    server's certificate (for addresses that are not the certificate's name)."""

    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    server_name: str = ""

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("a client certificate needs both cert_file and key_file")
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "ca_file") if self.ca_file else None,
            private_key=_read(self.key_file, "key_file") if self.key_file else None,
            certificate_chain=_read(self.cert_file, "cert_file") if self.cert_file else None,
        )

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def client_tls(tls) -> ClientTLS | None:
    """Normalise the client's ``tls`` argument: None/False (plaintext), True (system roots),
    a CA file path, or a ClientTLS."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return ClientTLS()
    if isinstance(tls, (str, Path)):
        return ClientTLS(ca_file=str(tls))
    if isinstance(tls, ClientTLS):
        return tls
    raise TypeError(f"tls must be None, True, a CA file path or a kvmem.tls.ClientTLS, got {type(tls).__name__}")
