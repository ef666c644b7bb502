"""The printable receipt of a dossier: phiếu tiếp nhận hồ sơ và hẹn trả kết quả.

The layout follows form 01 of Circular 01/2018/TT-VPCP: the unit, the applicant, the procedure, the
documents received, when the dossier was received and when the result is due, and the dossier code as a
QR code the desk and the applicant can scan. Rendered as HTML (a Jinja template, autoescaped) or as PDF
(fpdf2 with the DejaVu Sans font shipped in ``node/fonts``, which has every Vietnamese glyph).
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
import segno
from aiohttp import web
from fpdf import FPDF
from fpdf.enums import XPos, YPos
from markupsafe import Markup

from node import api
from node.auth import requires
from node.errors import ApiError
from node.registry import get_unit

TITLE = "PHIẾU TIẾP NHẬN HỒ SƠ VÀ HẸN TRẢ KẾT QUẢ"
NATION = "CỘNG HÒA XÃ HỘI CHỦ NGHĨA VIỆT NAM"
MOTTO = "Độc lập - Tự do - Hạnh phúc"
DESK = "BỘ PHẬN MỘT CỬA"
RETURN_METHODS = {0: "Tại Bộ phận Một cửa", 1: "Qua dịch vụ bưu chính công ích"}
NOT_SET = "(chưa xác định)"
FONT = "DejaVu"


def _nfc(value: Any) -> str:
    return unicodedata.normalize("NFC", str(value)) if value is not None else ""


def _parse(value: Any) -> datetime | None:
    try:
        return datetime.strptime(str(value), "%Y%m%d%H%M%S")
    except ValueError:
        return None


def date_vn(value: Any) -> str:
    """``yyyyMMddHHmmss`` as dd/mm/yyyy."""
    dt = _parse(value)
    return dt.strftime("%d/%m/%Y") if dt else NOT_SET


def time_vn(value: Any) -> str:
    """``yyyyMMddHHmmss`` as "08 giờ 30 phút, ngày 22/11/2026"."""
    dt = _parse(value)
    return f"{dt:%H} giờ {dt:%M} phút, ngày {dt:%d/%m/%Y}" if dt else NOT_SET


@dataclass(frozen=True)
class Receipt:
    """What the receipt shows, read once from the dossier's record."""

    code: str
    unit_name: str
    applicant: str
    id_number: str
    phone: str
    email: str
    procedure: str
    procedure_code: str
    field: str
    summary: str
    received: str
    due: str
    due_time: str
    return_method: str
    officer: str
    competent: str | None
    documents: list[dict[str, str]]
    fees: list[dict[str, str]]
    fee_total: str


def _money(amount: Any) -> str:
    try:
        return f"{int(amount):,}".replace(",", ".") + " đồng"
    except (TypeError, ValueError):
        return _nfc(amount)


def receipt_of(record: dict[str, Any]) -> Receipt:
    receiving = str(record.get("MaDonViTiepNhan") or "")
    competent = str(record.get("MaDonViXuLy") or receiving)
    unit = get_unit(receiving)
    other = get_unit(competent) if competent != receiving else None
    steps = [s for s in record.get("QuaTrinhXuLy") or [] if isinstance(s, dict)]
    intake = next((s for s in steps if s.get("TrangThai") == 2), steps[0] if steps else {})
    due = _parse(record.get("NgayHenTra"))
    fees = [f for f in record.get("DanhSachLePhi") or [] if isinstance(f, dict)]
    total = sum(int(f.get("Gia") or 0) for f in fees if isinstance(f.get("Gia"), int | float))
    return Receipt(
        code=_nfc(record.get("MaHoSo")),
        unit_name=_nfc(unit.name if unit else receiving),
        applicant=_nfc(record.get("ChuHoSo")),
        id_number=_nfc(record.get("SoGiayToChuHoSo")),
        phone=_nfc(record.get("SoDienThoai")),
        email=_nfc(record.get("Email")),
        procedure=_nfc(record.get("TenTTHC")),
        procedure_code=_nfc(record.get("MaTTHC")),
        field=_nfc(record.get("TenLinhVuc")),
        summary=_nfc(record.get("TrichYeuHoSo")),
        received=time_vn(record.get("NgayTiepNhan")),
        due=date_vn(record.get("NgayHenTra")),
        due_time=f"{due:%H} giờ {due:%M} phút" if due else "",
        return_method=RETURN_METHODS.get(int(record.get("HinhThuc") or 0), RETURN_METHODS[0]),
        officer=_nfc(intake.get("NguoiXuLy")),
        competent=_nfc(other.name if other else competent) if competent != receiving else None,
        documents=[
            {
                "name": _nfc(d.get("TenTepDinhKem")),
                "component": _nfc(d.get("MaThanhPhanHoSo")),
                "digital": "Có" if d.get("DuocSoHoa") == 1 or d.get("Sha256") else "Không",
            }
            for d in record.get("TaiLieuNop") or []
            if isinstance(d, dict)
        ],
        fees=[{"name": _nfc(f.get("TenPhiLePhi")), "amount": _money(f.get("Gia"))} for f in fees],
        fee_total=_money(total),
    )


