"""Write the flag tables of docs/reference.md from the CLI itself, so that they cannot drift from `--help`.

    python docs/make_reference.py           # rewrite the tables in docs/reference.md
    python docs/make_reference.py --check   # exit 1, with one line, when docs/reference.md is out of date

Each command's table sits between `<!-- generated: flags COMMAND -->` and `<!-- end generated -->`; everything
outside the markers is prose, kept as written. The tables come from the click command tree of `maecli.cli.app`:
a command's usage, the first paragraph of its help, and per argument and option its names, type or choices,
default and help text. To change a table, change the option's help in maecli/cli/ and run this script.
"""

from __future__ import annotations

import argparse
import re
import sys
from enum import Enum
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "reference.md"
BLOCK = re.compile(r"(<!-- generated: flags (\S+) -->\n)(.*?)(<!-- end generated -->)", re.DOTALL)


def commands() -> dict:
    """{name: click command} for every command of the app, in the order --help lists them."""
    sys.path.insert(0, str(ROOT))  # document this checkout's CLI, whatever else is installed
    import typer

    from maecli.cli import app

    group = typer.main.get_command(app)
    return {name: group.commands[name] for name in group.list_commands(None)}


def names(param) -> str:
    if param.param_type_name == "argument":
        return f"`{shown_name(param)}`"
    return ", ".join(f"`{o}`" for o in sorted(param.opts, key=lambda o: not o.startswith("--")) + param.secondary_opts)


def shown_name(param) -> str:
    name = param.metavar or param.name.upper()
    return name + ("..." if param.nargs != 1 else "")


def type_of(param) -> str:
    """What the parameter takes: its choices, its metavar, or the plain type (int, float, path, text)."""
    if getattr(param, "is_flag", False):
        return "flag"
    choices = getattr(getattr(param, "type", None), "choices", None)  # click's Choice
    descriptor = getattr(param, "type_descriptor", None)  # typer 0.29 and later
    if descriptor is not None and descriptor.choices:
        choices = [c.value if isinstance(c, Enum) else c for c in descriptor.choices]
    if choices:
        return " \\| ".join(str(c) for c in choices)
    if param.param_type_name == "option" and param.metavar:
        return param.metavar.strip("<>")
    if descriptor is not None:
        annotation = descriptor.annotation
        for kind, name in ((bool, "flag"), (int, "int"), (float, "float"), (Path, "path"), (str, "text")):
            if annotation is kind or kind in getattr(annotation, "__args__", ()):
                return name
    return getattr(getattr(param, "type", None), "name", "text")


def default_of(param) -> str:
    if param.required:
        return "required"
    default = param.default
    if getattr(param, "is_flag", False) and param.secondary_opts:
        return f"`{param.opts[0] if default else param.secondary_opts[0]}`"
    if default is None or default is False or default == [] or default == ():
        return ""
    if isinstance(default, Enum):
        default = default.value
    return f"`{default}`"


def cell(text: str) -> str:
    """One table cell: one line, with the characters markdown would take as a column or an HTML tag escaped."""
    return " ".join(text.split()).replace("|", "\\|").replace("<", "\\<")


def table(name: str, command) -> str:
    params = [p for p in command.params if not getattr(p, "hidden", False)]
    arguments = " ".join(shown_name(p) for p in params if p.param_type_name == "argument")
    first_paragraph = cell((command.help or "").split("\n\n")[0])
    lines = [
        "```",
        f"maecli {name} [OPTIONS] {arguments}".rstrip(),
        "```",
        "",
        first_paragraph,
        "",
        "| argument or option | takes | default | meaning |",
        "|---|---|---|---|",
    ]
    for p in sorted(params, key=lambda p: p.param_type_name != "argument"):
        lines.append(f"| {names(p)} | {type_of(p)} | {default_of(p)} | {cell(p.help or '')} |")
    return "\n".join(lines) + "\n"


def generate(text: str) -> str:
    """`text` (docs/reference.md) with every generated block rewritten from the app."""
    found = commands()
    blocks = [m.group(2) for m in BLOCK.finditer(text)]
    missing = [name for name in found if name not in blocks]
    unknown = [name for name in blocks if name not in found]
    if missing or unknown:
        raise SystemExit(
            f"docs/reference.md: no block for {', '.join(missing) or 'none'}; blocks for unknown commands: "
            f"{', '.join(unknown) or 'none'}"
        )
    return BLOCK.sub(lambda m: m.group(1) + table(m.group(2), found[m.group(2)]) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the file differs from what it would be")
    parser.add_argument("path", nargs="?", type=Path, default=REFERENCE)
    args = parser.parse_args(argv)
    text = args.path.read_text(encoding="utf-8")
    new = generate(text)
    if args.check:
        if new != text:
            print(f"{args.path} is out of date with the CLI: run python docs/make_reference.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.path.write_text(new, encoding="utf-8")
        print(f"rewrote the flag tables in {args.path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
