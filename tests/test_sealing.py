"""End-to-end sealing of peer payloads: round trips, every tampering refused, keys on disk."""

from __future__ import annotations

import multiprocessing
import os
import stat
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from nmoe_protocol import sealing
from nmoe_protocol.sealing import (
    KeyPins,
    SealError,
    generate_keypair,
    load_or_create_keypair,
    open_sealed,
    payload_aad,
    seal,
    sealed_size,
)

RNG = np.random.default_rng(0)
A_KEY, A_PUB = generate_keypair()  # requester, partition 0
B_KEY, B_PUB = generate_keypair()  # expert owner, partition 1
C_KEY, C_PUB = generate_keypair()  # another node
AAD = payload_aad("q-7", sealing.WAVE_FEATURES, 0, 1)


def _features(rows: int = 3, dim: int = 4) -> np.ndarray:
    return RNG.standard_normal((rows, dim)).astype(np.float32)


@pytest.mark.parametrize(
    "array",
    [
        _features(10, 64),
        _features(0, 64),
        _features(1, 1),
        RNG.standard_normal((5, 3)),
        RNG.standard_normal((2, 3, 4)).astype(np.float16),
        RNG.integers(-(2**40), 2**40, (7, 2)),
        RNG.integers(-5, 5, 6).astype(np.int32),
        RNG.integers(0, 255, (2, 1, 1, 3)).astype(np.uint8),
        RNG.random((4, 2)) > 0.5,
        np.array(2.5, dtype=np.float32),
        RNG.standard_normal((6, 5)).astype(np.float32).T,  # not C-contiguous
        _features(4, 3).astype(">f4"),  # big endian: arrives in native order, same values
    ],
    ids=lambda a: f"{a.dtype.str}{a.shape}",
)
def test_round_trip(array: np.ndarray) -> None:
    blob = seal(array, A_KEY, B_PUB, AAD)
    assert blob.dtype == np.uint8 and blob.ndim == 1
    assert blob.size == sealed_size(array.shape, array.dtype)
    opened = open_sealed(blob, B_KEY, A_PUB, AAD)
    assert opened.shape == array.shape and opened.dtype == array.dtype.newbyteorder("=")
    assert np.array_equal(opened, array)
    assert opened.flags.writeable and opened.dtype.isnative
    assert np.array_equal(open_sealed(blob.tobytes(), B_KEY, A_PUB, AAD), array)


def test_every_flipped_bit_and_every_truncation_is_refused() -> None:
    blob = seal(_features(3, 4), A_KEY, B_PUB, AAD)
    for index in range(blob.size):  # magic, ephemeral key, nonce, ciphertext, tag
        for bit in (0, 7):
            tampered = blob.copy()
            tampered[index] ^= 1 << bit
            with pytest.raises(SealError):
                open_sealed(tampered, B_KEY, A_PUB, AAD)
    for length in range(blob.size):
        with pytest.raises(SealError):
            open_sealed(blob[:length], B_KEY, A_PUB, AAD)
    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(np.concatenate([blob, np.zeros(1, np.uint8)]), B_KEY, A_PUB, AAD)
    assert np.array_equal(open_sealed(blob, B_KEY, A_PUB, AAD).shape, (3, 4))


def test_replay_under_another_query_wave_or_route_is_refused() -> None:
    array = _features()
    blob = seal(array, A_KEY, B_PUB, AAD)
    for other in (
        payload_aad("q-8", "features", 0, 1),  # the same payload replayed in another query
        payload_aad("q-7", sealing.WAVE_LOGITS, 0, 1),
        payload_aad("q-7", "features", 2, 1),
        payload_aad("q-7", "features", 0, 2),
        payload_aad("q-7", "features", 1, 0),
        b"",
    ):
        with pytest.raises(SealError, match="authentication failed"):
            open_sealed(blob, B_KEY, A_PUB, other)


