"""Writes a run: ``<root>/<device-slug>/<suite>.json``, ``<suite>.md`` and PNG plots.

One run = one device and one set of versions, written together: a table never mixes runs.
``python -m benchmarks report FILE.json`` re-renders the Markdown and the plots from a JSON.
"""

from __future__ import annotations

import json
from pathlib import Path

BASELINES = ("naive", "liger", "cce", "trl")


# -- formatting ---------------------------------------------------------------------------------

def fmt_time(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms"


def fmt_mib(b: int | None) -> str:
    return "–" if b is None else f"{b / 2**20:,.0f}"


def fmt_ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}×"


def header(record: dict) -> list[str]:
    env, s = record["env"], record["settings"]
    v = env["versions"]
    git = env["git"]
    lines = [
        f"# {record['suite']} suite — {env['device_name']}",
        "",
        f"- Run: {record['created']} · `{record['command']}`",
        (f"- Device: {env['device_name']} (`{env['device_slug']}`); CPU {env['cpu_model']}, "
         f"{env['torch_threads']} torch threads"),
        "- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val is not None),
        f"- Commit: {git.get('commit') or 'unknown'}{' (uncommitted changes)' if git.get('dirty') else ''}",
        "- Timing: " + s.get("timing", f"{s['warmup']} warm-up + {s['repeats']} timed runs per contender, "
                                         "round-robin in one process; medians."),
    ]
    if env.get("cpu_rule"):
        lines.append(f"- CPU kernel rule (impl=\"cpu\"/\"auto\"): {env['cpu_rule']['describe']}")
    load = record.get("load_average") or {}
    if load.get("start") and load.get("end"):
        lines.append(f"- Load average (1/5/15 min) at the start {'/'.join(map(str, load['start']))}, at the end "
                     f"{'/'.join(map(str, load['end']))}, on {env.get('cpu_count') or '?'} CPUs (a load above the "
                     "torch threads means other processes shared the CPU)")
    for name, why in sorted(record.get("unavailable", {}).items()):
        lines.append(f"- Not run: `{name}` — {why}")
    for note in record.get("notes", []):
        lines.append(f"- {note}")
    return lines + [""]


# -- kernel suite ---------------------------------------------------------------------------------

