"""From worker records to results.json, results.md (tables with ratios against recipe and unsloth) and a plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

LOSS_TOLERANCE = 5e-3  # relative first-step loss difference bf16 kernels explain (observed: benchmarks/README.md)
REFERENCES = ("recipe", "unsloth")


def read_records(out: Path) -> list[dict]:
    """Every record in out/records, in the order they were written."""
    files = sorted((out / "records").glob("*.json"), key=lambda f: f.stat().st_mtime_ns)
    return [json.loads(f.read_text()) for f in files]


def peak_memory_gib(record: dict) -> float | None:
    """Peak GPU memory allocated on CUDA; on the CPU the process's peak resident memory."""
    return record.get("peak_allocated_gib", record.get("train_rss_peak_gib"))


def _finite(values) -> bool:
    return bool(values) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def shape_of(record: dict) -> tuple:
    return record["model"], record.get("seq"), record.get("batch")


def shape_label(model: str, seq, batch) -> str:
    return model if seq is None else f"{model}, {seq} × {batch}"


def train_rows(records: list[dict]) -> tuple[list[dict], list[str]]:
    """One row per training record, with ratios to recipe/unsloth of the same model; plus the void comparisons."""
    rows, void = [], []
    train = [r for r in records if r.get("phase") == "train"]
    for model, seq, batch in dict.fromkeys(shape_of(r) for r in train):  # only the same shape is compared
        group = []
        for r in (r for r in train if shape_of(r) == (model, seq, batch)):
            error = r.get("error")
            if not error and not _finite(r.get("losses")):
                error = f"non-finite loss: {r.get('losses')}"
            group.append({"model": model, "seq": seq, "batch": batch, "shape": shape_label(model, seq, batch),
                          "impl": r["impl"], "error": error, "tokens_per_s": r.get("tokens_per_s"),
                          "median_step_s": r.get("median_step_s"), "peak_gib": peak_memory_gib(r),
                          "peak_reserved_gib": r.get("peak_reserved_gib"), "first_loss": (r.get("losses") or [None])[0],
                          "last_loss": (r.get("losses") or [None])[-1], "losses": r.get("losses"),
                          "load_s": r.get("load_s"), "after_load_gib": r.get("after_load_allocated_gib"),
                          "cuda_graphs": r.get("cuda_graphs")})
        runs: dict = {}  # impl -> its rows without an error, in run order
        seen: dict = {}  # impl -> rows of it so far, failed ones included
        for row in group:
            seen[row["impl"]] = row["run"] = seen.get(row["impl"], 0) + 1
            if not row["error"]:
                runs.setdefault(row["impl"], []).append(row)
        ok = {impl: rows[0] for impl, rows in runs.items()}
        loss_ref = ok.get("recipe") or next(iter(ok.values()), None)
        for row in group:
            for ref in REFERENCES:
                base = runs.get(ref)  # a reference run several times: each row against its median
                compared = not row["error"] and base
                row[f"tokens_per_s_vs_{ref}"] = (_ratio(row["tokens_per_s"], _median(b["tokens_per_s"] for b in base))
                                                 if compared else None)
                row[f"memory_vs_{ref}"] = (_ratio(row["peak_gib"], _median(b["peak_gib"] for b in base))
                                           if compared else None)
            row["loss_reference"] = loss_ref["impl"] if loss_ref else None
            row["loss_rel_diff"] = None
            if not row["error"] and loss_ref is not None:
                reference = loss_ref["first_loss"]
                row["loss_rel_diff"] = abs(row["first_loss"] - reference) / max(abs(reference), 1e-12)
            row["comparison_void"] = row["loss_rel_diff"] is not None and row["loss_rel_diff"] > LOSS_TOLERANCE
            if row["comparison_void"]:
                void.append(f"{row['shape']}: {row['impl']}'s first-step loss {row['first_loss']:.4f} differs from "
                            f"{loss_ref['impl']}'s {loss_ref['first_loss']:.4f} by {row['loss_rel_diff']:.1e} "
                            f"(> {LOSS_TOLERANCE:g} relative)")
        rows += group
    return rows, void


