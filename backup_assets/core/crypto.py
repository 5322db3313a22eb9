"""age encryption of artifacts, as streams (pyrage; the stock `age` CLI decrypts every artifact).

The catalog names public recipients only (age X25519 `age1...` keys and `ssh-ed25519`/`ssh-rsa`
keys): backup hosts never need a private key to write backups. Reading one back (checks that
need plaintext, drills, restores) needs an identity file, whose *path* is in the environment
variable the catalog names (`identity_file_env`).

pyrage's encrypt_io/decrypt_io pull from a reader and push to a writer; our pipelines push on
write and pull on read, so each side runs in a thread joined to the stream by an OS pipe:
memory stays bounded whatever the size.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pyrage

from backup_assets.core import BackupError
from backup_assets.core.chunks import ChunkQueue

MAGIC = b"age-encryption.org/v1\n"
SUFFIX = ".age"


def is_encrypted(head: bytes) -> bool:
    return head.startswith(MAGIC)


def parse_recipient(text: str):
    """A pyrage recipient from its public text form; ValueError saying why not."""
    text = text.strip()
    try:
        if text.startswith("age1"):
            return pyrage.x25519.Recipient.from_str(text)
        if text.startswith(("ssh-ed25519 ", "ssh-rsa ")):
            return pyrage.ssh.Recipient.from_str(text)
    except pyrage.RecipientError as exc:
        raise ValueError(f"not a valid age or ssh public key ({exc})") from None
    if text.startswith("AGE-SECRET-KEY") or "PRIVATE KEY" in text:
        raise ValueError("this is a private key: the catalog takes public recipients only")
    raise ValueError("expected an age public key (age1...) or an ssh-ed25519/ssh-rsa public key")


def fingerprint(recipient: str) -> str:
    """SHA256:<base64> of the key: for ssh keys the usual ssh fingerprint, for age keys of the
    public key's text."""
    parts = recipient.strip().split()
    if parts[0].startswith("ssh-") and len(parts) >= 2:
        blob = base64.b64decode(parts[1])
    else:
        blob = parts[0].encode()
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def describe(recipients: list[str]) -> list[dict]:
    """What a manifest records of the recipients: type, fingerprint and the public key itself."""
    out = []
    for r in recipients:
        kind = "x25519" if r.startswith("age1") else r.split()[0]
        out.append({"type": kind, "fingerprint": fingerprint(r), "recipient": r.strip()})
    return out


class NoIdentity(BackupError):
    """The key that opens an artifact is not at hand (no identity file, a wrong or unusable one): what needs
    the plaintext cannot be done here, which says nothing about the backup itself."""


@dataclass(frozen=True)
class Identities:
    """The private keys that can open artifacts, loaded from the file an environment variable names."""

    env: str
    keys: tuple
    public: frozenset  # fingerprints of the keys' public halves, where known

    @classmethod
    def load(cls, env: str, needed: list[dict] | None = None) -> "Identities":
        need = ", ".join(r["fingerprint"] for r in needed or []) or "one of its recipients"
        path = os.environ.get(env)
        if not path:
            raise NoIdentity(f"the artifact is encrypted for {need}: set {env} to the path of an age identity "
                              "file (or ssh private key) for one of these keys")
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise NoIdentity(f"cannot read the identity file {path} named by {env}: {exc.strerror}") from None
        keys, public = [], set()
        text = data.decode(errors="replace")
        if "PRIVATE KEY" in text:
            try:
                keys.append(pyrage.ssh.Identity.from_buffer(data))
            except Exception as exc:  # pyrage raises its own error types for bad keys
                raise NoIdentity(f"the identity file named by {env} is not a usable ssh key: {exc}") from None
        else:
            for line in text.splitlines():
                line = line.strip()
                if line.startswith("AGE-SECRET-KEY-"):
                    try:
                        key = pyrage.x25519.Identity.from_str(line)
                    except pyrage.IdentityError as exc:
                        raise NoIdentity(f"the identity file named by {env} holds a bad age key: {exc}") from None
                    keys.append(key)
                    public.add(fingerprint(str(key.to_public())))
        if not keys:
            raise NoIdentity(f"the identity file named by {env} holds no age identity or ssh private key")
        return cls(env, tuple(keys), frozenset(public))


