"""Bad input files: the image corpus of tests/bad_images.py through the data layer and pretrain, and
broken or hostile weights files through `maecli.load` and `pretrain --init-from`."""

import os
import pickle
import shutil
import signal
import tempfile
import warnings
from pathlib import Path

import bad_images as B
import pytest
import torch
from conftest import TINY, invoke

import maecli
from maecli.data import decode, describe_error, find_images
from maecli.model import MAE, MAEConfig
from maecli.weights import WeightsError, save_weights

REASONS = {  # why pretrain skips a file, as its warning says
    "empty.jpg": "not a readable image",
    "text.jpg": "not a readable image",
    "random.png": "not a readable image",
    "truncated.jpg": "truncated",
    "bomb.png": "decompression bomb",
    "deleted.jpg": "file not found",
    "broken_link.jpg": "broken symbolic link",
    "loop_a.jpg": "symbolic link loop",
    "pipe.jpg": "not a regular file",
    "no_permission.jpg": "permission denied",
}


@pytest.fixture
def alarm():
    """Fail instead of hanging if a read blocks (a FIFO opened for reading waits for a writer forever)."""

    def timeout(signum, frame):
        raise TimeoutError("a read blocked")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def test_find_images_lists_each_file_once(bad_images_dir, alarm):
    names = [p.relative_to(bad_images_dir).as_posix() for p in find_images(bad_images_dir)]
    assert names == B.LISTED, B.describe(bad_images_dir)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_decode_takes_the_usable_and_names_what_is_wrong_with_the_rest(bad_images_dir, alarm, in_chans):
    (bad_images_dir / "deleted.jpg").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no PIL warning may reach the user's screen
        for name, item in B.CORPUS.items():
            path = bad_images_dir / name
            if item.usable:
                x = decode(path, in_chans)
                assert x.dtype == torch.uint8 and x.shape[0] == in_chans, name
                if item.shape:
                    assert tuple(x.shape[1:]) == item.shape, f"{name}: {item.what}"
            else:
                with pytest.raises(Exception) as e:
                    decode(path, in_chans)
                reason = REASONS.get(name)
                if reason:
                    assert reason in describe_error(e.value, path), f"{name}: {describe_error(e.value, path)}"


def test_a_file_without_read_permission_is_skipped(tmp_path):
    """Root ignores permission bits, so as root the read is tried by a forked child that drops to `nobody`."""
    folder = Path(tempfile.mkdtemp(prefix="maecli-perm-"))  # not under tmp_path: nobody must reach it
    try:
        os.chmod(folder, 0o755)
        locked = folder / "locked.jpg"
        shutil.copy(next(B.EXAMPLES.glob("*.jpg")), locked)
        os.chmod(locked, 0)
        if not B.IS_ROOT:
            with pytest.raises(PermissionError) as e:
                decode(locked)
            assert describe_error(e.value, locked) == "permission denied"
            return
        pid = os.fork()
        if pid == 0:  # the child: no pytest machinery, just an exit code
            code = 3
            try:
                os.setgid(65534)
                os.setuid(65534)
                try:
                    decode(locked)
                    code = 1
                except Exception as e:
                    code = 0 if describe_error(e, locked) == "permission denied" else 2
            finally:
                os._exit(code)
        code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if code == 3:
            pytest.skip("running as root, and this system does not let a child drop to an unprivileged user")
        assert code == 0, {1: "an unreadable file decoded", 2: "the reason was not 'permission denied'"}.get(code)
    finally:
        os.chmod(folder / "locked.jpg", 0o644)
        shutil.rmtree(folder)


def test_decode_composites_transparency_on_white(bad_images_dir):
    x = decode(bad_images_dir / "rgba.png")
    assert (x[:, :, :15] == 255).all()  # the left half is fully transparent


@pytest.mark.parametrize("in_chans", [1, 3])
def test_pretrain_skips_what_it_cannot_use(tmp_path, bad_images_dir, monkeypatch, alarm, in_chans):
    import maecli.data as D

    real = D.find_images

    def find_then_delete(root):
        found = real(root)
        (bad_images_dir / "deleted.jpg").unlink()  # vanishes between discovery and reading
        return found

    monkeypatch.setattr(D, "find_images", find_then_delete)
    out = tmp_path / "run"
    # one batch holds every file: each is read at least once
    r = invoke(
        "pretrain",
        bad_images_dir,
        "--out",
        out,
        *TINY,
        "--batch-size",
        len(B.LISTED),
        "--steps",
        "2",
        "--in-chans",
        in_chans,
    )
    assert r.exit_code == 0, r.output + "\n" + B.describe(bad_images_dir)
    assert "Traceback" not in r.output
    bad = B.unusable()
    for name in bad:
        line = next(
            (
                x
                for x in r.stderr.splitlines()
                if x.startswith("warning: skipped") and f"/{name}: " in x and REASONS.get(name, "") in x
            ),
            None,
        )
        assert line, f"no warning for {name} ({B.CORPUS[name].what}):\n{r.stderr}"
    for name in B.usable():
        assert f"/{name}:" not in r.stderr, f"{name} ({B.CORPUS[name].what}) was skipped:\n{r.stderr}"
    assert f"{len(bad)} unreadable files skipped" in r.stderr
    assert f"{len(bad)} files skipped" in r.stderr
    assert maecli.load(out).cfg.in_chans == in_chans


