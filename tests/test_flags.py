"""The command line's numbers: every numeric flag of every command range-checked at the boundary (exit 2, the flag
named), settings that cannot work together refused as a bad command line before any training, and a batch larger
than the data capped with the learning rate scaled to the batch actually used.
"""

import pytest
from conftest import PHOTO, TINY, invoke, one_line_error


def numeric_flags():
    """(command, its required arguments, flag, int or float) for every number option of every command, found by
    looking at the CLI itself: a command added later is checked too."""
    import enum
    import typing

    import typer

    from maecli.cli import app

    for name, command in typer.main.get_command(app).commands.items():
        required = [name]
        for p in command.params:
            annotation = getattr(getattr(p, "type_descriptor", None), "annotation", None)
            if p.required or p.opts[0] == "--weights":  # finetune needs --weights unless it resumes
                kinds = typing.get_args(annotation) or (annotation,)
                choice = next((k for k in kinds if isinstance(k, type) and issubclass(k, enum.Enum)), None)
                value = next(iter(choice)).value if choice else "x"
                required += [value] if not p.opts[0].startswith("-") else [p.opts[0], value]
        for p in command.params:
            annotation = getattr(getattr(p, "type_descriptor", None), "annotation", None)
            kinds = set(typing.get_args(annotation) or (annotation,)) & {int, float}
            if kinds and p.opts[0].startswith("--") and not getattr(p, "is_flag", False):
                yield name, required, p, kinds.pop()


FLAGS = list(numeric_flags())


def test_the_flag_sweep_finds_the_flags():
    found = {(name, p.opts[0]) for name, _, p, _ in FLAGS}
    assert {
        ("pretrain", "--seed"),
        ("pretrain", "--warmup-epochs"),
        ("probe", "--val-split"),
        ("reconstruct", "--zoom"),
        ("serve", "--port"),
        ("embed", "--batch-size"),
    } <= found


@pytest.mark.parametrize("name, required, param, kind", FLAGS, ids=[f"{n} {p.opts[0]}" for n, _, p, _ in FLAGS])
def test_every_numeric_flag_is_range_checked(name, required, param, kind):
    flag = param.opts[0]
    if kind is int:
        assert param.min is not None and param.max is not None, f"{name} {flag} has no range"
        values = ["99999999999999999999", "-99999999999999999999"]
    else:
        values = ["nan", "inf", "-inf", "1e999", "-1"]
    for value in values:
        r = invoke(*required, flag, value)
        assert r.exit_code == 2, (name, flag, value, r.output)
        assert flag in r.stderr and "Traceback" not in r.output, (name, flag, value, r.stderr)


def test_settings_that_cannot_work_together_are_a_bad_command_line(photo_dir, tmp_path):
    for extra in (
        ["--img-size", "30", "--patch-size", "8"],
        ["--decoder-dim", "30", "--decoder-heads", "4"],
        ["--mask", "0.999"],
    ):
        args = [*TINY]
        for flag, value in zip(extra[::2], extra[1::2]):
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        one_line_error(invoke("pretrain", photo_dir, "--out", tmp_path / "run", *args), 2)
        assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_batch_larger_than_the_data_is_capped_and_the_lr_follows(tmp_path):
    data = tmp_path / "one"
    data.mkdir()
    (data / "only.jpg").write_bytes(PHOTO.read_bytes())
    args = [*TINY]
    args[args.index("--batch-size") + 1] = "64"
    r = invoke("pretrain", data, "--out", tmp_path / "run", "--steps", "1", "--previews", "0", *args)
    assert r.exit_code == 0, r.output
    assert "effective batch 1 (64, capped" in r.stderr and "x 1/256" in r.stderr, r.stderr
