"""Encryption at rest: sealed dossier contents, tamper refusal, keyring rules, migration and rotation."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pycrdt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.config import ConfigError, load_config
from node.crypto import (
    FORMAT,
    RECORD,
    STATE,
    Keyring,
    KeyringError,
    Resealer,
    SealedValueError,
    Sealer,
    count_key_usage,
    key_id_of,
    read_keyring,
    write_keyring,
)
from tests.conftest import AGENCY, UNIT, make_config, running_node, valid_intake

NAME = "Trần Thị Bích Ngọc"
ID_NUMBER = "079301234567"
PHONE = "0987654321"
SECRETS = (NAME.encode(), ID_NUMBER.encode(), PHONE.encode())


def keyring_at(tmp_path: Path) -> Path:
    path = tmp_path / "keys" / "wardsync.key"
    write_keyring(path, Keyring.new())
    return path


def raw_bytes(data_dir: Path) -> bytes:
    """Every byte SQLite keeps on disk for the store: the database, its WAL and shared memory."""
    return b"".join(p.read_bytes() for p in sorted(data_dir.glob("wardsync.sqlite3*")))


def leaked(data_dir: Path, secrets: tuple[bytes, ...] = SECRETS) -> list[bytes]:
    blob = raw_bytes(data_dir)
    return [s for s in secrets if s in blob]


def citizen(**extra: Any) -> dict[str, Any]:
    return valid_intake(**{"ChuHoSo": NAME, "SoGiayToChuHoSo": ID_NUMBER, "SoDienThoai": PHONE, **extra})


def side_conn(data_dir: Path) -> contextlib.closing[sqlite3.Connection]:
    return contextlib.closing(sqlite3.connect(data_dir / "wardsync.sqlite3", timeout=10, isolation_level=None))


class TestSealer:
    """The codec: authenticated, bound to its row, never confused with a clear value."""

    def test_round_trip_and_binding(self) -> None:
        """A value opens only in the column and row it was sealed for."""
        sealer = Sealer(Keyring.new())
        sealed = sealer.seal(STATE, "A", b"\x01\x02state")
        assert sealed[0] == FORMAT and key_id_of(sealed) == 1
        assert sealer.state("A", sealed) == b"\x01\x02state"
        with pytest.raises(SealedValueError):
            sealer.state("B", sealed)  # moved to another row
        with pytest.raises(SealedValueError):
            sealer.open_blob("journal.update", "A", sealed)  # moved to another column
        assert sealer.seal(STATE, "A", b"x") != sealer.seal(STATE, "A", b"x")  # a fresh nonce each time

    def test_tampered_value_is_refused(self) -> None:
        """Any flipped bit fails authentication."""
        sealer = Sealer(Keyring.new())
        sealed = bytearray(sealer.seal(RECORD, "A", b'{"ChuHoSo":"x"}'))
        for i in (6, 20, len(sealed) - 1):
            bad = bytearray(sealed)
            bad[i] ^= 0x01
            with pytest.raises(SealedValueError):
                sealer.record("A", bytes(bad))

    def test_unknown_key_and_missing_keyring_are_refused(self) -> None:
        """A value under a key the keyring lacks, or read by a node without a keyring, is refused."""
        sealed = Sealer(Keyring.new()).seal(STATE, "A", b"s")
        with pytest.raises(SealedValueError):
            Sealer(Keyring.new()).state("A", sealed)  # same id, other key material
        with pytest.raises(SealedValueError, match="no key_file"):
            Sealer().state("A", sealed)

    def test_strict_store_refuses_clear_values(self) -> None:
        """Once a store is fully sealed, a clear value (a stripped header) is refused, not served."""
        sealer = Sealer(Keyring.new())
        assert sealer.record("A", '{"a":1}') == '{"a":1}'  # migrating: clear values still read
        sealer.strict = True
        with pytest.raises(SealedValueError):
            sealer.record("A", '{"a":1}')
        with pytest.raises(SealedValueError):
            sealer.state("A", b"\x01\x00")

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.text(max_size=30)), min_size=0, max_size=8))
    def test_clear_updates_never_look_sealed(self, edits: list[tuple[str, str]]) -> None:
        """No Y update (from any number of writers) starts like a sealed value."""
        doc: pycrdt.Doc[Any] = pycrdt.Doc()
        doc["fields"] = fields = pycrdt.Map()
        for i, (key, value) in enumerate(edits):
            other: pycrdt.Doc[Any] = pycrdt.Doc(client_id=1000 + i)
            other.apply_update(doc.get_update())
            other.get("fields", type=pycrdt.Map)[key] = value
            doc.apply_update(other.get_update(doc.get_state()))
            fields[key + "!"] = value
        assert key_id_of(doc.get_update()) is None
        assert key_id_of(doc.get_update(doc.get_state())) is None

    def test_rotation_keeps_old_values_readable(self) -> None:
        """After a rotation new values use the new key and old ones still open."""
        ring = Keyring.new()
        old = Sealer(ring).seal(STATE, "A", b"old")
        sealer = Sealer(ring.rotated())
        assert key_id_of(sealer.seal(STATE, "A", b"new")) == 2
        assert sealer.state("A", old) == b"old"

    def test_keyed_hash(self) -> None:
        """Search terms become keyed hashes with a keyring, unchanged without one, stable across rotation."""
        ring = Keyring.new()
        assert Sealer().keyed_hash(ID_NUMBER) == ID_NUMBER
        hashed = Sealer(ring).keyed_hash(ID_NUMBER)
        assert ID_NUMBER not in hashed and hashed == Sealer(ring.rotated()).keyed_hash(ID_NUMBER)
        assert hashed != Sealer(Keyring.new()).keyed_hash(ID_NUMBER)


class TestKeyring:
    """The key file: outside the data, private, replaced atomically."""

    def test_key_file_inside_data_dir_is_refused(self, tmp_path: Path) -> None:
        """The configuration names the problem and the node does not start."""
        with pytest.raises(ConfigError, match=r"key_file.*inside data_dir"):
            make_config(tmp_path, key_file=str(tmp_path / "data" / "keys" / "k.json"))
        make_config(tmp_path, key_file=str(tmp_path / "elsewhere.key"))  # outside: fine

    def test_world_readable_keyring_is_refused(self, tmp_path: Path) -> None:
        path = keyring_at(tmp_path)
        os.chmod(path, 0o644)
        with pytest.raises(KeyringError, match="chmod"):
            read_keyring(path)

    def test_missing_keyring_stops_the_node(self, tmp_path: Path) -> None:
        with pytest.raises(KeyringError, match="not found"):
            Sealer.from_file(tmp_path / "nope.key")

    def test_round_trip(self, tmp_path: Path) -> None:
        path = keyring_at(tmp_path)
        ring = read_keyring(path).rotated()
        write_keyring(path, ring)
        assert read_keyring(path) == ring
        assert oct(path.stat().st_mode & 0o777) == "0o600"


class TestEncryptedNode:
    """A node with a keyring keeps citizens' data out of the file and refuses altered rows."""

    async def test_raw_file_holds_no_citizen_data(self, tmp_path: Path) -> None:
        """Name, ID number and phone are absent from the database and WAL bytes; the API returns them."""
        config = make_config(tmp_path, key_file=str(keyring_at(tmp_path)))
        data = config.data_path
        async with running_node(config) as (_, base, http):
            async with http.post(f"{base}/api/v1/dossiers", json=citizen(), headers={"Idempotency-Key": "k1"}) as r:
                assert r.status == 201, await r.text()
                code = (await r.json())["MaHoSo"]
            step = {"TrangThai": 4, "NguoiXuLy": "Phạm Thu Hà", "NoiDungXuLy": f"Thụ lý hồ sơ của {NAME}"}
            async with http.post(f"{base}/api/v1/dossiers/{code}/steps", json=step) as r:
                assert r.status == 201, await r.text()
            async with http.get(f"{base}/api/v1/dossiers/{code}") as r:
                got = await r.json()
            assert (got["ChuHoSo"], got["SoGiayToChuHoSo"], got["SoDienThoai"]) == (NAME, ID_NUMBER, PHONE)
            async with http.get(f"{base}/api/v1/dossiers") as r:
                assert (await r.json())["items"][0]["ChuHoSo"] == NAME
            async with http.post(f"{base}/api/v1/dossiers", json=citizen(), headers={"Idempotency-Key": "k1"}) as r:
                assert r.status == 201 and (await r.json())["MaHoSo"] == code  # the sealed answer replays
            # The search index holds keyed hashes only, and still finds the dossier by ID number and name.
            for query in ({"id_number": ID_NUMBER}, {"name": "tran thi bich ngoc"}, {"name": "NGỌC"}):
                async with http.get(f"{base}/api/v1/dossiers/search", params=query) as r:
                    assert r.status == 200, await r.text()
                    assert [d["MaHoSo"] for d in (await r.json())["items"]] == [code], query
            assert (data / "wardsync.sqlite3-wal").stat().st_size > 0
            assert leaked(data) == []
            assert leaked(data, (b"bich", b"ngoc")) == []  # nor the folded words of the name
            with side_conn(data) as conn:
                usage = count_key_usage(conn)
            assert usage["dossiers.record"] == {1: 1} and usage["journal.update"] == {1: 2}
            assert usage["idempotency.body"] == {1: 1}
        assert leaked(data) == []  # after the WAL was folded back at close, too

    async def test_clear_store_keeps_working_and_leaks(self, tmp_path: Path) -> None:
        """Without key_file the store is in clear (the default); the same check finds the data."""
        config = make_config(tmp_path)
        async with running_node(config) as (_, base, http), http.post(f"{base}/api/v1/dossiers", json=citizen()) as r:
            assert r.status == 201
        assert NAME.encode() in raw_bytes(config.data_path)

    async def test_tampered_or_swapped_rows_are_refused(self, tmp_path: Path) -> None:
        """An altered ciphertext, or one moved from another dossier, answers 500 and is never served."""
        config = make_config(tmp_path, key_file=str(keyring_at(tmp_path)))
        async with running_node(config) as (_, base, http):
            codes = []
            for name in ("Lê Văn Một", "Lê Văn Hai"):
                async with http.post(f"{base}/api/v1/dossiers", json=citizen(ChuHoSo=name)) as r:
                    codes.append((await r.json())["MaHoSo"])
            a, b = codes
            with side_conn(config.data_path) as conn:
                rec_a, rec_b = (conn.execute("SELECT record FROM dossiers WHERE code = ?", (c,)).fetchone()[0]
                                for c in codes)
                conn.execute("UPDATE dossiers SET record = ? WHERE code = ?", (rec_b, a))  # swapped in from b
                flipped = bytearray(rec_b)
                flipped[-3] ^= 0x40
                conn.execute("UPDATE dossiers SET record = ? WHERE code = ?", (bytes(flipped), b))
            for code in (a, b):
                async with http.get(f"{base}/api/v1/dossiers/{code}") as r:
                    body = await r.json()
                    assert r.status == 500, body
                    assert body["error"]["code"] == "sealed_value_refused"
                    assert "Lê Văn" not in await r.text()
            async with http.get(f"{base}/api/v1/dossiers") as r:
                assert r.status == 500
            with side_conn(config.data_path) as conn:
                conn.execute("UPDATE dossiers SET record = ? WHERE code = ?", (rec_a, a))
            async with http.get(f"{base}/api/v1/dossiers/{a}") as r:
                assert r.status == 200 and (await r.json())["ChuHoSo"] == "Lê Văn Một"

    async def test_encrypted_store_without_keyring_does_not_start(self, tmp_path: Path) -> None:
        """Dropping key_file from the configuration of an encrypted store stops the node with the reason."""
        key = keyring_at(tmp_path)
        config = make_config(tmp_path, key_file=str(key))
        async with running_node(config) as (_, base, http), http.post(f"{base}/api/v1/dossiers", json=citizen()) as r:
            assert r.status == 201
        with pytest.raises(KeyringError, match="holds encrypted dossiers"):
            async with running_node(make_config(tmp_path)):
                pass
        write_keyring(key, Keyring.new())  # a different keyring with the same key id
        with pytest.raises(KeyringError, match="does not open"):
            async with running_node(make_config(tmp_path, key_file=str(key))):
                pass


