# -*- test-case-name: tests.test_smtp_integration -*-
"""TLS contexts: our certificate for the client's STARTTLS, and the upstream's checks."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from OpenSSL import crypto
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

_PEM_CERT = re.compile(
    rb"-----BEGIN CERTIFICATE-----\r?\n.+?\r?\n-----END CERTIFICATE-----", re.DOTALL)


class TLSConfigError(ValueError):
    """The certificate or key cannot be used; ``str()`` says which and why."""


def server_options(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    """Options for our side of a client's STARTTLS: the first PEM certificate is ours,
    the rest of the file is its chain."""
    try:
        cert_pem = Path(cert_path).read_bytes()
        key_pem = Path(key_path).read_bytes()
    except OSError as e:
        raise TLSConfigError(f"cannot read {e.filename}: {e.strerror}") from None
    blocks = _PEM_CERT.findall(cert_pem)
    if not blocks:
        raise TLSConfigError(f"tls_cert: no PEM certificate in {cert_path}")
    try:
        certs = [ssl.Certificate.loadPEM(b) for b in blocks]
        key = ssl.KeyPair.load(key_pem, crypto.FILETYPE_PEM)
        options = ssl.CertificateOptions(
            privateKey=key.original,
            certificate=certs[0].original,
            extraCertChain=[c.original for c in certs[1:]],
        )
        options.getContext()  # checks that the key matches the certificate
    except Exception as e:
        raise TLSConfigError(f"tls_cert/tls_key: {cert_path}, {key_path}: {e}") from None
    return options


def client_options(
    hostname: str, *, verify: bool, trust_root: Any = None
) -> IOpenSSLClientConnectionCreator | ssl.CertificateOptions:
    """Options for our STARTTLS to the upstream MTA.

    With ``verify`` the certificate must chain to ``trust_root`` (default: the
    platform's CAs) and match ``hostname`` (service_identity). Without it the
    link is encrypted but not authenticated: what opportunistic TLS between a
    sender and its own MTA usually is.
    """
    if verify:
        if trust_root is None:
            return ssl.optionsForClientTLS(hostname)
        return ssl.optionsForClientTLS(hostname, trustRoot=trust_root)
    return ssl.CertificateOptions()
