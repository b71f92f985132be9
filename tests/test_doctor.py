"""`crowdtrain doctor`: each verdict from injected measurements (a CPU torch on a machine with an
NVIDIA GPU, memory for no preset, a full disk, a skewed clock, a run that needs a newer crowdtrain),
then the real command on this machine against an in-process coordinator (gRPC and HTTP APIs), as
lines and as --json, with its exit status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from crowdtrain.coordinator.api.grpcserver import create_server
from crowdtrain.coordinator.api.servicer import CoordinatorServicer, RunInfo
from crowdtrain.coordinator.api.webserver import WebContext, WebServer
from crowdtrain.coordinator.cli import main
from crowdtrain.coordinator.peers.health import HealthSettings
from crowdtrain.coordinator.peers.store import Store
from crowdtrain.coordinator.publishing import archive
from crowdtrain.peer import __version__
from crowdtrain.peer.checkpoints.format import CheckpointMeta
from crowdtrain.peer.doctor.command import checks_json, exit_status, format_lines
from crowdtrain.peer.doctor.verdicts import (
    CLOCK_FAIL_S,
    DISK_FLOOR_BYTES,
    Check,
    ClockReading,
    CoordinatorFacts,
    DiskFacts,
    ModelToFit,
    TorchFacts,
    check_clock,
    check_compatible,
    check_coordinator,
    check_disk,
    check_memory,
    check_reachable,
    check_torch,
    clock_skew,
    preset_models,
    run_disk_needs,
)
from crowdtrain.peer.run.manifest import DataSpec, ShardSpec, TokenizerSpec, build_manifest, get_preset

GB = 10**9
NAMES = ["torch", "memory", "disk", "coordinator", "compatible", "reachable", "clock"]


def a_manifest(shard_bytes=(1_000_000, 3_000_000), eval_bytes=500_000):
    preset = get_preset("tiny")
    shard = lambda name, size: ShardSpec(name, "0" * 64, size, 10)  # noqa: E731
    shards = tuple(shard(f"train-{i:05d}.jsonl", size) for i, size in enumerate(shard_bytes))
    data = DataSpec("t", preset.seq_len, 0.02, shard("eval.jsonl", eval_bytes), shards, 8)
    tokenizer = TokenizerSpec("byte-level-bpe", preset.vocab_size, "0" * 64)
    return build_manifest(preset, run_id="ct_doctor", created_unix_s=1.0, tokenizer=tokenizer, data=data)


# ------------------------------------------------------------------ torch


def test_a_cpu_torch_on_a_machine_with_an_nvidia_gpu_is_a_warning_naming_the_install_command():
    check = check_torch(TorchFacts("2.13.0+cpu", gpu_driver="nvidia (nvidia-smi)"))
    assert check.verdict == "warn" and "CPU build" in check.detail and "nvidia-smi" in check.detail
    assert check.next_step.endswith(
        "pip install --force-reinstall 'torch==2.13.0' --index-url https://download.pytorch.org/whl/cu128"
    )
    amd = check_torch(TorchFacts("2.13.0+cpu", gpu_driver="amd (/dev/kfd)"))
    assert amd.verdict == "warn" and "whl/rocm" in amd.next_step


@pytest.mark.parametrize(
    "facts, gpu, verdict, words",
    [
        (TorchFacts("2.13.0+cpu"), -1, "ok", "(CPU build): no GPU; trains on the CPU"),
        (
            TorchFacts("2.13.0+cu128", cuda_build="12.8", gpu_names=("NVIDIA H100",), gpu_bf16=(True,)),
            -1,
            "ok",
            "(CUDA 12.8 build): cuda:0 NVIDIA H100 (bf16)",
        ),
        (
            TorchFacts("2.13.0", cuda_build="12.8", gpu_names=("A", "Tesla T4"), gpu_bf16=(True, False)),
            1,
            "ok",
            "cuda:1 Tesla T4 (fp32 (no bf16 on this GPU))",
        ),
        (
            TorchFacts("2.13.0+rocm6.4", hip_build="6.4", gpu_names=("AMD MI300X",), gpu_bf16=(True,)),
            -1,
            "ok",
            "ROCm 6.4",
        ),
        (
            TorchFacts("2.13.0", cuda_build="12.8", gpu_driver="nvidia (nvidia-smi)"),
            -1,
            "warn",
            "sees no GPU",
        ),
        (TorchFacts("2.13.0", cuda_build="12.8", gpu_names=("A",), gpu_bf16=(True,)), 3, "fail", "--gpu 3"),
        (TorchFacts("2.13.0", mps=True), -1, "ok", "Apple MPS"),
        (TorchFacts("", import_error="OSError: libcudart.so.12"), -1, "fail", "does not import"),
    ],
)
def test_torch_verdicts(facts, gpu, verdict, words):
    check = check_torch(facts, gpu)
    assert check.verdict == verdict and words in check.detail
    assert bool(check.next_step) == (verdict != "ok")


# ------------------------------------------------------------------ memory, disk


def test_memory_for_no_preset_fails_some_warns_all_is_ok():
    models = preset_models()
    assert [m.label for m in models] == ["tiny", "small30m", "base125m", "wan30m"]
    none = check_memory((10_000_000, "cpu: test"), None, models)
    assert none.verdict == "fail" and none.detail.startswith("no preset fits: tiny needs")
    assert "close programs" in none.next_step
    some = check_memory((2 * GB, "cpu: test"), None, models)
    assert some.verdict == "warn" and some.detail.startswith(
        "fits tiny, small30m, wan30m; not base125m needs"
    )
    assert check_memory((64 * GB, "cpu"), (80 * GB, "cuda:0"), models).verdict == "ok"
    gpu_too_small = check_memory((64 * GB, "cpu"), (1 * GB, "cuda:0"), models)
    assert gpu_too_small.verdict == "warn" and "on the GPU" in gpu_too_small.detail
    run = ModelToFit("the run's base125m model", get_preset("base125m").num_parameters(), "sync", False)
    assert check_memory((2 * GB, "cpu"), None, models, run).verdict == "fail"
    fits = check_memory((64 * GB, "cpu"), None, models, run)
    assert (fits.verdict, fits.detail) == (
        "ok",
        "the run's base125m model needs 3.5 GB of RAM; 64.0 GB RAM usable",
    )


def test_disk_against_the_run_and_without_one():
    manifest = a_manifest()
    start, whole, what = run_disk_needs(manifest, checkpoint_bytes=2_000_000)
    # eval 0.5 MB + 2 checkpoints of 2 MB, plus the largest shard (3 MB) or all of them (4 MB)
    assert (start, whole) == (7_500_000, 8_500_000) and "2 shards of 4.0 MB" in what
    unpublished = run_disk_needs(manifest, checkpoint_bytes=None)  # the model's float32 weights, twice
    assert unpublished[0] == 500_000 + 3_000_000 + 2 * 4 * manifest.model.num_parameters
    needs = (start, whole, what)
    low = check_disk(DiskFacts("~/.cache/crowdtrain", 7_000_000), needs)
    assert low.verdict == "fail" and "needs 7.5 MB to start" in low.detail and "--cache-dir" in low.next_step
    assert check_disk(DiskFacts("c", 8_000_000), needs).verdict == "warn"
    assert check_disk(DiskFacts("c", 7_000_000, cached_bytes=2_000_000), needs).verdict == "ok"  # reused
    assert check_disk(DiskFacts("c", DISK_FLOOR_BYTES - 1), None).verdict == "warn"
    assert check_disk(DiskFacts("c", DISK_FLOOR_BYTES), None).verdict == "ok"
    assert 2.0 * GB < DISK_FLOOR_BYTES < 2.3 * GB


# ------------------------------------------------------------------ the coordinator


def answered(**kw) -> CoordinatorFacts:
    facts = dict(grpc_address="127.0.0.1:50051", http_base="http://127.0.0.1:8080", manifest=a_manifest())
    return CoordinatorFacts("127.0.0.1:50051", **(facts | kw))


def test_a_skewed_clock_warns_then_fails():
    reading = ClockReading(server_unix_s=1000.0, sent_unix_s=1010.0, received_unix_s=1010.2)
    skew, uncertainty = clock_skew(reading)
    assert skew == pytest.approx(9.6) and uncertainty == pytest.approx(0.6)
    late = check_clock(answered(clock=reading))
    assert late.verdict == "warn" and late.detail.startswith("+9.6 s from the coordinator's clock")
    assert "NTP" in late.next_step
    far = check_clock(
        answered(clock=ClockReading(1000.0, 1000.0 - CLOCK_FAIL_S - 5, 1000.0 - CLOCK_FAIL_S - 5))
    )
    assert far.verdict == "fail" and far.detail.startswith("-65.5 s") and "refuses" in far.detail
    assert check_clock(answered(clock=ClockReading(1000.0, 1000.3, 1000.9))).verdict == "ok"
    assert (
        check_clock(answered(clock=ClockReading(1000.0, 1005.0, 1007.0))).verdict == "ok"
    )  # within +/- 1.5 s
    assert check_clock(None).verdict == check_clock(answered(clock=None)).verdict == "skip"


def test_an_incompatible_version_or_manifest_fails_with_the_join_refusals_words():
    old = check_compatible(answered(min_peer_version="99.0"), "0.1.0")
    assert old.verdict == "fail"
    assert old.detail == "this run needs crowdtrain >= 99.0 and this peer runs 0.1.0"
    assert old.next_step.startswith("upgrade crowdtrain to >= 99.0")  # the rest of the refusal's line
    ok = check_compatible(answered(min_peer_version="0.1"), "0.1.0")
    assert ok.verdict == "ok" and ok.detail == "version 0.1.0 >= 0.1; run ct_doctor, manifest format 1"
    unpublished = check_compatible(answered(min_peer_version=None), "0.1.0")
    assert unpublished.verdict == "ok" and "not published" in unpublished.detail
    newer = check_compatible(
        answered(manifest=None, manifest_error="run manifest format 2 is not supported"), "0.1.0"
    )
    assert newer.verdict == "fail" and "upgrade" in newer.next_step
    assert check_compatible(None, "0.1.0").verdict == "skip"


def test_coordinator_and_reachability_verdicts():
    down = check_coordinator(CoordinatorFacts("h:1", error="unreachable", error_next_step="check it"))
    assert (down.verdict, down.next_step) == ("fail", "check it")
    no_http = check_coordinator(answered(http_error="connection refused"))
    assert no_http.verdict == "fail" and "HTTP port" in no_http.next_step
    assert check_coordinator(answered(round_trip_s=0.012)).detail.startswith(
        "gRPC 127.0.0.1:50051 answered in 12 ms"
    )
    assert check_coordinator(None).verdict == "skip"
    public = check_reachable(("203.0.113.7",))
    assert (
        public.verdict == "skip"
        and "coordinator dials the peer" in public.detail
        and "203.0.113.7" in public.detail
    )
    assert "client mode" in check_reachable(()).detail


def test_lines_fit_80_columns_in_ascii_and_the_exit_status_follows_the_failures():
    checks = [
        Check("torch", "ok", "torch 2.13.0 (CUDA 12.8 build): cuda:0 NVIDIA GeForce RTX 4090 \u2122 (bf16)"),
        Check("disk", "fail", "x " * 60, "free space there, or pass --cache-dir on a larger disk " * 2),
    ]
    lines = format_lines(checks)
    assert all(len(line) <= 80 and line.isascii() for line in lines)
    assert lines[0].startswith("ok    torch        torch 2.13.0")
    assert lines[-1] == "not ready: fix what failed above (1 ok, 0 warn, 1 fail, 0 skip; exit status 1)"
    assert any(line.strip().startswith("next: free space") for line in lines)
    assert "\033[31mfail" in "\n".join(format_lines(checks, tty=True))
    assert exit_status(checks) == 1 and exit_status(checks[:1] + [Check("clock", "warn", "w", "n")]) == 0
    assert checks_json(checks[:1])[0] == {
        "name": "torch",
        "verdict": "ok",
        "detail": checks[0].detail,
        "next_step": "",
    }
    with pytest.raises(ValueError):
        Check("x", "bad", "d")


# ------------------------------------------------------------------ the real command


@pytest.fixture
def coordinator(tmp_path: Path):
    """A coordinator's gRPC and HTTP APIs in process, serving a run and one published checkpoint."""
    manifest_json = a_manifest().to_json()
    store = Store(tmp_path / "s.sqlite3")
    root = tmp_path / "ckpt"
    staging = archive.new_staging_dir(root, 3)
    (staging / "model.safetensors").write_bytes(b"w" * 1000)
    archive.finalize(staging, root, CheckpointMeta("ct_doctor", 3, 768, 4.0, 1.0, "m", None, ()))
    web = WebServer(
        WebContext(tmp_path, frozenset(), root, manifest_json, store, lambda: None), "127.0.0.1", 0
    )
    web.start()
    base = f"http://127.0.0.1:{web.port}"
    run = RunInfo(manifest_json, "x", "{}", 2, base, root)
    server, port = create_server(
        CoordinatorServicer(run, store, HealthSettings(2.0, 10.0), initial_peers=list), "127.0.0.1", 0
    )
    server.start()
    web.announce_grpc(f"127.0.0.1:{port}", False, min_peer_version="0.1")
    try:
        yield f"127.0.0.1:{port}", base, web
    finally:
        server.stop(0)
        web.shutdown()
        store.close()


