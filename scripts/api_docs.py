"""Write docs/api.md, the reference of sparse-ft's public API, from the docstrings of ``sparse_ft.__all__``.

    .venv/bin/python scripts/api_docs.py            # regenerate docs/api.md
    .venv/bin/python scripts/api_docs.py --check    # exit 1 when docs/api.md is stale (tests/api/test_docs.py)

Each name gets its signature and docstring; a dataclass (a method config, the sparsity report) its fields and
citation, another class its own public methods and properties (not those it inherits from torch or transformers).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "api.md"
FOREIGN = ("torch", "transformers", "builtins", "abc")  # modules whose members are not ours to document


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def _doc(obj, indent: str = "") -> str:
    return (inspect.getdoc(obj) or "(no docstring)").replace("\n", "\n" + indent)


def _members(cls: type) -> list[tuple[str, object]]:
    """Public methods and properties that ``cls`` or its sparse-ft bases define, in definition order."""
    seen, members = set(), []
    for klass in cls.__mro__:
        if klass.__module__.split(".")[0] in FOREIGN or klass is object:
            continue
        for name, value in vars(klass).items():
            if name.startswith("_") or name in seen or not (
                    callable(value) or isinstance(value, (property, classmethod, staticmethod))):
                continue
            seen.add(name)
            members.append((name, getattr(cls, name) if not isinstance(value, property) else value))
    return members


def _section(name: str, obj) -> list[str]:
    if isinstance(obj, dict):  # METHODS
        rows = [f"| `{key}` | `{value.__name__}` |" for key, value in obj.items()]
        return [f"### `{name}`", "", "Method name → config class (`sparse_ft.methods`).", "",
                "| name | config |", "|---|---|", *rows, ""]
    kind = "class" if inspect.isclass(obj) else "function"
    lines = [f"### `{name}{_signature(obj)}`", "", f"*{kind}, `{obj.__module__}`*", "", _doc(obj), ""]
    if inspect.isclass(obj) and dataclasses.is_dataclass(obj):
        fields = [f"`{f.name}={f.default!r}`" for f in dataclasses.fields(obj) if f.default is not dataclasses.MISSING]
        if fields:
            lines += [f"Fields: {', '.join(fields)}.", ""]
        if getattr(obj, "citation", ""):
            lines += [f"Source: {obj.citation}.", ""]
    elif inspect.isclass(obj):
        for member, value in _members(obj):
            if isinstance(value, property):
                lines += [f"- **`.{member}`** (property): {_doc(value.fget, '  ')}", ""]
            else:
                lines += [f"- **`.{member}{_signature(value)}`**: {_doc(value, '  ')}", ""]
    return lines


def render() -> str:
    sys.path.insert(0, str(ROOT))
    import sparse_ft

    lines = ["# sparse-ft API reference", "",
             "Generated from the docstrings by `.venv/bin/python scripts/api_docs.py`; do not edit by hand.", "",
             inspect.getdoc(sparse_ft), "", "## Names", ""]
    for name in sparse_ft.__all__:
        lines += _section(name, getattr(sparse_ft, name))
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/api.md differs from the docstrings")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not OUTPUT.is_file() or OUTPUT.read_text() != text:
            print(f"{OUTPUT.relative_to(ROOT)} is stale: run .venv/bin/python scripts/api_docs.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(text)
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
