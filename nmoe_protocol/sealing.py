"""End-to-end sealing of peer payloads (features, logits): the relaying server sees only
ciphertext and sizes.

Every node has an X25519 key pair. The private key is generated on the node, kept in its state
directory (`sealing-x25519.key`, 32 raw bytes, mode 0600) and never sent; the 32-byte public key
is announced at discovery and pinned by peers for the run (`KeyPins`).

`seal` encrypts one array for one recipient with a key used once: the AES-256-GCM key derived
with HKDF-SHA256 from two shared secrets, ephemeral x recipient (a fresh ephemeral X25519 key
pair per message: `Ephemeral`, shared by the payloads one message seals for its several
recipients, then dropped) and sender x recipient (only the pinned sender can produce it; computed
once per key pair and process), over the context label and the ephemeral, sender and recipient
public keys, with a random nonce per payload. The AAD
(`payload_aad`) binds the query id, the wave and both partition ids, so a payload replayed under
another query, wave, sender or recipient is refused.

Blob (a 1-D uint8 array, so it travels in an ArrayRecord):

    offset  size  field (in clear, authenticated)
    0       4     magic b"NMS1" (format and version)
    4       32    ephemeral X25519 public key
    36      12    nonce (random)
    48      ...   AES-256-GCM ciphertext of the body, then its 16-byte tag

    body: dtype code (u8) | ndim (u8) | 2 zero bytes | ndim x u64 dims (little endian)
          | the array's bytes (C order, little endian)

A sealed (n, d) array is `n*d*itemsize + 84` bytes. No pickle anywhere: the dtype comes from a
fixed allow-list and the shape must account for every byte.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import struct
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from nmoe.atomic import clean_temp_files, write_atomic

KEY_FILE = "sealing-x25519.key"
KEY_SIZE = 32
MAGIC = b"NMS1"
KDF_LABEL = b"nmoe-flower/seal/v1"
AAD_LABEL = b"nmoe-flower/aad/v1"
NONCE_SIZE = 12
TAG_SIZE = 16
PREFIX_SIZE = len(MAGIC) + KEY_SIZE + NONCE_SIZE
BODY_HEAD = struct.Struct("<BBH")  # dtype code, ndim, reserved (zero)
DIM = struct.Struct("<Q")
MAX_NDIM = 4
# payload kinds for `payload_aad`'s wave: requester -> expert owner, expert owner -> requester
WAVE_FEATURES = "features"
WAVE_LOGITS = "logits"
DEFAULT_MAX_ROWS = 100_000
MAX_BODY_BYTES = 2**31 - 1 - TAG_SIZE  # AES-GCM in `cryptography` takes at most 2**31 - 1 bytes
# dtype codes on the wire (little endian); the allow-list of what a blob may hold
DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"),
    2: np.dtype("<f8"),
    3: np.dtype("<f2"),
    4: np.dtype("<i8"),
    5: np.dtype("<i4"),
    6: np.dtype("u1"),
    7: np.dtype("?"),
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
STATIC_SECRET_CACHE = 1024  # (own key, peer key) pairs whose static secret a process keeps
_STATIC_SECRETS: dict[tuple[bytes, bytes], bytes] = {}


class SealError(ValueError):
    """A payload that cannot be sealed or opened, or a key that cannot be used."""


# --- keys -----------------------------------------------------------------------------------------
def generate_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A new key pair: the private key and the 32 raw bytes of its public key."""
    private = X25519PrivateKey.generate()
    return private, public_key_bytes(private)


def public_key_bytes(private: X25519PrivateKey) -> bytes:
    """The 32 raw bytes of `private`'s public key (what a node announces)."""
    return private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def fingerprint(public: bytes) -> str:
    """A short hex name of a public key, for logs and error messages."""
    return hashlib.sha256(_public_key(public, "public key").public_bytes_raw()).hexdigest()[:16]


