"""Where and how the model runs: precision resolution, loader workers, the help screen's speed, and the host tuning
the command line applies on CPUs (and only there). Speed itself is measured in benchmarks/, never here."""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from conftest import EXAMPLES, ROOT

from maecli import cli, host, runtime
from maecli.model import MAE, MAEConfig, no_weight_decay_groups
from maecli.train.loop import make_optimizer


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
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert runtime.resolve_precision("bf16", torch.device("cpu")) == "bf16"  # asking explicitly always works
    assert len(caught) == (0 if expected else 1)  # with one warning where bf16 is the slow choice


def test_cpu_vendor_reads_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\n")
    assert runtime.cpu_vendor(str(info)) == "AuthenticAMD"
    info.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n")
    assert runtime.cpu_vendor(str(info)) == "GenuineIntel"


def cli_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**env, **extra}


@pytest.mark.parametrize(
    "environ, others, expected",
    [
        ({}, 0.0, {"GOMP_SPINCOUNT": "10000"}),  # idle cores: spin briefly
        ({}, 0.4, {"GOMP_SPINCOUNT": "10000"}),
        ({}, 1.0, {"OMP_WAIT_POLICY": "PASSIVE"}),  # someone else is computing: sleep
        ({}, None, {"OMP_WAIT_POLICY": "PASSIVE"}),  # cannot tell: sleep
        ({"LOCAL_WORLD_SIZE": "2"}, 0.0, {"OMP_WAIT_POLICY": "PASSIVE"}),  # launched processes share the cores
        ({"LOCAL_WORLD_SIZE": "1"}, 0.0, {"GOMP_SPINCOUNT": "10000"}),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, 0.0, {}),  # the user's choice wins
        ({"GOMP_SPINCOUNT": "1000"}, 5.0, {}),
    ],
)
def test_openmp_wait_policy(environ, others, expected):
    assert host.openmp_wait_env(environ, others) == expected


def test_others_running_counts_the_runnable_threads_besides_this_one(tmp_path):
    loadavg = tmp_path / "loadavg"
    loadavg.write_text("3.61 2.98 1.02 4/312 4242\n")  # 4 runnable, this process among them
    assert host.others_running(samples=3, gap_s=0, loadavg=str(loadavg)) == 3
    assert host.others_running(samples=1, gap_s=0, loadavg=str(tmp_path / "missing")) is None


@pytest.mark.parametrize(
    "extra, expected",
    [({}, ("PASSIVE", "10000")), ({"OMP_WAIT_POLICY": "ACTIVE"}, ("ACTIVE",)), ({"GOMP_SPINCOUNT": "1000"}, ("1000",))],
)
def test_cli_sets_the_wait_policy_before_torch_unless_told(extra, expected):
    code = (
        "import os, sys, maecli.host as h; h.gpu_present = lambda: False; h.configure_openmp(); import torch; "
        "print(os.environ.get('OMP_WAIT_POLICY') or os.environ.get('GOMP_SPINCOUNT'))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=cli_env(**extra), capture_output=True, text=True, check=True)
    assert out.stdout.strip() in expected


def test_help_shows_bracketed_defaults_literally():
    out = subprocess.run(
        [sys.executable, "-m", "maecli", "pretrain", "--help"],
        env=cli_env(COLUMNS="200"),
        capture_output=True,
        text=True,
        check=True,
    )
    assert "[default: runs/<date-time>]" in out.stdout
    # typer's rich help formatter costs ~0.2 s of imports (rich.markdown, pygments); plain click help does not
    code = (
        "import sys; from maecli.cli import main; sys.argv = ['maecli', '--help']\n"
        "try: main()\nexcept SystemExit: pass\n"
        "assert 'rich' not in sys.modules and 'torch' not in sys.modules, 'help loaded rich or torch'"
    )
    subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, check=True)