def train_ranges(train: list[dict]) -> list[str]:
    """For each shape and implementation run more than once (or compared with a reference run more than once): its
    tokens/s over runs and its ratio to each reference over every pair of runs, lowest to highest."""
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in train):
        runs: dict = {}
        for r in train:
            if r["shape"] == shape and not r["error"]:
                runs.setdefault(r["impl"], []).append(r)
        for impl, rows in runs.items():
            speeds = [r["tokens_per_s"] for r in rows]
            parts = []
            for ref in REFERENCES:
                refs = [b["tokens_per_s"] for b in runs.get(ref, [])]
                if impl != ref and refs and (len(rows) > 1 or len(refs) > 1):
                    ratios = [a / b for a in speeds for b in refs]
                    parts.append(f"{min(ratios):.2f}-{max(ratios):.2f}× {ref} ({len(rows)} × {len(refs)} runs)")
            if len(rows) > 1 or parts:
                lines.append(f"- {shape}, {impl}: {min(speeds):,.0f}-{max(speeds):,.0f} tokens/s over {len(rows)} "
                             f"run{'s' if len(rows) > 1 else ''}" + (f"; {'; '.join(parts)}" if parts else ""))
    return lines


LOAD_FIGURES = ("import_s", "load_s", "ready_s", "first_step_s", "start_to_first_step_s", "store_write_s",
                "background_write_s", "background_store_wait_s", "anon_rss_above_start_gib", "anon_rss_peak_gib",
                "gpu_peak_allocated_gib", "gpu_peak_reserved_gib", "read_bytes", "disk_read_s", "disk_read_gbps")


def _median(values) -> float | None:
    values = sorted(v for v in values if isinstance(v, (int, float)) and math.isfinite(v))
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def load_rows(records: list[dict]) -> list[dict]:
    """One row per (model, impl, variant, cache): the median of its runs (each a fresh process), fastload's phases
    by their medians, and ready-to-train ÷ the recipe's and unsloth's on-the-fly loads in the same cache state."""
    loads = [r for r in records if r.get("phase") == "load"]
    rows = []
    for key in dict.fromkeys((r["model"], r["impl"], r["variant"], r["cache"]) for r in loads):
        runs = [r for r in loads if (r["model"], r["impl"], r["variant"], r["cache"]) == key]
        good = [r for r in runs if not r.get("error")]
        row = {"model": key[0], "impl": key[1], "variant": key[2], "cache": key[3], "runs": len(good),
               "error": next((r["error"] for r in runs if r.get("error")), None) if not good else None,
               "source": good[0].get("source") if good else None}
        row.update({name: _median(r.get(name) for r in good) for name in LOAD_FIGURES})
        phase_names = dict.fromkeys(k for r in good for k in (r.get("phases_s") or {}))
        row["phases_s"] = {k: _median((r.get("phases_s") or {}).get(k) for r in good) for k in phase_names}
        row["cold_vs_disk"] = _ratio(row["load_s"], row["disk_read_s"]) if key[3] == "cold" else None
        row["store_s"] = row["background_write_s"] if row["background_write_s"] is not None else row["store_write_s"]
        rows.append(row)
    for row in rows:
        for other in ("recipe", "unsloth"):
            base = next((b for b in rows if (b["model"], b["impl"], b["variant"], b["cache"])
                         == (row["model"], other, "onthefly", row["cache"])), None)
            row[f"ready_vs_{other}"] = _ratio(row["ready_s"], base["ready_s"]) if base else None
    return rows


def longest_rows(records: list[dict]) -> list[dict]:
    """One row per (model, impl) of the longest phase: every length tried, the longest that trained, what stopped it
    (the failed length's error: out of memory, time; or the --max-seq cap)."""
    rows = []
    longest = [r for r in records if r.get("phase") == "longest"]
    for key in dict.fromkeys((r["model"], r["impl"]) for r in longest):
        tries = sorted((r for r in longest if (r["model"], r["impl"]) == key), key=lambda r: r["seq"])
        attempts = [{"seq": r["seq"], "error": r.get("error"), "tokens_per_s": r.get("tokens_per_s"),
                     "peak_allocated_gib": peak_memory_gib(r), "peak_reserved_gib": r.get("peak_reserved_gib"),
                     "median_step_s": r.get("median_step_s")} for r in tries]
        trained = [a["seq"] for a in attempts if not a["error"]]
        failed = next((a for a in attempts if a["error"]), None)
        rows.append({"model": key[0], "impl": key[1], "attempts": attempts, "longest": max(trained, default=None),
                     "stopped_by": (f"{failed['seq']}: {failed['error']}" if failed else "the --max-seq cap")})
    return rows


