"""Images to model input: the one-pass normalization, the seeded training crops, batch-at-once decoding that gives
what image-by-image decoding gives (training and inference paths alike), loader workers that stop when their
sources fail, and bad files decoded once rather than once per image."""

import time

import pytest
import torch
from conftest import EXAMPLES, PHOTO
from torchvision.transforms import v2

from maecli import data as D


@pytest.mark.parametrize("c", [1, 3])
def test_one_pass_normalization_matches_torchvision(c):
    x = torch.randint(0, 256, (c, 17, 23), dtype=torch.uint8)
    ref = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(*D.mean_std(c))])(x)
    out = D.ToModelInput(c)(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("c", [1, 3])
def test_training_crops_are_the_seeded_torchvision_ones(c):
    """Seeding only the CPU generator draws the same crops as torch.manual_seed, and leaves the caller's RNG alone."""
    paths = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".jpg", ".png"))[:3]
    ds = D.PretrainDataset(paths, 32, c, seed=7)
    reference = v2.Compose(
        [
            v2.RandomResizedCrop(32, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(*D.mean_std(c)),
        ]
    )
    state = torch.get_rng_state()
    for i, p in enumerate(paths):
        x, failed = ds[(2, i)]
        assert not failed
        torch.manual_seed(D.sample_seed(7, 2, i))
        torch.testing.assert_close(x, reference(D.decode(p, c, ds.min_side)), atol=1e-6, rtol=0)
        torch.set_rng_state(state)
        assert torch.equal(ds[(2, i)][0], x)  # a pure function of (seed, epoch, index)
        assert torch.equal(torch.get_rng_state(), state)


def test_float_image_tensors_are_taken_as_0_to_1():
    x = torch.rand(3, 8, 8)
    torch.testing.assert_close(
        D.ToModelInput(3)((x * 255).round().to(torch.uint8)),
        D.ToModelInput(3)((x * 255).round() / 255),
        atol=1e-5,
        rtol=0,
    )
    assert torch.equal(x, x.clone())  # the input is not changed in place


def test_a_batch_at_once_gives_the_items_one_by_one(bad_images_dir, monkeypatch):
    """__getitems__ (decode the whole micro-batch, then crop it) returns what __getitem__ returns for each slot:
    the same tensors, the same substitutes for broken files, the same failures, in order."""
    paths = D.find_images(bad_images_dir)
    ds = D.PretrainDataset(paths, 32, 3, seed=3)
    crop = ds.transform

    def transform(img):  # a file that decodes but cannot be cropped is skipped like a broken one
        out = crop(img)  # draws from the generator first, as a crop failing midway would
        if img.shape[-2:] == (1, 1):
            raise RuntimeError("nothing to crop")
        return out

    monkeypatch.setattr(ds, "transform", transform)
    items = [(1, i) for i in range(len(paths))]
    batch = ds.__getitems__(items)
    fresh = D.PretrainDataset(paths, 32, 3, seed=3)  # a dataset reports a bad file once (then knows it): a new one
    monkeypatch.setattr(fresh, "transform", transform)
    one_by_one = [fresh[item] for item in items]
    assert len(batch) == len(one_by_one) == len(items)
    for (x, failed), (y, failed_y) in zip(batch, one_by_one):
        assert torch.equal(x, y) and failed == failed_y
    skipped = {path for _, failed in batch for path, _ in failed}
    assert str(bad_images_dir / "one_pixel.png") in skipped and str(bad_images_dir / "empty.jpg") in skipped
    # and each slot holds the first file from its own on that decodes and crops, cropped with the slot's seed
    for (epoch, index), (x, failed) in zip(items, batch):
        for attempt in range(len(paths)):
            try:
                img = D.decode(paths[(index + attempt) % len(paths)], 3, ds.min_side)
            except Exception:
                continue
            if img.shape[-2:] != (1, 1):
                break
        torch.manual_seed(D.sample_seed(3, epoch, index))
        assert torch.equal(x, crop(img)) and len(failed) <= attempt  # bad files passed over, each reported once:
    reported = [path for _, failed in batch for path, _ in failed]
    assert len(reported) == len(set(reported))


def test_embed_reads_a_batch_as_it_reads_each_source(bad_images_dir):
    from PIL import Image

    ds = D.EvalImages(32, 3)
    sources = list(D.find_images(bad_images_dir)) + [
        Image.new("RGB", (40, 30), (200, 10, 10)),
        torch.zeros(1, 8, 8, dtype=torch.uint8),
    ]
    items = list(enumerate(sources))
    batch = ds.__getitems__(items)
    assert [p for p, _, _ in batch] == list(range(len(sources)))
    for (_, x, failure), item in zip(batch, items):
        _, y, failure_y = ds[item]
        assert failure == failure_y and (x is None) == (y is None) and (x is None or torch.equal(x, y))
    assert batch[-1][2] is not None and batch[-2][2] is None  # the wrong-shape tensor fails, the PIL image reads
    assert sum(f is not None for _, _, f in batch) > 5  # the folder's broken files are reported one by one


def test_loader_workers_stop_when_the_sources_fail():
    import multiprocessing

    from maecli.data import eval_batches

    def sources():
        yield from [PHOTO] * 5
        raise ValueError("the list of inputs broke")

    seen = []
    with pytest.raises(ValueError, match="broke"):
        for items, _ in eval_batches(sources(), 32, 3, batch_size=2, workers=2):
            seen += items
    assert seen == [PHOTO] * 5  # everything before the failure came through, in order
    deadline = time.time() + 30
    while multiprocessing.active_children() and time.time() < deadline:
        time.sleep(0.1)
    assert not multiprocessing.active_children()


def test_known_bad_files_are_not_read_again(tmp_path, monkeypatch):
    from maecli import data

    paths = []
    for i in range(300):
        (tmp_path / f"{i:03d}.jpg").write_bytes(b"")
        paths.append(tmp_path / f"{i:03d}.jpg")
    paths.append(PHOTO)
    reads = []
    decode = data.decode
    monkeypatch.setattr(data, "decode", lambda path, *a, **k: (reads.append(path), decode(path, *a, **k))[1])
    dataset = data.PretrainDataset(paths, 32, 3, seed=0)
    items = dataset.__getitems__([(0, i) for i in range(len(paths))])
    assert all(x.shape == (3, 32, 32) for x, _ in items)
    # each bad file once, the good one per slot; not every slot retrying the bad files after it (300 x 301 / 2 reads)
    assert len(reads) <= 2 * len(paths)
    failed = [f for _, fs in items for f in fs]
    assert len(failed) == 300 and len({path for path, _ in failed}) == 300  # each reported once