def load_or_create_keypair(directory: Path) -> tuple[X25519PrivateKey, bytes]:
    """The node's key pair from `directory/sealing-x25519.key`, created (atomically, mode 0600)
    if absent. Concurrent callers on one host get the same key; the temp file of a creation
    killed earlier is removed.

    Raises `SealError` if the file is not a regular file of 32 bytes owned by this user and
    unreadable by others (it is never repaired or replaced: its owner decides).
    """
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / KEY_FILE
    with _locked(directory):
        clean_temp_files(directory, target=KEY_FILE, all_files=True)  # the lock: no writer active
        if not os.path.lexists(path):
            raw = X25519PrivateKey.generate().private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )

            def write(tmp: str) -> None:
                fd = os.open(tmp, os.O_WRONLY | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0))
                try:
                    os.fchmod(fd, 0o600)
                    os.write(fd, raw)
                finally:
                    os.close(fd)

            write_atomic(path, write)
        private = _read_private_key(path)
    return private, public_key_bytes(private)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on `directory` (POSIX), released on exit or process death."""
    try:
        import fcntl
    except ImportError:  # not POSIX: creation is still atomic, only a creation race is open
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_private_key(path: Path) -> X25519PrivateKey:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as error:
        raise SealError(f"sealing key {path} cannot be opened: {error}") from error
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise SealError(f"sealing key {path} is not a regular file")
        if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
            raise SealError(f"sealing key {path} belongs to uid {info.st_uid}, not to this user")
        if info.st_mode & 0o077:
            raise SealError(
                f"sealing key {path} has permissions {stat.S_IMODE(info.st_mode):04o}: others may "
                f"read it; it must be 0600 (chmod 600 {path}, or delete it to make a new key)"
            )
        raw = os.read(fd, KEY_SIZE + 1)
    finally:
        os.close(fd)
    if len(raw) != KEY_SIZE:
        raise SealError(f"sealing key {path} holds {len(raw)} bytes, expected {KEY_SIZE}")
    return X25519PrivateKey.from_private_bytes(raw)


class KeyPins:
    """Peers' public keys by partition id, pinned at discovery for the whole run."""

    def __init__(self, pins: Mapping[int | str, bytes] | None = None) -> None:
        self._pins: dict[int, bytes] = {}
        for pid, public in (pins or {}).items():
            self.pin(int(pid), public)

    def pin(self, pid: int, public: bytes) -> None:
        """Pin `public` for `pid`; raises `SealError` if another key is pinned for it."""
        public = _public_key(public, f"public key of partition {pid}").public_bytes_raw()
        held = self._pins.setdefault(_pid(pid, "pid"), public)
        if held != public:
            raise SealError(
                f"partition {pid} announced key {fingerprint(public)} but "
                f"{fingerprint(held)} is pinned for this run"
            )

    def __getitem__(self, pid: int) -> bytes:
        if pid not in self._pins:
            raise SealError(f"no public key pinned for partition {pid}")
        return self._pins[pid]

    def __contains__(self, pid: object) -> bool:
        return pid in self._pins

    def to_dict(self) -> dict[str, bytes]:
        """`{str(pid): key}`, e.g. for a ConfigRecord in `context.state`."""
        return {str(pid): public for pid, public in sorted(self._pins.items())}


# --- payloads -------------------------------------------------------------------------------------
def payload_aad(query_id: str, wave: str, sender_pid: int, recipient_pid: int) -> bytes:
    """Associated data binding a payload to its query, wave (e.g. `WAVE_FEATURES`), sender and
    recipient partition ids (length-prefixed, so no two argument lists give the same bytes)."""
    parts = []
    for name, text in (("query_id", query_id), ("wave", wave)):
        if not isinstance(text, str) or not text:
            raise SealError(f"payload_aad: {name} must be a non-empty string, got {text!r}")
        encoded = text.encode()
        if len(encoded) > 1024:
            raise SealError(f"payload_aad: {name} is longer than 1024 bytes")
        parts.append(struct.pack("<H", len(encoded)) + encoded)
    pids = struct.pack("<QQ", _pid(sender_pid, "sender_pid"), _pid(recipient_pid, "recipient_pid"))
    return AAD_LABEL + b"".join(parts) + pids


def sealed_size(shape: tuple[int, ...], dtype: Any) -> int:
    """Bytes of the blob `seal` makes of an array of this shape and dtype."""
    count = 1
    for dim in shape:
        count *= int(dim)
    body = BODY_HEAD.size + DIM.size * len(shape) + count * np.dtype(dtype).itemsize
    return PREFIX_SIZE + body + TAG_SIZE


class Ephemeral:
    """A fresh ephemeral X25519 key pair for the payloads of one message (one per recipient):
    each payload's key still differs (HKDF over the recipient's key, its own random nonce), and
    the private half is never stored. Make a new one for every message."""

    def __init__(self) -> None:
        self.private = X25519PrivateKey.generate()
        self.public = self.private.public_key().public_bytes_raw()


