"""The ratios of issue 6 from a harness result, and the Markdown that ``docs/performance.md``
shows (rendered from the JSON, so the doc's numbers are the run's numbers).

Timing entries are keyed ``"<case>@B=<b>"`` (inference; ``plain@B=b`` runs the backbone at
batch b, ``plain_MB@B=b`` at batch M·b) and ``"<case>@M=<m>,B=<b>"`` (training steps;
``plain_train`` is the frozen backbone's forward and backward at M·b rows, ``plain_train_seq``
the same as M batches of b).
"""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Any

from benchmarks.cases import INFERENCE_CASES, TRAIN_CASES

GIB = 1024**3


def summary(times: list[float]) -> dict[str, Any]:
    """Median, min and max of the timed runs (seconds)."""
    return {
        "times": times,
        "median": statistics.median(times) if times else math.nan,
        "min": min(times) if times else math.nan,
        "max": max(times) if times else math.nan,
    }


def inference_key(case: str, batch: int) -> str:
    return f"{case}@B={batch}"


def train_key(case: str, members: int, batch: int) -> str:
    return f"{case}@M={members},B={batch}"


def floor_seconds(timings: dict[str, Any], members: int, batch: int) -> float | None:
    """``floor = min(T_single(M·B), M · T_single(B))``: the best plain way to run the
    backbone M times (one big batch, or M sequential batches)."""
    big = _median(timings, inference_key("plain_MB", batch))
    single = _median(timings, inference_key("plain", batch))
    if big is None or single is None:
        return None
    return min(big, members * single)


def train_floor_key(timings: dict[str, Any], members: int, batch: int) -> str | None:
    """The key of the faster training-floor term at (M, B): the frozen backbone's forward and
    backward at M·B rows in one batch, or as M batches of B (``None``: neither measured)."""
    keys = [train_key(c, members, batch) for c in ("plain_train", "plain_train_seq")]
    timed = [(t, k) for k in keys if (t := _median(timings, k)) is not None]
    return min(timed)[1] if timed else None


def train_floor_seconds(timings: dict[str, Any], members: int, batch: int) -> float | None:
    """``train_floor = min(T_fb(M·B), M · T_fb(B))``, ``T_fb`` the frozen backbone's forward
    and backward (gradients to the input only): what any M-member step must at least run."""
    key = train_floor_key(timings, members, batch)
    return None if key is None else _median(timings, key)


def train_sizes(settings: dict[str, Any]) -> list[tuple[int, int]]:
    """The run's training ``(M, B)``, the first one first (as :func:`benchmarks.cases.
    train_sizes`, from the JSON's settings)."""
    sizes = [(int(settings["train_members"]), int(settings["train_batch"]))]
    extra = [(int(m), int(b)) for m, b in settings.get("extra_train_sizes", ())]
    return sizes + [size for size in extra if size not in sizes]


def _explicit_train(timings: dict[str, Any], members: int, batch: int) -> float | None:
    """The faster of the two Explicit Ensemble training paths (``None``: neither ran)."""
    times = [
        t
        for mode in ("loop", "vmap")
        if (t := _median(timings, train_key(f"train_explicit_{mode}", members, batch))) is not None
    ]
    return min(times, default=None)


def _median(timings: dict[str, Any], key: str) -> float | None:
    """The median seconds of ``key`` (``None``: not run, or failed)."""
    entry = timings.get(key)
    return None if entry is None or "error" in entry else float(entry["median"])


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _target(value: float | None, op: str | None, bound: float | None, what: str) -> dict[str, Any]:
    met = None
    if value is not None and op is not None and bound is not None:
        met = value <= bound if op == "<=" else value >= bound
    return {
        "value": value,
        "target": None if op is None else f"{op} {bound:g}",
        "met": met,
        "what": what,
    }