def test_wrong_recipient_or_sender_is_refused() -> None:
    blob = seal(_features(), A_KEY, B_PUB, AAD)
    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(blob, C_KEY, A_PUB, AAD)  # a third node cannot read it
    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(blob, B_KEY, C_PUB, AAD)  # nor pass it off as its own
    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(blob, A_KEY, B_PUB, AAD)  # reflected back to its sender
    forged = seal(_features(), C_KEY, B_PUB, AAD)  # C claims to be A
    with pytest.raises(SealError, match="authentication failed"):
        open_sealed(forged, B_KEY, A_PUB, AAD)


def test_blob_reveals_nothing_but_its_size() -> None:
    array = _features(256, 64)
    blob = seal(array, A_KEY, B_PUB, AAD).tobytes()
    plain = array.tobytes()
    leaked = [i for i in range(0, len(plain) - 8, 4) if plain[i : i + 8] in blob]
    assert leaked == [], "pairs of plaintext floats found in the blob"
    assert array[:, :2].astype(np.float64).tobytes()[:8] not in blob
    zeros = seal(np.zeros((256, 64), np.float32), A_KEY, B_PUB, AAD).tobytes()
    assert bytes(16) not in zeros  # no structure of the plaintext shows through
    again = seal(array, A_KEY, B_PUB, AAD).tobytes()
    assert len(again) == len(blob) and again != blob  # a fresh key per message
    assert A_PUB not in blob and B_PUB not in blob  # not even who talks to whom


def _seal_body(body: bytes, aad: bytes = AAD) -> np.ndarray:
    """A correctly authenticated blob around any body: what a buggy or hostile peer could send."""
    ephemeral, ephemeral_public = generate_keypair()
    nonce = os.urandom(sealing.NONCE_SIZE)
    prefix = sealing.MAGIC + ephemeral_public + nonce
    key = sealing._derive(
        ephemeral.exchange(sealing._public_key(B_PUB, "")),
        A_KEY.exchange(sealing._public_key(B_PUB, "")),
        ephemeral_public,
        A_PUB,
        B_PUB,
    )
    return np.frombuffer(prefix + AESGCM(key).encrypt(nonce, body, prefix + aad), np.uint8)


def _body(code: int, shape: tuple[int, ...], data: bytes, ndim: int | None = None) -> bytes:
    ndim = len(shape) if ndim is None else ndim
    return struct.pack("<BBH", code, ndim, 0) + b"".join(struct.pack("<Q", d) for d in shape) + data


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_body(0, (2,), bytes(8)), "dtype code 0"),
        (_body(99, (2,), bytes(8)), "dtype code 99"),
        (_body(1, (2, 3), bytes(20)), r"needs 24 bytes, the payload has 20"),
        (_body(1, (2, 3), bytes(28)), r"needs 24 bytes, the payload has 28"),
        (_body(1, (1, 2**62), bytes(24)), "too large"),
        (_body(1, (3, 2**20, 2**20), bytes(24)), "too large"),
        (_body(1, (1, 2**20), bytes(24)), r"needs 4194304 bytes"),
        (_body(1, (0, 2**63), b""), "too large"),
        (_body(1, (2**63, 0), b""), "rows"),
        (_body(1, (0, 2**20, 2**20), b""), "too large"),
        (_body(1, (100_001, 1), bytes(4 * 100_001)), "100001 rows"),
        (_body(1, (1,) * 5, bytes(4)), "bad header"),
        (_body(1, (2, 3), bytes(24), ndim=3), "body too short for its shape|needs"),
        (struct.pack("<BBH", 1, 1, 7) + struct.pack("<Q", 1) + bytes(4), "reserved 7"),
        (b"\x01\x01", "truncated"),
    ],
)
def test_absurd_headers_are_refused(body: bytes, message: str) -> None:
    with pytest.raises(SealError, match=message):
        open_sealed(_seal_body(body), B_KEY, A_PUB, AAD)