def seal(
    array: np.ndarray,
    sender_private: X25519PrivateKey,
    recipient_public: bytes | X25519PublicKey,
    aad: bytes,
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    ephemeral: Ephemeral | None = None,
) -> np.ndarray:
    """Encrypt and authenticate `array` for the holder of `recipient_public` (a uint8 blob),
    with `ephemeral` (the message's; default: a new one for this payload alone).

    Raises `SealError` for a dtype outside `DTYPES`, more than `MAX_NDIM` dimensions, more
    than `max_rows` rows, a body over 2 GiB, or unusable keys or AAD.
    """
    if not isinstance(array, np.ndarray):
        raise SealError(f"seal: expected a numpy array, got {type(array).__name__}")
    wire = np.dtype(array.dtype).newbyteorder("<") if array.dtype.byteorder != "|" else array.dtype
    if wire not in CODES:
        raise SealError(f"seal: dtype {array.dtype} is not one of {_allowed_names(DTYPES)}")
    _check_shape(array.shape, max_rows, "seal")
    head = BODY_HEAD.pack(CODES[wire], array.ndim, 0) + b"".join(DIM.pack(d) for d in array.shape)
    data = np.asarray(array, dtype=wire, order="C").reshape(-1).view(np.uint8)
    if len(head) + data.size > MAX_BODY_BYTES:
        raise SealError(f"seal: {data.size} bytes is more than one payload may hold")
    plain = np.empty(len(head) + data.size, dtype=np.uint8)
    plain[: len(head)] = np.frombuffer(head, dtype=np.uint8)
    plain[len(head) :] = data
    recipient = _public_key(recipient_public, "recipient public key")
    sender_public = _private_key(sender_private, "sender private key").public_key()
    if ephemeral is None:
        ephemeral = Ephemeral()
    elif not isinstance(ephemeral, Ephemeral):
        raise SealError(f"seal: ephemeral must be an Ephemeral, got {type(ephemeral).__name__}")
    ephemeral_public = ephemeral.public
    nonce = os.urandom(NONCE_SIZE)
    prefix = MAGIC + ephemeral_public + nonce
    key = _derive(
        _exchange(ephemeral.private, recipient),
        _static_secret(sender_private, recipient),
        ephemeral_public,
        sender_public.public_bytes_raw(),
        recipient.public_bytes_raw(),
    )
    sealed = AESGCM(key).encrypt(nonce, plain, prefix + _aad(aad))
    blob = np.empty(len(prefix) + len(sealed), dtype=np.uint8)
    blob[: len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    blob[len(prefix) :] = np.frombuffer(sealed, dtype=np.uint8)
    return blob


def open_sealed(
    blob: np.ndarray | bytes,
    recipient_private: X25519PrivateKey,
    sender_public: bytes | X25519PublicKey,
    aad: bytes,
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
    dtypes: Collection[Any] | None = None,
) -> np.ndarray:
    """Authenticate and decrypt a blob from `seal`; the array it holds (writable, native order).

    Raises `SealError` for a blob that is not a 1-D uint8 array or bytes, is truncated or of
    another format, fails authentication (tampered, another sender or recipient key, another
    AAD), or holds a dtype outside `dtypes` (default: all of `DTYPES`), more than `MAX_NDIM`
    dimensions or `max_rows` rows, or a shape that does not account for its bytes.
    """
    raw = _blob_bytes(blob)  # no copy: views into the blob
    if len(raw) < PREFIX_SIZE + BODY_HEAD.size + TAG_SIZE:
        raise SealError(f"open_sealed: blob of {len(raw)} bytes is truncated")
    if bytes(raw[: len(MAGIC)]) != MAGIC:
        raise SealError("open_sealed: not a sealed payload (unknown magic or version)")
    recipient_private = _private_key(recipient_private, "recipient private key")
    sender = _public_key(sender_public, "sender public key")
    prefix = bytes(raw[:PREFIX_SIZE])
    ephemeral_public = prefix[len(MAGIC) : len(MAGIC) + KEY_SIZE]
    nonce = prefix[len(MAGIC) + KEY_SIZE :]
    key = _derive(
        _exchange(recipient_private, _public_key(ephemeral_public, "ephemeral key in the blob")),
        _static_secret(recipient_private, sender),
        ephemeral_public,
        sender.public_bytes_raw(),
        public_key_bytes(recipient_private),
    )
    try:
        body = AESGCM(key).decrypt(nonce, raw[PREFIX_SIZE:], prefix + _aad(aad))
    except InvalidTag:
        raise SealError(
            "open_sealed: authentication failed (tampered or truncated blob, another sender or "
            "recipient key, or another query id, wave or partition in the AAD)"
        ) from None
    return _parse_body(body, max_rows, dtypes)


# --- internals ------------------------------------------------------------------------------------
def _parse_body(body: bytes, max_rows: int, dtypes: Collection[Any] | None) -> np.ndarray:
    if len(body) < BODY_HEAD.size:
        raise SealError("open_sealed: body too short for its header")
    code, ndim, reserved = BODY_HEAD.unpack_from(body)
    allowed = DTYPES if dtypes is None else {c: d for c, d in DTYPES.items() if _in(d, dtypes)}
    if code not in allowed:
        raise SealError(f"open_sealed: dtype code {code} is not one of {_allowed_names(allowed)}")
    if reserved or ndim > MAX_NDIM:
        raise SealError(f"open_sealed: bad header (ndim {ndim}, reserved {reserved})")
    offset = BODY_HEAD.size + DIM.size * ndim
    if len(body) < offset:
        raise SealError("open_sealed: body too short for its shape")
    shape = tuple(DIM.unpack_from(body, BODY_HEAD.size + DIM.size * i)[0] for i in range(ndim))
    _check_shape(shape, max_rows, "open_sealed")
    dtype = allowed[code]
    count, span = 1, dtype.itemsize
    for dim in shape:
        count *= dim
        span *= max(dim, 1)
    if span > MAX_BODY_BYTES:  # numpy refuses such shapes even when one dimension is 0
        raise SealError(f"open_sealed: shape {shape} of {dtype} is too large")
    if count * dtype.itemsize != len(body) - offset:
        raise SealError(
            f"open_sealed: shape {shape} of {dtype} needs {count * dtype.itemsize} bytes, "
            f"the payload has {len(body) - offset}"
        )
    array = np.frombuffer(body, dtype=dtype, count=count, offset=offset).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=True)


