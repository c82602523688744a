"""`maecli serve`: the API through FastAPI's test client and a real uvicorn server, and the page in headless Chromium.

One tiny model and one small folder serve every test in this file (module fixtures), so it runs in seconds.
"""

import base64
import io
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from maecli.cli import app as cli

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "images"
PICKED = [
    "skimage_chelsea.jpg",
    "skimage_coffee.jpg",
    "skimage_camera_gray.png",
    "sklearn_flower.jpg",
    "skimage_rocket.jpg",
]
SECRET = b"top secret: not an image of the folder"
PAGE_HEADERS = {"X-Maecli": "1"}  # what the page's script sends with an upload


def tiny_model():
    import torch

    from maecli.model import MAE, MAEConfig

    torch.manual_seed(0)
    cfg = MAEConfig(
        img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, decoder_dim=32, decoder_depth=1, decoder_heads=2
    )
    return MAE(cfg)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A run folder (weights, config, metrics with a half-written last line, previews) and an image folder with
    the path tricks a server must refuse: a symlink to a file outside, a symlinked folder outside, a secret beside."""
    from PIL import Image

    from maecli.reconstruct import png_bytes, reconstruct, render
    from maecli.weights import save_weights

    base = tmp_path_factory.mktemp("serve")
    run = base / "run"
    (run / "previews").mkdir(parents=True)
    model = tiny_model()
    save_weights(model, run / "model.safetensors")
    (run / "config.json").write_text(json.dumps({"model": model.cfg.to_dict(), "train": {"data": "x"}}))
    lines = [json.dumps({"step": s, "epoch": s / 10, "loss": 1.0 / s, "lr": 1e-3}) for s in range(1, 31)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 31, "lo')
    for epoch, name in ((1, PICKED[0]), (2, PICKED[1])):
        rec = reconstruct(model, [EXAMPLES / name], seed=epoch)
        (run / "previews" / f"epoch-{epoch:04d}.png").write_bytes(png_bytes(render(rec)))

    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(SECRET)
    shutil.copy(EXAMPLES / "skimage_astronaut.jpg", outside / "astronaut.jpg")
    os.symlink(outside / "secret.png", run / "previews" / "epoch-0003.png")  # a preview that leads out of the run

    images = base / "images"
    (images / "sub").mkdir(parents=True)
    for name in PICKED[:3]:
        shutil.copy(EXAMPLES / name, images / name)
    for name in PICKED[3:]:
        shutil.copy(EXAMPLES / name, images / "sub" / name)
    os.symlink(images / PICKED[0], images / "sub" / "link_inside.jpg")  # stays in the folder: served
    os.symlink(outside / "astronaut.jpg", images / "escape.jpg")  # leads out: refused
    os.symlink(outside, images / "outside_dir")  # a folder out of the folder: refused
    Image.new("RGB", (10, 10)).save(images / "broken.png")
    data = (images / "broken.png").read_bytes()
    (images / "broken.png").write_bytes(data[: len(data) // 2])  # truncated: listed, but cannot be embedded
    return {"base": base, "run": run, "images": images, "outside": outside, "model": model}


def ready(app, timeout=60):
    index = app.state.server.index
    assert index.ready.wait(timeout), "the folder was not embedded in time"
    return index


@pytest.fixture(scope="module")
def client(site):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from maecli.serve import create_app

    app = create_app(site["run"], site["images"])  # the default cache: serve-cache/ in the run folder
    ready(app)
    with TestClient(app, headers=PAGE_HEADERS) as c:
        yield c
    app.state.server.close()


def png_of(response_json) -> bytes:
    head, data = response_json["image"].split(",", 1)
    assert head == "data:image/png;base64"
    return base64.b64decode(data)


def expected_png(model, path, mask, seed, zoom, patch_stats=True, name=None) -> bytes:
    from maecli.reconstruct import png_bytes, reconstruct, render

    rec = reconstruct(
        model, [path], mask_ratio=mask, seed=seed, use_patch_stats=patch_stats, names=[name] if name else None
    )
    return png_bytes(render(rec, zoom))


# ----------------------------------------------------------------------------------------------
# Reconstruct


def test_the_page_loads_nothing_from_elsewhere(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    assert '<script src="/app.js">' in page and '<link rel="stylesheet" href="/style.css">' in page
    assert "<script>" not in page and "<style>" not in page  # nothing inline: the policy allows only 'self'
    for url, kind in (("/app.js", "text/javascript"), ("/style.css", "text/css")):
        part = client.get(url)
        assert part.status_code == 200 and part.headers["content-type"].startswith(kind)
        page += part.text
    # nothing to fetch from elsewhere: no external script, style, font or image (the SVG namespace is a name)
    assert "http://" not in page.replace('"http://www.w3.org/2000/svg"', "")
    assert "https://" not in page
    policy = r.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "connect-src 'self'" in policy and "unsafe-inline" not in policy
    # the files are what is shipped, whatever the query string says
    for url in ("/", "/app.js"):
        tricked = client.get(url, params={"body": "<script>alert(1)</script>", "media_type": "text/html"})
        assert tricked.content == client.get(url).content and "alert" not in tricked.text


def test_the_page_script_parses():
    """The page's script is a file of its own, so a JavaScript tool can check it (node, where installed)."""
    node = shutil.which("node") or shutil.which("nodejs")
    if node is None:
        pytest.skip("node is not installed")
    script = ROOT / "maecli" / "serve" / "page" / "app.js"
    result = subprocess.run([node, "--check", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_reconstruction_is_the_cli_picture(client, site, tmp_path):
    info = client.get("/api/info").json()
    assert info["zoom"] == 8 and info["model"]["img_size"] == 32 and info["has_decoder"]
    params = {"path": "sub/sklearn_flower.jpg", "mask": 0.35, "seed": 7, "zoom": 2}
    r = client.get("/api/reconstruct", params=params)
    assert r.status_code == 200, r.text
    body = r.json()
    png = png_of(body)
    path = site["images"] / "sub" / "sklearn_flower.jpg"
    assert png == expected_png(site["model"], path, 0.35, 7, 2)
    assert client.get("/api/reconstruct.png", params=params).content == png
    assert body["hidden"] == 6 and body["patches"] == 16 and body["mask"] == 0.35 and body["seed"] == 7
    assert body["legend"].startswith("mask 0.35, seed 7;") and "true mean and variance" in body["legend"]
    assert "borrow each hidden patch's mean and variance" in body["note"]

    # the same bytes as the command the page shows
    out = tmp_path / "cli.png"
    result = CliRunner().invoke(
        cli,
        [
            "reconstruct",
            str(path),
            "-w",
            str(site["run"]),
            "--mask",
            "0.35",
            "--seed",
            "7",
            "--zoom",
            "2",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == png
    assert body["command"].endswith("--mask 0.35 --seed 7 --zoom 2")


def test_slider_seed_and_patch_stats_change_the_picture(client):
    def get(**kw):
        r = client.get("/api/reconstruct", params={"path": "skimage_coffee.jpg", **kw})
        assert r.status_code == 200, r.text
        return r.json()

    base = get(mask=0.75, seed=0)
    assert png_of(get(mask=0.75, seed=0)) == png_of(base)  # repeatable
    assert png_of(get(mask=0.25, seed=0)) != png_of(base)
    assert png_of(get(mask=0.75, seed=1)) != png_of(base)
    raw = get(mask=0.75, seed=0, patch_stats="false")
    assert png_of(raw) != png_of(base) and raw["patch_stats"] is False
    assert "shown raw" in raw["note"] and "shown raw" in raw["legend"]
    full = get(mask=0.95, seed=0)  # 16 patches: int(16 * 0.05) = 0 stay visible
    assert full["hidden"] == 16 and "none of the 16 patches stays visible" in full["warning"]
    for mask in (0.0, 0.01, 0.99, 1.0, "x"):
        assert client.get("/api/reconstruct", params={"path": "skimage_coffee.jpg", "mask": mask}).status_code == 422


def test_upload_gives_the_same_pixels_as_the_file(client, site):
    for name in ("skimage_chelsea.jpg", "skimage_camera_gray.png"):  # a JPEG decodes in draft mode, as a file does
        r = client.post("/api/upload", params={"name": name}, content=(site["images"] / name).read_bytes())
        assert r.status_code == 200, r.text
        upload = r.json()
        assert upload["name"] == name
        by_upload = client.get("/api/reconstruct", params={"upload": upload["id"], "mask": 0.6, "seed": 3})
        by_path = client.get("/api/reconstruct", params={"path": name, "mask": 0.6, "seed": 3})
        assert png_of(by_upload.json()) == png_of(by_path.json())
    assert client.get("/api/reconstruct", params={"upload": "0" * 20}).status_code == 404
    assert client.get("/api/reconstruct", params={"mask": 0.5}).status_code == 400  # neither path nor upload


# ----------------------------------------------------------------------------------------------
# Similar images


def test_neighbours_are_cosine_similarities_of_embed(client, site):
    import torch

    from maecli.embedding import embed

    listed = client.get("/api/images").json()["images"]
    assert listed == [
        "broken.png",
        "skimage_camera_gray.png",
        "skimage_chelsea.jpg",
        "skimage_coffee.jpg",
        "sub/link_inside.jpg",
        "sub/skimage_rocket.jpg",
        "sub/sklearn_flower.jpg",
    ]
    status = client.get("/api/index").json()
    assert status["state"] == "ready" and status["total"] == 7 and status["skipped"] == 1

    r = client.get("/api/neighbours", params={"path": "skimage_coffee.jpg", "k": 10})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    readable = [p for p in listed if p != "broken.png"]
    assert [n["path"] for n in results] != [] and "skimage_coffee.jpg" not in [n["path"] for n in results]
    assert len(results) == len(readable) - 1
    sims = [n["similarity"] for n in results]
    assert sims == sorted(sims, reverse=True)
    vectors = torch.nn.functional.normalize(embed(site["model"], [site["images"] / p for p in readable]), dim=-1)
    query = vectors[readable.index("skimage_coffee.jpg")]
    for n in results:
        assert abs(float(vectors[readable.index(n["path"])] @ query) - n["similarity"]) < 1e-3
    # the symlink inside the folder is the same picture as its target
    twin = client.get("/api/neighbours", params={"path": "sub/link_inside.jpg", "k": 1}).json()["results"][0]
    assert twin == {"path": "skimage_chelsea.jpg", "similarity": 1.0}

    up = client.post(
        "/api/upload", params={"name": "mine.jpg"}, content=(site["images"] / "sub" / "skimage_rocket.jpg").read_bytes()
    ).json()
    best = client.get("/api/neighbours", params={"upload": up["id"], "k": 3}).json()
    assert best["query"] == "mine.jpg" and best["results"][0] == {"path": "sub/skimage_rocket.jpg", "similarity": 1.0}
    broken = client.get("/api/neighbours", params={"path": "broken.png"})
    assert broken.status_code == 400 and "cannot read broken.png" in broken.json()["detail"]


def test_cache_makes_the_second_start_instant(site, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    import numpy as np

    from maecli import embedding
    from maecli.serve import create_app

    folder = tmp_path / "folder"
    shutil.copytree(site["images"], folder, symlinks=True)
    cache = tmp_path / "cache"
    first = create_app(site["run"], folder, cache_dir=cache)
    status = ready(first).status()
    first_vectors = ready(first).vectors.clone()
    readable = len(ready(first).rows)  # the copy's link_inside.jpg now points out of its folder: left out
    assert status["reused"] == 0 and status["state"] == "ready" and readable == 5
    assert sorted(p.suffix for p in cache.iterdir()) == [".json", ".npy"]

    def no_embedding(*args, **kwargs):
        raise AssertionError("the cache should have answered")

    monkeypatch.setattr(embedding, "embed", no_embedding)
    second = create_app(site["run"], folder, cache_dir=cache)
    index = ready(second)
    assert index.state == "ready" and index.reused == readable and list(index.skipped) == ["broken.png"]
    assert np.allclose(index.vectors.numpy(), first_vectors.numpy())
    monkeypatch.undo()

    # a changed file (another picture, another size) is embedded again; the other five come from the cache
    shutil.copy(folder / "skimage_coffee.jpg", folder / "sub" / "sklearn_flower.jpg")
    third = create_app(site["run"], folder, cache_dir=cache)
    index = ready(third)
    assert index.reused == readable - 1
    rows = index.rows
    assert float(index.vectors[rows["sub/sklearn_flower.jpg"]] @ index.vectors[rows["skimage_coffee.jpg"]]) > 0.9999
    for app in (first, second, third):
        app.state.server.close()


def test_encoder_only_weights_still_find_neighbours(site, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from maecli.model import MAE
    from maecli.serve import create_app
    from maecli.weights import save_weights

    save_weights(MAE(site["model"].cfg, decoder=False), tmp_path / "encoder.safetensors")
    app = create_app(tmp_path / "encoder.safetensors", site["images"], cache_dir=tmp_path / "cache")
    ready(app)
    c = TestClient(app)
    assert c.get("/api/info").json()["has_decoder"] is False
    r = c.get("/api/reconstruct", params={"path": "skimage_coffee.jpg"})
    assert r.status_code == 409 and "only the encoder" in r.json()["detail"]
    assert len(c.get("/api/neighbours", params={"path": "skimage_coffee.jpg"}).json()["results"]) == 5
    assert c.get("/api/run").json() == {"run": str(tmp_path), "previews": [], "metrics": []}
    app.state.server.close()


# ----------------------------------------------------------------------------------------------
# What may be served


TRICKS = [
    "../outside/secret.png",
    "/etc/passwd",
    "sub/../../outside/secret.png",
    "..",
    "sub/..\\..\\secret.png",
    "C:/Windows/win.ini",
    "escape.jpg",
    "outside_dir/astronaut.jpg",
    "outside_dir/secret.png",
    "nope.jpg",
    "",
    "sub",
    ".",
    "./skimage_coffee.jpg",
]


@pytest.mark.parametrize("trick", TRICKS)
def test_paths_that_leave_the_folder_are_refused(client, trick):
    for url in ("/api/image", "/api/thumb", "/api/reconstruct", "/api/neighbours"):
        r = client.get(url, params={"path": trick})
        assert r.status_code in (400, 403, 404), (url, trick, r.status_code)
        assert SECRET not in r.content and b"root:" not in r.content
        assert "detail" in r.json()


def test_raw_urls_and_previews_cannot_escape(client, site):
    for raw in (
        "/api/image?path=..%2F..%2Foutside%2Fsecret.png",
        "/api/image?path=%2Fetc%2Fpasswd",
        "/api/image?path=sub%2F%2E%2E%2F%2E%2E%2Foutside%2Fsecret.png",
        "/api/run/previews/3",
        "/api/run/previews/..%2F..%2Foutside%2Fsecret.png",
        "/api/run/previews/-1",
        "/api/run/previews/x",
        "/api/thumb?path=escape.jpg%00.png",
    ):
        r = client.get(raw)
        assert r.status_code in (400, 403, 404, 422), raw
        assert SECRET not in r.content
    ok = client.get("/api/image", params={"path": "sub/link_inside.jpg"})  # a symlink that stays inside
    assert ok.status_code == 200 and ok.content == (site["images"] / PICKED[0]).read_bytes()
    assert client.get("/api/thumb", params={"path": "skimage_coffee.jpg"}).headers["content-type"] == "image/jpeg"


def test_training_progress(client, site):
    run = client.get("/api/run").json()
    assert run["previews"] == [1, 2]  # epoch 3 is a symlink out of the run folder
    metrics = run["metrics"]
    assert [m["step"] for m in metrics] == list(range(1, 31))  # the half-written line 31 is skipped
    assert metrics[0] == {"step": 1, "loss": 1.0, "lr": 1e-3, "epoch": 0.1}
    preview = client.get("/api/run/previews/2")
    assert preview.status_code == 200 and preview.content == (site["run"] / "previews" / "epoch-0002.png").read_bytes()


def test_odd_files_in_the_folder(site, tmp_path):
    """A FIFO named like an image is never listed or opened (at start, or put in a file's place later); a file deleted
    since the start is said to be gone; a name with a backslash (an ordinary character on POSIX) is listed and
    served like any other."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from maecli.serve import create_app

    folder = tmp_path / "folder"
    folder.mkdir()
    for name in ("gone.jpg", "becomes_pipe.jpg", "back\\slash.jpg", "kept.jpg"):
        shutil.copy(site["images"] / "skimage_coffee.jpg", folder / name)
    os.mkfifo(folder / "pipe.jpg")
    logged = []
    app = create_app(site["run"], folder, model=site["model"], cache_dir=tmp_path / "cache", log=logged.append)
    ready(app)
    c = TestClient(app)
    listed = c.get("/api/images").json()["images"]
    assert listed == ["back\\slash.jpg", "becomes_pipe.jpg", "gone.jpg", "kept.jpg"]
    assert any("1 not regular files (FIFOs, devices)" in line for line in logged), logged

    (folder / "gone.jpg").unlink()
    (folder / "becomes_pipe.jpg").unlink()
    os.mkfifo(folder / "becomes_pipe.jpg")
    for url in ("/api/image", "/api/thumb", "/api/reconstruct", "/api/neighbours"):
        for name, status, words in (
            ("gone.jpg", 404, "gone.jpg no longer exists"),
            ("becomes_pipe.jpg", 403, "no longer a regular file"),
            ("pipe.jpg", 404, "not an image in the folder"),
        ):
            r = c.get(url, params={"path": name})  # returns at once: nothing opens a FIFO
            assert r.status_code == status and words in r.json()["detail"], (url, name, r.text)
        assert c.get(url, params={"path": "back\\slash.jpg"}).status_code == 200, url
    assert c.get("/api/image", params={"path": "back\\slash.jpg"}).content == (folder / "kept.jpg").read_bytes()
    app.state.server.close()


def test_odd_metrics_files_draw_no_curve(tmp_path):
    """metrics.jsonl is read by rundir.read_metrics: a FIFO is never opened, a folder or damage draws nothing."""
    from maecli.serve.folder import loss_points

    os.mkfifo(tmp_path / "metrics.jsonl")
    assert loss_points(tmp_path) == []  # returns at once: a FIFO would block a reader forever
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").mkdir()
    assert loss_points(tmp_path) == []
    (tmp_path / "metrics.jsonl").rmdir()
    rows = ['{"step": 1, "loss": NaN}', '{"step": 2, "loss": true}', "[1]", '{"step": 3, "loss": 0.5, "lr": "x"}']
    (tmp_path / "metrics.jsonl").write_text("\n".join(rows) + "\n" + "x" * (2 << 20) + "\n")
    assert loss_points(tmp_path) == [{"step": 3, "loss": 0.5}]


def test_host_header_is_checked_when_asked(site):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from maecli.serve import create_app

    app = create_app(site["run"], model=site["model"], allowed_hosts=["127.0.0.1", "localhost", "::1", "127.0.0.2"])
    for base in ("http://127.0.0.1:8000", "http://LOCALHOST:8000", "http://[::1]:8000", "http://127.0.0.2"):
        assert TestClient(app, base_url=base).get("/api/info").status_code == 200, base
    r = TestClient(app, base_url="http://attacker.example").get("/api/info")
    assert r.status_code == 400 and "not at 'attacker.example'" in r.json()["detail"]


def test_every_host_answers_at_the_printed_url(site):
    """--host 127.0.0.2 (loopback, but not a name the Host check knew) printed a URL that answered 400 to
    everything; 0.0.0.0 printed http://0.0.0.0:PORT/. Each prints an address that answers."""
    httpx = pytest.importorskip("httpx")
    from maecli.serve.process import page_url

    assert page_url("0.0.0.0", 80) == "http://127.0.0.1:80/" and page_url("::", 80) == "http://[::1]:80/"
    assert page_url("::1", 80) == "http://[::1]:80/" and page_url("localhost", 80) == "http://localhost:80/"
    for host, prefix in (("127.0.0.2", "http://127.0.0.2:"), ("0.0.0.0", "http://127.0.0.1:")):
        proc = subprocess.Popen(
            [sys.executable, "-m", "maecli", "serve", "-w", str(site["run"]), "--host", host, "--port", "0"],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            seen = []
            for line in proc.stderr:
                seen.append(line)
                if "open http://" in line:
                    break
            assert "open http://" in seen[-1], "".join(seen)
            url = seen[-1].split("open ", 1)[1].split()[0]
            assert url.startswith(prefix), "".join(seen)
            assert httpx.get(url + "api/info", timeout=10).status_code == 200, host
            assert httpx.get(url, timeout=10).status_code == 200, host
        finally:
            proc.kill()
            proc.wait()


def test_requests_from_other_sites_are_refused(client, site, tmp_path):
    """What a browser sends on behalf of another web site (an <img> tag, a form, a script's fetch) is refused:
    Sec-Fetch-Site other than same-origin or none, an Origin that is not this server; an upload needs the page's
    header and a body type no form can send. The page itself stays open to links from anywhere."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from maecli.model import MAE, MAEConfig
    from maecli.serve import create_app

    thumb = {"path": "skimage_coffee.jpg"}
    for site_header, status in (("cross-site", 403), ("same-site", 403), ("same-origin", 200), ("none", 200)):
        r = client.get("/api/thumb", params=thumb, headers={"Sec-Fetch-Site": site_header})
        assert r.status_code == status, site_header
    r = client.get("/api/reconstruct", params=thumb, headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "another web site" in r.json()["detail"]
    assert client.get("/api/reconstruct", params=thumb, headers={"Origin": "http://testserver"}).status_code == 200
    assert client.get("/", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200  # a link to the page

    jpeg = (site["images"] / "skimage_chelsea.jpg").read_bytes()
    bare = TestClient(client.app)  # no X-Maecli header
    for headers, status in (
        ({"Content-Type": "text/plain"}, 403),  # what a form or a no-cors fetch from elsewhere can send
        ({"Content-Type": "application/octet-stream"}, 403),
        ({"Content-Type": "text/plain", **PAGE_HEADERS}, 415),
        ({"Content-Type": "multipart/form-data; boundary=x", **PAGE_HEADERS}, 415),
        ({"Content-Type": "application/octet-stream", "Origin": "http://evil.example", **PAGE_HEADERS}, 403),
        ({"Content-Type": "application/octet-stream", **PAGE_HEADERS}, 200),
        ({"Content-Type": "image/jpeg", "Origin": "http://testserver", **PAGE_HEADERS}, 200),
    ):
        r = bare.post("/api/upload", params={"name": "x.jpg"}, content=jpeg, headers=headers)
        assert r.status_code == status, (headers, r.text)

    # zoom is bounded by the picture's size: tiles of at most 1024 px, whatever the query asks
    big = MAE(
        MAEConfig(
            img_size=128,
            patch_size=32,
            embed_dim=16,
            depth=1,
            num_heads=2,
            decoder_dim=16,
            decoder_depth=1,
            decoder_heads=2,
        )
    )
    app = create_app(site["run"], site["images"], model=big, index=False)
    c = TestClient(app)
    assert c.get("/api/info").json()["max_zoom"] == 8
    assert c.get("/api/reconstruct", params={**thumb, "zoom": 8}).status_code == 200
    r = c.get("/api/reconstruct.png", params={**thumb, "zoom": 9})
    assert r.status_code == 400 and "at most 8 for this 128 px model" in r.json()["detail"]
    app.state.server.close()


# ----------------------------------------------------------------------------------------------
# Bad uploads


def bomb_png(width=30_000, height=30_000) -> bytes:
    from bad_images import bomb_png as make

    return make(width, height)


def test_bad_uploads_get_a_message_and_the_server_keeps_serving(client, site):
    from PIL import Image

    jpeg = (site["images"] / "skimage_chelsea.jpg").read_bytes()
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, format="PNG")  # 64 megapixels in a few KB
    bad = {
        "empty": (b"", 400, "empty"),
        "text": (b"just some text, not an image\n" * 10, 400, "not a readable image"),
        "truncated": (jpeg[: len(jpeg) // 2], 400, "cannot read the upload"),
        "bomb": (bomb_png(), 400, "bomb"),
        "big bomb": (bomb_png(100_000, 100_000), 400, "bomb"),
        "many pixels": (buf.getvalue(), 400, "the limit is 60,000,000"),
        "too large": (b"\0" * (20 * 2**20 + 1), 413, "limit of 20 MB"),
        "too large, no length given": ((b"\0" * 2**20 for _ in range(21)), 413, "limit of 20 MB"),
    }
    for what, (data, status, words) in bad.items():
        r = client.post("/api/upload", params={"name": f"{what}.png"}, content=data)
        assert r.status_code == status, (what, r.text)
        assert words in r.json()["detail"], (what, r.json())
    # after all that, the server still answers
    assert client.get("/api/info").status_code == 200
    good = client.post("/api/upload", params={"name": "ok.jpg"}, content=jpeg)
    assert good.status_code == 200
    assert client.get("/api/reconstruct", params={"upload": good.json()["id"]}).status_code == 200


def test_pixel_bombs_by_shape_are_refused_from_the_header(client, site, tmp_path):
    """A 1 x 200,000 PNG is under the pixel limit, but resized to 32 px on its shorter side it would hold 32 x
    6,400,000 pixels (gigabytes as float). It is refused from its header alone, as an upload, as a folder file,
    and on the commands' image path (data.eval_batches)."""
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from maecli import data as D
    from maecli.serve import create_app

    strip = bomb_png(1, 200_000)  # a true header with one row behind it: decoding it would fail, not refuse
    r = client.post("/api/upload", params={"name": "strip.png"}, content=strip)
    assert r.status_code == 400 and "1 x 200000" in r.json()["detail"] and "too long and thin" in r.json()["detail"]

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "strip.png").write_bytes(strip)
    shutil.copy(site["images"] / "skimage_coffee.jpg", folder / "coffee.jpg")
    app = create_app(site["run"], folder, model=site["model"], cache_dir=tmp_path / "cache")
    index = ready(app)
    assert list(index.rows) == ["coffee.jpg"] and "too long and thin" in index.skipped["strip.png"]
    r = TestClient(app).get("/api/reconstruct", params={"path": "strip.png"})
    assert r.status_code == 400 and "too long and thin" in r.json()["detail"]
    app.state.server.close()

    failed = []
    batches = D.eval_batches([folder / "strip.png", folder / "coffee.jpg"], 32, 3, on_error=lambda *a: failed.append(a))
    assert [len(paths) for paths, _ in batches] == [1]
    assert "too long and thin" in failed[0][1]


EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nnewpath 0 0 moveto 8 8 lineto stroke\n%%EOF\n"


def test_uploads_open_only_the_formats_maecli_reads(client, tmp_path, monkeypatch):
    """Pillow would try every decoder it knows: an EPS upload would start Ghostscript. data.decode, the one decoder
    of uploads, folder files and the commands, names its formats, so the EPS decoder is never even asked."""
    from PIL import EpsImagePlugin, Image

    from maecli import data as D

    with Image.open(io.BytesIO(EPS)) as img:  # left to itself, Pillow takes it for an image
        assert img.format == "EPS"
    asked = []
    original = EpsImagePlugin.EpsImageFile._open
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: asked.append(1) or original(self))
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: asked.append("gs"))
    r = client.post("/api/upload", params={"name": "drawing.png"}, content=EPS)
    assert r.status_code == 400 and "not a readable image" in r.json()["detail"]
    (tmp_path / "drawing.png").write_bytes(EPS)
    with pytest.raises(Image.UnidentifiedImageError):
        D.decode(tmp_path / "drawing.png")
    assert asked == []
    assert set(D.FORMATS) >= {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"}


def test_every_file_of_the_bad_corpus_uploads_or_is_refused(client, bad_images_dir):
    from bad_images import CORPUS

    for name, what in CORPUS.items():
        path = bad_images_dir / name
        if path.is_symlink() or not path.is_file() or not os.access(path, os.R_OK) or name == "deleted.jpg":
            continue  # links, pipes and unreadable files cannot be uploaded by a browser; deleted.jpg is whole here
        r = client.post("/api/upload", params={"name": path.name}, content=path.read_bytes())
        assert r.status_code == (200 if what.usable else 400), (name, r.text)


def test_a_folder_of_bad_files_is_served(site, bad_images_dir, tmp_path):
    """Links out, loops, a FIFO, bombs: the index skips what it cannot read and no request hangs."""
    pytest.importorskip("fastapi")
    from bad_images import CORPUS
    from fastapi.testclient import TestClient

    from maecli.serve import create_app

    (bad_images_dir / "deleted.jpg").unlink()
    app = create_app(site["run"], bad_images_dir, model=site["model"], cache_dir=tmp_path / "cache")
    index = ready(app)
    assert index.state == "ready"
    usable = {name for name, b in CORPUS.items() if b.usable}
    assert set(index.rows) == usable
    c = TestClient(app)
    for name in CORPUS:
        r = c.get("/api/reconstruct", params={"path": name})
        assert r.status_code == 200 if name in usable else r.status_code in (400, 404), (name, r.text)
    app.state.server.close()


# ----------------------------------------------------------------------------------------------
# A real server: several requests at once, Ctrl-C


@contextmanager
def live(app):
    """The app on a real uvicorn server on a free port, in a thread."""
    import uvicorn

    from maecli.serve import listen

    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def test_concurrent_requests(client, site):
    httpx = pytest.importorskip("httpx")

    app = client.app
    jobs = [
        ("/api/reconstruct", {"path": p, "mask": m, "seed": s})
        for p in ("skimage_coffee.jpg", "sub/skimage_rocket.jpg")
        for m in (0.25, 0.5, 0.75)
        for s in (0, 1)
    ]
    jobs += [("/api/neighbours", {"path": p}) for p in ("skimage_coffee.jpg", "skimage_chelsea.jpg")] * 3
    jobs += [("/api/thumb", {"path": p}) for p in ("skimage_coffee.jpg", "sub/sklearn_flower.jpg")] * 3
    expected = {i: client.get(url, params=params).content for i, (url, params) in enumerate(jobs)}
    with live(app) as url, httpx.Client(base_url=url, timeout=60, headers=PAGE_HEADERS) as http:

        def fetch(i):
            path, params = jobs[i]
            r = http.get(path, params=params)
            return i, r.status_code, r.content

        def upload(_):
            return http.post(
                "/api/upload", params={"name": "x.jpg"}, content=(site["images"] / "skimage_chelsea.jpg").read_bytes()
            ).status_code

        with ThreadPoolExecutor(8) as pool:
            uploads = pool.map(upload, range(4))
            results = list(pool.map(fetch, list(range(len(jobs))) * 2))
        assert list(uploads) == [200] * 4
        for i, status, content in results:
            assert status == 200 and content == expected[i], jobs[i]


def test_cheap_requests_do_not_wait_for_renders(site, tmp_path):
    """60 reconstructions wait for a model that is busy (its lock held here). The page's other requests answer at
    once; 8 reconstructions are queued, the others are told 503 with Retry-After, and the queued ones finish."""
    httpx = pytest.importorskip("httpx")
    from maecli.serve import create_app
    from maecli.serve.server import RENDERS_ADMITTED

    app = create_app(site["run"], site["images"], model=site["model"], cache_dir=tmp_path / "cache")
    server = app.state.server
    ready(app)
    with live(app) as url, httpx.Client(base_url=url, timeout=60, headers=PAGE_HEADERS) as http:
        with ThreadPoolExecutor(60) as pool:
            server.model_lock.acquire()
            try:
                renders = [
                    pool.submit(http.get, "/api/reconstruct", params={"path": "skimage_coffee.jpg", "seed": i})
                    for i in range(60)
                ]
                deadline = time.monotonic() + 60
                while sum(r.done() for r in renders) < 60 - RENDERS_ADMITTED:  # the refused answer at once
                    assert time.monotonic() < deadline, "the queue did not refuse what it cannot hold"
                    time.sleep(0.05)
                refused = [r.result() for r in renders if r.done()]
                assert server.renders.admitted == RENDERS_ADMITTED and {r.status_code for r in refused} == {503}
                start = time.monotonic()
                for path in ("/api/info", "/api/run", "/api/images", "/api/index", "/api/neighbours?path=sub/x.jpg"):
                    r = http.get(path, timeout=5)
                    assert r.status_code in (200, 404), (path, r.text)
                assert http.get("/api/thumb", params={"path": "sub/skimage_rocket.jpg"}, timeout=5).status_code == 200
                assert time.monotonic() - start < 5
            finally:
                server.model_lock.release()
            statuses = [r.result().status_code for r in renders]
    assert statuses.count(200) == RENDERS_ADMITTED and statuses.count(503) == 60 - RENDERS_ADMITTED
    assert refused[0].headers["retry-after"] == "1" and "busy" in refused[0].json()["detail"]
    app.state.server.close()


def test_ctrl_c_stops_the_cli_cleanly(site, tmp_path):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")

    run = tmp_path / "run"
    shutil.copytree(site["run"], run, symlinks=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "maecli", "serve", "-w", str(run), "--images", str(site["images"]), "--port", "0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr] + [lines.put("")], daemon=True).start()
    seen = []
    try:
        while True:
            line = lines.get(timeout=60)
            assert line, "".join(seen)
            seen.append(line)
            if "open http://" in line:
                url = line.split("open ", 1)[1].split()[0]
                break
        assert url.startswith("http://127.0.0.1:")
        assert httpx.get(url + "api/info").status_code == 200
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    while (line := lines.get(timeout=10)) != "":
        seen.append(line)
    err = "".join(seen)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "maecli serve: stopped" in err and proc.stdout.read() == ""
    with pytest.raises(httpx.HTTPError):
        httpx.get(url + "api/info", timeout=2)


# ----------------------------------------------------------------------------------------------
# The command line


def test_cli_help_and_errors(site, tmp_path):
    runner = CliRunner()
    result = runner.invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0 and "--images" in result.stdout and "maecli[serve]" in result.stdout
    result = runner.invoke(cli, ["serve", "-w", str(tmp_path / "nope")])
    assert result.exit_code == 1 and result.stderr.startswith("error: weights not found")
    result = runner.invoke(cli, ["serve", "-w", str(site["run"]), "--images", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "is not a folder" in result.stderr


def test_port_in_use_is_one_line(site):
    pytest.importorskip("fastapi")
    from maecli.serve import listen

    taken = listen("127.0.0.1", 0)
    taken.listen()
    try:
        result = CliRunner().invoke(cli, ["serve", "-w", str(site["run"]), "--port", str(taken.getsockname()[1])])
    finally:
        taken.close()
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("error: cannot listen on 127.0.0.1:") and len(result.stderr.splitlines()) == 1


def test_without_the_extra_one_line_names_the_install(site, monkeypatch):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # import fastapi now raises ImportError
    result = CliRunner().invoke(cli, ["serve", "-w", str(site["run"])])
    assert result.exit_code == 1
    assert result.stderr.strip() == 'error: maecli serve needs FastAPI and uvicorn: pip install "maecli[serve]"'


# ----------------------------------------------------------------------------------------------
# The page in a real browser


def browser_or_skip():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1400",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(driver), options=options)


def test_browser_slider_changes_the_picture_to_the_apis(client, site, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser_or_skip()
    try:
        with live(client.app) as url:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 30)
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#gallery .thumb[data-path="skimage_chelsea.jpg"]'))
            driver.find_element(By.CSS_SELECTOR, '#gallery .thumb[data-path="skimage_chelsea.jpg"]').click()
            grid = driver.find_element(By.ID, "grid")
            wait.until(lambda d: grid.get_attribute("data-name") == "skimage_chelsea.jpg")
            assert grid.get_attribute("data-mask") == "0.75"
            before = grid.get_attribute("src")

            slider = driver.find_element(By.ID, "mask")
            drag = ActionChains(driver).click_and_hold(slider).move_by_offset(-slider.size["width"] // 3, 0)
            drag.release().perform()
            value = float(slider.get_attribute("value"))
            assert value < 0.75
            wait.until(lambda d: float(grid.get_attribute("data-mask")) == value)
            after = grid.get_attribute("src")
            assert after != before
            shown = base64.b64decode(after.split(",", 1)[1])
            assert (
                shown
                == client.get(
                    "/api/reconstruct.png", params={"path": "skimage_chelsea.jpg", "mask": value, "seed": 0, "zoom": 8}
                ).content
            )
            assert shown == expected_png(site["model"], site["images"] / "skimage_chelsea.jpg", value, 0, 8)
            assert f"--mask {value:g} --seed 0" in driver.find_element(By.ID, "command").text

            # neighbours of the clicked image, with their similarity
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#neighbours .thumb .sim"))
            first = driver.find_element(By.CSS_SELECTOR, "#neighbours .thumb")
            assert first.get_attribute("data-path") == "sub/link_inside.jpg"
            assert first.find_element(By.CLASS_NAME, "sim").text == "1.000"

            # junk through the file picker: a message on the page, and the page goes on working
            junk = tmp_path / "junk.jpg"
            junk.write_bytes(b"not a picture at all")
            driver.execute_script("document.getElementById('file').style.display = 'block'")
            driver.find_element(By.ID, "file").send_keys(str(junk))
            error = driver.find_element(By.ID, "recon-error")
            wait.until(lambda d: error.is_displayed() and "not a readable image" in error.text)
            driver.find_element(By.ID, "reseed").click()
            wait.until(lambda d: grid.get_attribute("data-seed") != "0")
            assert driver.find_element(By.CSS_SELECTOR, "#loss svg polyline") is not None
    finally:
        driver.quit()
