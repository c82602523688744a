"""The command line as a whole: its options, its help, its flag reference, and where each check lives."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import invoke

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def labelled_dir(photo_dir, tmp_path):
    """Two classes of four photos each."""
    import shutil

    root = tmp_path / "labelled"
    for name, sub in (("a", photo_dir / "a"), ("b", photo_dir / "b" / "c")):
        shutil.copytree(sub, root / name)
    return root


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--fraction", "0.5", "--per-class", "2"], "--fraction and --per-class contradict each other"),
        (["--fraction", "0"], "each fraction must lie in (0, 1]"),
        (["--layer-decay", "0"], "--layer-decay must lie in (0, 1]"),
        (["--val-split", "0.3", "--val", "{data}"], "--val and --val-split contradict each other"),
        (["--val-split", "1"], "--val-split must lie strictly between 0 and 1"),
    ],
)
def test_the_library_checks_settings_once_and_the_cli_says_so_with_exit_2(labelled_dir, tiny_weights, extra, message):
    """finetune's settings are checked by the library alone (finetune.check_recipe, labelled.load_labelled): its
    UsageError reaches the user as one line and exit 2, before any training."""
    extra = [str(labelled_dir) if a == "{data}" else a for a in extra]
    r = invoke("finetune", labelled_dir, "-w", tiny_weights, "--out", labelled_dir.parent / "run", *extra)
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert "Traceback" not in r.output
    assert not (labelled_dir.parent / "run" / "checkpoints").exists()


def commands():
    """(name, click command) for every command of the app, as --help lists them."""
    import typer

    from maecli.cli import app

    group = typer.main.get_command(app)
    return [(name, group.commands[name]) for name in group.list_commands(None)]


def test_each_short_flag_has_one_meaning():
    meanings: dict[str, set[str]] = {}
    for _, command in commands():
        for p in command.params:
            longs = [o for o in p.opts + p.secondary_opts if o.startswith("--")]
            for short in (o for o in p.opts if len(o) == 2 and o.startswith("-")):
                meanings.setdefault(short, set()).add(longs[0])
    assert meanings["-o"] == {"--out"} and meanings["-w"] == {"--weights"} and meanings["-f"] == {"--format"}
    assert all(len(longs) == 1 for longs in meanings.values()), meanings


def test_output_is_still_read_as_the_old_name_of_out(photo_dir, tiny_weights, tmp_path):
    target = tmp_path / "e.jsonl"
    r = invoke("embed", photo_dir, "-w", tiny_weights, "--workers", "0", "--output", target)
    assert r.exit_code == 0 and r.stdout == "" and target.read_text().count("\n") > 0, r.output
    r = invoke("embed", photo_dir, "-w", tiny_weights, "--out", target, "--output", target)
    assert r.exit_code == 2 and "--output is the old name of --out" in r.stderr
    assert "--output" not in invoke("embed", "--help").stdout


def test_help_lists_the_commands_in_the_order_of_a_workflow():
    order = [
        "pretrain",
        "reconstruct",
        "embed",
        "probe",
        "finetune",
        "predict",
        "export",
        "plot",
        "info",
        "serve",
        "shard",
    ]
    assert [name for name, _ in commands()] == order
    listed = [line.split()[0] for line in invoke("--help").stdout.split("Commands:")[1].splitlines() if line.strip()]
    assert listed == order


@pytest.mark.parametrize("name", [name for name, _ in commands()])
def test_help_shows_no_python_types_and_no_overflow_guards(name):
    r = invoke(name, "--help")
    assert r.exit_code == 0
    text = " ".join(r.stdout.split())  # as one line: the columns wrap anywhere
    for python in ("<list[", "<str>", "<int range>", "<float range>", "9223372036854775807", "<=x", "x>="):
        assert python not in text, (name, python)


def test_version_is_the_package_version():
    import maecli

    r = invoke("--version")
    assert r.exit_code == 0 and r.stdout == f"maecli {maecli.__version__}\n"


@pytest.mark.parametrize("arg", ["--help", "--version"])
def test_help_and_version_do_not_import_torch(arg):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "maecli", arg], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0 and r.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if "|" in line]
    assert "typer" in imported and not [m for m in imported if m.split(".")[0] in ("torch", "timm", "accelerate")]


def test_the_flag_reference_is_the_cli_s_own(tmp_path):
    """docs/reference.md's flag tables are generated (docs/make_reference.py): a flag added, renamed or
    re-explained without regenerating them fails here, and so the README's test command."""
    import subprocess
    import sys

    def check(*path):
        return subprocess.run(
            [sys.executable, "docs/make_reference.py", "--check", *map(str, path)],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )

    r = check()
    assert r.returncode == 0, r.stderr
    reference = (ROOT / "docs" / "reference.md").read_text(encoding="utf-8")
    assert "`--log-with`" in reference and "`--allow-data-change`" in reference
    drifted = tmp_path / "reference.md"
    drifted.write_text(reference.replace("| `--keep` | int | `2` |", "| `--keep` | int | `3` |"), encoding="utf-8")
    r = check(drifted)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1 and "make_reference.py" in r.stderr