def test_limits_on_both_sides() -> None:
    blob = seal(_features(50, 2), A_KEY, B_PUB, AAD)
    with pytest.raises(SealError, match="50 rows, at most 10"):
        open_sealed(blob, B_KEY, A_PUB, AAD, max_rows=10)
    with pytest.raises(SealError, match="dtype code 1"):
        open_sealed(blob, B_KEY, A_PUB, AAD, dtypes=("int64",))
    assert open_sealed(blob, B_KEY, A_PUB, AAD, dtypes=(np.float32,)).shape == (50, 2)
    for bad in (
        np.zeros(3, dtype=object),
        np.zeros(3, dtype=np.complex64),
        np.zeros((1,) * 5, dtype=np.float32),
        np.zeros(3, dtype="U2"),
    ):
        with pytest.raises(SealError):
            seal(bad, A_KEY, B_PUB, AAD)
    with pytest.raises(SealError, match="at most 10"):
        seal(_features(11, 2), A_KEY, B_PUB, AAD, max_rows=10)
    with pytest.raises(SealError, match="numpy array"):
        seal([1.0, 2.0], A_KEY, B_PUB, AAD)  # type: ignore[arg-type]
    with pytest.raises(SealError, match="32 raw bytes"):
        seal(_features(), A_KEY, B_PUB[:31], AAD)
    with pytest.raises(SealError, match="unusable public key"):
        seal(_features(), A_KEY, bytes(32), AAD)  # a low-order point
    with pytest.raises(SealError, match="aad must be bytes"):
        seal(_features(), A_KEY, B_PUB, "q-7")  # type: ignore[arg-type]
    with pytest.raises(SealError, match="1-D uint8"):
        open_sealed(blob.astype(np.int16), B_KEY, A_PUB, AAD)
    with pytest.raises(SealError, match="magic"):
        open_sealed(np.frombuffer(b"XXXX" + blob.tobytes()[4:], np.uint8), B_KEY, A_PUB, AAD)


def test_payload_aad_is_unambiguous_and_checked() -> None:
    cases = [
        ("ab", "c", 0, 1),
        ("a", "bc", 0, 1),
        ("a", "b", 0, 1),
        ("a", "b", 1, 0),
        ("a", "b", 0, 256),
        ("a", "b", 256, 0),
    ]
    assert len({payload_aad(*case) for case in cases}) == len(cases)
    assert payload_aad("q", "logits", 3, 4) == payload_aad("q", "logits", np.int64(3), 4)
    for bad in (("", "w", 0, 1), ("q", "", 0, 1), ("q", "w", -1, 1), ("q", "w", 0, True)):
        with pytest.raises(SealError):
            payload_aad(*bad)  # type: ignore[arg-type]


# --- keys -----------------------------------------------------------------------------------------
def test_keypair_is_created_once_private_and_reloaded(tmp_path: Path) -> None:
    folder = tmp_path / "state"
    leftover = folder / ".sealing-x25519.key.abcd1234.tmp"  # a creation killed earlier
    folder.mkdir()
    leftover.write_bytes(b"half")
    private, public = load_or_create_keypair(folder)
    path = folder / sealing.KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_size == 32 and public not in path.read_bytes()
    assert sorted(os.listdir(folder)) == [sealing.KEY_FILE]
    again, public_again = load_or_create_keypair(folder)
    assert public_again == public
    blob = seal(_features(), A_KEY, public, AAD)
    assert open_sealed(blob, again, A_PUB, AAD).shape == (3, 4)


def test_bad_key_files_are_refused_not_replaced(tmp_path: Path) -> None:
    _, public = load_or_create_keypair(tmp_path)
    path = tmp_path / sealing.KEY_FILE
    original = path.read_bytes()
    path.chmod(0o644)
    with pytest.raises(SealError, match="permissions 0644.*chmod 600"):
        load_or_create_keypair(tmp_path)
    path.chmod(0o600)
    assert load_or_create_keypair(tmp_path)[1] == public
    path.write_bytes(original[:31])
    with pytest.raises(SealError, match="31 bytes"):
        load_or_create_keypair(tmp_path)
    path.unlink()
    (tmp_path / "elsewhere").write_bytes(original)
    (tmp_path / "elsewhere").chmod(0o600)
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(SealError, match="cannot be opened"):
        load_or_create_keypair(tmp_path)
    assert path.is_symlink()


