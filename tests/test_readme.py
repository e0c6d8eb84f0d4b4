"""README.md's flag tables say what the scripts' parsers do: the same flags, both ways, and the same defaults.

Each table follows a marker line `<!-- flags: SCRIPT -->` and has the columns `| flag | default | meaning |`.
A row's first cell names one or more flags, each in its own backticks (`--x/--no-x` is one flag); its
default cell holds one value per flag, separated by ", ", or one value for all of them:

- a number or a (backticked) word: the parser's default, compared as a number or a string; a trailing
  "(...)" is a comment (`0 (off)`);
- `on` / `off`: True / a default that turns the feature off (None, False or 0);
- `required`: a required flag; `one is required`: one of a required group of mutually exclusive flags;
- `preset`: set after parsing from the preset (the script's TRAIN_DEFAULTS, its model PRESETS, or demo.py's
  SAMPLING_PRESETS through PRESET_FLAGS), and
  `shapes 16, f16 16` states each preset's value (every preset, by a prefix of its name);
- `N things` for a list default: its length;
- blank, or words that are none of these (`best available`): a default the script works out itself, so
  the parser's must be None or False, and a number must also be in the flag's --help ("default 8").
"""
from __future__ import annotations

import argparse
import importlib
import re
from unittest import mock

import pytest

from tests.conftest import REPO

SCRIPTS = {"demo.py": "demo", "train_vqgan.py": "train_vqgan", "train_gpt.py": "train_gpt",
           "train_clip.py": "train_clip", "preencode.py": "preencode", "evaluate.py": "evaluate",
           "export.py": "export", "cluster.submit": "cluster.submit", "app.py": "app"}
FLAG = re.compile(r"--[a-z0-9][a-z0-9-]*")
NUMBER = re.compile(r"[-+]?(\d[\d_]*\.?\d*|\.\d+)(e[-+]?\d+)?")


class _Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def parser_of(module) -> argparse.ArgumentParser:
    """The script's parser as its parse_args builds it, caught at its parse_args call (nothing runs)."""
    if hasattr(module, "build_parser"):
        return module.build_parser()

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), pytest.raises(_Captured) as got:
        module.parse_args([])
    return got.value.parser