def summarize(records: list[dict], meta: dict) -> dict:
    train, void = train_rows(records)
    longest = longest_rows(records)
    reached = {(r["model"], r["impl"]) for r in longest if r["longest"]}
    # a longest run ends in a failure by design: only one that trained no length at all is an error
    errors = [f"{r['phase']} {r.get('impl') or ''} {r['model']}"
              + (f" ({r['variant']}, {r['cache']})" if r.get("phase") == "load" else "")
              + (f" at {r.get('seq')}" if r.get("phase") == "longest" else "") + f": {r['error']}"
              for r in records if r.get("error")
              and not (r.get("phase") == "longest" and (r["model"], r.get("impl")) in reached)]
    errors += [f"train {row['impl']} {row['model']}: {row['error']}" for row in train
               if row["error"] and row["error"].startswith("non-finite")]
    versions = {}
    for r in records:
        versions.update({k: v for k, v in (r.get("versions") or {}).items() if v})
    gpu = next((r["gpu"] for r in records if r.get("gpu")), None)
    models = {r["model"]: {k: r.get(k) for k in ("bytes", "shards", "seconds", "device")}
              for r in records if r.get("phase") == "create" and not r.get("error")}
    quantized = {r["model"]: r.get("save_s") for r in records if r.get("phase") == "quantize" and not r.get("error")}
    return {"meta": {**meta, "gpu": gpu, "versions": versions}, "created": models, "prequantize_save_s": quantized,
            "train": train, "load": load_rows(records), "longest": longest, "void": void, "errors": errors,
            "ok": not errors and not void, "records": records}


def _f(value, fmt: str = "{:.2f}") -> str:
    return "—" if value is None else fmt.format(value)


def _x(value) -> str:
    return "—" if value is None else f"{value:.2f}×"