def _create_and_report(folder: str, queue: multiprocessing.Queue) -> None:
    queue.put(load_or_create_keypair(Path(folder))[1])


def test_concurrent_creation_agrees_on_one_key(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    children = [
        context.Process(target=_create_and_report, args=(str(tmp_path / "state"), queue))
        for _ in range(4)
    ]
    for child in children:
        child.start()
    keys = {queue.get(timeout=60) for _ in children}
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    assert keys == {load_or_create_keypair(tmp_path / "state")[1]}


def test_pins_refuse_a_changed_key() -> None:
    pins = KeyPins()
    pins.pin(0, A_PUB)
    pins.pin(0, A_PUB)
    pins.pin(1, B_PUB)
    with pytest.raises(SealError, match="partition 1 announced key .* pinned"):
        pins.pin(1, C_PUB)
    with pytest.raises(SealError, match="no public key pinned for partition 5"):
        pins[5]
    with pytest.raises(SealError, match="32 raw bytes"):
        pins.pin(2, b"short")
    restored = KeyPins(pins.to_dict())
    assert restored[0] == A_PUB and restored[1] == B_PUB and 2 not in restored


# --- throughput -----------------------------------------------------------------------------------
def test_seal_and_open_throughput() -> None:
    """Seal + open of a 10,000 x 64 float32 batch (2.56 MB); prints MB/s of plaintext."""
    batch = RNG.standard_normal((10_000, 64)).astype(np.float32)
    aad = payload_aad("bench", "features", 0, 1)
    assert np.array_equal(open_sealed(seal(batch, A_KEY, B_PUB, aad), B_KEY, A_PUB, aad), batch)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(5):
            open_sealed(seal(batch, A_KEY, B_PUB, aad), B_KEY, A_PUB, aad)
        best = min(best, (time.perf_counter() - start) / 5)
    throughput = batch.nbytes / best / 1e6
    print(
        f"\nseal+open 10,000 x 64 float32 ({batch.nbytes / 1e6:.2f} MB): "
        f"{best * 1e3:.1f} ms, {throughput:.0f} MB/s"
    )
    assert throughput > 20  # a floor for a loaded 2-core machine, not a target


def test_one_ephemeral_per_message_keeps_each_payload_to_its_recipient() -> None:
    """The payloads one message seals for several recipients share its ephemeral key (one
    key generation per message); each opens only for its own recipient, under its own AAD."""
    ephemeral = sealing.Ephemeral()
    rows = _features(5, 8)
    aad_b, aad_c = AAD, payload_aad("q-7", sealing.WAVE_FEATURES, 0, 2)
    for_b = seal(rows, A_KEY, B_PUB, aad_b, ephemeral=ephemeral)
    for_c = seal(rows, A_KEY, C_PUB, aad_c, ephemeral=ephemeral)
    assert bytes(for_b[4:36]) == bytes(for_c[4:36]) == ephemeral.public
    assert bytes(for_b[48:]) != bytes(for_c[48:])
    assert np.array_equal(open_sealed(for_b, B_KEY, A_PUB, aad_b), rows)
    assert np.array_equal(open_sealed(for_c, C_KEY, A_PUB, aad_c), rows)
    for blob, key, aad in ((for_b, C_KEY, aad_b), (for_b, C_KEY, aad_c), (for_c, B_KEY, aad_c)):
        with pytest.raises(SealError, match="authentication failed"):
            open_sealed(blob, key, A_PUB, aad)
    again = seal(rows, A_KEY, B_PUB, aad_b, ephemeral=ephemeral)  # same recipient: new nonce
    assert bytes(again[36:48]) != bytes(for_b[36:48]) and bytes(again[48:]) != bytes(for_b[48:])
    with pytest.raises(SealError, match="must be an Ephemeral"):
        seal(rows, A_KEY, B_PUB, aad_b, ephemeral=A_KEY)
