"""`maecli finetune` and `maecli predict`: a real tiny model end to end through the CLI, exact resume, bad input,
and the timm export of a classifier."""

import json
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import TINY, answers_each_path_in_turn
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from maecli.cli import app

CLASSES = ("blue", "green", "red")
# fast settings for the classifier runs: batch 8 over 24 training images is 3 steps an epoch
FAST = ["--batch-size", "8", "--workers", "0", "--warmup-epochs", "1", "--log-every", "1"]
LIGHT = ["--mixup", "0", "--cutmix", "0", "--aa", "none", "--reprob", "0"]  # the short-run recipe


def invoke(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def make_labelled(root, per_class=8, val_per_class=3, broken=False):
    """train/ and val/ with three classes of generated 32 px images: noisy squares, one dominant colour each."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 90, (32, 32, 3), dtype=np.uint8)
                x, y, s = rng.integers(0, 16, 3)
                img[y : y + 10 + s, x : x + 10 + s, 2 - c] = 230
                Image.fromarray(img).save(folder / f"{i:02d}.png")
    if broken:
        (root / "train" / "red" / "broken.jpg").write_bytes(b"not an image")
        (root / "val" / "red" / "broken.png").write_bytes(b"\x89PNG broken")
    return root


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    return make_labelled(tmp_path_factory.mktemp("labelled") / "shapes", broken=True)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, labelled):
    """A 2-step tiny pretrain on the training images, through the CLI."""
    out = tmp_path_factory.mktemp("pre") / "run"
    r = invoke("pretrain", labelled / "train", "--out", out, "--steps", "2", "--previews", "0", *TINY)
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, labelled, pretrained):
    """Two epochs of fine-tuning with --baseline and --json; returns (run folder, CLI result)."""
    out = tmp_path_factory.mktemp("ft") / "run"
    r = invoke(
        "finetune", labelled, "--weights", pretrained, "--out", out, "--epochs", "2", "--baseline", "--json", *FAST
    )
    assert r.exit_code == 0, r.output
    return out, r


def test_finetune_end_to_end(finetuned, labelled):
    out, r = finetuned
    result = json.loads(r.stdout)
    assert result["classes"] == list(CLASSES)
    for name in ("finetuned", "baseline"):
        assert set(result[name]) == {"top1", "top5", "best_epoch"}
        assert 0 <= result[name]["top1"] <= 1 and result[name]["top5"] is None  # 3 classes: top-5 would hold all
        assert result[name]["best_epoch"] in (1, 2)
    for folder in (out, out / "baseline"):
        config = json.loads((folder / "config.json").read_text())
        assert config["classes"] == list(CLASSES) and config["classifier"] == {"num_classes": 3, "pool": "mean"}
        # 8 steps: auto takes the light recipe, and the config records what it filled in
        assert config["finetune"]["recipe"] == "auto" and config["finetune"]["layer_decay"] == 0.75
        assert (config["finetune"]["mixup"], config["finetune"]["aa"], config["finetune"]["blr"]) == (0, "none", 5e-3)
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        val = [row for row in rows if "val_top1" in row]
        assert [row["epoch"] for row in val] == [1, 2] and all(
            "val_top5" not in row and "val_loss" in row for row in val
        )
        assert any("loss" in row and "lr" in row and "images_per_sec" in row for row in rows)
        per_class = json.loads((folder / "per_class.json").read_text())
        assert [c["class"] for c in per_class["classes"]] == list(CLASSES)
        assert [c["images"] for c in per_class["classes"]] == [3, 3, 3]  # the broken val image left out
    assert json.loads((out / "baseline" / "config.json").read_text())["finetune"]["scratch"] is True
    # the closing table, the per-class table and the skipped files on stderr
    assert "finetuned" in r.stderr and "scratch" in r.stderr and "best epoch" in r.stderr
    assert "skipped validation image" in r.stderr and "broken.png" in r.stderr
    assert "skipped" in r.stderr and "broken.jpg" in r.stderr
    assert "1 unreadable training file skipped" in r.stderr
    assert r.stderr.count("recipe light (auto: 8 steps, under 2000): mixup 0, cutmix 0, RandAugment off") == 2
    assert "hint:" not in r.stderr
    # the pretrained and the scratch run share data order and init seed but not weights
    a, b = load_file(out / "model.safetensors"), load_file(out / "baseline" / "model.safetensors")
    assert a.keys() == b.keys() and "head.weight" in a and "fc_norm.weight" in a
    assert not torch.equal(a["blocks.0.attn.qkv.weight"], b["blocks.0.attn.qkv.weight"])


def test_predict_through_a_pipe_matches_validation(finetuned, labelled):
    out, r = finetuned
    best_top1 = json.loads(r.stdout)["finetuned"]["top1"]
    paths = sorted(str(p) for p in (labelled / "val").rglob("*") if p.is_file())
    # paths on stdin, as `find ... | maecli predict -` gives them
    proc = invoke("predict", "-", "-w", out, "--workers", "0", "--top-k", "2", input="\n".join(paths) + "\n")
    assert proc.exit_code == 0, proc.output
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    readable = [p for p in paths if not p.endswith("broken.png")]
    assert [line["path"] for line in lines] == readable  # input order, the broken one left out
    for line in lines:
        assert line["class"] in CLASSES and len(line["top_k"]) == 2
        assert line["top_k"][0] == {"class": line["class"], "probability": line["probability"]}
        assert line["top_k"][0]["probability"] >= line["top_k"][1]["probability"]
    # predict reads images as validation does: the same weights give the same accuracy
    correct = sum(line["class"] == os.path.basename(os.path.dirname(line["path"])) for line in lines)
    assert correct / len(lines) == pytest.approx(best_top1)
    assert "skipped" in proc.stderr and "1 unreadable file skipped" in proc.stderr

    csv = invoke("predict", labelled / "val" / "red", "-w", out, "--format", "csv", "--workers", "0", "--strict")
    assert csv.exit_code == 1 and "broken.png" in csv.stderr and "--strict" in csv.stderr
    csv = invoke("predict", labelled / "val" / "blue", "-w", out, "--format", "csv", "--workers", "0")
    assert csv.exit_code == 0, csv.output
    header, *rows = csv.stdout.splitlines()
    assert header == "path,class,probability,class_2,probability_2,class_3,probability_3" and len(rows) == 3
    target = out.parent / "labels.jsonl"  # -o: to a file, as embed writes
    r = invoke("predict", labelled / "val" / "blue", "-w", out, "--workers", "0", "-o", target)
    assert r.exit_code == 0 and r.stdout == "" and len(target.read_text().splitlines()) == 3, r.output


def test_a_slow_pipe_gets_each_label_when_its_path_pauses(finetuned, labelled):
    out, _ = finetuned
    paths = sorted((labelled / "val").rglob("0*.png"))[:2]
    lines = answers_each_path_in_turn(["predict", "-w", str(out), "--workers", "2"], paths)
    assert [json.loads(line)["path"] for line in lines] == [str(p) for p in paths]


def test_export_to_timm_gives_the_same_logits(finetuned, tmp_path):
    import timm  # noqa: F401  (the printed snippet imports it too)

    from maecli.classifier import load_classifier

    out, _ = finetuned
    target = tmp_path / "classifier.safetensors"
    r = invoke("export", out, target, "--format", "timm")
    assert r.exit_code == 0, r.output
    snippet = "\n".join(
        line
        for line in (r.stdout + "\n" + r.stderr).splitlines()
        if line.startswith(("import ", "model = ", "model.load_state_dict", "classes = "))
    )
    assert "num_classes=3" in snippet and "global_pool='avg'" in snippet
    scope = {}
    exec(snippet, scope)  # strict load: every tensor has its place in timm's model
    ours, classes = load_classifier(out)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(scope["model"].eval()(x), ours(x), atol=1e-5)
    assert scope["classes"] == classes == list(CLASSES)


def test_a_finetuned_run_still_loads_as_an_encoder(finetuned):
    import maecli

    out, _ = finetuned
    with pytest.warns(UserWarning, match="fc_norm"):
        model = maecli.load(out)
    assert not model.has_decoder
    vectors = maecli.embed(model, torch.rand(2, 3, 32, 32))
    assert vectors.shape == (2, 32) and torch.isfinite(vectors).all()


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_weights):
    """A 3-epoch run (9 steps) with a checkpoint every 2 steps and at each epoch end: (data, run folder)."""
    root = tmp_path_factory.mktemp("resume")
    data = make_labelled(root / "data")
    r = invoke(
        "finetune",
        data,
        "--out",
        root / "a",
        "--weights",
        tiny_weights,
        "--epochs",
        "3",
        "--save-every",
        "2",
        "--keep",
        "10",
        *FAST,
    )
    assert r.exit_code == 0, r.output
    return data, root / "a"


@pytest.mark.parametrize("resume_from", [4, 6])  # mid-epoch; an epoch end, whose validation ran after the save
def test_resume_after_a_kill_is_exact(tmp_path, uninterrupted, resume_from):
    data, a = uninterrupted
    b = tmp_path / "b"
    shutil.copytree(a, b)
    # b "died" just after its checkpoint at `resume_from`: later checkpoints never happened; its later metrics rows
    # and best weights stay behind, as a kill leaves them
    for ckpt in (b / "checkpoints").iterdir():
        if int(ckpt.name[5:]) > resume_from:
            shutil.rmtree(ckpt)
    r = invoke("finetune", data, "--out", b, "--resume")
    assert r.exit_code == 0, r.output
    assert f"from step {resume_from}" in r.stderr
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "per_class.json").read_text() == (b / "per_class.json").read_text()
    last_a, last_b = (load_file(run / "checkpoints" / "step-00000009" / "model.safetensors") for run in (a, b))
    assert all(torch.equal(last_a[k], last_b[k]) for k in last_a)

    def rows(run):
        keep = ("step", "epoch", "loss", "lr", "val_top1", "val_top5", "val_loss")
        return [
            {k: v for k, v in json.loads(line).items() if k in keep}
            for line in (run / "metrics.jsonl").read_text().splitlines()
        ]

    assert rows(a) == rows(b)  # no validation row lost or repeated


def test_resume_refuses_other_training_images(tmp_path, uninterrupted):
    data, a = uninterrupted
    other, b = tmp_path / "data", tmp_path / "b"
    shutil.copytree(data, other)
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step-00000009")
    (other / "train" / "red" / "00.png").unlink()
    r = invoke("finetune", other, "--out", b, "--resume", "--epochs", "4")
    assert r.exit_code == 1 and "1 file removed (e.g. 'train/red/00.png')" in r.stderr, r.output
    assert "Traceback" not in r.output
    r = invoke("finetune", other, "--out", b, "--resume", "--epochs", "4", "--allow-data-change")
    assert r.exit_code == 0 and "going on with these" in r.stderr, r.output


def test_fraction_and_per_class_take_a_seeded_stratified_subset():
    from maecli.errors import DataError
    from maecli.labelled import Split
    from maecli.train.finetune import subset

    sizes = {"a": 10, "b": 20, "c": 4}
    paths = [f"{c}/{i:02d}.png" for c, n in sizes.items() for i in range(n)]
    split = Split(paths, [y for y, n in enumerate(sizes.values()) for _ in range(n)])
    half = subset(split, list(sizes), 0.5, None, seed=0)
    assert [half.labels.count(y) for y in range(3)] == [5, 10, 2]
    assert all(p.startswith("abc"[y]) for p, y in zip(half.paths, half.labels)) and half.paths == sorted(half.paths)
    assert subset(split, list(sizes), 0.5, None, seed=0) == half  # seeded
    assert subset(split, list(sizes), 0.5, None, seed=1) != half
    few = subset(split, list(sizes), None, 6, seed=0)
    assert [few.labels.count(y) for y in range(3)] == [6, 6, 4]
    with pytest.raises(DataError, match="leaves class c"):
        subset(split, list(sizes), 0.1, None, seed=0)


def one_class(root):
    make_labelled(root)
    for split in ("train", "val"):
        for name in CLASSES[1:]:
            shutil.rmtree(root / split / name)


def empty_class(root):
    make_labelled(root)
    for p in (root / "train" / "green").iterdir():
        p.unlink()


def unreadable_class(root):
    make_labelled(root)
    for p in (root / "train" / "green").iterdir():
        p.write_bytes(b"not an image")


def unreadable_val(root):
    make_labelled(root)
    for p in (root / "val").rglob("*.png"):
        p.write_bytes(b"\x89PNG broken")


def unknown_val_class(root):
    make_labelled(root)
    shutil.copytree(root / "val" / "red", root / "val" / "purple")


@pytest.mark.parametrize(
    "layout, extra, message",
    [
        (one_class, [], "class folder"),
        (empty_class, [], "no images"),
        (unreadable_class, [], "class green has no readable training image"),
        (unreadable_val, [], "has no readable validation image"),
        (unknown_val_class, [], "only in val: purple"),
        (make_labelled, ["--fraction", "0.01"], "leaves class blue"),
    ],
)
def test_bad_data_is_one_line_and_writes_nothing(tmp_path, tiny_weights, layout, extra, message):
    layout(tmp_path / "data")
    out = tmp_path / "run"
    r = invoke("finetune", tmp_path / "data", "--weights", tiny_weights, "--out", out, *extra, *FAST)
    assert r.exit_code == 1, r.output
    assert r.stderr.startswith("error: ") and message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--aa", "rand-m9-mstd0.5-inc"], "'inc' is not a RandAugment setting"),
        (["--aa", "rand-m99"], "magnitude 99 is out of range"),
        (["--img-size", "30"], "--img-size 30"),
    ],
)
def test_settings_that_cannot_work_are_a_bad_command_line(tmp_path, tiny_weights, flags, message):
    data = make_labelled(tmp_path / "data", per_class=2, val_per_class=1)
    out = tmp_path / "run"
    r = invoke("finetune", data, "--weights", tiny_weights, "--out", out, *flags, *FAST)
    assert r.exit_code == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.output
    assert not out.exists()


def test_resume_on_other_classes_says_what_changed_and_offers_no_overwrite(tmp_path, uninterrupted):
    data, a = uninterrupted
    other, b = tmp_path / "data", tmp_path / "b"
    shutil.copytree(data, other)
    shutil.copytree(a, b)
    for split in ("train", "val"):
        (other / split / "red").rename(other / split / "purple")
    r = invoke("finetune", other, "--out", b, "--resume")
    assert r.exit_code == 1 and "added: purple; removed: red" in r.stderr, r.output
    assert "--overwrite" not in r.stderr and "new --out" in r.stderr


def test_bad_weights_are_one_line(tmp_path, tiny_weights):
    data = make_labelled(tmp_path / "data")
    not_vit = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, str(not_vit))
    out = tmp_path / "run"
    r = invoke("finetune", data, "--weights", not_vit, "--out", out, *FAST)
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.output
    assert not out.exists()
    # predict needs a classifier: an MAE's weights are refused in one line
    r = invoke("predict", data / "val", "-w", tiny_weights, "--workers", "0")
    assert r.exit_code == 1 and "holds no classifier" in r.stderr and r.stderr.count("\n") == 1, r.output
    assert r.stdout == ""


def test_pillow_13_posterize_at_zero_bits_keeps_the_image():
    """RandAugment `inc1` asks for 0 bits at magnitude 10; Pillow 13 raises there, our floor keeps 1 bit."""
    from maecli.train.finetune import RECIPES, FinetuneArgs, train_transform

    transform = train_transform(FinetuneArgs(data="", weights="", **RECIPES["paper"]), 32, 3)
    ops = [op for t in transform.transforms for op in getattr(t, "ops", [])]
    posterize = next(op for op in ops if op.name == "PosterizeIncreasing")
    posterize.magnitude, posterize.magnitude_std, posterize.prob = 10, 0, 1.0
    img = Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3))
    out = np.asarray(posterize(img))
    assert set(np.unique(out)) <= {0, 128}  # one bit kept


def test_log_with_tensorboard_holds_the_validation_metrics(tmp_path, labelled, tiny_weights):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    r = invoke(
        "finetune",
        labelled,
        "--weights",
        tiny_weights,
        "--out",
        run,
        "--epochs",
        "2",
        "--log-with",
        "tensorboard",
        *FAST,
        *LIGHT,
    )
    assert r.exit_code == 0, r.output
    assert "hint:" not in r.stderr  # the short-run recipe asks for no advice
    events = EventAccumulator(str(run / "logs" / "maecli"), size_guidance={"scalars": 0})
    events.Reload()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = {row["step"]: row["val_top1"] for row in rows if "val_top1" in row}
    logged = {e.step: e.value for e in events.Scalars("val_top1")}
    assert list(logged) == list(val) == [4, 8]  # 25 training files (one broken) in batches of 8: 4 steps an epoch
    assert all(abs(logged[s] - val[s]) < 1e-6 for s in val)
    assert {"loss", "lr", "val_top1", "val_loss"} <= set(events.Tags()["scalars"])


def test_the_recipe_fills_what_the_user_left_unset_by_the_runs_length():
    from maecli.train.finetune import FinetuneArgs, with_recipe

    short = FinetuneArgs("data", weights="w", epochs=2, batch_size=8)  # 24 images: 3 steps an epoch, 6 in all
    args, line = with_recipe(short, 24)
    assert line == "recipe light (auto: 6 steps, under 2000)"
    assert (args.mixup, args.cutmix, args.aa, args.reprob, args.blr, args.crop_scale) == (0, 0, "none", 0, 5e-3, 0.35)
    assert args.warmup_epochs == 0.2  # 10% of the run
    args, line = with_recipe(replace(short, epochs=1000), 24)
    assert line == "recipe paper (auto: 3000 steps, at least 2000)" and (args.mixup, args.warmup_epochs) == (0.8, 5)
    args, line = with_recipe(replace(short, recipe="paper", mixup=0.1, blr=2e-3), 24)
    assert line == "recipe paper" and (args.mixup, args.cutmix, args.blr, args.crop_scale) == (0.1, 1.0, 2e-3, 0.08)


def test_the_papers_recipe_on_a_short_run_gets_a_hint(tmp_path, tiny_weights):
    data = make_labelled(tmp_path / "data", per_class=2, val_per_class=1)
    r = invoke("finetune", data, "-w", tiny_weights, "--out", tmp_path / "run", "--epochs", "1", "--recipe", "paper",
               *FAST)  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "recipe paper: mixup 0.8, cutmix 1, RandAugment rand-m9-mstd0.5-inc1" in r.stderr
    assert "hint: 1 step is a short fine-tuning" in r.stderr and "--recipe light" in r.stderr


def test_a_sweep_over_fractions_and_seeds_answers_did_it_pay(tmp_path, tiny_weights):
    data = make_labelled(tmp_path / "data", per_class=4, val_per_class=2)
    out = tmp_path / "sweep"
    flags = ["--epochs", "1", "--batch-size", "4", "--workers", "0", "--log-every", "1"]
    r = invoke("finetune", data, "-w", tiny_weights, "--out", out, "--fraction", "0.5,1", "--seeds", "2", "--json",
               *flags)  # fmt: skip
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout)
    assert [row["fraction"] for row in summary["rows"]] == [0.5, 1.0] and summary["seeds"] == 2
    assert [row["labels"] for row in summary["rows"]] == [6, 12]  # round(4 x 0.5) and 4 of each of 3 classes
    for row in summary["rows"]:
        for init in ("pretrained", "scratch"):
            runs = row[init]["runs"]
            assert len(runs) == 2 and abs(row[init]["mean"] - sum(runs) / 2) < 1e-9
        assert row["gain"] == row["pretrained"]["mean"] - row["scratch"]["mean"]
    assert json.loads((out / "sweep.json").read_text())["rows"] == summary["rows"]
    for fraction, seed in (("0.5", 0), ("0.5", 1), ("1", 0), ("1", 1)):
        assert (out / f"fraction-{fraction}" / f"seed-{seed}" / "baseline" / "model.safetensors").exists()
    assert "pretrained" in r.stderr and "± " in r.stderr and "mean ± std over 2 seeds" in r.stderr
    r = invoke("finetune", data, "-w", tiny_weights, "--out", out, "--fraction", "0.5,1", "--seeds", "2", "--resume",
               *flags)  # fmt: skip
    assert r.exit_code == 0 and r.stderr.count("resuming ") == 8, r.output  # 4 pairs, each at its last step
    png = tmp_path / "sweep.png"
    r = invoke("plot", out, "-o", png)
    assert r.exit_code == 0 and png.stat().st_size > 0, r.output


def test_overwrite_leaves_nothing_of_the_old_run(tmp_path, tiny_weights):
    """An old baseline/ or per_class.json that survives --overwrite would be read back as the new run's."""
    data = make_labelled(tmp_path / "data", per_class=2, val_per_class=1)
    out = tmp_path / "run"
    r = invoke("finetune", data, "-w", tiny_weights, "--out", out, "--epochs", "1", "--baseline", *FAST)
    assert r.exit_code == 0 and (out / "baseline" / "model.safetensors").exists(), r.output
    (out / "previews").mkdir()  # anything a training command writes, whichever made it
    r = invoke("finetune", data, "-w", tiny_weights, "--out", out, "--epochs", "1", "--overwrite", "--seed", "3", *FAST)
    assert r.exit_code == 0, r.output
    assert not (out / "baseline").exists() and not (out / "previews").exists()
    assert json.loads((out / "config.json").read_text())["finetune"]["seed"] == 3