def qr_svg(code: str) -> str:
    return str(segno.make(code, error="m").svg_inline(scale=4, border=2))


def qr_png(code: str) -> bytes:
    out = io.BytesIO()
    segno.make(code, error="m").save(out, kind="png", scale=8, border=2)
    return out.getvalue()


_TEMPLATE = """<!doctype html>
<html lang="vi">
<head>
<meta charset="utf-8">
<title>{{ title }} {{ r.code }}</title>
<style>
@page { size: A4; margin: 18mm 16mm; }
body { font-family: "Times New Roman", "DejaVu Serif", serif; font-size: 13pt; color: #000; max-width: 180mm;
       margin: 0 auto; }
.head { display: flex; justify-content: space-between; text-align: center; }
.head div { width: 48%; }
h1 { text-align: center; font-size: 15pt; margin: 18px 0 4px; }
.code { text-align: center; }
.qr { text-align: center; margin: 4px 0 10px; }
table { border-collapse: collapse; width: 100%; margin: 6px 0; }
th, td { border: 1px solid #000; padding: 3px 6px; text-align: left; vertical-align: top; }
.sign { display: flex; justify-content: space-between; text-align: center; margin-top: 24px; }
.sign div { width: 45%; min-height: 90px; }
.note { font-style: italic; }
</style>
</head>
<body>
<div class="head">
  <div><strong>ỦY BAN NHÂN DÂN<br>{{ r.unit_name | upper }}</strong><br>{{ desk }}</div>
  <div><strong>{{ nation }}</strong><br><u>{{ motto }}</u></div>
</div>
<h1>{{ title }}</h1>
<p class="code">Mã hồ sơ: <strong>{{ r.code }}</strong></p>
<div class="qr">{{ qr }}</div>
<p>Bộ phận Một cửa {{ r.unit_name }} tiếp nhận hồ sơ của: <strong>{{ r.applicant }}</strong></p>
<p>Số giấy tờ: {{ r.id_number }}{% if r.phone %} &middot; Số điện thoại: {{ r.phone }}{% endif %}
{%- if r.email %} &middot; Email: {{ r.email }}{% endif %}</p>
<p>Thủ tục hành chính: {{ r.procedure }} ({{ r.procedure_code }}) &middot; Lĩnh vực: {{ r.field }}</p>
<p>Nội dung yêu cầu giải quyết: {{ r.summary }}</p>
{% if r.competent %}<p class="note">Hồ sơ tiếp nhận không phụ thuộc địa giới hành chính; đơn vị giải quyết:
{{ r.competent }}.</p>{% endif %}
<p>1. Thành phần hồ sơ nộp gồm:</p>
<table>
<tr><th>STT</th><th>Tên giấy tờ</th><th>Mã thành phần</th><th>Bản điện tử</th></tr>
{% for d in r.documents %}<tr><td>{{ loop.index }}</td><td>{{ d.name }}</td><td>{{ d.component }}</td>
<td>{{ d.digital }}</td></tr>
{% else %}<tr><td colspan="4">(không có)</td></tr>{% endfor %}
</table>
<p>2. Số lượng hồ sơ: 01 (bộ)</p>
<p>3. Thời gian tiếp nhận: {{ r.received }}</p>
<p>4. Ngày hẹn trả kết quả: <strong>{{ r.due }}</strong>{% if r.due_time %}, lúc {{ r.due_time }}{% endif %}</p>
<p>5. Nhận kết quả: {{ r.return_method }}</p>
{% if r.fees %}<p>6. Phí, lệ phí:</p>
<table>{% for f in r.fees %}<tr><td>{{ f.name }}</td><td>{{ f.amount }}</td></tr>{% endfor %}
<tr><th>Tổng cộng</th><th>{{ r.fee_total }}</th></tr></table>{% endif %}
<div class="sign">
  <div><strong>NGƯỜI NỘP HỒ SƠ</strong><br><em>(Ký và ghi rõ họ tên)</em><br><br><br>{{ r.applicant }}</div>
  <div><strong>NGƯỜI TIẾP NHẬN HỒ SƠ</strong><br><em>(Ký và ghi rõ họ tên)</em><br><br><br>{{ r.officer }}</div>
</div>
</body>
</html>
"""


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(_TEMPLATE)