def _groups(cases: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in cases:
        out.setdefault((r["case"], r["op"], r["mode"]), []).append(r)
    return out


def _max_err(r: dict) -> str:
    errs = r.get("rel_err")
    if not errs:
        return "–" if r["contender"] != r.get("check_ref") else "ref"
    worst = max(errs.values())
    return "ref" if r["contender"] == r.get("check_ref") else f"{worst:.1e}"


def _gradient_bytes(info: dict, mode: str) -> int:
    """Bytes of the gradients a forward+backward must return: hidden's and weight's, in their dtype."""
    if mode != "fwd+bwd":
        return 0
    itemsize = {"float32": 4, "float64": 8}.get(info["dtype"], 2)
    return (info["rows"] + info["head"]["vocab"]) * info["head"]["hidden"] * itemsize


def kernels_markdown(record: dict) -> str:
    lines = header(record)
    lines += [
        ("Columns: median time; vs X = X's median / this median (> 1: faster than X); "
         "TFLOP/s = minimal lm-head work (2·N·H·V fwd, 6·N·H·V fwd+bwd, N counted rows) / median; "
         "of floor = that work at the GEMM rate measured in the same rounds / median; peak extra = memory "
         "beyond the inputs (MiB); beyond grads = peak extra less the gradients of hidden and weight in "
         "their dtype (fwd+bwd), what a fused op adds to what any backward must return; max rel err = worst of output, |dhidden| rows, |dweight| rows against the "
         "reference."),
        "",
    ]
    for (case, op, mode), rows in _groups(record["cases"]).items():
        info = rows[0]["case_info"]
        head, lay = info["head"], info["layout"]
        softcap = f", softcap {head['softcap']}" if head["softcap"] else ""
        lines += [f"## {case} · {op} · {mode}", "",
                  (f"H={head['hidden']}, V={head['vocab']}{softcap}, {info['dtype']}, {lay['pairs']} pairs × 2 × "
                   f"{lay['seq_len']} tokens (prompt {lay['prompt_len']}), {info['counted_rows']:,} counted of "
                   f"{info['rows']:,} rows"), ""]
        base = {r["contender"]: r for r in rows if r["status"] == "ok"}
        present = [b for b in BASELINES if b in base]
        lines.append("| contender | median | " + " | ".join(f"vs {b}" for b in present)
                     + " | TFLOP/s | of floor | peak extra MiB | beyond grads MiB | mem vs naive | max rel err |")
        lines.append("|---" * (8 + len(present)) + "|")
        grads = _gradient_bytes(info, mode)
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"| {r['contender']} | {r['status']}: {r['note']} |" + " |" * (6 + len(present)))
                continue
            if r["kind"] == "floor":
                gemm = f"[{r['gemm_rows']}×{head['hidden']}]·[{head['hidden']}×{head['vocab']}]"
                label = "GEMM floor" if r["contender"] == "gemm" else f"GEMM, {r['contender'].split(':')[-1]} engine"
                lines.append(f"| {label} {gemm} | {fmt_time(r['median_s'])} |"
                             + " |" * len(present) + f" {r.get('tflops', 0):.3g} | | | | | |")
                continue
            speed = [fmt_ratio(base[b]["median_s"] / r["median_s"]) for b in present]
            mem_naive = base.get("naive", {}).get("peak_extra_bytes")
            mem_ratio = mem_naive / r["peak_extra_bytes"] if mem_naive and r.get("peak_extra_bytes") else None
            name = f"**{r['contender']}**" if r["kind"] == "ours" else r["contender"]
            of_floor = f"{100 * r['of_floor']:.0f}%" if r.get("of_floor") else "–"
            peak = r.get("peak_extra_bytes")
            lines.append(f"| {name} | {fmt_time(r['median_s'])} | " + " | ".join(speed)
                         + f" | {r.get('tflops', 0):.3g} | {of_floor} | {fmt_mib(peak)}"
                         f" | {fmt_mib(None if peak is None else peak - grads)}"
                         f" | {fmt_ratio(mem_ratio)} | {_max_err(r)} |")
        lines.append("")
        best = _best_engine_floor(rows, info, mode)
        if best is not None:
            lines += [best, ""]
    return "\n".join(lines)


def _best_engine_floor(rows: list[dict], info: dict, mode: str) -> str | None:
    """The minimal work at the faster matrix engine's measured rate (torch.mm or oneDNN), and
    each of ours against it: the CPU kernel's target (issue 17: <= 1.05x in fwd+bwd)."""
    floors = [r for r in rows if r["status"] == "ok" and r["kind"] == "floor" and r.get("tflops")]
    if not floors:
        return None
    fastest = max(floors, key=lambda r: r["tflops"])
    head = info["head"]
    work = (6 if mode == "fwd+bwd" else 2) * info["counted_rows"] * head["hidden"] * head["vocab"]
    floor_s = work / (fastest["tflops"] * 1e12)
    engine = "torch.mm" if fastest["contender"] == "gemm" else fastest["contender"].split(":")[-1]
    ours = [f"`{r['contender']}` {r['median_s'] / floor_s:.2f}×" for r in rows
            if r["status"] == "ok" and r["kind"] == "ours"]
    return (f"Floor at the faster engine ({engine}, {fastest['tflops']:.3g} TFLOP/s): "
            f"{'6' if mode == 'fwd+bwd' else '2'}·N·H·V = {fmt_time(floor_s)}; " + ", ".join(ours) + " of it.")


def _colors(record: dict) -> dict[str, str]:
    """One colour per contender, the same in every panel."""
    names = list(dict.fromkeys(r["contender"] for r in record["cases"]))
    return {name: f"C{i % 10}" for i, name in enumerate(names)}


