"""The printable receipt (phiếu tiếp nhận hồ sơ và hẹn trả kết quả) as HTML and as PDF, from a real node."""

from __future__ import annotations

from pathlib import Path

import pypdfium2 as pdfium
import pypdfium2.raw as pdfium_c
import pytest

from node.crypto import Keyring, write_keyring
from tests.conftest import make_config, running_node, valid_intake

TITLE = "PHIẾU TIẾP NHẬN HỒ SƠ VÀ HẸN TRẢ KẾT QUẢ"
DUE = "05/01/2030"  # valid_intake's NgayHenTra 20300105170000


def qr_codes(png: Path) -> list[str]:
    """The QR codes zxing-cpp reads in a rendered page; None when no decoder is installed."""
    from PIL import Image

    try:
        import zxingcpp  # type: ignore[import-not-found,unused-ignore]  # optional test dependency
    except ImportError:
        return []
    with Image.open(png) as image:
        found = zxingcpp.read_barcodes(image.convert("L"))
    return [r.text for r in found if "QR" in str(r.format)]


def page_images(pdf: bytes) -> list[tuple[float, float]]:
    """(width, height) in points of every image drawn on the PDF's pages."""
    doc = pdfium.PdfDocument(pdf)
    try:
        sizes = []
        for i in range(len(doc)):
            for obj in doc[i].get_objects(filter=(pdfium_c.FPDF_PAGEOBJ_IMAGE,)):
                left, bottom, right, top = obj.get_bounds()
                sizes.append((right - left, top - bottom))
        return sizes
    finally:
        doc.close()


def pdf_text_and_pages(pdf: bytes, out: Path) -> tuple[str, list[Path]]:
    """The PDF's text and each page rendered to a PNG under ``out``."""
    doc = pdfium.PdfDocument(pdf)
    texts, pngs = [], []
    try:
        for i in range(len(doc)):
            page = doc[i]
            texts.append(page.get_textpage().get_text_range())
            image = page.render(scale=1.5).to_pil()
            png = out / f"receipt-{i + 1}.png"
            image.save(png)
            pngs.append(png)
            # Not blank: a good share of the page is ink (text, table rules, the QR code).
            grey = image.convert("L")
            dark = sum(grey.histogram()[:128])
            assert dark > 0.01 * grey.width * grey.height, f"page {i + 1} is (nearly) blank"
    finally:
        doc.close()
    return "\n".join(texts), pngs