class TestMigrationAndRotation:
    """A clear store is sealed in the background; a rotation re-seals every row under the new key."""

    async def test_clear_store_is_sealed_then_rotated(self, tmp_path: Path) -> None:
        clear = make_config(tmp_path)
        async with running_node(clear) as (_, base, http):
            codes = []
            for i in range(70):  # more than one reseal batch
                idem = {"Idempotency-Key": f"m{i}"}
                async with http.post(f"{base}/api/v1/dossiers", json=citizen(), headers=idem) as r:
                    codes.append((await r.json())["MaHoSo"])
        assert leaked(clear.data_path)
        key = keyring_at(tmp_path)
        config = make_config(tmp_path, key_file=str(key))
        async with running_node(config) as (node, base, http):
            resealer = node.resealer
            assert resealer is not None
            for _ in range(100):
                if not await resealer.run_once():
                    break
            assert resealer.done and node.store.sealer.strict
            async with http.get(f"{base}/api/v1/dossiers/{codes[-1]}") as r:
                assert (await r.json())["ChuHoSo"] == NAME
            with side_conn(config.data_path) as conn:
                assert set(count_key_usage(conn)["dossiers.state"]) == {1}
            # Rotate from the command line while the node runs; it notices the file and re-seals.
            done = run_cli("key", "rotate", "--config", str(write_config(tmp_path, key)))
            assert done.returncode == 0 and "key 2 is now active" in done.stdout, done.stderr
            os.utime(key, ns=(0, key.stat().st_mtime_ns + 1))  # a coarse clock may give the same mtime
            for _ in range(100):
                if not await resealer.run_once():
                    break
            async with http.post(f"{base}/api/v1/dossiers", json=citizen()) as r:
                assert r.status == 201
            with side_conn(config.data_path) as conn:
                usage = count_key_usage(conn)
                assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            assert all(set(counts) <= {2} for counts in usage.values()), usage
            async with http.get(f"{base}/api/v1/dossiers/{codes[0]}") as r:
                assert (await r.json())["SoGiayToChuHoSo"] == ID_NUMBER
            async with http.post(f"{base}/api/v1/dossiers", json=citizen(), headers={"Idempotency-Key": "m3"}) as r:
                assert (await r.json())["MaHoSo"] == codes[3]  # answers kept for idempotency re-sealed too
        assert leaked(config.data_path) == []
        done = run_cli("key", "retire", "--config", str(write_config(tmp_path, key)))
        assert done.returncode == 0 and "retired keys [1]" in done.stdout, done.stdout + done.stderr
        assert sorted(read_keyring(key).keys) == [2]

    async def test_resealer_batches_through_the_writer(self, tmp_path: Path) -> None:
        """Re-sealing a row written while a pass runs neither loses nor reverts the write."""
        key = keyring_at(tmp_path)
        async with running_node(make_config(tmp_path, key_file=str(key))) as (node, base, http):
            async with http.post(f"{base}/api/v1/dossiers", json=citizen()) as r:
                code = (await r.json())["MaHoSo"]
            write_keyring(key, read_keyring(key).rotated())
            os.utime(key, ns=(0, key.stat().st_mtime_ns + 1))
            resealer = Resealer(node.store, batch=1)
            assert await resealer.run_once()
            step = {"TrangThai": 4, "NguoiXuLy": "Phạm Thu Hà", "NoiDungXuLy": "Thụ lý"}
            async with http.post(f"{base}/api/v1/dossiers/{code}/steps", json=step) as r:
                assert r.status == 201
            for _ in range(50):
                if not await resealer.run_once():
                    break
            async with http.get(f"{base}/api/v1/dossiers/{code}") as r:
                assert (await r.json())["TrangThaiHoSo"] == 4


