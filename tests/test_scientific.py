"""Images a scientist has: 16-bit with an offset, many bands, DICOM, with statistics measured on the data. Readers
and statistics pinned against numpy; the real CLI trained and used end to end on folders made from real photos."""

import json

import numpy as np
import pytest
import torch
from conftest import TINY, invoke, one_line_error

tifffile = pytest.importorskip("tifffile")

from scientific import (  # noqa: E402
    OFFSET,
    write_dicom_folder,
    write_gray16_folder,
    write_six_band_folder,
)

from maecli import readers  # noqa: E402
from maecli import stats as S  # noqa: E402


def read(path, **kw):
    return readers.read(path, readers.Request(**kw))


# ----------------------------------------------------------------------------------------------
# Readers


def test_16_bit_gray_keeps_its_levels(tmp_path):
    arrays = write_gray16_folder(tmp_path / "g", n=2)
    for name, expected in zip(("scan0.tif", "scan1.png"), arrays):
        d = read(tmp_path / "g" / name)
        assert d.pixels.dtype == np.float32 and d.pixels.shape == (1, 48, 48)
        np.testing.assert_array_equal(d.pixels[0], expected)  # no /257: every level kept
    assert arrays[1].min() >= OFFSET and len(np.unique(arrays[1])) > 100


def test_six_bands_first_or_last_read_the_same(tmp_path):
    arrays = write_six_band_folder(tmp_path / "t", n=2)
    for i, expected in enumerate(arrays):  # tile0 is interleaved (bands last), tile1 planar (bands first)
        np.testing.assert_array_equal(read(tmp_path / "t" / f"tile{i}.tif").pixels, expected.astype(np.float32))


def test_npy_bands_first_or_last(tmp_path):
    a = np.random.default_rng(0).random((5, 20, 30), dtype=np.float32)
    np.save(tmp_path / "chw.npy", a)
    np.save(tmp_path / "hwc.npy", np.moveaxis(a, 0, -1))
    np.testing.assert_array_equal(read(tmp_path / "chw.npy").pixels, a)
    np.testing.assert_array_equal(read(tmp_path / "hwc.npy").pixels, a)


