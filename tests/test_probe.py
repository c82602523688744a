"""`maecli probe` on tiny labelled folders of real images, the probes' math, and `pretrain --probe`."""

import json
import shutil

import pytest
import torch
from conftest import EXAMPLES, TINY, invoke, one_line_error

from maecli.labelled import load_labelled
from maecli.probe import knn_scores, linear_probe, topk_accuracy


def labelled(root, layout):
    """Class folders of real images: {class: [example file names]}."""
    for cls, names in layout.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(EXAMPLES / name, root / cls / name)
    return root


GRAY = ["skimage_camera_gray.png", "skimage_coins_gray.png", "skimage_moon_gray.png", "skimage_grass_gray.png"]
COLOR = ["skimage_astronaut.jpg", "skimage_chelsea.jpg", "skimage_coffee.jpg", "skimage_rocket.jpg"]


@pytest.fixture
def classes_dir(tmp_path):
    return labelled(tmp_path / "data", {"gray": GRAY, "color": COLOR})


# -- the math -----------------------------------------------------------------------------------


def test_knn_votes_are_temperature_weighted():
    train = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6], [-1.0, 0.1]])
    labels = torch.tensor([0, 1, 1, 2])
    query = torch.tensor([[2.0, 0.0], [-3.0, 0.0]])  # length must not matter: cosine
    scores = knn_scores(train, labels, query, num_classes=3, k=3, temperature=0.07)
    # one neighbour at similarity 1 outvotes two at 0.8 when T is small...
    assert scores[0].argmax() == 0
    torch.testing.assert_close(scores[0], torch.tensor([torch.e ** (1 / 0.07), 2 * torch.e ** (0.8 / 0.07), 0.0]))
    assert scores[1].argmax() == 2
    # ...while a flat temperature makes it a near-majority vote
    assert knn_scores(train, labels, query[:1], num_classes=3, k=3, temperature=1.0)[0].argmax() == 1
    # k larger than the training set uses all of it
    assert knn_scores(train, labels, query, num_classes=3, k=50).shape == (2, 3)


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.1], [0.2, 0.3, 0.5]])
    assert topk_accuracy(scores, torch.tensor([1, 0, 0])) == {"top1": 2 / 3, "top5": None}
    many = torch.arange(70.0).reshape(7, 10)  # every row ranks class 9 first, then 8, 7, ...
    acc = topk_accuracy(many, torch.tensor([9, 8, 7, 6, 5, 4, 0]))
    assert acc == {"top1": 1 / 7, "top5": 5 / 7}


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.arange(4).repeat(50)
    x = centers[y] + torch.randn(200, 16, generator=g)
    logits = linear_probe(x[:160], y[:160], x[160:], 4, epochs=20, batch_size=32)
    assert topk_accuracy(logits, y[160:])["top1"] == 1.0
    again = linear_probe(x[:160], y[:160], x[160:], 4, epochs=20, batch_size=32)
    assert torch.equal(logits, again)  # seeded


# -- the layouts --------------------------------------------------------------------------------


def test_layouts(tmp_path, classes_dir):
    d = load_labelled(classes_dir, val_split=0.25)
    assert d.classes == ["color", "gray"]
    assert (len(d.train.paths), len(d.val.paths)) == (6, 2)  # one of each class held out
    assert sorted(d.val.labels) == [0, 1]
    assert set(d.train.paths).isdisjoint(d.val.paths)
    split = labelled(tmp_path / "split" / "train", {"a": GRAY[:2], "b": COLOR[:2]}).parent
    labelled(split / "test", {"a": GRAY[2:3], "b": COLOR[2:]})
    d = load_labelled(split)
    assert (len(d.train.paths), len(d.val.paths)) == (4, 3) and d.val.labels == [0, 1, 1]
    d = load_labelled(split / "train", val=split / "test")
    assert (len(d.train.paths), len(d.val.paths)) == (4, 3)