class EncryptingWriter:
    """A writable stream that encrypts to `sink` (age format) as it goes, in a thread fed through
    a ChunkQueue rather than a kernel pipe: pyrage reads in 8 KiB pieces, which through a pipe
    cost a system call and a copy each."""

    def __init__(self, sink, recipients: list[str]):
        self._recipients = [parse_recipient(r) for r in recipients]
        self._chunks = ChunkQueue()
        self._closed = False
        self._error: list[BaseException] = []

        def run() -> None:
            try:
                pyrage.encrypt_io(self._chunks, sink, self._recipients)
            except BaseException as exc:  # re-raised by close()
                self._error.append(exc)
                self._chunks.drain()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def write(self, data) -> int:
        if self._error:
            self._raise()
        if not data:  # an empty chunk would end the stream
            return 0
        try:
            self._chunks.put(bytes(data), self._thread.is_alive)
        except BrokenPipeError:
            self._raise()
            raise
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._chunks.put(None, self._thread.is_alive)  # the end of the stream
            except BrokenPipeError:  # the thread already stopped: its error is raised below
                pass
        self._thread.join()
        self._raise()

    def _raise(self) -> None:
        if self._error:
            raise BackupError(f"encryption failed: {self._error[0]}")


class DecryptingReader:
    """A readable stream of the plaintext of an age-encrypted stream. A wrong key, a damaged or
    truncated ciphertext raise BackupError when they are met (age authenticates every chunk)."""

    def __init__(self, source: BinaryIO, identities: Identities, *, what: str):
        self._what = what
        self._identities = identities
        r, w = os.pipe()
        self._pipe = os.fdopen(r, "rb", buffering=0)
        writer = os.fdopen(w, "wb", buffering=1 << 20)
        self._error: list[BaseException] = []

        def run() -> None:
            try:
                pyrage.decrypt_io(source, writer, list(identities.keys))
            except BaseException as exc:
                self._error.append(exc)
            finally:
                try:
                    writer.close()
                except BrokenPipeError:
                    pass

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def read(self, size: int = -1) -> bytes:
        data = self._pipe.read(size if size and size > 0 else 1 << 20)
        if not data:
            self._thread.join()
            if self._error:
                exc = self._error[0]
                if "no matching" in str(exc).lower():
                    raise NoIdentity(f"{self._what}: none of the keys in the identity file named by "
                                      f"{self._identities.env} opens it ({exc})")
                raise BackupError(f"{self._what}: the encrypted stream is damaged or truncated ({exc})")
        return data

    def close(self) -> None:
        self._pipe.close()
        self._thread.join(timeout=30)


def identities_for(catalog, manifest, *, artifact: str) -> "Identities | None":
    """The identities that open an artifact (None when it is not encrypted). The variable is the
    catalog's `identity_file_env` for the source, else the one the manifest recorded; a missing or
    wrong one is one line naming the variable and the keys the artifact needs."""
    enc = manifest.encryption
    if not enc:
        return None
    cfg = catalog.encryption_for(manifest.source) if catalog is not None else None
    env = (cfg.identity_file_env if cfg is not None and cfg.identity_file_env else None) or enc.get("identity_file_env")
    needed = enc.get("recipients") or []
    names = ", ".join(r["fingerprint"] for r in needed)
    if not env:
        raise NoIdentity(f"{artifact} is encrypted for {names}: name the variable that holds the identity file's "
                          "path in the catalog (encryption.identity_file_env)")
    try:
        ids = Identities.load(env, needed)
    except BackupError as exc:
        raise NoIdentity(f"{artifact}: {exc}") from None
    x25519_needed = {r["fingerprint"] for r in needed if r.get("type") == "x25519"}
    only_age_keys = len(ids.public) == len(ids.keys)
    if only_age_keys and not (ids.public & x25519_needed):
        raise NoIdentity(f"{artifact} is encrypted for {names}; the identity file named by {env} holds none of "
                          f"these keys (it holds {', '.join(sorted(ids.public))})")
    return ids


def identities_for_record(catalog, source: str, record: dict, *, what: str) -> "Identities | None":
    """The identities for a file described by a JSON of its own (a WAL segment, a base backup): None when it is
    not encrypted; the catalog's identity_file_env for the source, else the one the JSON recorded."""
    if not record.get("encrypted"):
        return None
    cfg = catalog.encryption_for(source) if catalog is not None else None
    env = (cfg.identity_file_env if cfg is not None and cfg.identity_file_env else None) or record.get("identity_file_env")
    if not env:
        raise NoIdentity(f"{what} is encrypted: name the identity file's variable in encryption.identity_file_env")
    try:
        return Identities.load(env)
    except BackupError as exc:
        raise NoIdentity(f"{what}: {exc}") from None


def identities_if_any(catalog, manifest, *, artifact: str) -> "Identities | None":
    """The identities when they can be had, else None (for checks that can do without plaintext)."""
    try:
        return identities_for(catalog, manifest, artifact=artifact)
    except BackupError:
        return None


def key_summary(manifest) -> str:
    """Which key a backup needs, for `list`: the recipients' fingerprints, or '-' when plain."""
    enc = manifest.encryption
    if not enc:
        return "-"
    return ",".join(r["fingerprint"][:19] for r in enc.get("recipients", []))
