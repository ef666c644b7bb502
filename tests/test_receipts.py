"""Signed receipts: each dossier accepted here has a receipt signed with the unit's Ed25519 key, checkable offline."""

from __future__ import annotations

import asyncio
import json
import stat
from pathlib import Path
from typing import Any

import pytest

from node.app import Node
from node.cli import main
from node.config import load_config
from node.receipts import KEY_FILE, ReceiptKeyError
from node.service import Merge
from tests.conftest import make_config, running_node, valid_intake

DOSSIERS = "/api/v1/dossiers"


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


async def get(session: Any, url: str) -> tuple[int, Any]:
    async with session.get(url) as r:
        return r.status, await r.json()


class TestKey:
    """The unit's key is made once, kept private, and survives restarts."""

    async def test_generated_on_first_start_private_and_stable(self, tmp_path: Path) -> None:
        config = make_config(tmp_path)
        async with running_node(config) as (_, base, session):
            status, first = await get(session, f"{base}/api/v1/keys/receipt")
        assert status == 200 and first["algorithm"] == "Ed25519"
        assert first["public_key"].startswith("-----BEGIN PUBLIC KEY-----")
        path = tmp_path / "data" / "keys" / KEY_FILE
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        async with running_node(config) as (_, base, session):
            _, again = await get(session, f"{base}/api/v1/keys/receipt")
        assert again["key_id"] == first["key_id"] and again["public_key"] == first["public_key"]

    async def test_key_dir_setting_and_a_key_readable_by_others_is_refused(self, tmp_path: Path) -> None:
        """[node] key_dir moves the key; a key file others can read stops the node from starting."""
        keys = tmp_path / "elsewhere"
        config = make_config(tmp_path, key_dir=str(keys))
        async with Node(config):
            pass
        assert (keys / KEY_FILE).is_file() and not (tmp_path / "data" / "keys").exists()
        (keys / KEY_FILE).chmod(0o644)
        with pytest.raises(ReceiptKeyError, match="chmod 600"):
            async with Node(config):
                pass


class TestReceipt:
    """The receipt names code, time, unit and the digest as accepted, and verifies with the published key."""

    async def test_receipt_verifies_offline_and_tampering_is_detected(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        async with running_node(make_config(tmp_path)) as (_, base, session):
            async with session.post(f"{base}{DOSSIERS}", json=valid_intake()) as r:
                accepted = await r.json()
            code = accepted["MaHoSo"]
            async with session.post(f"{base}{DOSSIERS}/{code}/steps", json={"TrangThai": 4, "NguoiXuLy": "Hà"}) as r:
                assert r.status == 201
            status, receipt = await get(session, f"{base}{DOSSIERS}/{code}/signed-receipt")
            _, again = await get(session, f"{base}{DOSSIERS}/{code}/signed-receipt")
            _, key = await get(session, f"{base}/api/v1/keys/receipt")
        assert status == 200
        assert receipt == again  # deterministic: the same receipt every time
        assert receipt["code"] == code
        assert receipt["unit"] == "26743" and receipt["agency_code"] == "000.00.17.H29"
        # The digest of the record as accepted, not of the record after the later step.
        assert receipt["digest"] == accepted["digest"]
        assert receipt["key_id"] == key["key_id"]
        assert receipt["audit_seq"] == 1 and len(receipt["audit_hash"]) == 64

        pem = tmp_path / "receipt-key.pem"
        pem.write_text(key["public_key"], encoding="utf-8")
        good = tmp_path / "good.json"
        good.write_text(json.dumps(receipt, ensure_ascii=False), encoding="utf-8")
        rc, out = cli(capsys, "verify-receipt", str(good), "--public-key", str(pem))
        assert rc == 0, out
        assert f"valid receipt for {code}" in out

        forged = tmp_path / "forged.json"
        forged.write_text(json.dumps({**receipt, "digest": "0" * 64}), encoding="utf-8")
        rc, out = cli(capsys, "verify-receipt", str(forged), "--public-key", str(pem))
        assert rc == 1
        assert "INVALID" in out and "signature does not match" in out

        # Another unit's key does not vouch for this receipt.
        async with running_node(make_config(tmp_path / "other")) as (_, base, session):
            _, other = await get(session, f"{base}/api/v1/keys/receipt")
        other_pem = tmp_path / "other.pem"
        other_pem.write_text(other["public_key"], encoding="utf-8")
        rc, out = cli(capsys, "verify-receipt", str(good), "--public-key", str(other_pem))
        assert rc == 1 and "signed with key" in out

    async def test_verify_receipt_fetches_the_key_from_the_node(
        self, tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """--url asks the node for its public key with a token of any role."""
        async with running_node(make_config(tmp_path)) as (node, base, session):
            async with session.post(f"{base}{DOSSIERS}", json=valid_intake()) as r:
                code = (await r.json())["MaHoSo"]
            _, receipt = await get(session, f"{base}{DOSSIERS}/{code}/signed-receipt")
            path = tmp_path / "receipt.json"
            path.write_text(json.dumps(receipt), encoding="utf-8")
            token = await node.auth.create_token(["peer"], name="verifier")
            # The command blocks on HTTP: run it off the loop that serves the node.
            rc = await asyncio.to_thread(main, ["verify-receipt", str(path), "--url", base, "--token", token])
        out = capsys.readouterr()
        assert rc == 0, out.err
        assert f"valid receipt for {code}" in out.out


class TestAccess:
    """Who may read receipts and the key; dossiers that were not accepted here have none."""

    async def test_roles_and_missing_receipts(self, tmp_path: Path) -> None:
        async with running_node(make_config(tmp_path)) as (node, base, session):
            async with session.post(f"{base}{DOSSIERS}", json=valid_intake()) as r:
                code = (await r.json())["MaHoSo"]
            peer = {"Authorization": f"Bearer {await node.auth.create_token(['peer'], name='p')}"}
            async with session.get(f"{base}{DOSSIERS}/{code}/signed-receipt", headers=peer) as r:
                assert r.status == 403
            async with session.get(f"{base}/api/v1/keys/receipt", headers=peer) as r:
                assert r.status == 200
            reader = {"Authorization": f"Bearer {await node.auth.create_token(['read-only'], name='r')}"}
            async with session.get(f"{base}{DOSSIERS}/{code}/signed-receipt", headers=reader) as r:
                assert r.status == 200
            status, body = await get(session, f"{base}{DOSSIERS}/000.00.17.H29-250701-9999/signed-receipt")
            assert (status, body["error"]["code"]) == (404, "not_found")
            row = await node.store.fetchone("SELECT state FROM dossiers WHERE code = ?", (code,))

        # The same dossier arriving at another unit through an upstream: that unit did not accept it.
        other = load_config(
            env={},
            overrides={
                "node": {
                    "unit": "26740",
                    "agency_code": "000.00.18.H29",
                    "listen": "127.0.0.1:0",
                    "data_dir": str(tmp_path / "b"),
                }
            },
        )
        async with running_node(other) as (b_node, base, session):
            result = await b_node.service.merge(Merge(code, bytes(row[0]), origin="city"))
            assert result.status == 201
            status, body = await get(session, f"{base}{DOSSIERS}/{code}/signed-receipt")
        assert (status, body["error"]["code"]) == (404, "no_receipt")