def test_nodata_and_nan_become_nan_and_are_counted(tmp_path):
    write_six_band_folder(tmp_path / "t", n=1, nodata=0)
    d = read(tmp_path / "t" / "tile0.tif")
    assert d.missing >= 16 and np.isnan(d.pixels[:, :4, :4]).all()
    a = np.ones((2, 8, 8), np.float32)
    a[1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", a)
    assert read(tmp_path / "nan.npy").missing == 1


def test_tiff_claiming_too_many_bands_is_refused_before_decoding(tmp_path):
    tifffile.imwrite(
        tmp_path / "many.tif", np.zeros((readers.MAX_BANDS + 1, 2, 2), np.uint16), photometric="minisblack"
    )
    with pytest.raises(ValueError, match="bands; the limit"):
        read(tmp_path / "many.tif")


def test_dicom_rescaled_and_empty_refused(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    write_dicom_folder(tmp_path / "d")
    ds = pydicom.dcmread(tmp_path / "d" / "CT_small.dcm")
    d = read(tmp_path / "d" / "CT_small.dcm")
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(d.pixels[0], expected.astype(np.float32))
    with pytest.raises(ValueError, match="no pixel data"):
        read(tmp_path / "d" / "no_pixels.dcm")


# ----------------------------------------------------------------------------------------------
# Statistics


def test_statistics_are_the_datas(tmp_path):
    arrays = write_six_band_folder(tmp_path / "t", n=4)
    s = S.measure(sorted((tmp_path / "t").iterdir()))
    stack = np.concatenate([a.reshape(6, -1) for a in arrays], axis=1).astype(np.float64)
    assert s.in_chans == 6 and s.units == "native" and not s.imagenet
    np.testing.assert_allclose(s.mean, stack.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(s.std, stack.std(axis=1), rtol=1e-9)
    chosen = S.measure(sorted((tmp_path / "t").iterdir()), bands=(4, 3, 2))
    np.testing.assert_allclose(chosen.mean, stack.mean(axis=1)[[3, 2, 1]], rtol=1e-9)


def test_statistics_sample_is_seeded():
    paths = [f"{i}.png" for i in range(1000)]
    assert S.sample(paths, 3) == S.sample(paths, 3) != S.sample(paths, 4)
    assert len(S.sample(paths, 3)) == S.SAMPLE


# ----------------------------------------------------------------------------------------------
# The CLI end to end


def pretrain(data, out, *extra):
    r = invoke("pretrain", data, "--out", out, "--steps", "4", *TINY, *extra)
    assert r.exit_code == 0, r.output
    return r, json.loads((out / "config.json").read_text())["model"]


def test_16_bit_folder_trains_with_its_own_statistics(tmp_path):
    arrays = write_gray16_folder(tmp_path / "g")
    r, cfg = pretrain(tmp_path / "g", tmp_path / "run")
    values = np.concatenate([a.ravel() for a in arrays]).astype(np.float64)
    assert cfg["in_chans"] == 1 and cfg["units"] == "native"
    assert cfg["mean"][0] == pytest.approx(values.mean(), rel=1e-9)
    assert cfg["std"][0] == pytest.approx(values.std(), rel=1e-9)
    assert "statistics: 1 band, native units; measured mean" in r.stderr
    from maecli.weights import load

    model = load(tmp_path / "run" / "model.safetensors")  # the header alone carries the statistics
    assert model.cfg.mean == pytest.approx(tuple(cfg["mean"]))
    e = invoke("embed", tmp_path / "g" / "scan1.png", tmp_path / "g" / "scan0.tif", "-w", tmp_path / "run")
    assert e.exit_code == 0, e.output
    assert len(e.stdout.splitlines()) == 2


def test_6_band_tiffs_train_reconstruct_and_write_raw(tmp_path):
    write_six_band_folder(tmp_path / "t")
    _, cfg = pretrain(tmp_path / "t", tmp_path / "run", "--show-bands", "4,3,2")
    assert cfg["in_chans"] == 6 and len(cfg["mean"]) == 6
    assert (tmp_path / "run" / "previews" / "epoch-0001.png").exists()
    for where in (tmp_path / "run", tmp_path / "run" / "model.safetensors"):  # the run, and the weights' header
        r = invoke("info", where, "--json")
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["statistics"] == {k: cfg[k] for k in ("in_chans", "units", "mean", "std", "bands")}
    text = " ".join(invoke("info", tmp_path / "run").stdout.split())
    assert f"statistics 6 bands (all the files' bands), native units; mean {cfg['mean'][0]:.4g}," in text
    png, raw = tmp_path / "rec.png", tmp_path / "rec.npy"
    r = invoke(
        "reconstruct", tmp_path / "t" / "tile1.tif", "-w", tmp_path / "run", "-o", png, "--show-bands", "4,3,2",
        "--raw", raw,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    full = np.load(raw)
    assert full.shape == (1, 6, 32, 32) and full.dtype == np.float32
    serve_shows_the_bands(tmp_path / "run", tmp_path / "t", png)
    assert 0 <= np.median(full) <= 25500  # the input's units (100 x 0..255), not normalized values


def test_float32_tiffs_with_nodata_train_to_a_finite_loss(tmp_path):
    write_six_band_folder(tmp_path / "t", dtype=np.float32, nodata=-9999.0)
    r, cfg = pretrain(tmp_path / "t", tmp_path / "run", "--bands", "3,2,1")
    assert cfg["bands"] == [3, 2, 1] and cfg["units"] == "native" and max(cfg["mean"]) <= 1
    assert "missing (NaN or nodata): filled with their band's mean" in r.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(row["loss"]) for row in rows if "loss" in row)


def test_mixed_band_counts_are_refused_in_one_line(tmp_path):
    write_six_band_folder(tmp_path / "t", n=2)
    tifffile.imwrite(tmp_path / "t" / "four.tif", np.zeros((4, 40, 40), np.uint16), photometric="minisblack")
    r = invoke("pretrain", tmp_path / "t", "--out", tmp_path / "run", "--steps", "2", *TINY)
    one_line_error(r, 1, "four.tif has 4 bands", "tile0.tif has 6 bands")


def test_dicom_folder_trains_and_skips_the_file_without_pixels(tmp_path):
    pytest.importorskip("pydicom")
    write_dicom_folder(tmp_path / "d")
    r, cfg = pretrain(tmp_path / "d", tmp_path / "run")
    assert cfg["in_chans"] == 1 and cfg["units"] == "native"
    assert "no_pixels.dcm" in r.stderr and "1 file skipped" in r.stderr


def test_6_band_probe_finetune_predict_and_timm_export(tmp_path):
    from scientific import write_labelled_twin

    timm = pytest.importorskip("timm")
    write_six_band_folder(tmp_path / "t")
    write_labelled_twin(tmp_path / "twin")
    _, cfg = pretrain(tmp_path / "t", tmp_path / "run")
    r = invoke("probe", tmp_path / "twin", "-w", tmp_path / "run", "--baseline")
    assert r.exit_code == 0 and "random init" in r.output, r.output
    ft = tmp_path / "ft"
    short = ["--steps", "2", "--batch-size", "4", "--recipe", "paper"]  # auto: light, which has no RandAugment at all
    r = invoke("finetune", tmp_path / "twin", "-w", tmp_path / "run", "--out", ft, *short)
    assert r.exit_code == 0, r.output
    assert "RandAugment off (6 bands in native units" in r.stderr
    r = invoke("predict", tmp_path / "twin" / "val" / "first" / "3.tif", "-w", ft)
    assert r.exit_code == 0 and len(r.stdout.splitlines()) == 1, r.output
    out = tmp_path / "timm.safetensors"
    assert invoke("export", tmp_path / "run", out, "--format", "timm").exit_code == 0
    from safetensors.torch import load_file

    import maecli

    net = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        in_chans=6, global_pool="token",
    )  # fmt: skip
    net.load_state_dict(load_file(out), strict=True)
    model = maecli.load(tmp_path / "run").eval()
    x = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), model.encode(x)[:, 0], atol=1e-5, rtol=1e-5)


