"""Ed25519 signatures of bundles: `pack --sign-key KEY` writes signature.json, `verify --trusted-key PUB` checks it.

manifest.json lists every file's sha256, so a signature over manifest.json's bytes covers the whole bundle.
The hashes alone only catch accidents (anyone who changes a file can recompute them); a signature checked
against a public key you trust also catches deliberate changes.

Keys: PEM (``openssl genpkey -algorithm ed25519 -out key.pem``; ``openssl pkey -in key.pem -pubout -out pub.pem``)
or OpenSSH (``ssh-keygen -t ed25519``). An encrypted private key reads its password from
EDGEPACK_SIGN_KEY_PASSWORD.
"""
from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Any

from edgepack.bundle.manifest import MANIFEST, SIGNATURE
from edgepack.errors import BundleError, first_line
from edgepack.safeio import parse_json, read_bytes

ALGORITHM = "ed25519"
_CONTEXT = b"edgepack bundle signature v1\n"  # signed together with the digest: never valid for anything else
_HELP = "make one with: openssl genpkey -algorithm ed25519 -out key.pem"


def _message(digest: str) -> bytes:
    return _CONTEXT + digest.encode("ascii")


def key_id(public_key) -> str:
    """A short fingerprint of a public key: sha256 of its 32 raw bytes, first 16 hex digits."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()[:16]


def load_private_key(path: Path):
    """An Ed25519 private key from a PEM or OpenSSH file; BundleError naming the file otherwise."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = read_bytes(path, "signing key", BundleError)
    password = os.environ.get("EDGEPACK_SIGN_KEY_PASSWORD")
    pw = password.encode() if password else None
    key: Any
    try:
        if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY"):
            key = serialization.load_ssh_private_key(data, pw)
        else:
            key = serialization.load_pem_private_key(data, pw)
    except TypeError:  # encrypted without a password, or a password for a plain key
        raise BundleError(f"signing key {path} is encrypted" if not pw else
                          f"signing key {path} is not encrypted; unset EDGEPACK_SIGN_KEY_PASSWORD",
                          hint="set EDGEPACK_SIGN_KEY_PASSWORD to its password" if not pw else None) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise BundleError(f"signing key {path} is not a PEM or OpenSSH private key ({first_line(e)})",
                          hint=_HELP) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"signing key {path} is a {type(key).__name__.lstrip('_')}; edgepack signs with Ed25519",
                          hint=_HELP)
    return key


def load_public_key(path: Path):
    """An Ed25519 public key from a PEM or OpenSSH (ssh-ed25519 ...) file; BundleError naming the file otherwise."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    data = read_bytes(path, "trusted key", BundleError)
    key: Any
    try:
        if data.lstrip().startswith(b"ssh-"):
            key = serialization.load_ssh_public_key(data.strip())
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise BundleError(f"trusted key {path} is not a PEM or OpenSSH public key ({first_line(e)})",
                          hint="export it with: openssl pkey -in key.pem -pubout -out pub.pem") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"trusted key {path} is not an Ed25519 public key; edgepack signs with Ed25519")
    return key


def _manifest_digest(bundle: Path) -> str:
    path = bundle / MANIFEST
    if path.is_symlink():
        raise BundleError(f"{path} is a symlink; a bundle's manifest must be a plain file in the bundle")
    return hashlib.sha256(read_bytes(path, "manifest", BundleError)).hexdigest()


def sign_bundle(bundle: Path, key_path: Path) -> dict[str, Any]:
    """Write bundle/signature.json: an Ed25519 signature over manifest.json's sha256; returns its content."""
    import json

    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = load_private_key(key_path)
    digest = _manifest_digest(bundle)
    public = key.public_key()
    doc = {"algorithm": ALGORITHM, "signed_file": MANIFEST, "sha256": digest, "key_id": key_id(public),
           "public_key": base64.b64encode(public.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode(),
           "signature": base64.b64encode(key.sign(_message(digest))).decode()}
    (bundle / SIGNATURE).write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return doc


def _read_signature(bundle: Path) -> dict[str, Any]:
    path = bundle / SIGNATURE
    if path.is_symlink():
        raise BundleError(f"{bundle} failed the signature check: {SIGNATURE} is a symlink")
    if not path.exists():
        raise BundleError(f"{bundle} is not signed: {SIGNATURE} is missing",
                          hint="pack it with --sign-key, or verify without --trusted-key")
    try:
        doc = parse_json(read_bytes(path, "signature", BundleError).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{bundle} failed the signature check: {SIGNATURE} is not valid JSON ({e})") from None
    fields = ("algorithm", "signed_file", "sha256", "signature")
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k), str) for k in fields):
        raise BundleError(f"{bundle} failed the signature check: {SIGNATURE} lacks one of {', '.join(fields)}")
    if doc["algorithm"] != ALGORITHM or doc["signed_file"] != MANIFEST:
        raise BundleError(f"{bundle} failed the signature check: {SIGNATURE} signs {doc['signed_file']!r} with "
                          f"{doc['algorithm']!r}; edgepack signs {MANIFEST} with {ALGORITHM}")
    return doc


def check_signature(bundle: Path, trusted_key: Path) -> dict[str, Any]:
    """Check signature.json against the trusted public key; BundleError naming the file that fails."""
    key = load_public_key(trusted_key)
    bundle = Path(bundle)
    doc = _read_signature(bundle)
    digest = _manifest_digest(bundle)
    if doc["sha256"] != digest:
        raise BundleError(f"{bundle} failed the signature check: {MANIFEST} changed after it was signed "
                          f"(its sha256 is not the one {SIGNATURE} signs)",
                          hint="restore the bundle from its archive or re-pack and sign it")
    from cryptography.exceptions import InvalidSignature

    try:
        signature = base64.b64decode(doc["signature"], validate=True)
        key.verify(signature, _message(digest))
    except (InvalidSignature, ValueError):
        raise BundleError(f"{bundle} failed the signature check: {SIGNATURE} was not made with the trusted key "
                          f"{key_id(key)} for this {MANIFEST}",
                          hint="the bundle was signed by someone else or changed; do not deploy it") from None
    return {"signed": True, "trusted": True, "key_id": key_id(key)}


def describe_signature(bundle: Path) -> dict[str, Any]:
    """What signature.json claims, unchecked (no trusted key given)."""
    try:
        doc = _read_signature(Path(bundle))
    except BundleError as e:
        return {"signed": True, "trusted": False, "problem": str(e)}
    return {"signed": True, "trusted": False, "key_id": doc.get("key_id"),
            "note": "not checked: pass --trusted-key PUB to check it"}