def write_config(tmp_path: Path, key: Path) -> Path:
    path = tmp_path / "wardsync.toml"
    path.write_text(
        f'[node]\nunit = "{UNIT}"\nagency_code = "{AGENCY}"\ndata_dir = "{tmp_path / "data"}"\nkey_file = "{key}"\n',
        encoding="utf-8",
    )
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("WARDSYNC_")}
    return subprocess.run(
        [sys.executable, "-m", "node", *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


class TestInit:
    """`wardsync init` writes a configuration with encryption on, and its keyring beside it."""

    def test_init_enables_encryption(self, tmp_path: Path) -> None:
        out = tmp_path / "etc" / "wardsync.toml"
        out.parent.mkdir()
        done = run_cli("init", "--unit", UNIT, "--agency-code", AGENCY, "--out", str(out),
                       "--data-dir", str(tmp_path / "data"))
        assert done.returncode == 0, done.stderr
        config = load_config(out, env={})
        assert config.node.key_file == str(tmp_path / "etc" / "wardsync.key")
        assert read_keyring(Path(config.node.key_file)).active == 1
        assert run_cli("key", "create", "--config", str(out)).returncode == 1  # never overwrites a keyring
        status = run_cli("key", "status", "--config", str(out))
        assert status.returncode == 0 and '"active": 1' in status.stdout