def test_init_from_an_rgb_model_adapts_it_to_6_bands(tmp_path, tiny_weights):
    """An RGB run continued on 6-band TIFFs: the patch embedding by timm's adapt_input_conv (the RGB filters for
    bands 1-3, cycled for 4-6, scaled by 3/6), the decoder's output rows cycled, every other weight the source's
    (lr 0), and the data's statistics, not ImageNet's."""
    from timm.models import adapt_input_conv

    import maecli

    arrays = write_six_band_folder(tmp_path / "t", n=4)
    out = tmp_path / "run"
    r = invoke("pretrain", tmp_path / "t", "--out", out, "--steps", "2", "--lr", "0", "--img-size", "32",
               "--batch-size", "4", "--workers", "0", "--previews", "0", "--init-from", tiny_weights)  # fmt: skip
    assert r.exit_code == 0, r.output
    warning = [line for line in r.stderr.splitlines() if "adapt_input_conv" in line]
    assert len(warning) == 1 and "3 bands adapted to 6" in warning[0], r.stderr
    assert "reused for bands 1-3 and cycled for bands 4-6" in warning[0] and "red, green and blue" in warning[0]
    source, trained = maecli.load(tiny_weights), maecli.load(out)
    stack = np.concatenate([a.reshape(6, -1) for a in arrays], axis=1).astype(np.float64)
    assert trained.cfg.in_chans == 6 and trained.cfg.units == "native"
    np.testing.assert_allclose(trained.cfg.mean, stack.mean(axis=1), rtol=1e-9)
    before, after = source.state_dict(), trained.state_dict()
    assert before.keys() == after.keys()
    for name in before.keys() - {"patch_embed.proj.weight", "decoder_pred.weight", "decoder_pred.bias"}:
        assert torch.equal(after[name], before[name]), name
    proj = after["patch_embed.proj.weight"]
    torch.testing.assert_close(proj, adapt_input_conv(6, before["patch_embed.proj.weight"]))
    torch.testing.assert_close(proj[:, :3], before["patch_embed.proj.weight"] * 3 / 6)
    torch.testing.assert_close(proj[:, 3:], proj[:, :3])
    rows = after["decoder_pred.weight"].reshape(64, 6, -1)  # (pixel, band, width): band 4 predicted as band 1
    source_rows = before["decoder_pred.weight"].reshape(64, 3, -1)
    torch.testing.assert_close(rows, torch.cat([source_rows, source_rows], dim=1))


def serve_shows_the_bands(run, folder, cli_png):
    """The page draws the same 4,3,2 composite that reconstruct --show-bands 4,3,2 wrote, and its thumbnails too."""
    pytest.importorskip("fastapi")
    import base64

    from fastapi.testclient import TestClient

    from maecli.serve import create_app

    app = create_app(run, folder, index=False, show_bands=(4, 3, 2))
    with TestClient(app, headers={"X-Maecli": "1"}) as client:
        r = client.get("/api/reconstruct", params={"path": "tile1.tif", "mask": 0.75, "seed": 0, "zoom": 8})
        assert r.status_code == 200, r.text
        assert base64.b64decode(r.json()["image"].split(",", 1)[1]) == cli_png.read_bytes()
        assert client.get("/api/thumb", params={"path": "tile1.tif"}).status_code == 200
    app.state.server.close()