def render_html(r: Receipt) -> str:
    # The QR code is segno's own SVG, built from the code alone: safe to put in unescaped.
    qr = Markup(qr_svg(r.code))
    return _template().render(r=r, title=TITLE, nation=NATION, motto=MOTTO, desk=DESK, qr=qr)


def _font(name: str) -> Path:
    return Path(str(resources.files("node") / "fonts" / name))


class _Pdf(FPDF):
    def __init__(self) -> None:
        super().__init__(orientation="P", unit="mm", format="A4")
        self.add_font(FONT, "", _font("DejaVuSans.ttf"))
        self.add_font(FONT, "B", _font("DejaVuSans-Bold.ttf"))
        self.set_margins(16, 16, 16)
        self.set_auto_page_break(True, margin=16)

    def line_text(self, text: str, *, bold: bool = False, size: float = 10.5, align: str = "L") -> None:
        self.set_font(FONT, "B" if bold else "", size)
        self.multi_cell(0, size * 0.55, text, align=align, new_x=XPos.LMARGIN, new_y=YPos.NEXT)


def render_pdf(r: Receipt) -> bytes:
    pdf = _Pdf()
    pdf.set_title(f"{TITLE} {r.code}")
    pdf.set_creator("wardsync")
    pdf.add_page()
    half = (pdf.w - pdf.l_margin - pdf.r_margin) / 2
    top = pdf.get_y()
    pdf.set_font(FONT, "B", 10)
    pdf.multi_cell(half, 5, f"ỦY BAN NHÂN DÂN\n{r.unit_name.upper()}\n{DESK}", align="C")
    left_end = pdf.get_y()
    pdf.set_xy(pdf.l_margin + half, top)
    pdf.multi_cell(half, 5, NATION, align="C", new_x=XPos.LEFT, new_y=YPos.NEXT)
    pdf.set_font(FONT, "", 10)
    pdf.multi_cell(half, 5, MOTTO, align="C")
    pdf.set_y(max(left_end, pdf.get_y()) + 6)
    pdf.line_text(TITLE, bold=True, size=13, align="C")
    pdf.ln(1)
    pdf.line_text(f"Mã hồ sơ: {r.code}", bold=True, size=11, align="C")
    side = 32.0
    pdf.image(io.BytesIO(qr_png(r.code)), x=(pdf.w - side) / 2, y=pdf.get_y() + 1, w=side, h=side)
    pdf.set_y(pdf.get_y() + side + 3)
    pdf.line_text(f"Bộ phận Một cửa {r.unit_name} tiếp nhận hồ sơ của: {r.applicant}")
    contact = f"Số giấy tờ: {r.id_number}"
    if r.phone:
        contact += f" - Số điện thoại: {r.phone}"
    if r.email:
        contact += f" - Email: {r.email}"
    pdf.line_text(contact)
    pdf.line_text(f"Thủ tục hành chính: {r.procedure} ({r.procedure_code}) - Lĩnh vực: {r.field}")
    pdf.line_text(f"Nội dung yêu cầu giải quyết: {r.summary}")
    if r.competent:
        pdf.line_text(f"Hồ sơ tiếp nhận không phụ thuộc địa giới hành chính; đơn vị giải quyết: {r.competent}.")
    pdf.ln(2)
    pdf.line_text("1. Thành phần hồ sơ nộp gồm:")
    pdf.set_font(FONT, "", 9.5)
    with pdf.table(col_widths=(10, 100, 35, 25), text_align="LEFT", line_height=5) as table:
        table.row(["STT", "Tên giấy tờ", "Mã thành phần", "Bản điện tử"])
        for i, d in enumerate(r.documents, 1):
            table.row([str(i), d["name"], d["component"], d["digital"]])
        if not r.documents:
            table.row(["", "(không có)", "", ""])
    pdf.ln(2)
    pdf.line_text("2. Số lượng hồ sơ: 01 (bộ)")
    pdf.line_text(f"3. Thời gian tiếp nhận: {r.received}")
    due = r.due + (f", lúc {r.due_time}" if r.due_time else "")
    pdf.line_text(f"4. Ngày hẹn trả kết quả: {due}", bold=True)
    pdf.line_text(f"5. Nhận kết quả: {r.return_method}")
    if r.fees:
        pdf.line_text("6. Phí, lệ phí:")
        pdf.set_font(FONT, "", 9.5)
        with pdf.table(col_widths=(120, 50), text_align="LEFT", line_height=5, first_row_as_headings=False) as t:
            for f in r.fees:
                t.row([f["name"], f["amount"]])
            t.row(["Tổng cộng", r.fee_total])
    pdf.ln(8)
    y = pdf.get_y()
    for i, (who, name) in enumerate((("NGƯỜI NỘP HỒ SƠ", r.applicant), ("NGƯỜI TIẾP NHẬN HỒ SƠ", r.officer))):
        pdf.set_xy(pdf.l_margin + i * half, y)
        pdf.set_font(FONT, "B", 10)
        pdf.multi_cell(half, 5, who, align="C", new_x=XPos.LEFT, new_y=YPos.NEXT)
        pdf.set_font(FONT, "", 9)
        pdf.multi_cell(half, 5, "(Ký và ghi rõ họ tên)", align="C", new_x=XPos.LEFT, new_y=YPos.NEXT)
        pdf.set_y(pdf.get_y() + 18)
        pdf.set_x(pdf.l_margin + i * half)
        pdf.set_font(FONT, "B", 10)
        pdf.multi_cell(half, 5, name, align="C")
    return bytes(pdf.output())