def test_reconstruct_names_each_unusable_file(tmp_path, bad_images_dir, alarm):
    weights = tmp_path / "m.safetensors"
    save_weights(tiny_model(), weights)
    (bad_images_dir / "deleted.jpg").unlink()
    for name in sorted(B.unusable()):
        r = invoke("reconstruct", bad_images_dir / name, "--weights", weights, "--out", tmp_path / "r.png")
        assert r.exit_code == 1 and "Traceback" not in r.output, f"{name}: {r.output}"
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and name in errors[0], f"{name} ({B.CORPUS[name].what}): {r.stderr}"
    usable = [bad_images_dir / n for n in sorted(B.usable())]
    r = invoke("reconstruct", *usable, "--weights", weights, "--out", tmp_path / "r.png")
    assert r.exit_code == 0, r.output


# -- weights ----------------------------------------------------------------------------------


def tiny_model(embed_dim=32) -> MAE:
    return MAE(
        MAEConfig(
            img_size=32,
            patch_size=8,
            embed_dim=embed_dim,
            depth=2,
            num_heads=2,
            decoder_dim=32,
            decoder_depth=1,
            decoder_heads=2,
        )
    )


def hostile_files(tmp_path):
    """Pickles that would write `marker` if anything unpickled them with the standard unpickler."""
    marker = tmp_path / "pwned"
    state = {"pos_embed": torch.zeros(1), "payload": B.WritesAFile(marker)}
    files = {}
    for name in ("evil.pth", "evil.pt", "evil.bin"):  # torch.save's zip format
        torch.save(state, tmp_path / name)
        files[name] = tmp_path / name
    for name in ("raw.pkl.pth", "evil.safetensors"):  # a bare pickle stream, one under a safetensors name
        (tmp_path / name).write_bytes(pickle.dumps(state, protocol=2))
        files[name] = tmp_path / name
    run = tmp_path / "evil_run"  # a run folder whose weights file is a pickle
    run.mkdir()
    (run / "model.safetensors").write_bytes(pickle.dumps(state))
    files["run folder"] = run
    return files, marker


def test_malicious_pickles_are_refused_and_never_run(tmp_path):
    files, marker = hostile_files(tmp_path)
    for name, path in files.items():
        with pytest.raises(WeightsError) as e:
            maecli.load(path)
        assert str(path) in str(e.value) or path.name in str(e.value), name
        assert not marker.exists(), f"loading {name} ran code"
    r = invoke("pretrain", tmp_path, "--out", tmp_path / "run", *TINY, "--steps", "1", "--init-from", files["evil.pth"])
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert not marker.exists()


def test_broken_weights_are_one_clear_error(tmp_path, photo_dir):
    good = tmp_path / "good.safetensors"
    save_weights(tiny_model(), good)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    random_file = tmp_path / "random.safetensors"
    random_file.write_bytes(os.urandom(5000))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    # a run folder whose config says one architecture and whose weights are another
    other = tmp_path / "other_arch"
    other.mkdir()
    save_weights(tiny_model(embed_dim=64), other / "model.safetensors")
    (other / "config.json").write_text('{{"model": {}}}'.format(__import__("json").dumps(tiny_model().cfg.to_dict())))
    from safetensors.torch import save_file

    foreign = tmp_path / "resnet.safetensors"  # somebody else's network, no maecli config anywhere
    save_file({"conv1.weight": torch.zeros(8, 3, 7, 7), "fc.weight": torch.zeros(10, 8)}, foreign)

    for path in (truncated, random_file, empty, other, foreign, tmp_path / "missing.safetensors"):
        with pytest.raises(WeightsError) as e:
            maecli.load(path)
        assert path.name in str(e.value), str(e.value)
        r = invoke("pretrain", photo_dir, "--out", tmp_path / "run", *TINY, "--steps", "1", "--init-from", path)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and path.name in errors[0], r.stderr
    assert maecli.load(good).cfg.embed_dim == 32


@pytest.mark.parametrize(
    "header,message",
    [("{not json", "not valid JSON"), ('{"img_size": 32, "patch_size": 0}', "patch_size must be a positive")],
)
def test_broken_config_in_the_weights_header(tmp_path, header, message):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(2)}, str(path), metadata={"maecli_config": header})
    with pytest.raises(WeightsError, match=message):
        maecli.load(path)