def readme_tables(text: str) -> dict[str, list[list[str]]]:
    """{script: [[flag cell, default cell, meaning], ...]} from every marked table."""
    tables: dict[str, list[list[str]]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.fullmatch(r"<!-- flags: (\S+) -->", line.strip())
        if not m:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        header = [c.strip() for c in lines[j].strip().strip("|").split("|")]
        assert header == ["flag", "default", "meaning"], (m.group(1), lines[j])
        rows = tables.setdefault(m.group(1), [])
        for row in lines[j + 2:]:
            if not row.startswith("|"):
                break
            # `\|` inside a cell is a literal bar (`--resume PATH\|auto`), not a column break.
            cells = [c.strip().replace("\0", "|") for c in row.replace("\\|", "\0").strip().strip("|").split("|")]
            rows.append(cells)
    return tables


README_TABLES = readme_tables((REPO / "README.md").read_text())


def _split(cell: str) -> list[str]:
    """The default cell's values: split at ", " outside backticks and parentheses."""
    items, depth, tick, cur = [], 0, False, ""
    for i, ch in enumerate(cell):
        tick ^= ch == "`"
        depth += (ch == "(") - (ch == ")")
        if ch == "," and not tick and depth == 0 and cell[i + 1:i + 2] == " ":
            items.append(cur.strip())
            cur = ""
        else:
            cur += ch
    items.append(cur.strip())
    return [] if items == [""] else items


def _literal(value: str) -> str:
    value = re.sub(r"\s*\([^()]*\)$", "", value.strip())  # `0 (off)`: the parenthesis is a comment
    return value.strip().strip("`")


def _is_number(text: str) -> bool:
    return NUMBER.fullmatch(text) is not None


def _presets(module) -> dict[str, dict]:
    """{preset: {dest: value}}: the training defaults and the model config of each preset."""
    models, train = getattr(module, "PRESETS", {}), getattr(module, "TRAIN_DEFAULTS", {})
    out = {}
    for name in {**models, **train}:
        cfg = models.get(name, {})
        out[name] = {**(dict(vars(cfg)) if hasattr(cfg, "__dict__") else dict(cfg)), **train.get(name, {})}
    # demo.py: sampling presets, PRESET_FLAGS = {argparse dest: SAMPLING_PRESETS key}
    for name, values in getattr(module, "SAMPLING_PRESETS", {}).items():
        out[name] = {dest: values[key] for dest, key in getattr(module, "PRESET_FLAGS", {}).items()}
    return out


def check_default(module, parser, action, said: str) -> str | None:
    """Why the README's default `said` for `action` is wrong, or None."""
    flag, default = action.option_strings[0], action.default
    value = _literal(said)
    if value == "required":
        return None if action.required else f"{flag}: README says required, the parser does not"
    if action.required:
        return f"{flag}: required, README says {said!r}"
    if value == "one is required":
        groups = [g for g in parser._mutually_exclusive_groups if action in g._group_actions and g.required]
        return None if groups else f"{flag}: not in a required group, README says {said!r}"
    presets = _presets(module)
    if value == "preset":
        if default is not None:
            return f"{flag}: README says preset, the parser's default is {default!r}"
        missing = [p for p, v in presets.items() if action.dest not in v]
        return f"{flag}: no preset sets {action.dest} ({missing or 'no presets'})" if missing or not presets else None
    per = [re.fullmatch(r"(\S+) (.+)", item) for item in _split(said)] if presets and default is None else []
    if per and all(per) and all(any(p.startswith(m.group(1)) for p in presets) for m in per):
        stated = {p: _literal(m.group(2)) for m in per for p in presets if p.startswith(m.group(1))}
        if set(stated) != set(presets):
            return f"{flag}: README gives presets {sorted(stated)}, the script has {sorted(presets)}"
        wrong = {p: (v, presets[p].get(action.dest)) for p, v in stated.items()
                 if not _same(v, presets[p].get(action.dest))}
        return f"{flag}: README's preset defaults differ (README, code): {wrong}" if wrong else None
    if value == "on":
        return None if default is True else f"{flag}: README says on, default {default!r}"
    if value == "off":
        return None if default in (None, False, 0) else f"{flag}: README says off, default {default!r}"
    if isinstance(default, list):
        m = re.fullmatch(r"(\d+) \w+", value)
        return None if m and int(m.group(1)) == len(default) else f"{flag}: README {said!r}, default {default!r}"
    if default is None or default is False:
        if _is_number(value) and not re.search(rf"default:? {re.escape(value)}\b", action.help or ""):
            return f"{flag}: README says {value}, the parser's default is {default!r} and its help does not say so"
        return None  # a default the script works out itself, described in words (or nothing)
    return None if _same(value, default) else f"{flag}: README says {said!r}, the parser's default is {default!r}"


def _same(text: str, default) -> bool:
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        return text == str(default)
    return _is_number(text) and float(text.replace("_", "")) == float(default)


def _script_flags(parser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings
            if s.startswith("--") and not isinstance(a, argparse._HelpAction)}


def table_problems(module, parser, rows: list[list[str]]) -> list[str]:
    """Everything on which a flag table and a parser disagree ([] = nothing)."""
    flags = _script_flags(parser)
    problems, listed = [], set()
    for flag_cell, default_cell, _meaning in rows:
        entries = [FLAG.findall(span) for span in re.findall(r"`([^`]*)`", flag_cell)]
        entries = [e for e in entries if e]
        listed.update(f for e in entries for f in e)
        actions = []
        for entry in entries:
            known = [flags[f] for f in entry if f in flags]
            if len(known) != len(entry) or len({id(a) for a in known}) != 1:
                continue  # unknown flags are reported below
            actions.append(known[0])
        if len(actions) != len(entries):
            continue
        values = _split(default_cell)
        if len(values) > 1 and len(entries) == 1:
            values = [default_cell]  # one flag, several words (`shapes 16, f16 16`)
        if len(values) == 1 and len(entries) > 1:
            values = values * len(entries)  # one value for the whole row (`preset`, `required`)
        if not values:
            values = [""] * len(entries)
        if len(values) != len(entries):
            problems.append(f"row {flag_cell!r}: {len(entries)} flags but {len(values)} defaults {default_cell!r}")
            continue
        for action, said in zip(actions, values):
            why = check_default(module, parser, action, said)
            if why:
                problems.append(why)
    missing, unknown = sorted(set(flags) - listed), sorted(listed - set(flags))
    return ([f"flags the README's table lacks: {missing}"] if missing else []) + \
        ([f"flags the script lacks: {unknown}"] if unknown else []) + problems


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_readme_flag_table_matches_the_parser(script):
    assert script in README_TABLES, f"README.md has no flag table for {script} (<!-- flags: {script} -->)"
    module = importlib.import_module(SCRIPTS[script])
    problems = table_problems(module, parser_of(module), README_TABLES[script])
    assert not problems, f"{script}: " + "; ".join(problems)


def test_the_checker_catches_wrong_defaults_and_missing_or_unknown_flags():
    """The comparison itself: a table that disagrees with a parser in each way is reported."""
    p = argparse.ArgumentParser()
    p.add_argument("--keep-every", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=None, help="images in the strip (default 8)")
    p.add_argument("--fast", action="store_true")
    p.add_argument("--l2-codes", action=argparse.BooleanOptionalAction, default=True)
    module = argparse.Namespace()
    keep, steps, fast, l2 = p._actions[1:]
    assert check_default(module, p, keep, "off") and check_default(module, p, keep, "500")
    assert check_default(module, p, keep, "10000") is None and check_default(module, p, keep, "10_000") is None
    assert check_default(module, p, steps, "8") is None and check_default(module, p, steps, "9")
    assert check_default(module, p, fast, "off") is None and check_default(module, p, fast, "on")
    table = readme_tables("<!-- flags: x.py -->\n| flag | default | meaning |\n| --- | --- | --- |\n"
                          "| `--keep-every`, `--steps` | 10000, 8 | cadence \\| strip |\n"
                          "| `--l2-codes/--no-l2-codes`, `--fast`, `--slow` | on, off, off | |\n")
    assert table["x.py"][0] == ["`--keep-every`, `--steps`", "10000, 8", "cadence | strip"]
    assert table_problems(module, p, table["x.py"]) == ["flags the script lacks: ['--slow']"]
    assert table_problems(module, p, table["x.py"][:1]) == [
        "flags the README's table lacks: ['--fast', '--l2-codes', '--no-l2-codes']"]
    module = argparse.Namespace(TRAIN_DEFAULTS={"shapes": {"batch_size": 16}, "f16-16384": {"batch_size": 16}})
    p.add_argument("--batch-size", type=int)
    bs = p._actions[-1]
    assert check_default(module, p, bs, "shapes 64, f16 16")
    assert check_default(module, p, bs, "shapes 16") and check_default(module, p, bs, "shapes 16, f16 16") is None
    assert check_default(module, p, bs, "preset") is None and check_default(module, p, steps, "preset")