@pytest.mark.parametrize(
    "case,message",
    [
        ("one class", "holds 1 class folder(s) (only); a probe needs one subfolder per class, at least two"),
        ("empty class", "class folder(s) with no images in"),
        ("mismatch", "classes differ between train and val: only in train: b; only in val: c"),
        ("train only", "holds train/ but no val/ or test/"),
        ("val twice", "already holds train/ and val/; drop --val/--val-split"),
        ("tiny class", "class b has only 1 image; --val-split needs at least 2 per class"),
    ],
)
def test_bad_layouts_are_refused_clearly(tmp_path, tiny_weights, case, message):
    root = tmp_path / "data"
    extra = []
    if case == "one class":
        labelled(root, {"only": GRAY})
    elif case == "empty class":
        labelled(root, {"a": GRAY})
        (root / "b").mkdir()
    elif case in ("mismatch", "val twice"):
        labelled(root / "train", {"a": GRAY[:2], "b": COLOR[:2]})
        labelled(root / "val", {"a": GRAY[2:], "c": COLOR[2:]})
        if case == "val twice":
            extra = ["--val", root / "val"]
    elif case == "train only":
        labelled(root / "train", {"a": GRAY, "b": COLOR})
    elif case == "tiny class":
        labelled(root, {"a": GRAY, "b": COLOR[:1]})
    r = invoke("probe", root, "-w", tiny_weights, *extra)
    assert r.exit_code == 1, r.output
    assert message in r.stderr and "Traceback" not in r.output and r.stdout == ""


def test_flag_errors(classes_dir, tiny_weights):
    r = invoke("probe", classes_dir, "-w", tiny_weights, "--val", classes_dir, "--val-split", "0.3")
    assert r.exit_code == 2 and "contradict" in r.stderr
    r = invoke("probe", classes_dir, "-w", tiny_weights, "--val-split", "1.5")
    assert r.exit_code == 2 and "--val-split" in r.stderr
    r = invoke("probe", classes_dir, "-w", tiny_weights, "--val-split", "1")
    assert r.exit_code == 2 and "strictly between 0 and 1" in r.stderr
    r = invoke("probe", classes_dir / "nope", "-w", tiny_weights)
    assert r.exit_code == 1 and "does not exist" in r.stderr


# -- end to end ---------------------------------------------------------------------------------


def test_probe_both_methods_with_baseline_as_json(classes_dir, tiny_weights):
    r = invoke(
        "probe",
        classes_dir,
        "-w",
        tiny_weights,
        "--val-split",
        "0.5",
        "--baseline",
        "--json",
        "--epochs",
        "5",
        "--k",
        "3",
    )
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)  # stdout holds only the JSON
    assert set(result) == {"knn", "linear", "baseline", "n_train", "n_val", "classes"}
    assert (result["n_train"], result["n_val"], result["classes"]) == (4, 4, ["color", "gray"])
    for accs in (result["knn"], result["linear"], result["baseline"]["knn"], result["baseline"]["linear"]):
        assert set(accs) == {"top1", "top5"} and 0 <= accs["top1"] <= 1 and accs["top5"] is None
    assert set(result["baseline"]) == {"knn", "linear"}
    assert "random init" in r.stderr and "kNN top-1" in r.stderr and "linear top-1" in r.stderr


def test_probe_one_method_without_baseline(classes_dir, tiny_weights):
    r = invoke("probe", classes_dir, "-w", tiny_weights, "--method", "knn", "--json")
    assert r.exit_code == 0, r.output
    result = json.loads(r.stdout)
    assert result["linear"] is None and result["baseline"] is None and result["knn"]["top1"] >= 0
    assert "random init" not in r.stderr


def test_pretrain_logs_knn_at_each_epoch_end(tmp_path, photo_dir, classes_dir):
    out = tmp_path / "run"
    r = invoke("pretrain", photo_dir, "--out", out, "--steps", "4", "--probe", classes_dir, *TINY)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    probes = [row for row in rows if "knn_top1" in row]
    assert [(row["step"], row["epoch"]) for row in probes] == [(2, 1), (4, 2)]
    assert all(0 <= row["knn_top1"] <= 1 for row in probes)
    assert "kNN top-1" in r.stderr
    one_class = labelled(tmp_path / "one", {"only": GRAY})
    r = invoke("pretrain", photo_dir, "--out", tmp_path / "run2", "--steps", "2", "--probe", one_class, *TINY)
    assert r.exit_code == 1 and "a probe needs one subfolder per class" in r.stderr  # before any step
    assert not (tmp_path / "run2" / "checkpoints").exists()


def test_a_class_left_without_a_readable_image_is_refused(tmp_path, tiny_weights):
    data = tmp_path / "labelled"
    (data / "cats").mkdir(parents=True)
    (data / "junk").mkdir()
    for i, photo in enumerate(sorted(EXAMPLES.glob("*.jpg"))[:5]):
        (data / "cats" / f"{i}.jpg").write_bytes(photo.read_bytes())
        (data / "junk" / f"{i}.jpg").write_bytes(b"not an image")
    one_line_error(invoke("probe", data, "-w", tiny_weights, "--workers", "0"), 1, "junk")
