"""Regenerate node/data/legacy_units_hcm_2025.csv: pre-July-2025 commune codes -> Ho Chi Minh City's new units.

Source: the MIT-licensed PyPI package ``vietnamadminunits`` (1.0.4), whose conversion data follows
Resolution 1685/NQ-UBTVQH15 (HCMC) and the national register of administrative units: its
``admin_units_legacy`` table (old codes of Ho Chi Minh City, Bình Dương and Bà Rịa-Vũng Tàu), its
``admin_units`` table (new units) and ``converter_2025.json`` (old unit -> new unit; for an old unit
split between several new ones, the one that took the larger part is marked as the default). The new
units' codes are taken, by name, from ``vietnam-provinces`` (the node's unit registry): for ten new
wards the two packages name a different one of the merged old codes as the new code.

Run it only to refresh the shipped file (the package is not a runtime dependency):

    pip install vietnamadminunits==1.0.4 && python scripts/build_legacy_units.py
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from node.registry import units  # the registry is the authority for the new codes

OLD_PROVINCES = ("79", "74", "77")  # Hồ Chí Minh, Bình Dương, Bà Rịa-Vũng Tàu before 1 July 2025
NEW_PROVINCE_KEY = "thanhphohochiminh"
OUT = Path(__file__).resolve().parent.parent / "node" / "data" / "legacy_units_hcm_2025.csv"


def main() -> int:
    # Located, not imported: importing it pulls in shapely and geopy, which only its address parser needs.
    spec = importlib.util.find_spec("vietnamadminunits")
    if spec is None or not spec.submodule_search_locations:
        print("install vietnamadminunits==1.0.4 first", file=sys.stderr)
        return 1
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    conv = json.loads((data / "converter_2025.json").read_text(encoding="utf-8"))
    whole = conv["DICT_PROVINCE_WARD_NO_DIVIDED"][NEW_PROVINCE_KEY]
    split = conv["DICT_PROVINCE_WARD_DIVIDED"].get(NEW_PROVINCE_KEY, {})
    old_to_new = {old: new for new, olds in whole.items() for old in olds}
    db = sqlite3.connect(data / "dataset.db")
    registry = {u.name.lower(): u for u in units()}
    new_units = {}
    for key, name in db.execute("SELECT wardKey, ward FROM admin_units WHERE provinceKey = ?", (NEW_PROVINCE_KEY,)):
        unit = registry[" ".join(name.split()).lower()]
        new_units[key] = (unit.code, unit.name)
    rows = []
    for pkey, dkey, wkey, wcode, province, district, ward in db.execute(
        "SELECT provinceKey, districtKey, wardKey, wardCode, province, district, ward FROM admin_units_legacy"
        f" WHERE provinceCode IN ({','.join('?' for _ in OLD_PROVINCES)}) ORDER BY wardCode",
        OLD_PROVINCES,
    ):
        old_key = f"{pkey}_{dkey}_{wkey or ''}"
        new_key, others = old_to_new.get(old_key), []
        if new_key is None and old_key in split:
            parts = split[old_key]
            new_key = next(p["newWardKey"] for p in parts if p["isDefaultNewWard"])
            others = [new_units[p["newWardKey"]][0] for p in parts if p["newWardKey"] != new_key]
        if new_key is None or not wcode:
            print(f"no successor for {old_key} ({wcode})", file=sys.stderr)
            continue
        new_code, new_name = new_units[new_key]
        old_name = " ".join(f"{ward}, {district}, {province}".split())
        rows.append((f"{int(wcode):05d}", old_name, new_code, new_name, " ".join(others)))
    with OUT.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(("old_code", "old_name", "new_code", "new_name", "also_to"))
        w.writerows(rows)
    print(f"wrote {len(rows)} units to {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