def wants_pdf(request: web.Request) -> bool:
    fmt = request.query.get("format")
    if fmt is not None:
        if fmt not in ("html", "pdf"):
            raise ApiError(400, "invalid_parameter", "format must be html or pdf", fields={"format": "html or pdf"})
        return fmt == "pdf"
    accept = request.headers.get("Accept", "")
    return "application/pdf" in accept and "text/html" not in accept


@requires("clerk", "operator")
async def receipt(request: web.Request) -> web.Response:
    """The dossier's receipt as HTML, or as PDF with ``?format=pdf`` or ``Accept: application/pdf``."""
    code = request.match_info["code"]
    pdf = wants_pdf(request)
    store = request.app[api.STORE]
    row = await store.fetchone("SELECT record FROM dossiers WHERE code = ?", (code,))
    if row is None:
        raise ApiError(404, "not_found", f"no dossier with code {code!r}")
    r = receipt_of(json.loads(store.sealer.record(code, row[0])))
    if pdf:
        # Laying out a PDF takes tens of milliseconds of CPU: off the event loop.
        body = await asyncio.to_thread(render_pdf, r)
        response = web.Response(body=body, content_type="application/pdf")
        response.headers["Content-Disposition"] = f'inline; filename="phieu-tiep-nhan-{code}.pdf"'
        return response
    return web.Response(text=render_html(r), content_type="text/html", charset="utf-8")


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/dossiers/{code}/receipt", receipt)
