"""Write ``docs/recipes.md``: the paper's recipe values against the resolved configs.

The paper's values live in ``docs/recipes/paper.yaml`` (one owner); the configs' values come
from ``lorae fit --config <file> --print_config``, i.e. after ``base:`` composition and every
default. Each row is one data set x setting: the paper's value with its source, the configs'
values, and ``match`` or the listed deviation with its reason. A config value that differs from
the paper without a listed deviation is reported as a failure (exit code 1; the test suite
holds the configs to this, ``tests/test_configs.py``).

    python scripts/make_recipes.py            # rewrite docs/recipes.md
    python scripts/make_recipes.py --check    # exit 1 if it is stale or a value is unexplained
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import io
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "docs" / "recipes" / "paper.yaml"
OUTPUT = REPO / "docs" / "recipes.md"
_MISSING = object()

Resolver = Callable[[Path], dict[str, Any]]


def load_paper(path: Path = PAPER) -> dict[str, Any]:
    """The recipe data file."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def experiment_configs(folder: Path) -> list[Path]:
    """The runnable configs of a data set's folder (every YAML file but ``base.yaml``)."""
    return sorted(p for p in folder.rglob("*.yaml") if p.name != "base.yaml")


def config_name(path: Path, folder: Path) -> str:
    """``deit_tiny/lora_ensemble`` for ``<folder>/deit_tiny/lora_ensemble.yaml``."""
    return path.relative_to(folder).with_suffix("").as_posix()


def resolve(path: Path) -> dict[str, Any]:
    """The fully resolved config of ``path`` (``lorae fit --config path --print_config``)."""
    from lorae.cli import main

    out = io.StringIO()
    argv, sys.argv = sys.argv, sys.argv[:1]  # the generator's own options are not the CLI's
    try:
        with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
            main(["fit", "--config", str(path), "--print_config"])
    finally:
        sys.argv = argv
    resolved = yaml.safe_load(out.getvalue())
    if not isinstance(resolved, dict):
        raise RuntimeError(f"{path} did not resolve: {out.getvalue()[-500:]}")
    return resolved


def lookup(config: Any, key: str) -> Any:
    """The value at dotted ``key`` (list items by index), or ``_MISSING``."""
    for part in key.split("."):
        if isinstance(config, list) and part.isdigit() and int(part) < len(config):
            config = config[int(part)]
        elif isinstance(config, Mapping) and part in config:
            config = config[part]
        else:
            return _MISSING
    return config


def _matches(name: str, patterns: Any) -> Any:
    """The value of the first pattern of ``patterns`` (a mapping, or a list that may nest
    lists from YAML aliases) matching ``name``."""
    if not isinstance(patterns, Mapping):
        flat = [p for item in patterns for p in (item if isinstance(item, list) else [item])]
        return True if any(fnmatch.fnmatchcase(name, p) for p in flat) else None
    for pattern in patterns:
        if fnmatch.fnmatchcase(name, pattern):
            return patterns[pattern]
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return not isinstance(b, bool) and float(a) == float(b)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _show(value: Any) -> str:
    if value is _MISSING:
        return "(absent)"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    return str(value)


