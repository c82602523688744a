"""The fast-path defaults keep their meaning: same crops, same numbers, the intended precision and threads.

Speed itself is measured in benchmarks/run.py, never here.
"""
import os
import subprocess
import sys

import pytest
import torch
from torchvision.transforms import v2

from maecli import cli
from maecli import data as D
from maecli import heap, runtime
from maecli.model import MAE, MAEConfig
from maecli.train import make_optimizer

from conftest import ROOT, EXAMPLES


@pytest.mark.parametrize("c", [1, 3])
def test_one_pass_normalization_matches_torchvision(c):
    x = torch.randint(0, 256, (c, 17, 23), dtype=torch.uint8)
    ref = v2.Compose([v2.ToDtype(torch.float32, scale=True), D.normalize(c)])(x)
    out = D.ToModelInput(c)(x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("c", [1, 3])
def test_training_crops_are_the_seeded_torchvision_ones(c):
    """Seeding only the CPU generator draws the same crops as torch.manual_seed, and leaves the caller's RNG alone."""
    paths = sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".jpg", ".png"))[:3]
    ds = D.PretrainDataset(paths, 32, c, seed=7)
    reference = v2.Compose([
        v2.RandomResizedCrop(32, scale=(0.2, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(), v2.ToDtype(torch.float32, scale=True), D.normalize(c),
    ])
    state = torch.get_rng_state()
    for i, p in enumerate(paths):
        x, failed = ds[(2, i)]
        assert not failed
        torch.manual_seed(D.sample_seed(7, 2, i))
        torch.testing.assert_close(x, reference(D.decode(p, c, ds.min_side)), atol=1e-6, rtol=0)
        torch.set_rng_state(state)
        assert torch.equal(ds[(2, i)][0], x)  # a pure function of (seed, epoch, index)
        assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    "amx, avx512_bf16, vendor, expected",
    [
        (True, True, "GenuineIntel", True),  # AMX: bf16 matmuls several times fp32
        (False, True, "AuthenticAMD", True),  # Zen 4/5
        (False, True, "GenuineIntel", False),  # AVX512-BF16 alone: slower than fp32 (measured here)
        (False, False, "AuthenticAMD", False),
    ],
)
def test_auto_precision_on_cpu(monkeypatch, amx, avx512_bf16, vendor, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(runtime, "cpu_vendor", lambda: vendor)
    assert runtime.native_bf16(torch.device("cpu")) is expected
    assert runtime.resolve_precision("auto", torch.device("cpu")) == ("bf16" if expected else "no")
    assert runtime.resolve_precision("bf16", torch.device("cpu")) == "bf16"  # asking explicitly always works


def test_cpu_vendor_is_a_known_string():
    assert runtime.cpu_vendor() in ("GenuineIntel", "AuthenticAMD", "")


def cli_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**env, **extra}


@pytest.mark.parametrize("environ, others, expected", [
    ({}, 0.0, {"GOMP_SPINCOUNT": "10000"}),  # idle cores: spin briefly
    ({}, 0.4, {"GOMP_SPINCOUNT": "10000"}),
    ({}, 1.0, {"OMP_WAIT_POLICY": "PASSIVE"}),  # someone else is computing: sleep
    ({}, None, {"OMP_WAIT_POLICY": "PASSIVE"}),  # cannot tell: sleep
    ({"LOCAL_WORLD_SIZE": "2"}, 0.0, {"OMP_WAIT_POLICY": "PASSIVE"}),  # launched processes share the cores
    ({"LOCAL_WORLD_SIZE": "1"}, 0.0, {"GOMP_SPINCOUNT": "10000"}),
    ({"OMP_WAIT_POLICY": "ACTIVE"}, 0.0, {}),  # the user's choice wins
    ({"GOMP_SPINCOUNT": "1000"}, 5.0, {}),
])
def test_openmp_wait_policy(environ, others, expected):
    assert cli.openmp_wait_env(environ, others) == expected


def test_others_running_reads_a_count():
    n = cli.others_running(samples=2, gap_s=0)
    if not os.path.exists("/proc/loadavg"):
        assert n is None
    else:  # the count excludes this process, which is running while it reads
        assert n is not None and 0 <= n < 10_000


@pytest.mark.parametrize("extra, expected", [({}, ("PASSIVE", "10000")), ({"OMP_WAIT_POLICY": "ACTIVE"}, ("ACTIVE",)),
                                             ({"GOMP_SPINCOUNT": "1000"}, ("1000",))])
def test_cli_sets_the_wait_policy_before_torch_unless_told(extra, expected):
    code = ("import os, sys, maecli.cli as c; c.configure_openmp(); import torch; "
            "print(os.environ.get('OMP_WAIT_POLICY') or os.environ.get('GOMP_SPINCOUNT'))")
    out = subprocess.run([sys.executable, "-c", code], env=cli_env(**extra), capture_output=True, text=True, check=True)
    assert out.stdout.strip() in expected


def test_help_shows_bracketed_defaults_literally():
    out = subprocess.run([sys.executable, "-m", "maecli", "pretrain", "--help"], env=cli_env(COLUMNS="200"),
                         capture_output=True, text=True, check=True)
    assert "[default: runs/<date-time>]" in out.stdout
    # typer's rich help formatter costs ~0.2 s of imports (rich.markdown, pygments); plain click help does not
    code = ("import sys; from maecli.cli import main; sys.argv = ['maecli', '--help']\n"
            "try: main()\nexcept SystemExit: pass\n"
            "assert 'rich' not in sys.modules and 'torch' not in sys.modules, 'help loaded rich or torch'")
    subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, check=True)


