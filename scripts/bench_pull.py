"""`crowdtrain pull` against `curl` of the same checkpoint files from the same coordinator.

    .venv/bin/python -m scripts.bench_pull --size-mb 500      # base125m's initial weights, 499 MB
    .venv/bin/python -m scripts.bench_pull --size-mb 3        # tiny: a quick check on a laptop

No training: the run is created by the coordinator's own code (`runs.open_run`, the preset whose fp32
weights are nearest --size-mb, over a few stdlib packages as the corpus), and its randomly
initialised model is written and signed as checkpoint step 0 exactly as the publisher writes one
(`save_pretrained`, the HF tokenizer, `archive.finalize` with the run's key). Then a real
`crowdtrain coordinator` process (publisher off) serves it over HTTP and the gRPC stream.

Each round runs `curl` of every file over HTTP (download only), then `pull()` over HTTP and over
the gRPC stream (download, signature, sha256 of every file, atomic rename into place), each into
an empty directory on the same disk. One unmeasured curl first puts the served files in the page
cache. The table shows each transport's best round (the machine may be shared: the best round is
the least disturbed one) and its ratio to curl's best.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

from crowdtrain.coordinator.demo import coordinator_command, spawn, stop_children, wait_for_endpoints
from crowdtrain.peer.checkpoints import trust
from crowdtrain.peer.checkpoints.format import CheckpointMeta
from crowdtrain.peer.checkpoints.pull import list_published, pull  # imported before any clock starts

# a corpus of stdlib packages: enough documents for base125m's 64 shards, a tokenizer in seconds
CORPUS_PACKAGES = (
    "asyncio",
    "email",
    "json",
    "http",
    "urllib",
    "importlib",
    "concurrent",
    "unittest",
    "xml",
    "multiprocessing",
    "idlelib",
    "lib2to3",
    "ctypes",
    "encodings",
    "tkinter",
)


def preset_for(size_mb: float) -> str:
    """The preset whose fp32 weights are nearest `size_mb` megabytes."""
    from crowdtrain.peer.run.manifest import PRESETS

    return min(PRESETS.values(), key=lambda p: abs(p.num_parameters() * 4 / 1e6 - size_mb)).name


def publish_initial_checkpoint(data_dir: Path, preset: str):
    """Create a run in `data_dir` (the coordinator's own code) and publish its initial weights as
    step 0, signed with the run's key; returns the CheckpointMeta."""
    from crowdtrain.coordinator.config import CoordinatorConfig
    from crowdtrain.coordinator.publishing import archive
    from crowdtrain.coordinator.run.runs import RunSettings, open_run
    from crowdtrain.peer.run.model import build_model, save_hf

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = tuple(str(stdlib / p) for p in CORPUS_PACKAGES if (stdlib / p).is_dir())
    config = CoordinatorConfig(data_dir=str(data_dir), preset=preset, data=corpus)
    store, run = open_run(config.settings(RunSettings), data_dir)
    try:
        root = data_dir / "checkpoints"
        staging = archive.new_staging_dir(root, 0)
        save_hf(build_model(run.manifest), run.tokenizer_json, run.manifest, staging)
        initial = CheckpointMeta(
            run_id=run.manifest.run_id,
            step=0,
            samples_seen=0,
            eval_loss=0.0,  # not evaluated: only the bytes matter here
            created_unix_s=time.time(),
            manifest_sha256=run.manifest.sha256(),
            previous_step=None,
            files=(),
        )
        return archive.finalize(staging, root, initial, signing_key=run.signing_key)
    finally:
        store.close()


def curl_seconds(base_url: str, names: list[str], dest: Path) -> float:
    """Seconds for plain `curl` to download every file of `names` under `base_url` into `dest`."""
    dest.mkdir(parents=True)
    t0 = time.monotonic()
    for name in names:
        subprocess.run(["curl", "-sf", "-o", str(dest / name), f"{base_url}/{name}"], check=True)
    return time.monotonic() - t0


def pull_seconds(coordinator: str, out: Path, step: int, public_key: str, work: Path) -> float:
    """Seconds for `pull()` (download + signature + every sha256 + rename) into `out`, the run's key
    pinned, with a private trust store (the user's own is never touched)."""
    store = trust.TrustStore(work / "trusted_keys.json")
    t0 = time.monotonic()
    pull(coordinator, out, step=step, public_key=public_key, store=store)
    return time.monotonic() - t0


def compare_with_curl(
    endpoints: dict, work: Path, rounds: int = 1, step: int = -1
) -> tuple[float, list[tuple[str, float, float, float]]]:
    """(checkpoint MB, rows) for the checkpoint `step` (-1: the latest) the coordinator at
    `endpoints` lists; rows are (transport, pull MB/s, curl MB/s, pull/curl), best of `rounds`."""
    listed, _ = list_published(endpoints["grpc"])
    chosen = listed[-1] if step < 0 else next(c for c in listed if c.step == step)
    # the signed key, not the listing's say-so: pull checks it against crowdtrain.json anyway
    public_key = _signed_key(chosen.url)
    names = [f.name for f in chosen.files]
    size_mb = sum(f.size_bytes for f in chosen.files) / 1e6
    scratch = work / "scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    curl_seconds(chosen.url, names, scratch / "warm")  # page cache: every round reads from memory
    best = {"curl": float("inf"), "HTTP": float("inf"), "gRPC stream": float("inf")}
    for i in range(rounds):
        shutil.rmtree(scratch, ignore_errors=True)
        best["curl"] = min(best["curl"], curl_seconds(chosen.url, names, scratch / f"curl-{i}"))
        for label, source in (("HTTP", endpoints["http"]), ("gRPC stream", endpoints["grpc"])):
            seconds = pull_seconds(source, scratch / f"pull-{i}-{label[:4]}", chosen.step, public_key, work)
            best[label] = min(best[label], seconds)
    shutil.rmtree(scratch, ignore_errors=True)
    curl_mb_s = size_mb / best["curl"]
    rows = [(t, size_mb / best[t], curl_mb_s, best["curl"] / best[t]) for t in ("HTTP", "gRPC stream")]
    return size_mb, rows


def _signed_key(checkpoint_url: str) -> str:
    with urllib.request.urlopen(f"{checkpoint_url}/crowdtrain.json", timeout=30) as response:
        return CheckpointMeta.from_json(response.read().decode()).public_key


def format_table(size_mb: float, rows: list[tuple[str, float, float, float]]) -> str:
    """The side-by-side table of `compare_with_curl`'s rows."""
    lines = [
        f"pull vs curl, {size_mb:.1f} MB checkpoint (each column: best of the rounds)",
        f"{'transport':<12} {'pull MB/s':>10} {'curl MB/s':>10} {'pull/curl':>10}",
    ]
    lines += [f"{t:<12} {p:>10.1f} {c:>10.1f} {r:>9.2f}x" for t, p, c, r in rows]
    return "\n".join(lines)


def pull_figures(size_mb: float, work: Path, rounds: int = 3) -> list[tuple[str, float, float, float]]:
    """(transport, pull MB/s, curl MB/s, pull/curl) for "HTTP" and "gRPC stream": a checkpoint of
    about `size_mb` MB published in `work` and served by a real coordinator process. Prints the table."""
    data_dir = work / "coord"
    preset = preset_for(size_mb)
    t0 = time.monotonic()
    publish_initial_checkpoint(data_dir, preset)
    print(f"run ({preset}) created and its initial weights published in {time.monotonic() - t0:.0f}s")
    coordinator = spawn(
        "coordinator", coordinator_command(data_dir, "--checkpoint-interval-s", "0"), work, echo=False
    )
    try:
        endpoints = wait_for_endpoints(data_dir / "endpoints.json", coordinator, timeout_s=300)
        served_mb, rows = compare_with_curl(endpoints, work, rounds)
    finally:
        stop_children([coordinator])
    print(format_table(served_mb, rows))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=500.0, help="about this big (the nearest preset)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="measured rounds; each transport's best is shown"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="crowdtrain-bench-pull-"))
    try:
        pull_figures(args.size_mb, work, args.rounds)
    finally:
        shutil.rmtree(work / "coord" / "checkpoints", ignore_errors=True)  # the big part
        print(f"(coordinator log in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
