"""What every benchmark report says the same way: the machine it was measured on and its tables."""
from __future__ import annotations

import platform
from pathlib import Path

import torch


def machine() -> dict:
    """The CPU model, torch's threads and version, and the GPU (None without one) of this machine."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table: floats to 4 significant digits, None as "-"."""
    def cell(value):
        if value is None:
            return "-"
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def minutes_text(minutes: float) -> str:
    """'1 minute', '0.2 minutes', '15 minutes'."""
    return f"{minutes:g} minute" + ("" if minutes == 1 else "s")