def _plot_kernels(record: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in record["cases"] if r["status"] == "ok" and r["kind"] != "floor"]
    color = _colors(record)
    panels = list(dict.fromkeys((r["op"], r["mode"]) for r in ok))
    if not panels:
        return None
    fig, axes = plt.subplots(2, len(panels), figsize=(6 * len(panels), 8), squeeze=False)
    for col, (op, mode) in enumerate(panels):
        rows = [r for r in ok if (r["op"], r["mode"]) == (op, mode)]
        cases = list(dict.fromkeys(r["case"] for r in rows))
        names = list(dict.fromkeys(r["contender"] for r in rows))
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            by_case = {r["case"]: r for r in rows if r["contender"] == name}
            xs = [k + i * width for k, c in enumerate(cases) if c in by_case]
            bars = axes[0][col].bar(xs, [by_case[c]["median_s"] for c in cases if c in by_case], width, label=name,
                                    color=color[name])
            axes[0][col].bar_label(bars, fmt="%.3g", fontsize=6)
            mem = [(k + i * width, by_case[c].get("peak_extra_bytes")) for k, c in enumerate(cases) if c in by_case]
            mem = [(x, b / 2**20) for x, b in mem if b is not None]
            if mem:
                bars = axes[1][col].bar([x for x, _ in mem], [b for _, b in mem], width, label=name, color=color[name])
                axes[1][col].bar_label(bars, fmt="%.0f", fontsize=6)
        for row, ylabel in enumerate(("median time (s)", "peak extra memory (MiB)")):
            ax = axes[row][col]
            ax.set_xticks([k + 0.4 - width / 2 for k in range(len(cases))], cases, rotation=30, ha="right")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{op} · {mode}")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle(f"kernels — {record['env']['device_name']}, {record['env']['torch_threads']} threads "
                 f"(lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_sweep(record: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in record["cases"] if r["status"] == "ok" and r["kind"] != "floor"
          and (r["op"], r["mode"]) == ("spin_loss", "fwd+bwd")]
    color = _colors(record)
    heads: dict[str, set] = {}
    for r in ok:
        heads.setdefault(r["case_info"]["head"]["name"], set()).add(r["case_info"]["counted_rows"])
    heads = {h: ns for h, ns in heads.items() if len(ns) > 1}
    if not heads:
        return None
    fig, axes = plt.subplots(2, len(heads), figsize=(6 * len(heads), 8), squeeze=False)
    for col, head in enumerate(heads):
        rows = [r for r in ok if r["case_info"]["head"]["name"] == head]
        for name in dict.fromkeys(r["contender"] for r in rows):
            pts = sorted((r["case_info"]["counted_rows"], r["median_s"], r.get("peak_extra_bytes"))
                         for r in rows if r["contender"] == name)
            axes[0][col].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name, color=color[name])
            mem = [(p[0], p[2] / 2**20) for p in pts if p[2] is not None]
            if mem:
                axes[1][col].plot([m[0] for m in mem], [m[1] for m in mem], marker="o", label=name,
                                  color=color[name])
        for row, ylabel in enumerate(("median time (s)", "peak extra memory (MiB)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N counted tokens")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{head} · spin_loss · fwd+bwd")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle(f"N sweep — {record['env']['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- e2e suite --------------------------------------------------------------------------------

def e2e_markdown(record: dict) -> str:
    lines = header(record)
    lines += [("Columns: median time of one SPIN training step (policy forward + loss + backward; no optimizer "
               "update); layout tokens = tokens the variant's batch holds (padding included for the padded step, "
               "each prompt once for the shared-prompt step), per pair; tokens/s = the tokens of the pairs' "
               "sequences (prompt counted in each, the same for every variant) / median; speed-up and memory "
               "ratio against the case's first variant (padded full logits; packed-fused in the shared-prompt "
               "cases), the speed-up as the ratio of medians and as the median of per-round ratios (rounds are "
               "round-robin, so a load that drifts between rounds cancels); CPU time = the process's CPU time "
               "of the step, all threads (CPU only; on a shared machine it varies less than the wall time) and the "
               "ratio of its medians; peak extra = memory beyond the "
               "model and the batch (MiB); loss: every variant computes the same loss on the same data."), ""]
    groups: dict[str, list[dict]] = {}
    for r in record["cases"]:
        groups.setdefault(r["case"], []).append(r)
    for case, rows in groups.items():
        info = rows[0].get("case_info", {})
        lines += [f"## {case}", "", info.get("summary", ""), "",
                  "| variant | layout tokens | per pair | median step | tokens/s | speed-up | per round "
                  "| CPU time | CPU speed-up | peak extra MiB | memory ratio | loss |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        base = next((r for r in rows if r.get("baseline") and r["status"] == "ok"), None)
        for r in rows:
            if r["status"] != "ok":
                lines.append(f"| {r['variant']} | {r['status']}: {r['note']} | | | | | | | | | | |")
                continue
            speed = base["median_s"] / r["median_s"] if base else None
            cpu_speed = base["cpu_median_s"] / r["cpu_median_s"] if base and r.get("cpu_median_s") else None
            cpu = fmt_time(r["cpu_median_s"]) if r.get("cpu_median_s") else "–"
            mem = (base["peak_extra_bytes"] / r["peak_extra_bytes"]
                   if base and base.get("peak_extra_bytes") and r.get("peak_extra_bytes") else None)
            layout = (r.get("padded_tokens") if r["variant"] == "padded-full-logits"
                      else r.get("layout_tokens", r.get("tokens")))
            pairs = r["case_info"].get("pairs")
            per_pair = f"{layout / pairs:,.1f}" if layout and pairs else "–"
            lines.append(f"| {r['variant']} | {layout or 0:,} | {per_pair} | {fmt_time(r['median_s'])} | "
                         f"{r['tokens_per_s']:,.0f} | {fmt_ratio(speed)} | {fmt_ratio(r.get('speedup_per_round'))} | "
                         f"{cpu} | {fmt_ratio(cpu_speed)} | {fmt_mib(r.get('peak_extra_bytes'))} | "
                         f"{fmt_ratio(mem)} | {r.get('loss', float('nan')):.4f} |")
        lines.append("")
    return "\n".join(lines)


def _plot_e2e(record: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in record["cases"] if r["status"] == "ok"]
    if not ok:
        return None
    labels = [f"{r['case']}\n{r['variant']}" for r in ok]
    fig, axes = plt.subplots(1, 2, figsize=(12, max(4.5, 0.5 * len(ok))))  # room for each two-line label
    axes[0].barh(labels, [r["tokens_per_s"] for r in ok])
    axes[0].set_xlabel("tokens/s (higher is better)")
    mem = [r.get("peak_extra_bytes") or 0 for r in ok]
    axes[1].barh(labels, [m / 2**20 for m in mem])
    axes[1].set_xlabel("peak extra memory, MiB (lower is better)")
    if not any(mem):
        axes[1].set_title("memory not measured in this run")
    fig.suptitle(f"one SPIN step — {record['env']['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- writing ------------------------------------------------------------------------------------

def write_run(record: dict, root: Path) -> list[Path]:
    """Write JSON, Markdown and plots of one run under ``root/<device-slug>/``; returns the paths."""
    folder = Path(root) / record["env"]["device_slug"]
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / f"{_stem(record)}.json"
    json_path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    return [json_path, *render(record, folder)]


def _stem(record: dict) -> str:
    """``<suite>`` or, for a tagged run (``--tag``), ``<suite>-<tag>``: a tagged run has its own files."""
    return record["suite"] + (f"-{record['tag']}" if record.get("tag") else "")


def render(record: dict, folder: Path) -> list[Path]:
    stem = _stem(record)
    md = folder / f"{stem}.md"
    paths = [md]
    if record["suite"] == "kernels":
        md.write_text(kernels_markdown(record))
        plots = [_plot_kernels(record, folder / f"{stem}.png"), _plot_sweep(record, folder / f"{stem}-sweep.png")]
    elif record["suite"] in ("iteration", "generation", "planner"):  # their own modules render them (tables only)
        import importlib

        md.write_text(importlib.import_module(f"benchmarks.{record['suite']}").markdown(record))
        plots = []
    else:
        md.write_text(e2e_markdown(record))
        plots = [_plot_e2e(record, folder / f"{stem}.png")]
    return paths + [p for p in plots if p is not None]