def check_setting(
    setting: Mapping[str, Any], resolved: Mapping[str, Mapping[str, Any]]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Each applicable config's value of one setting against the paper.

    Returns:
        One entry per config (``config``, ``value``, ``expected``, ``status``, ``reason``) and
        the failures (a config value neither the paper's nor a listed deviation).
    """
    entries, failures = [], []
    for name, config in resolved.items():
        applies = setting.get("applies_to")
        if applies is not None and not _matches(name, applies):
            continue
        value = lookup(config, setting["key"])
        per_config = setting.get("per_config") or {}
        expected = _matches(name, per_config) if _matches(name, list(per_config)) else None
        if expected is None:
            expected = setting.get("paper")
        if "paper_in" in setting:
            ok = any(_same(value, v) for v in setting["paper_in"])
        else:
            ok = _same(value, expected)
        deviation = _matches(name, setting.get("deviations") or {})
        if ok:
            status, reason = "match", ""
        elif deviation is not None and _same(value, deviation["value"]):
            status, reason = "deviation", deviation["reason"]
        else:
            status, reason = "FAIL", ""
            failures.append(
                f"{name}: {setting['name']} ({setting['key']}) is {_show(value)}, the paper's "
                f"is {_show(setting.get('paper_in', expected))} and no deviation is listed"
            )
        entries.append(
            {
                "config": name,
                "value": value,
                "expected": expected,
                "status": status,
                "reason": reason,
            }
        )
    return entries, failures


def _cell(entries: list[dict[str, Any]], what: str) -> str:
    groups: dict[str, list[str]] = {}
    for entry in entries:
        groups.setdefault(_show(entry[what]), []).append(entry["config"])
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{value} ({', '.join(names)})" for value, names in groups.items())


def _status(entries: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, str], list[str]] = {}
    for entry in entries:
        if entry["status"] != "match":
            groups.setdefault((entry["status"], entry["reason"]), []).append(entry["config"])
    if not groups:
        return "match"
    parts = []
    for (status, reason), names in groups.items():
        which = "all" if len(names) == len(entries) else ", ".join(names)
        parts.append(f"**{status}** ({which})" + (f": {reason}" if reason else ""))
    matched = len(entries) - sum(len(names) for names in groups.values())
    return ("match elsewhere; " if matched else "") + "; ".join(parts)


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def build(
    paper: Mapping[str, Any], repo: Path = REPO, resolver: Resolver = resolve
) -> tuple[str, list[str]]:
    """The Markdown of ``docs/recipes.md`` and the list of unexplained deviations."""
    lines = [
        "# The paper's recipes and lorae's configs",
        "",
        "Generated by `python scripts/make_recipes.py` from the paper's values in",
        "[`docs/recipes/paper.yaml`](recipes/paper.yaml) and each config resolved with",
        "`lorae fit --config <file> --print_config`; do not edit by hand (`tests/test_configs.py`",
        "fails when this file is stale or a config differs from the paper without a listed",
        "deviation). Each `configs/<dataset>/<method>.yaml` is one command,",
        "`lorae fit --config configs/<dataset>/<method>.yaml`: the method file starts with",
        "`base: base.yaml`, the data set's one recipe, which lorae merges in before parsing",
        "(`lorae/cli/compose.py`; later files win, mappings merge key by key).",
        "",
    ]
    failures: list[str] = []
    for dataset, spec in paper["datasets"].items():
        folder = repo / spec["folder"]
        configs = experiment_configs(folder)
        resolved = {config_name(p, folder): resolver(p) for p in configs}
        lines += [f"## {dataset}", ""]
        lines.append(f"Configs in `{spec['folder']}/`: " + ", ".join(f"`{n}`" for n in resolved))
        lines.append("")
        if spec.get("notes"):
            lines += [spec["notes"], ""]
        for key, reason in (spec.get("fragments_may_set") or {}).items():
            lines.append(f"- method files may set `{key}`: {reason}")
        if spec.get("fragments_may_set"):
            lines.append("")
        if not spec["settings"]:
            continue
        lines += [
            "| setting | paper (source) | config | status |",
            "| --- | --- | --- | --- |",
        ]
        for setting in spec["settings"]:
            entries, failed = check_setting(setting, resolved)
            failures += [f"{dataset}/{f}" for f in failed]
            if not entries:
                continue
            if "paper_in" in setting:
                paper_value = "one of " + _show(setting["paper_in"])
            else:
                paper_value = _cell(entries, "expected")
            row = [
                setting["name"],
                f"{paper_value}: {setting['source']}",
                _cell(entries, "value"),
                _status(entries),
            ]
            lines.append("| " + " | ".join(_escape(c) for c in row) + " |")
        lines.append("")
    return "\n".join(lines), failures


def main(argv: list[str] | None = None) -> int:
    """Write (or ``--check``) ``docs/recipes.md``; 1 on an unexplained deviation."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = parser.parse_args(argv)
    text, failures = build(load_paper())
    for failure in failures:
        print(f"unexplained deviation: {failure}", file=sys.stderr)
    if args.check:
        stale = not OUTPUT.is_file() or OUTPUT.read_text(encoding="utf-8") != text
        if stale:
            print(f"{OUTPUT} is stale: run python scripts/make_recipes.py", file=sys.stderr)
        return 1 if stale or failures else 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
