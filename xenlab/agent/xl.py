"""Parsing `xl` output (standard library only: used by the agent in dom0 and
by the host alike)."""

from __future__ import annotations


def parse_xl_info(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            out[key.strip()] = value.strip()
    return out


def parse_xl_list(text: str) -> list[dict]:
    """`xl list` rows: Name ID Mem VCPUs State Time(s)."""
    rows = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 6:
            rows.append({
                "name": " ".join(parts[:-5]), "id": int(parts[-5]), "memory_mib": int(parts[-4]),
                "vcpus": int(parts[-3]), "state": parts[-2], "cpu_seconds": float(parts[-1]),
            })
    return rows