class TestReceipt:
    """GET /api/v1/dossiers/{code}/receipt."""

    async def test_html_in_vietnamese_with_the_code_the_due_date_and_a_qr_code(self, tmp_path: Path) -> None:
        async with running_node(make_config(tmp_path)) as (_, url, s):
            body = valid_intake(
                TrichYeuHoSo="Đăng ký khai sinh <script>alert(1)</script>",
                TaiLieuNop=[{"TepDinhKemId": "tk1", "TenTepDinhKem": "Tờ khai đăng ký khai sinh"}],
                DanhSachLePhi=[{"TenPhiLePhi": "Lệ phí hộ tịch", "MaPhiLePhi": "LP01", "Gia": 8000}],
            )
            async with s.post(f"{url}/api/v1/dossiers", json=body) as r:
                code = (await r.json())["MaHoSo"]
            async with s.get(f"{url}/api/v1/dossiers/{code}/receipt") as r:
                assert r.status == 200 and r.content_type == "text/html"
                html = await r.text()
            for text in (TITLE, code, DUE, "Phường Bến Thành".upper(), "Nguyễn Thị Lan", "Thủ tục đăng ký khai sinh",
                         "Tờ khai đăng ký khai sinh", "8.000 đồng"):
                assert text in html, text
            assert "<svg" in html  # the code as a QR code
            assert "<script>" not in html and "&lt;script&gt;" in html

    @pytest.mark.parametrize("ask", ["query", "accept"])
    async def test_pdf_renders_with_the_code_and_the_due_date(self, tmp_path: Path, ask: str) -> None:
        async with running_node(make_config(tmp_path)) as (_, url, s):
            async with s.post(f"{url}/api/v1/dossiers", json=valid_intake()) as r:
                code = (await r.json())["MaHoSo"]
            path, headers = f"{url}/api/v1/dossiers/{code}/receipt", {}
            if ask == "query":
                path += "?format=pdf"
            else:
                headers["Accept"] = "application/pdf"
            async with s.get(path, headers=headers) as r:
                assert r.status == 200 and r.content_type == "application/pdf"
                pdf = await r.read()
        assert pdf.startswith(b"%PDF-")
        text, pngs = pdf_text_and_pages(pdf, tmp_path)
        assert len(pngs) == 1
        for expected in (TITLE, f"Mã hồ sơ: {code}", DUE, "Phường Bến Thành", "Nguyễn Thị Lan"):
            assert expected in text, expected
        # The QR code: one square image on the page, about 32 mm (91 pt) a side.
        ((w, h),) = page_images(pdf)
        assert 85 < w < 97 and abs(w - h) < 1
        try:
            import zxingcpp  # type: ignore[import-not-found,unused-ignore]  # noqa: F401  # optional
        except ImportError:
            return  # no decoder installed: the image above is what can be checked
        # Scanned from the rendered page, as a desk's scanner would: it reads the dossier code.
        assert qr_codes(pngs[0]) == [code]

    async def test_the_due_date_the_record_holds_and_the_refusals(self, tmp_path: Path) -> None:
        async with running_node(make_config(tmp_path)) as (_, url, s):
            body = valid_intake()
            del body["NgayHenTra"]  # the node may set one from the procedure; the receipt shows what it holds
            async with s.post(f"{url}/api/v1/dossiers", json=body) as r:
                created = await r.json()
            code, due = created["MaHoSo"], created.get("NgayHenTra")
            shown = f"{due[6:8]}/{due[4:6]}/{due[0:4]}" if due else "(chưa xác định)"
            async with s.get(f"{url}/api/v1/dossiers/{code}/receipt") as r:
                assert r.status == 200 and f"Ngày hẹn trả kết quả: <strong>{shown}</strong>" in await r.text()
            async with s.get(f"{url}/api/v1/dossiers/{code}/receipt?format=docx") as r:
                assert r.status == 400 and (await r.json())["error"]["fields"] == {"format": "html or pdf"}
            async with s.get(f"{url}/api/v1/dossiers/000.00.17.H29-200101-0001/receipt?format=pdf") as r:
                assert r.status == 404

    async def test_encrypted_store(self, tmp_path: Path) -> None:
        """With encryption at rest the receipt is rendered from the opened record."""
        key_file = tmp_path / "keys" / "wardsync.key"
        write_keyring(key_file, Keyring.new())
        async with running_node(make_config(tmp_path, key_file=str(key_file))) as (_, url, s):
            async with s.post(f"{url}/api/v1/dossiers", json=valid_intake()) as r:
                code = (await r.json())["MaHoSo"]
            async with s.get(f"{url}/api/v1/dossiers/{code}/receipt") as r:
                assert r.status == 200, await r.text()
                html = await r.text()
            assert code in html and DUE in html and "Nguyễn Thị Lan" in html
            async with s.get(f"{url}/api/v1/dossiers/{code}/receipt?format=pdf") as r:
                assert r.status == 200 and r.content_type == "application/pdf"
                text, _ = pdf_text_and_pages(await r.read(), tmp_path)
            assert code in text and DUE in text

    async def test_boundary_free_dossier_names_the_competent_unit(self, tmp_path: Path) -> None:
        async with running_node(make_config(tmp_path)) as (_, url, s):
            async with s.post(f"{url}/api/v1/dossiers", json=valid_intake(MaDonViXuLy="26740")) as r:
                code = (await r.json())["MaHoSo"]
            async with s.get(f"{url}/api/v1/dossiers/{code}/receipt") as r:
                html = await r.text()
            assert "đơn vị giải quyết:\nPhường Sài Gòn." in html
            async with s.get(f"{url}/api/v1/dossiers/{code}/receipt?format=pdf") as r:
                text, _ = pdf_text_and_pages(await r.read(), tmp_path)
            assert "Phường Sài Gòn" in text and "Phường Bến Thành" in text