def markdown(summary: dict) -> str:
    meta = summary["meta"]
    cuda = meta.get("device") == "cuda"
    versions = ", ".join(f"{k} {v}" for k, v in sorted(meta.get("versions", {}).items()))
    lines = ["# fastload benchmark", "",
             f"Device: {meta.get('device')}" + (f" ({meta['gpu']})" if meta.get("gpu") else "")
             + f", compute {meta.get('dtype')}; training batch {meta.get('batch')} × {meta.get('seq')} tokens, "
               f"{meta.get('warmup')} warm-up + {meta.get('steps')} timed steps (median); LoRA r=16, alpha=16 on "
               "q,k,v,o,gate,up,down (on an MoE: q,k,v,o and the fused experts); gradient checkpointing; AdamW8bit "
               "lr 2e-4. Every measurement ran in a fresh process.",
             "", f"Versions: {versions or 'unknown'}.", ""]
    made = [f"{m} {c['bytes'] / 1e9:.1f} GB in {c['seconds']:.0f} s on {c['device']}"
            for m, c in summary["created"].items()]
    made += [f"{m} NF4 copy (recipe's save_pretrained) in {s:.0f} s" for m, s in summary["prequantize_save_s"].items()]
    if made:
        lines += [f"Made in this run: {'; '.join(made)}.", ""]
    mem = "peak allocated GiB" if cuda else "peak RSS GiB (CPU)"
    train = summary["train"]
    for shape in dict.fromkeys(r["shape"] for r in train):
        lines += [f"## Training: {shape}", "",
                  f"| impl | tokens/s | median step s | {mem} | peak reserved GiB | loss step 1 | loss last | "
                  "tokens/s ÷ recipe | memory ÷ recipe | tokens/s ÷ unsloth | memory ÷ unsloth |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for r in (r for r in train if r["shape"] == shape):
            if r["error"]:
                lines.append(f"| {_run_label(r, train)} | {_failed(r['error'])} | | | | | | | | | |")
                continue
            void = " ⚠" if r["comparison_void"] else ""
            lines.append(f"| {_run_label(r, train)} | {r['tokens_per_s']:,.0f} | {r['median_step_s']:.3f} | "
                         f"{_f(r['peak_gib'])} | {_f(r['peak_reserved_gib'])} | {r['first_loss']:.4f}{void} | "
                         f"{r['last_loss']:.4f} | "
                         f"{_x(r['tokens_per_s_vs_recipe'])} | {_x(r['memory_vs_recipe'])} | "
                         f"{_x(r['tokens_per_s_vs_unsloth'])} | {_x(r['memory_vs_unsloth'])} |")
        graphs = [f"{r['impl']}: {graphs_line(r['cuda_graphs'])}" for r in train
                  if r["shape"] == shape and not r["error"] and r.get("cuda_graphs")]
        if graphs:
            lines += ["", "CUDA graphs: " + "; ".join(graphs) + "."]
        voids = [v for v in summary["void"] if v.startswith(f"{shape}:")]
        diffs = [r["loss_rel_diff"] for r in train if r["shape"] == shape and r["loss_rel_diff"] is not None]
        if voids:
            lines += ["", "**comparison void**: the implementations did not compute the same first step: "
                      + "; ".join(v.split(": ", 1)[1] for v in voids)]
        elif len(diffs) > 1:
            lines += ["", f"First-step losses agree "
                          f"(largest relative difference {max(diffs):.1e} ≤ {LOSS_TOLERANCE:g})."]
        ranges = train_ranges([r for r in train if r["shape"] == shape])
        if ranges:
            lines += ["", "Over runs (ratios: every run against every run of the reference; a row's ratio is "
                          "against the reference's median):", *ranges]
        lines.append("")
    lines += longest_markdown(summary.get("longest", []), mem)
    lines += load_tables(summary["load"], meta, cuda)
    if summary["errors"]:
        lines += ["## Errors", ""] + [f"- {e}" for e in summary["errors"]] + [""]
    legend = ("Ratios: tokens/s ÷ reference above 1 is faster; memory ÷ reference below 1 is smaller; "
              "load ÷ recipe below 1 is faster.")
    if cuda:
        legend += (" Peak allocated: the larger of the run's peak and the timed steps' peak plus any CUDA graph pool "
                   "(which the allocator stops counting once graphs are captured).")
    if summary["void"]:
        legend += f" ⚠: first-step loss differs by more than {LOSS_TOLERANCE:g} relative (comparison void)."
    lines += [legend]
    return "\n".join(lines) + "\n"


def _run_label(row: dict, train: list[dict]) -> str:
    """The implementation, with its run number where it ran more than once on this shape."""
    several = sum(1 for r in train if r["shape"] == row["shape"] and r["impl"] == row["impl"]) > 1
    return f"{row['impl']} (run {row['run']})" if several else row["impl"]


def graphs_line(graphs: dict) -> str:
    line = (f"{graphs['layer_graphs']} layer graphs captured ({graphs['with_backward']} with their backward), "
            f"{graphs['loss_graphs']} loss graphs, {graphs['replays']:,} replays")
    return line + (f", capturing stopped: {graphs['stopped']}" if graphs.get("stopped") else "")


def longest_markdown(rows: list[dict], mem: str) -> list[str]:
    """The longest phase per model: one line per implementation, every length with its speed and memory."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        lines += [f"## Longest trainable sequence: {model}, batch 1", "",
                  ("Doubling the length until a step fails, each length in a fresh process. Per length: tokens/s, "
                   f"{mem} / peak reserved GiB."), "",
                  "| impl | longest trained | stopped by | per length |", "|---|--:|---|---|"]
        for r in (r for r in rows if r["model"] == model):
            cells = "; ".join(f"{a['seq']}: {_failed(a['error'])}" if a["error"] else
                              f"{a['seq']}: {a['tokens_per_s']:,.0f} tok/s, {_f(a['peak_allocated_gib'])} / "
                              f"{_f(a['peak_reserved_gib'])} GiB" for a in r["attempts"])
            stopped = r["stopped_by"].replace("|", "/")[:160]
            lines.append(f"| {r['impl']} | {_f(r['longest'], '{:,}')} | {stopped} | {cells} |")
        lines.append("")
    return lines


LOAD_COLUMNS = (("import s", "import_s"), ("load s", "load_s"), ("ready s", "ready_s"),
                ("first step s", "first_step_s"), ("start → first step s", "start_to_first_step_s"),
                ("store write s", "store_s"), ("anon RSS + GiB", "anon_rss_above_start_gib"))
VARIANTS = {"first": "first load (stores)", "store": "from its store", "prequantized": "pre-quantized copy",
            "onthefly": "on the fly"}


def load_tables(loads: list[dict], meta: dict, cuda: bool) -> list[str]:
    """The loading table per model (medians), then where fastload's load time went, by phase."""
    lines = []
    for model in dict.fromkeys(r["model"] for r in loads):
        rows = [r for r in loads if r["model"] == model]
        runs = max((r["runs"] for r in rows), default=0)
        header = [name for name, _ in LOAD_COLUMNS] + (["GPU peak alloc / reserved GiB"] if cuda else []) + [
            "disk read s (GB/s), cold", "cold ÷ disk", "ready ÷ recipe", "ready ÷ unsloth"]
        lines += [f"## Loading: {model}", "",
                  f"Median of {runs} runs, each in a fresh process. Ready: from the from_pretrained call to LoRA, "
                  "checkpointing and optimizer in place; load excludes a store write made on the load's own thread "
                  "(a background write, on a GPU, is off it: the store write column says how long either took). "
                  "Anon RSS: the peak of the process's anonymous memory above its level before the load (file pages "
                  "of the checkpoint do not count). Warm: the files read once before; cold: evicted from the page "
                  "cache, the disk timed reading them once, then evicted again."
                  + (f" Cold loads not measured: {meta['cold_unavailable']}." if meta.get("cold_unavailable") else ""),
                  "", "| impl | load | cache | " + " | ".join(header) + " |",
                  "|---|---|---|" + "--:|" * len(header)]
        for r in rows:
            if r["error"]:
                lines.append(f"| {r['impl']} | {VARIANTS.get(r['variant'], r['variant'])} | {r['cache']} | "
                             f"{_failed(r['error'])} |" + " |" * (len(header) - 1))
                continue
            cells = [_f(r[key]) for _, key in LOAD_COLUMNS]
            if cuda:
                cells.append(f"{_f(r['gpu_peak_allocated_gib'])} / {_f(r['gpu_peak_reserved_gib'])}")
            disk = "—" if r["disk_read_s"] is None else f"{r['disk_read_s']:.2f} ({_f(r['disk_read_gbps'])})"
            cells += [disk, _x(r["cold_vs_disk"]), _x(r["ready_vs_recipe"]), _x(r["ready_vs_unsloth"])]
            lines.append(f"| {r['impl']} | {VARIANTS.get(r['variant'], r['variant'])} | {r['cache']} | "
                         + " | ".join(cells) + " |")
        phased = [r for r in rows if r["phases_s"]]
        names = list(dict.fromkeys(k for r in phased for k in r["phases_s"]))
        if phased:
            lines += ["", (f"Where fastload's load time goes, {model} (median seconds; host time on the loading "
                           "thread; tokenizer_overlapped ran on its own thread meanwhile):"), "",
                      "| load | cache | " + " | ".join(names) + " |", "|---|---|" + "--:|" * len(names)]
            for r in phased:
                lines.append(f"| {VARIANTS.get(r['variant'], r['variant'])} | {r['cache']} | "
                             + " | ".join(_f(r["phases_s"].get(k)) for k in names) + " |")
        lines.append("")
    return lines


def plot(summary: dict, path: Path) -> None:
    """Bar charts of tokens/s and peak memory by implementation, one group per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in summary["train"] if not r["error"]]
    model_names = list(dict.fromkeys(r["shape"] for r in rows))
    impl_names = list(dict.fromkeys(r["impl"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(impl_names), 1)
    for ax, key, title in ((axes[0], "tokens_per_s", "training tokens/s (higher is better)"),
                           (axes[1], "peak_gib", "peak memory GiB (lower is better)")):
        for i, impl in enumerate(impl_names):
            values = [_median(r[key] for r in rows if r["shape"] == m and r["impl"] == impl) or 0
                      for m in model_names]  # an implementation run several times: its median
            bars = ax.bar([j + i * width for j in range(len(model_names))], values, width, label=impl)
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_xticks([j + width * (len(impl_names) - 1) / 2 for j in range(len(model_names))], model_names)
        ax.set_title(title)
    axes[0].legend()
    meta = summary["meta"]
    fig.suptitle(f"fastload bench on {meta.get('gpu') or meta.get('device')}: "
                 f"batch {meta.get('batch')} × {meta.get('seq')}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(out: Path, meta: dict, with_plot: bool = False) -> dict:
    """Rebuild results.json and results.md from every record in `out`; bench.png too when asked."""
    summary = summarize(read_records(out), meta)
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    (out / "results.md").write_text(markdown(summary))
    if with_plot:
        try:
            plot(summary, out / "bench.png")
        except ImportError as e:  # the numbers matter more than the picture: say so and go on
            print(f"fastload bench: no plot ({e}); pip install matplotlib")
    return summary


def _failed(error: str) -> str:
    """A table cell for a job that has no figure: skipped for want of time, or failed (details under Errors)."""
    return "skipped" if error.startswith("skipped") else "error"