def test_pretrain_optimizer_is_fused_adamw_with_the_papers_betas():
    model = MAE(
        MAEConfig(
            img_size=16,
            patch_size=8,
            embed_dim=8,
            depth=1,
            num_heads=2,
            decoder_dim=8,
            decoder_depth=1,
            decoder_heads=2,
        )
    )
    opt = make_optimizer(no_weight_decay_groups(model, 0.05), 1e-3, torch.device("cpu"), betas=(0.9, 0.95))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"] and opt.defaults["betas"] == (0.9, 0.95)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


@pytest.mark.parametrize(
    "cpus, procs, cuda, expected",
    [
        (2, None, False, 1),
        (16, None, False, 4),
        (64, None, False, 4),  # CPU training: the model keeps the cores
        (16, None, True, 15),
        (128, None, True, 16),  # one GPU: every core but one decodes, up to 16
        (16, "8", True, 1),
        (128, "8", True, 15),
        (128, "bad", True, 16),  # cores shared by the launched processes
    ],
)
def test_default_workers(monkeypatch, cpus, procs, cuda, expected):
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: set(range(cpus)), raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if procs is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", procs)
    assert runtime.default_workers() == expected


GLIBC = bool(os.confstr("CS_GNU_LIBC_VERSION")) if hasattr(os, "confstr") else False

# touches 64 MiB three times (bigger than any size glibc would keep on its heap by default) and prints the
# page faults of the last round; "keep" sets maecli's heap policy first
FAULTS_PER_ROUND = """
import resource, sys
from maecli import host
if sys.argv[1] == "keep":
    assert host.keep_freed_memory()
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = b"x" * (64 << 20)
    del block
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_kept_memory_is_reused_without_page_faults():
    env = {k: v for k, v in os.environ.items() if not host.malloc_tuned_by_user({k: v})}
    faults = {
        mode: int(
            subprocess.run(
                [sys.executable, "-c", FAULTS_PER_ROUND, mode],
                env=env,
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        for mode in ("default", "keep")
    }
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert faults["default"] > pages // 2  # glibc maps and unmaps such a block each time: every page faults
    assert faults["keep"] < pages // 20  # kept on the heap: the pages are already there


def test_a_users_malloc_settings_win(monkeypatch):
    assert host.malloc_tuned_by_user({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert host.malloc_tuned_by_user({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"})
    assert not host.malloc_tuned_by_user({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"})
    assert host.malloc_tuned_by_user({"MAECLI_KEEP_FREED_MEMORY": "0"})
    assert not host.malloc_tuned_by_user({"MAECLI_KEEP_FREED_MEMORY": "1"})
    assert host.keep_freed_memory({"MALLOC_MMAP_MAX_": "65536"}) is False


def test_host_tuning_is_the_cli_s_and_only_on_a_cpu(monkeypatch, tiny_weights, tmp_path):
    """The CLI sets the OpenMP policy before torch loads, and the heap policy once the model's device is known to
    be a CPU; the Python API changes no process-wide setting."""
    from typer.testing import CliRunner

    import maecli

    calls = []
    monkeypatch.setattr(host, "configure_openmp", lambda: calls.append("openmp"))
    monkeypatch.setattr(host, "keep_freed_memory", lambda environ=None: calls.append("heap"))
    img = sorted(EXAMPLES.glob("*.jpg"))[0]
    result = CliRunner().invoke(cli.app, ["embed", str(img), "-w", str(tiny_weights)])
    assert result.exit_code == 0, result.output
    assert calls == ["openmp", "heap"]
    calls.clear()
    maecli.embed(maecli.load(tiny_weights), [img])
    assert calls == []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    host.tune_for_cpu(torch.device("cuda"))
    assert calls == []


def test_importing_maecli_changes_no_process_setting():
    code = (
        "import os; before = dict(os.environ); import maecli, maecli.cli, maecli.train.pretrain, maecli.embedding; "
        "assert dict(os.environ) == before"
    )
    subprocess.run([sys.executable, "-c", code], env=cli_env(), capture_output=True, check=True)
