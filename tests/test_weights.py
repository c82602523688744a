"""Weights refused when they are read: tensors that would compute nonsense (NaN, inf, integers, booleans), broken
Hugging Face configs, .pth files whose records inflate far past their size, and a checkpoint whose optimizer state
would run code when unpickled (refused on resume, the code never run).

embed and reconstruct refuse with one line on stderr naming the file and what is wrong with it. Broken and hostile
weights through `maecli.load` and `pretrain --init-from` are tested in test_bad_inputs.py, other libraries' formats
in test_interop.py.
"""

import json
import os
import time
import zipfile
from pathlib import Path

import torch
from bad_images import WritesAFile
from conftest import PHOTO, RUN, invoke, one_line_error
from safetensors.torch import load_file, save_file

import maecli


def test_weights_that_cannot_compute_are_refused(tmp_path, tiny_weights):
    state = load_file(tiny_weights)
    meta = {"maecli_config": json.dumps(maecli.load(tiny_weights).cfg.to_dict())}
    cases = {
        "nan": (
            {**state, "blocks.1.attn.qkv.weight": state["blocks.1.attn.qkv.weight"].clone().fill_(float("nan"))},
            "tensor blocks.1.attn.qkv.weight holds NaN or inf",
        ),
        "inf": (
            {**state, "norm.bias": torch.full_like(state["norm.bias"], float("inf"))},
            "tensor norm.bias holds NaN",
        ),
        "int": ({k: v.to(torch.int64) for k, v in state.items()}, "holds int64 values"),
        "bool": ({**state, "cls_token": state["cls_token"] > 0}, "tensor cls_token holds bool values"),
    }
    for name, (tensors, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata=meta)
        for command in ("embed", "reconstruct"):
            one_line_error(invoke(command, PHOTO, "-w", path), 1, message, str(path))
        if name in ("nan", "inf"):  # the same through the pickle reader (found before the heads are asked for)
            torch.save({"model": tensors}, tmp_path / f"{name}.pth")
            one_line_error(invoke("embed", PHOTO, "-w", tmp_path / f"{name}.pth"), 1, message)


def hf_folder(tmp_path: Path, tiny_weights) -> Path:
    folder = tmp_path / "hf"
    r = invoke("export", tiny_weights, folder, "--format", "hf")
    assert r.exit_code == 0, r.output
    return folder


def test_a_broken_hugging_face_config_is_refused(tmp_path, tiny_weights):
    folder = hf_folder(tmp_path, tiny_weights)
    good = json.loads((folder / "config.json").read_text())
    assert invoke("embed", PHOTO, "-w", folder).exit_code == 0
    for text, message in [
        ('{"model_type": "vit_mae", "hidden_size": 32,', "is not readable JSON"),
        ("[1, 2]", "holds a JSON list"),
        (json.dumps({**good, "layer_norm_eps": "1e-6"}), "layer_norm_eps is '1e-6'"),
        (json.dumps({**good, "num_attention_heads": 0}), "num_attention_heads is 0"),
        (json.dumps({**good, "norm_pix_loss": "yes"}), "norm_pix_loss is 'yes'"),
        (json.dumps({**good, "model_type": "bert"}), "is a 'bert' config"),
    ]:
        (folder / "config.json").write_text(text)
        one_line_error(invoke("embed", PHOTO, "-w", folder), 1, message)


def test_a_pth_whose_records_inflate_is_refused_before_reading(tmp_path):
    """A torch.save zip whose one record deflates from a few hundred kB to 256 MiB: refused at once."""
    plain = tmp_path / "plain.pth"
    torch.save({"model": {"pos_embed": torch.zeros(64 * 2**20)}}, plain)  # 256 MiB of zeros
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    plain.unlink()
    assert bomb.stat().st_size < 2 * 2**20
    t0 = time.time()
    line = one_line_error(invoke("embed", PHOTO, "-w", bomb), 1, "refused", "zip bomb")
    assert time.time() - t0 < 5 and "256 MiB" in line


def test_a_malicious_optimizer_pickle_is_not_run(tmp_path, small_dir):
    out = tmp_path / "run"
    r = invoke("pretrain", small_dir, "--out", out, *RUN, "--steps", "5")
    assert r.exit_code == 0, r.output
    marker = tmp_path / "pwned"
    # an optimizer.pt whose unpickling would run a shell command
    torch.save(
        {"state": {}, "param_groups": [], "payload": WritesAFile(marker)},
        out / "checkpoints" / "step-00000005" / "optimizer.pt",
    )
    r = invoke("pretrain", small_dir, "--out", out, "--resume", "--steps", "6")
    assert r.exit_code == 1 and "none of the 1 checkpoints" in r.stderr and "is unusable" in r.stderr
    assert not marker.exists()


def test_a_fifo_as_weights_is_refused_without_opening_it(tmp_path, photo_dir):
    """Opening a FIFO for reading waits for a writer: every command that takes --weights would hang."""
    from typer.testing import CliRunner

    from maecli.cli import app

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    for command in (["predict", str(photo_dir)], ["embed", str(photo_dir)], ["reconstruct", str(photo_dir)]):
        r = CliRunner().invoke(app, [*command, "-w", str(fifo)])
        assert r.exit_code == 1 and "is not a regular file" in r.stderr, (command, r.output)
