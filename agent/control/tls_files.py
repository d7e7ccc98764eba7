"""The control service's TLS material, read from files and re-read when they change.

A Secret mounted as a volume is updated in place by the kubelet (an atomic swap of a symlink)
when cert-manager or an operator rotates it. The gRPC core asks `_fetch` for the certificate at
every new TLS handshake; it answers with the new files once they changed, so new connections
see a rotated certificate (and CA) without a restart, while established streams keep theirs.

A pair that does not fit together (a certificate written before its key) is not taken: the
previous pair stays in use and the next handshake looks again.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from dataclasses import dataclass

import grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsFiles:
    """TLS material in memory. With `ca`, clients must present a certificate it signed."""

    cert: bytes
    key: bytes
    ca: bytes | None

    @classmethod
    def read(cls, cert: str, key: str, ca: str | None) -> TlsFiles:
        with open(cert, "rb") as c, open(key, "rb") as k:
            cert_pem, key_pem = c.read(), k.read()
        if ca is None:
            return cls(cert_pem, key_pem, None)
        with open(ca, "rb") as a:
            return cls(cert_pem, key_pem, a.read())

    @property
    def require_client_auth(self) -> bool:
        return self.ca is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.ca is not None
        )


class ReloadingTlsFiles:
    """Server credentials from files, re-read at the first handshake after any of them changed."""

    def __init__(self, cert: str, key: str, ca: str | None) -> None:
        self._paths = (cert, key, ca)
        self._lock = threading.Lock()
        self._signature = self._stat()
        self._unusable: tuple[tuple[int, int, int], ...] | None = None  # warned about once
        self.current = TlsFiles.read(cert, key, ca)  # raises OSError: the service cannot start
        self._check_pair()
        self.reloads = 0

    @property
    def require_client_auth(self) -> bool:
        return self._paths[2] is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._configuration(self.current), self._fetch,
            require_client_authentication=self.require_client_auth,
        )

    def _configuration(self, files: TlsFiles) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration(
            [(files.key, files.cert)], root_certificates=files.ca
        )

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        # stat follows the kubelet's ..data symlink: a swapped Secret shows as a new inode.
        signature = []
        for path in self._paths:
            if path is not None:
                st = os.stat(path)
                signature.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(signature)

    def _check_pair(self) -> None:
        """Raises ssl.SSLError unless the certificate and key files fit together."""
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(self._paths[0], self._paths[1])

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC at each handshake: a new configuration, or None to keep the current one."""
        try:
            with self._lock:
                before = self._stat()
                if before in (self._signature, self._unusable):
                    return None
                cert, key, ca = self._paths
                files = TlsFiles.read(cert, key, ca)
                self._check_pair()
                if self._stat() != before:
                    return None  # changing under us: look again at the next handshake
                self._signature, self.current = before, files
                self.reloads += 1
            log.info("TLS files changed: new connections use the new certificate (reload %d)", self.reloads)
            return self._configuration(files)
        except (OSError, ssl.SSLError, ValueError) as exc:
            try:
                self._unusable = self._stat()
            except OSError:
                self._unusable = None
            log.warning("TLS files changed but cannot be used yet (%s); keeping the previous ones", exc)
            return None