def test_pretrain_optimizer_is_fused_adamw_with_the_papers_betas():
    model = MAE(MAEConfig(img_size=16, patch_size=8, embed_dim=8, depth=1, num_heads=2, decoder_dim=8,
                          decoder_depth=1, decoder_heads=2))
    opt = make_optimizer(model, 1e-3, 0.05, torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] and opt.defaults["betas"] == (0.9, 0.95)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


@pytest.mark.parametrize("cpus, procs, cuda, expected", [
    (2, None, False, 1), (16, None, False, 4), (64, None, False, 4),  # CPU training: the model keeps the cores
    (16, None, True, 15), (128, None, True, 16),  # one GPU: every core but one decodes, up to 16
    (16, "8", True, 1), (128, "8", True, 15), (128, "bad", True, 16),  # cores shared by the launched processes
])
def test_default_workers(monkeypatch, cpus, procs, cuda, expected):
    from maecli import train

    monkeypatch.setattr(train.os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: cuda)
    if procs is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", procs)
    assert train.default_workers() == expected


GLIBC = bool(heap.glibc())

# touches 64 MiB three times (bigger than any size glibc would keep on its heap by default) and prints the
# page faults of the last round; "keep" sets maecli's heap policy first
FAULTS_PER_ROUND = """
import resource, sys
from maecli import heap
if sys.argv[1] == "keep":
    assert heap.keep_freed_memory()
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = b"x" * (64 << 20)
    del block
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_kept_memory_is_reused_without_page_faults():
    env = {k: v for k, v in os.environ.items() if not heap.user_tuned({k: v})}
    faults = {mode: int(subprocess.run([sys.executable, "-c", FAULTS_PER_ROUND, mode], env=env, cwd=ROOT,
                                       capture_output=True, text=True, check=True).stdout)
              for mode in ("default", "keep")}
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert faults["default"] > pages // 2  # glibc maps and unmaps such a block each time: every page faults
    assert faults["keep"] < pages // 20  # kept on the heap: the pages are already there


def test_a_users_malloc_settings_win(monkeypatch):
    assert heap.user_tuned({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert heap.user_tuned({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"})
    assert not heap.user_tuned({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"})
    assert heap.user_tuned({"MAECLI_KEEP_FREED_MEMORY": "0"})
    assert not heap.user_tuned({"MAECLI_KEEP_FREED_MEMORY": "1"})
    calls = []
    if GLIBC:
        monkeypatch.setattr(heap.glibc(), "mallopt", lambda *a: calls.append(a) or 1)
    assert heap.keep_freed_memory({"MALLOC_MMAP_MAX_": "65536"}) is False
    assert heap.keep_freed_memory({}) is GLIBC
    assert calls == ([(heap.M_MMAP_MAX, 0), (heap.M_TRIM_THRESHOLD, heap.KEEP_FREE_BYTES)] if GLIBC else [])


def test_every_command_sets_the_heap_policy_first(monkeypatch):
    from typer.testing import CliRunner

    calls = []
    monkeypatch.setattr(cli, "configure_openmp", lambda: calls.append("openmp"))
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append("heap"))
    for command in ("pretrain", "embed", "probe", "reconstruct", "export"):
        calls.clear()
        result = CliRunner().invoke(cli.app, [command, "--help"])
        assert result.exit_code == 0, result.output
        assert calls == ["openmp", "heap"], command


# with the heap kept, a freed 64 MiB block stays resident until trim_heap(); prints the pages it gave back
PAGES_TRIMMED = """
from maecli import heap
assert heap.keep_freed_memory()
def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1])
block = b"x" * (64 << 20)
del block
kept = resident()
assert heap.trim_heap()
print(kept - resident())
"""


@pytest.mark.skipif(not GLIBC or not os.path.exists("/proc/self/statm"), reason="glibc's malloc on Linux only")
def test_trim_heap_gives_kept_memory_back():
    env = {k: v for k, v in os.environ.items() if not heap.user_tuned({k: v})}
    out = subprocess.run([sys.executable, "-c", PAGES_TRIMMED], env=env, cwd=ROOT, capture_output=True, text=True,
                         check=True)
    assert int(out.stdout) > (64 << 20) // os.sysconf("SC_PAGE_SIZE") // 2


@pytest.mark.skipif(GLIBC, reason="without glibc only")
def test_trim_heap_is_a_no_op_without_glibc():
    assert heap.trim_heap() is False


# bf16 on a CPU whose bf16 GEMM is the slow one: the linear layers multiply in fp32 (runtime.cpu_bf16_gemm_in_fp32)

def assert_rounded_product(out, ref):
    """`out` is the bf16 rounding of the exact product `ref`: exactly, but where fp32 sums in another order tip a
    tie (1 ulp)."""
    ulps = (out.view(torch.int16).int() - ref.view(torch.int16).int()).abs()
    assert ulps.max() <= 1 and (ulps == 0).float().mean() > 0.99, (ulps.max(), (ulps == 0).float().mean())


def _bf16_linear_run(monkeypatch, mode, x, lin, grad):
    monkeypatch.setenv("MAECLI_CPU_BF16_GEMM", mode)
    x = x.clone().requires_grad_()
    lin.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(x)
    out.backward(grad)
    return out, x.grad, lin.weight.grad, lin.bias.grad


def test_bf16_linear_in_fp32_gives_the_bf16_result(monkeypatch):
    from maecli.model import Linear

    g = torch.Generator().manual_seed(0)
    lin = Linear(96, 160)
    x, grad = torch.randn(4, 33, 96, generator=g), torch.randn(4, 33, 160, generator=g).bfloat16()
    out, grad_x, grad_w, grad_b = _bf16_linear_run(monkeypatch, "fp32", x, lin, grad)
    native = _bf16_linear_run(monkeypatch, "native", x, lin, grad)
    assert out.dtype == native[0].dtype == torch.bfloat16
    assert [t.dtype for t in (grad_x, grad_w, grad_b)] == [t.dtype for t in native[1:]] == [torch.float32] * 3
    # float64 on the operands rounded to bf16, as autocast rounds them
    xb, wb, bb = (t.bfloat16().double() for t in (x, lin.weight.detach(), lin.bias.detach()))
    ref = (xb @ wb.T + bb).bfloat16()
    assert_rounded_product(out, ref)
    # gradients of the bf16 operands, in fp32 (autocast's bf16 kernel rounds them to bf16)
    g64 = grad.double()
    for got, want in [(grad_x, g64 @ wb), (grad_w, g64.reshape(-1, 160).T @ xb.reshape(-1, 96)),
                      (grad_b, g64.sum((0, 1)))]:
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def _matmul_dtypes(model, imgs, noise):
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = set()
    matmuls = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.convolution.default,
               torch.ops.aten.convolution_backward.default)

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in matmuls:
                seen.update(a.dtype for a in args if isinstance(a, torch.Tensor))
            return func(*args, **(kwargs or {}))

    with Record():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(imgs, noise=noise)[0]
        loss.backward()
    return seen


def test_bf16_training_step_runs_its_linear_layers_on_the_chosen_gemm(monkeypatch):
    torch.manual_seed(0)
    model = MAE(MAEConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                          decoder_dim=16, decoder_depth=1, decoder_heads=2))
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    monkeypatch.setenv("MAECLI_CPU_BF16_GEMM", "fp32")
    assert _matmul_dtypes(model, imgs, noise) == {torch.float32}
    monkeypatch.setenv("MAECLI_CPU_BF16_GEMM", "native")
    assert torch.bfloat16 in _matmul_dtypes(model, imgs, noise)
    assert all(type(m) is not torch.nn.Linear for m in model.modules())  # timm's layers too


def test_patch_projection_in_fp32_is_the_bf16_convolution(monkeypatch):
    from maecli.model import PatchProjection

    g = torch.Generator().manual_seed(1)
    proj = PatchProjection(3, 48, kernel_size=8, stride=8)
    x = torch.randn(2, 3, 32, 24, generator=g)
    monkeypatch.setenv("MAECLI_CPU_BF16_GEMM", "fp32")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = proj(x)
    assert out.shape == (2, 48, 4, 3) and out.dtype == torch.bfloat16
    xb, wb, bb = (t.bfloat16().double() for t in (x, proj.weight.detach(), proj.bias.detach()))
    assert_rounded_product(out, torch.nn.functional.conv2d(xb, wb, bb, stride=8).bfloat16())


@pytest.mark.parametrize("native, env, expected", [(True, None, False), (False, None, True), (True, "fp32", True),
                                                   (False, "native", False), (False, "Native", False),
                                                   (False, "auto", True)])
def test_bf16_gemm_choice_follows_the_cpu_unless_told(monkeypatch, native, env, expected):
    monkeypatch.setattr(runtime, "native_bf16", lambda device: native)
    runtime.cpu_native_bf16.cache_clear()
    if env is None:
        monkeypatch.delenv("MAECLI_CPU_BF16_GEMM", raising=False)
    else:
        monkeypatch.setenv("MAECLI_CPU_BF16_GEMM", env)
    try:
        assert runtime.cpu_bf16_gemm_in_fp32() is expected
    finally:
        runtime.cpu_native_bf16.cache_clear()


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
    one_by_one = [ds[item] for item in items]
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
        assert torch.equal(x, crop(img)) and len(failed) == attempt


def test_embed_reads_a_batch_as_it_reads_each_source(bad_images_dir):
    from PIL import Image

    from maecli.embedding import Images

    ds = Images(32, 3)
    sources = list(D.find_images(bad_images_dir)) + [Image.new("RGB", (40, 30), (200, 10, 10)),
                                                    torch.zeros(1, 8, 8, dtype=torch.uint8)]
    items = list(enumerate(sources))
    batch = ds.__getitems__(items)
    assert [p for p, _, _ in batch] == list(range(len(sources)))
    for (_, x, failure), item in zip(batch, items):
        _, y, failure_y = ds[item]
        assert failure == failure_y and (x is None) == (y is None) and (x is None or torch.equal(x, y))
    assert batch[-1][2] is not None and batch[-2][2] is None  # the wrong-shape tensor fails, the PIL image reads
    assert sum(f is not None for _, _, f in batch) > 5  # the folder's broken files are reported one by one