def _check_shape(shape: tuple[int, ...], max_rows: int, where: str) -> None:
    if len(shape) > MAX_NDIM:
        raise SealError(f"{where}: {len(shape)} dimensions, at most {MAX_NDIM} allowed")
    if shape and shape[0] > max_rows:
        raise SealError(f"{where}: {shape[0]} rows, at most {max_rows} allowed")


def _derive(
    ephemeral_secret: bytes,
    static_secret: bytes,
    ephemeral_public: bytes,
    sender_public: bytes,
    recipient_public: bytes,
) -> bytes:
    info = KDF_LABEL + ephemeral_public + sender_public + recipient_public
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(
        ephemeral_secret + static_secret
    )


def _exchange(private: X25519PrivateKey, public: X25519PublicKey) -> bytes:
    try:
        return private.exchange(public)
    except ValueError as error:  # a low-order point gives the all-zero secret
        raise SealError(f"unusable public key {public.public_bytes_raw().hex()}") from error


def _static_secret(private: X25519PrivateKey, public: X25519PublicKey) -> bytes:
    """The sender x recipient secret, computed once per key pair and process (a node seals for
    and opens from the same few pinned peers on every message); the ephemeral one is fresh."""
    key = (private.private_bytes_raw(), public.public_bytes_raw())
    secret = _STATIC_SECRETS.get(key)
    if secret is None:
        secret = _exchange(private, public)
        if len(_STATIC_SECRETS) >= STATIC_SECRET_CACHE:
            _STATIC_SECRETS.pop(next(iter(_STATIC_SECRETS)))
        _STATIC_SECRETS[key] = secret
    return secret


def _public_key(value: bytes | X25519PublicKey, what: str) -> X25519PublicKey:
    if isinstance(value, X25519PublicKey):
        return value
    if not isinstance(value, (bytes, bytearray, memoryview)) or len(value) != KEY_SIZE:
        raise SealError(f"{what} must be {KEY_SIZE} raw bytes")
    return X25519PublicKey.from_public_bytes(bytes(value))


def _private_key(value: X25519PrivateKey, what: str) -> X25519PrivateKey:
    if not isinstance(value, X25519PrivateKey):
        raise SealError(f"{what} must be an X25519PrivateKey, got {type(value).__name__}")
    return value


def _blob_bytes(blob: np.ndarray | bytes) -> memoryview:
    if isinstance(blob, (bytes, bytearray)):
        return memoryview(blob)
    if isinstance(blob, np.ndarray) and blob.dtype == np.uint8 and blob.ndim == 1:
        return memoryview(np.ascontiguousarray(blob))
    kind = (
        f"{blob.dtype} array of shape {blob.shape}" if isinstance(blob, np.ndarray) else type(blob)
    )
    raise SealError(f"open_sealed: expected a 1-D uint8 array or bytes, got {kind}")


def _aad(aad: bytes) -> bytes:
    if not isinstance(aad, (bytes, bytearray)):
        raise SealError(f"aad must be bytes (see payload_aad), got {type(aad).__name__}")
    return bytes(aad)


def _pid(value: int, name: str) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or not 0 <= value < 2**63
    ):
        raise SealError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _in(dtype: np.dtype, dtypes: Collection[Any]) -> bool:
    return any(np.dtype(d).newbyteorder("=") == dtype.newbyteorder("=") for d in dtypes)


def _allowed_names(dtypes: Mapping[int, np.dtype]) -> str:
    return ", ".join(str(d.newbyteorder("=")) for d in dtypes.values())