def test_the_real_command_on_this_machine(coordinator, tmp_path: Path, capsys):
    grpc_address, base, web = coordinator
    cache = str(tmp_path / "cache")
    status = main(["doctor", "--coordinator", grpc_address, "--cache-dir", cache])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"crowdtrain {__version__} doctor on ")
    verdicts = {line[6:17].strip(): line[:4].strip() for line in out[1:-1] if not line.startswith(" ")}
    assert list(verdicts) == NAMES
    assert [verdicts[n] for n in ("coordinator", "compatible", "reachable", "clock")] == [
        "ok",
        "ok",
        "skip",
        "ok",
    ]
    assert status == (1 if "fail" in verdicts.values() else 0)
    assert out[-1].endswith(f"exit status {status})") and all(len(line) <= 80 for line in out)
    compatible = next(line for line in out if line[6:].startswith("compatible"))
    assert f"version {__version__} >= 0.1; run ct_doctor, manifest format 1" in compatible

    # the dashboard's address, --json: the same checks as one list
    assert main(["doctor", "--coordinator", base, "--cache-dir", cache, "--json"]) == status
    checks = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in checks] == NAMES and set(checks[0]) == {
        "name",
        "verdict",
        "detail",
        "next_step",
    }
    assert checks[3]["verdict"] == "ok" and checks[3]["detail"].startswith(
        f"gRPC {grpc_address} (from {base})"
    )

    # a run that needs a newer crowdtrain: the command fails, with the join refusal's upgrade line
    web.announce_grpc(grpc_address, False, min_peer_version="99.0")
    assert main(["doctor", "--coordinator", grpc_address, "--cache-dir", cache, "--json"]) == 1
    compatible = json.loads(capsys.readouterr().out)[4]
    assert compatible["verdict"] == "fail" and compatible["next_step"].startswith("upgrade crowdtrain")