def ratios(result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every ratio issue 6 names, with its target and whether it was met (``None``: not
    measured in this run, or no target on this device)."""
    s = result["settings"]
    timings: dict[str, Any] = result["timings"]
    m, batches = s["members"], sorted(s["batches"])
    cuda = s["device"] == "cuda"
    out: dict[str, dict[str, Any]] = {}
    for b in batches:
        lorae = _median(timings, inference_key("lorae", b))
        out[f"lorae/floor@B={b}"] = _target(
            _ratio(lorae, floor_seconds(timings, m, b)),
            None if cuda else "<=",
            1.05,
            "LoRA-Ensemble inference / min(T_single(M·B), M·T_single(B))",
        )
        out[f"lorae/plain_MB@B={b}"] = _target(
            _ratio(lorae, _median(timings, inference_key("plain_MB", b))),
            "<=" if cuda and b > 1 else None,
            1.10,
            "LoRA-Ensemble inference / plain backbone at batch M·B",
        )
    b1, bmax = batches[0], batches[-1]
    out[f"explicit_sequential/lorae@B={b1}"] = _target(
        _ratio(
            _median(timings, inference_key("explicit_loop", b1)),
            _median(timings, inference_key("lorae", b1)),
        ),
        None if cuda else ">=",
        1.5,
        "Explicit Ensemble (members in a loop) inference / LoRA-Ensemble",
    )
    out[f"lorae/vmap@M={m},B={bmax}"] = _target(
        _ratio(
            _median(timings, inference_key("lorae", bmax)),
            _median(timings, inference_key("vmap", bmax)),
        ),
        None if cuda else "<=",
        0.8,
        "LoRA-Ensemble inference / vmap-over-members reference",
    )
    if cuda:
        latency = _median(timings, inference_key("lorae", 1))
        out[f"lorae_latency_ms@M={m},B=1"] = _target(
            None if latency is None else 1000 * latency,
            "<=",
            5.0,
            "LoRA-Ensemble inference latency at B = 1 (milliseconds)",
        )
    mt, bt = s["train_members"], s["train_batch"]
    out[f"train_lorae/train_explicit@M={mt},B={bt}"] = _target(
        _ratio(
            _median(timings, train_key("train_lorae", mt, bt)), _explicit_train(timings, mt, bt)
        ),
        None if cuda else "<=",
        0.6,
        "training step: LoRA-Ensemble / the faster Explicit Ensemble path",
    )
    float32 = s["dtype"] == "float32"
    for m_, b_ in train_sizes(s):
        floor = train_floor_seconds(timings, m_, b_)
        out[f"train_lorae/train_floor@M={m_},B={b_}"] = _target(
            _ratio(_median(timings, train_key("train_lorae", m_, b_)), floor),
            "<=" if float32 else None,
            1.10,
            "training step: LoRA-Ensemble / the training floor (frozen backbone forward + "
            "backward at M·B rows, the faster of one batch and M batches)",
        )
        out[f"train_explicit/train_floor@M={m_},B={b_}"] = _target(
            _ratio(_explicit_train(timings, m_, b_), floor),
            None,
            None,
            "training step: the faster Explicit Ensemble path / the training floor",
        )
        out[f"train_peft/train_floor@M={m_},B={b_}"] = _target(
            _ratio(_median(timings, train_key("train_peft", m_, b_)), floor),
            None,
            None,
            "M PEFT-style steps (one adapter at a time) / the training floor",
        )
    memory = result.get("memory", {})
    out[f"train_peak_memory_lorae/explicit@M={mt},B={bt}"] = _target(
        _ratio(
            memory.get("train_lorae", {}).get("peak_bytes"),
            memory.get("train_explicit", {}).get("peak_bytes"),
        ),
        "<=",
        0.35,
        "peak memory of a training step: LoRA-Ensemble / Explicit Ensemble",
    )
    size = result.get("size", {})
    out[f"resident_parameters@M={m}/backbone"] = _target(
        size.get("resident_ratio"),
        "<=",
        1.15,
        "parameters + buffers of the M-member LoRA-Ensemble / one backbone",
    )
    out["adapter_checkpoint/backbone_checkpoint"] = _target(
        size.get("adapter_ratio"),
        "<=",
        0.12,
        "adapter-only checkpoint bytes / one backbone's parameter bytes",
    )
    return out


def _time(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def _cell(entry: dict[str, Any] | None, floor: float | None = None) -> str:
    if entry is None:
        return "-"
    if "error" in entry:
        return f"failed ({entry['error'][-120:]})"
    text = f"{_time(entry['median'])} ({_time(entry['min'])}-{_time(entry['max'])})"
    if floor:
        text += f", {entry['median'] / floor:.2f}x floor"
    return text


def _bytes(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / GIB:.2f} GiB" if value >= GIB else f"{value / 1024**2:.1f} MiB"


def _memory(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "-"
    return f"failed ({entry['error'][-200:]})" if "error" in entry else _bytes(entry["peak_bytes"])


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def render_markdown(result: dict[str, Any]) -> str:
    """The Markdown section of one run: setup, inference and training tables, ratios."""
    s, env = result["settings"], result["environment"]
    timings: dict[str, Any] = result["timings"]
    m, batches = s["members"], sorted(s["batches"])
    lines = [
        f"Command: `{result['command']}`",
        "",
        f"Machine: {env['device_name']}{_cpu_kind_text(env)}, {env['threads']} threads, "
        f"torch {env['torch']}, "
        f"timm {env['timm']}, {env['date']}. Backbone `{s['backbone']}`"
        + (f" with overrides `{s['backbone_overrides']}`" if s["backbone_overrides"] else "")
        + f", rank {s['rank']}, dtype {s['dtype']}, {s['repeats']} timed runs per case "
        f"({s['slow_repeats']} for cases slower than {s['slow_seconds']:g} s"
        + (
            f", {s['fast_repeats']} for cases faster than {s['fast_seconds']:g} s"
            if "fast_repeats" in s
            else ""
        )
        + "), interleaved.",
        "",
        f"Inference, M = {m}: median (min-max) per call, and x floor where "
        "floor = min(T_single(M·B), M·T_single(B)).",
        "",
        "| case | " + " | ".join(f"B = {b}" for b in batches) + " |",
        "|---|" + "---:|" * len(batches),
    ]
    floors = {b: floor_seconds(timings, m, b) for b in batches}
    rows: list[tuple[str, str]] = [
        ("plain", "plain backbone, batch B"),
        ("plain_MB", "plain backbone, batch M·B"),
    ]
    rows += [(c, label) for c, label in INFERENCE_CASES.items() if c != "plain"]
    for case, label in rows:
        cells = [timings.get(inference_key(case, b)) for b in batches]
        if all(c is None for c in cells):
            continue
        ratio = case not in ("plain", "plain_MB")
        rendered = [
            _cell(c, floors[b] if ratio else None) for c, b in zip(cells, batches, strict=True)
        ]
        lines.append(f"| {label} | " + " | ".join(rendered) + " |")
    lines.append("| floor | " + " | ".join(_time(floors[b]) for b in batches) + " |")
    mt, bt = s["train_members"], s["train_batch"]
    memory = result.get("memory", {})
    lines += [
        "",
        f"Training step (forward, cross-entropy over members, backward, AdamW), M = {mt}, "
        f"B = {bt}:",
        "",
        "| case | time |",
        "|---|---:|",
    ]
    for case, label in TRAIN_CASES.items():
        if case == "plain_train":
            for key, text in (
                ("plain_train", "training floor, one batch of M·B rows"),
                ("plain_train_seq", "training floor, M batches of B rows"),
            ):
                entry = timings.get(train_key(key, mt, bt))
                if entry is not None:
                    lines.append(f"| {text} | {_cell(entry)} |")
            continue
        entry = timings.get(train_key(case, mt, bt))
        if entry is not None:
            lines.append(f"| {label} | {_cell(entry)} |")
    lines += _train_floor_lines(result)
    if memory:
        lines += [
            "",
            "Peak memory of that training step, each in a fresh process (CPU: peak RSS minus "
            "the RSS after imports; CUDA: `max_memory_allocated`): LoRA-Ensemble "
            f'{_memory(memory.get("train_lorae"))}, Explicit Ensemble (`vectorize="auto"`) '
            f"{_memory(memory.get('train_explicit'))}.",
        ]
    lines += ["", "| ratio | value | target | met |", "|---|---:|---:|:---:|"]
    for name, r in result["ratios"].items():
        met = {True: "yes", False: "**no**", None: "-"}[r["met"]]
        lines.append(
            f"| `{name}`: {r['what']} | {_value(r['value'])} | {r['target'] or '-'} | {met} |"
        )
    lines += ["", *_memory_lines(result)]
    for key, table in result.get("profiles", {}).items():
        lines += [
            "",
            f"<details><summary>Profile of one call of <code>{key}</code></summary>",
            "",
            "```",
            table.rstrip(),
            "```",
            "",
            "</details>",
        ]
    if result.get("skipped"):
        lines += ["", "Skipped: " + "; ".join(f"`{k}` ({v})" for k, v in result["skipped"].items())]
    return "\n".join(lines)


def _cpu_kind_text(env: dict[str, Any]) -> str:
    """`` (CPU kind avx512_bf16, torch capability AVX512)`` where the run recorded it."""
    if "cpu_kind" not in env:
        return ""
    capability = env.get("cpu_capability")
    return f" (CPU kind `{env['cpu_kind']}`" + (
        f", torch capability {capability})" if capability else ")"
    )


def _train_floor_lines(result: dict[str, Any]) -> list[str]:
    """The training-floor table: every size's floor and each method's step against it."""
    s, timings = result["settings"], result["timings"]
    sizes = train_sizes(s)
    if not any(train_floor_seconds(timings, m, b) for m, b in sizes):
        return []
    lines = [
        "",
        "Training at the floor: median per M-member training step, and x the training floor "
        "= min(T_fb(M·B), M·T_fb(B)), T_fb the frozen backbone's forward and backward with "
        "gradients to the input only (what any M-member step must run). PEFT-style: one "
        "adapter at a time, M steps at batch B.",
        "",
        "| M x B | training floor | LoRA-Ensemble | Explicit Ensemble (faster path) | "
        "PEFT-style, M steps |",
        "|---|---:|---:|---:|---:|",
    ]
    left_out = result.get("skipped_train", {})
    for m, b in sizes:
        floor = train_floor_seconds(timings, m, b)
        key = train_floor_key(timings, m, b)
        how = "one batch" if key and key.startswith("plain_train@") else f"{m} batches"
        explicit = [
            timings[k]
            for mode in ("loop", "vmap")
            if (k := train_key(f"train_explicit_{mode}", m, b)) in timings
            and "error" not in timings[k]
        ]
        fastest = min(explicit, key=lambda e: e["median"]) if explicit else None
        reasons = [
            v
            for k, v in left_out.items()
            if k.startswith("train_explicit") and k.endswith(f"@M={m},B={b}")
        ]
        explicit_cell = (
            _cell(fastest, floor)
            if fastest is not None
            else (f"not run: {reasons[0]}" if reasons else "-")
        )
        cells = [
            f"{_time(floor)} ({how})" if floor is not None else "-",
            _cell(timings.get(train_key("train_lorae", m, b)), floor),
            explicit_cell,
            _cell(timings.get(train_key("train_peft", m, b)), floor),
        ]
        lines.append(f"| {m} x {b} | " + " | ".join(cells) + " |")
    return lines


def _memory_lines(result: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    size = result.get("size", {})
    if size:
        lines.append(
            f"- Parameters resident: LoRA-Ensemble M = {size['members']}: "
            f"{size['lorae_resident']:,}; one backbone: {size['backbone_resident']:,}; "
            f"Explicit Ensemble: {size['explicit_resident']:,}. Adapter checkpoint "
            f"{size['adapter_bytes']:,} bytes; one backbone {size['backbone_bytes']:,} bytes."
        )
    if result.get("auto_chunk") is not None:
        lines.append(f'- `member_chunk_size="auto"` chose: {result["auto_chunk"]}.')
    fit = result.get("fit")
    if fit:
        if "error" in fit:
            lines.append(f"- M = {fit['members']} training fit check failed: {fit['error'][-300:]}")
        else:
            lines.append(
                f"- M = {fit['members']} LoRA-Ensemble training step at B = {fit['batch']} "
                f"(asked: {fit['requested_batch']}): peak {_bytes(fit['peak_bytes'])} of "
                f"{_bytes(fit['machine_bytes'])}; fits: {'yes' if fit['fits'] else 'no'} "
                f"(predicted from B = 1, 2 at B = {fit['requested_batch']}: "
                f"{_bytes(fit['predicted_peak_bytes'])})."
            )
    need = result.get("explicit_need")
    if need:
        lines.append(
            f"- Explicit Ensemble, M = {need['members']}, training at B = {need['batch']} "
            f"would need {_bytes(need['total_bytes'])} (computed: M x (4 x "
            f"{need['parameters_per_member']:,} float32 parameters for weights, gradients and "
            f"AdamW's two moments = {_bytes(need['state_bytes_per_member'])}, + "
            f"{_bytes(need['activation_bytes_per_member'])} of activations saved for backward, "
            f"measured for one member)); this machine has {_bytes(need['machine_bytes'])}."
        )
    return lines


def markers(result: dict[str, Any]) -> tuple[str, str]:
    """The comment pair around one device/dtype's section in ``docs/performance.md``: on CPU
    one per CPU kind (``cpu-amx-float32``, ``cpu-avx2-bf16``, ...), since bf16 and even float32
    speed differ by kind; results from before the kind was recorded keep ``cpu-<dtype>``."""
    s = result["settings"]
    kind = result.get("environment", {}).get("cpu_kind") if s["device"] == "cpu" else None
    tag = "-".join(str(p) for p in (s["device"], kind, s["dtype"]) if p)
    return f"<!-- speed:{tag}:start -->", f"<!-- speed:{tag}:end -->"


def write_section(path: Path, start: str, end: str, body: str) -> None:
    """Write ``body`` between the ``start`` and ``end`` markers of ``path``, keeping the rest
    of the file (appended, markers included, when they are absent; a new file holds just it)."""
    section = f"{start}\n{body}\n{end}"
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + section + "\n"
    path.write_text(text, encoding="utf-8")


def write_markdown(path: Path, result: dict[str, Any]) -> None:
    """Write the run's section into ``path``: between its markers when the file has them (the
    rest of the file is kept), else appended (a new file holds just the section)."""
    write_section(path, *markers(result), render_markdown(result))
