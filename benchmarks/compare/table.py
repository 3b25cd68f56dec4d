"""The comparison's printed output: the speed/memory table (ratios to prefjax) and the loss check."""

from __future__ import annotations

import math
from typing import Any, Optional

Row = dict[str, Any]  # framework, size, seq, pairs, params, and either the runner's result or "error"


def derived(row: Row) -> dict[str, float]:
    """pairs/s, tokens/s (both sequences of each pair, full length), step ms, peak memory MiB (the
    accelerator's high-water mark where there is one, else the process's RSS), start-up s."""
    step = row["step_seconds"]
    out = {"pairs/s": row["pairs"] / step, "tokens/s": 2 * row["pairs"] * row["seq"] / step,
           "step (ms)": 1e3 * step, "peak memory (MiB)": _peak_bytes(row) / 2**20,
           "start-up (s)": row["startup_seconds"]}
    if row.get("model_flops") and row.get("peak_flops"):
        out["MFU (%)"] = 100.0 * row["model_flops"] / step / row["peak_flops"]
    return out


def _peak_bytes(row: Row) -> int:
    return row.get("device_peak_bytes") or row["peak_rss"]


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 10 else f"{value:.1f}"


def speed_table(rows: list[Row]) -> str:
    """Markdown table; each number is followed by its ratio to prefjax's row of the same cell."""
    cols = ["pairs/s", "tokens/s", "step (ms)", "MFU (%)", "peak memory (MiB)", "start-up (s)"]
    if not all("model_flops" in r for r in rows if "error" not in r):
        cols.remove("MFU (%)")
    lines = ["| framework | size | params | seq | " + " | ".join(cols) + " |", "|---" * (4 + len(cols)) + "|"]
    base = {(r["size"], r["seq"]): derived(r) for r in rows if r["framework"] == "prefjax" and "error" not in r}
    for r in rows:
        head = f"| {r['framework']} | {r['size']} | {r['params'] / 1e6:.2f} M | {r['seq']} |"
        if "error" in r:
            reason = r["error"] if len(r["error"]) <= 160 else r["error"][:157] + "..."
            lines.append(head + f" unavailable: {reason} |" + " |" * (len(cols) - 1))
            continue
        d, ref = derived(r), base.get((r["size"], r["seq"]))
        cells = []
        for c in cols:
            ratio = "" if ref is None or r["framework"] == "prefjax" or not ref.get(c) else f" ({d[c] / ref[c]:.2f}x)"
            cells.append(_fmt(d[c]) + ratio)
        lines.append(head + " " + " | ".join(cells) + " |")
    return "\n".join(lines)


def loss_check(rows: list[Row], tol: float, logp_rtol: float) -> tuple[str, bool]:
    """First-step losses and chosen log-probs per cell, and whether all agree with prefjax's.

    At step 1 the policy equals the reference, so every framework's DPO loss is log 2 whatever
    the weights; the policy's log-prob of the chosen responses (sum over tokens, mean over pairs)
    is what shows that the same weights met the same tokens. Step 2's loss (after one AdamW
    update) is shown as well: it also depends on the gradients and the optimizer.
    """
    lines = ["| framework | size | seq | loss step 1 | loss step 2 | logps/chosen step 1 | diff vs prefjax (loss; logps rel.) |",
             "|---" * 7 + "|"]
    ok = True
    base = {(r["size"], r["seq"]): r for r in rows if r["framework"] == "prefjax" and "error" not in r}
    for r in rows:
        if "error" in r or not r.get("losses"):
            continue
        losses, logps = r["losses"], r.get("first_logps_chosen")
        second = f"{losses[1]:.6f}" if len(losses) > 1 else "-"
        ref: Optional[Row] = base.get((r["size"], r["seq"]))
        diff = "-"
        if ref is not None and r["framework"] != "prefjax":
            d_loss = abs(losses[0] - ref["losses"][0])
            good = math.isfinite(d_loss) and d_loss <= tol
            d_logp = math.nan
            if logps is not None and ref.get("first_logps_chosen") is not None:
                d_logp = abs(logps - ref["first_logps_chosen"]) / max(abs(ref["first_logps_chosen"]), 1e-12)
                good &= math.isfinite(d_logp) and d_logp <= logp_rtol
            ok &= good
            diff = f"{d_loss:.1e}; {d_logp:.1e} {'ok' if good else 'MISMATCH'}"
        logp_text = "-" if logps is None else f"{logps:.4f}"
        lines.append(f"| {r['framework']} | {r['size']} | {r['seq']} | {losses[0]:.6f} | {second} | {logp_text} | {diff} |")
    return "\n".join(lines), ok


def memory_table(rows: list[Row]) -> str:
    """Peak memory against what the step must hold (prefjax.models.memory_budget), per framework.

    prefjax also reports XLA's own peak for the step program (inputs + outputs + temporaries,
    donated buffers counted once). Peak memory is the accelerator's high-water mark of allocated
    bytes where there is one, else the process's peak RSS, which includes each runtime's own
    code and libraries.
    """
    lines = ["| framework | size | seq | required (arithmetic) | XLA step peak (MiB) | XLA / required | "
             "peak memory (MiB) | peak / required |", "|---" * 8 + "|"]
    for r in rows:
        if "error" in r or "required_bytes" not in r:
            continue
        need = r["required_bytes"]
        xla = r.get("xla_peak_bytes")
        xla_cells = f"{xla / 2**20:,.1f} | {xla / need:.2f}x" if xla else "- | -"
        lines.append(f"| {r['framework']} | {r['size']} | {r['seq']} | {r['required_text']} | {xla_cells} | "
                     f"{_peak_bytes(r) / 2**20:,.0f} | {_peak_bytes(r) / need:.2f}x |")
    return "\n".join(lines)


def print_tables(rows: list[Row], loss_tol: float, logp_rtol: float) -> bool:
    """Prints the speed, memory and first-step tables; whether every framework agrees with prefjax."""
    print(speed_table(rows))
    print()
    print(memory_table(rows))
    print()
    text, ok = loss_check(rows, loss_tol, logp_rtol)
    print(text)
    return ok


def main(argv: list[str]) -> int:
    """Prints the three tables for the rows of one or more JSON files written by
    compare_trl_tunix.py --json (e.g. cells of one machine run as separate invocations)."""
    import argparse
    import json

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("files", nargs="+", help="--json outputs of compare_trl_tunix.py")
    p.add_argument("--loss-tol", type=float, default=1e-4)
    p.add_argument("--logp-rtol", type=float, default=1e-4)
    args = p.parse_args(argv)
    rows: list[Row] = []
    for name in args.files:
        with open(name, encoding="utf-8") as f:
            rows += json.load(f)
    # One prefjax row per cell is the base of the ratios; later files' rows follow earlier ones.
    rows.sort(key=lambda r: (r["size"], r["seq"], r["framework"] != "prefjax"))
    return 0 if print_tables(rows, args.loss_tol, args.logp_rtol) else 1


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
