"""What the doctor measures: this machine's torch, memory and disk, and what a coordinator answers
before any session (its gRPC API's ListCheckpoints, its HTTP API's run manifest, join box and Date
header). Each returns the facts record peer/doctor/verdicts.py judges; nothing here decides.

    facts = probe_coordinator("203.0.113.7:50051", ClientTls())    # or the dashboard's http://HOST:PORT
    torch_facts = gather_torch(); ram, device = gather_memory(torch_facts, gpu=-1)
"""

from __future__ import annotations

import dataclasses
import email.utils
import ipaddress
import json
import shutil
import time
import urllib.parse
from pathlib import Path

from crowdtrain.peer.checks import check_run_id
from crowdtrain.peer.display import clean_display
from crowdtrain.peer.doctor.verdicts import ClockReading, CoordinatorFacts, DiskFacts, TorchFacts
from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.link.client import CoordinatorClient, is_http_url
from crowdtrain.peer.link.download import open_url
from crowdtrain.peer.link.tls import ClientTls, plaintext_refusal
from crowdtrain.peer.machine.device import DeviceError, choose_device
from crowdtrain.peer.machine.fit import available_bytes
from crowdtrain.peer.run.manifest import RunManifest

MAX_ANSWER_BYTES = 16 << 20  # of the run manifest or the join box read from the coordinator
HTTP_TIMEOUT_S = 10.0  # each call to the coordinator, gRPC or HTTP


def gpu_driver() -> str:
    """A GPU this machine has, found without torch: "nvidia (nvidia-smi)", "amd (/dev/kfd)" or ""."""
    if shutil.which("nvidia-smi"):
        return "nvidia (nvidia-smi)"
    if Path("/proc/driver/nvidia").exists():
        return "nvidia (/proc/driver/nvidia)"
    if Path("/dev/kfd").exists():
        return "amd (/dev/kfd)"
    return ""


def gather_torch() -> TorchFacts:
    """What this machine's torch is and sees."""
    driver = gpu_driver()
    try:
        import torch
    except Exception as e:  # a broken install (missing CUDA libraries, ...): the verdict says so
        return TorchFacts("", import_error=clean_display(f"{type(e).__name__}: {e}", 200), gpu_driver=driver)
    names, bf16 = [], []
    for index in range(torch.cuda.device_count()):  # what machine/device.pick_device counts
        names.append(clean_display(torch.cuda.get_device_name(index), 60))
        with torch.cuda.device(index):
            bf16.append(bool(torch.cuda.is_bf16_supported()))
    mps = getattr(torch.backends, "mps", None)
    return TorchFacts(
        torch.__version__,
        cuda_build=torch.version.cuda or "",
        hip_build=getattr(torch.version, "hip", None) or "",
        gpu_names=tuple(names),
        gpu_bf16=tuple(bf16),
        mps=bool(mps and mps.is_available() and mps.is_built()),
        gpu_driver=driver,
    )


def gather_memory(facts: TorchFacts, gpu: int) -> tuple[tuple[int, str], tuple[int, str] | None]:
    """(RAM, the training device's memory or None on the CPU), as fit.available_bytes measures them
    for the device `crowdtrain peer` would pick."""
    try:
        device, _ = choose_device("auto", gpu, len(facts.gpu_names), facts.mps)
    except DeviceError:  # check_torch fails for it; the memory check looks at the CPU
        device = "cpu"
    if facts.import_error:
        device = "cpu"
    ram = available_bytes("cpu", 0)
    return ram, None if device == "cpu" else available_bytes(device, 0)


def gather_disk(cache_dir: str, run_id: str | None) -> DiskFacts:
    """Free bytes where the cache directory is (or will be created), and what this run already
    cached there."""
    root = Path(cache_dir).expanduser()
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    cached = 0
    if run_id:
        run_dir = root / check_run_id(run_id)  # as data/shards.run_cache_dir names it
        if run_dir.is_dir():
            cached = sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file() and not f.is_symlink())
    home = str(Path.home())
    shown = "~" + str(root)[len(home) :] if str(root).startswith(home + "/") else str(root)
    return DiskFacts(shown, shutil.disk_usage(existing).free, cached)


def global_addresses() -> tuple[str, ...]:
    """This machine's globally routable IP addresses (none behind NAT)."""
    import psutil

    found = []
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            try:
                ip = ipaddress.ip_address(a.address.split("%", 1)[0])
            except ValueError:  # a MAC address
                continue
            if ip.is_global:
                found.append(str(ip))
    return tuple(found)


def _get(url: str, tls: ClientTls) -> tuple[bytes, ClockReading | None]:
    """The body of `url` (bounded) and a clock reading from its Date header (None without one)."""
    sent = time.time()
    with open_url(url, HTTP_TIMEOUT_S, tls.ssl_context()) as response:
        received = time.time()  # the headers are here; the body may take longer
        date = response.headers.get("Date")
        body = response.read(MAX_ANSWER_BYTES + 1)
    if len(body) > MAX_ANSWER_BYTES:
        raise ValueError(f"{url} sent more than {MAX_ANSWER_BYTES} bytes")
    try:
        clock = ClockReading(email.utils.parsedate_to_datetime(date).timestamp(), sent, received)
    except (TypeError, ValueError):  # no Date header, or a malformed one
        clock = None
    return body, clock


def _minimum_version(base: str, tls: ClientTls) -> str | None:
    """The run's minimum crowdtrain, from the dashboard's join box (None: not published there)."""
    try:
        answer = json.loads(_get(f"{base}/api/v1/join", tls)[0])
    except (OSError, ValueError):  # an older coordinator without the join box (404)
        return None
    value = answer.get("min_peer_version") if isinstance(answer, dict) else None
    return clean_display(value, 40) if isinstance(value, str) else None


def _latest_checkpoint_bytes(listing) -> int | None:
    if not listing.checkpoints:
        return None
    latest = max(listing.checkpoints, key=lambda c: c.step)
    return sum(max(0, f.size_bytes) for f in latest.files)


def probe_coordinator(address: str, tls: ClientTls) -> CoordinatorFacts:
    """Ask the coordinator what a joining peer would: its gRPC API (ListCheckpoints, which needs no
    session), then its HTTP API: the run's manifest (with a clock reading) and the join box."""
    started = time.monotonic()
    try:
        with CoordinatorClient(address, rpc_timeout_s=HTTP_TIMEOUT_S, tls=tls) as client:
            listing = client.list_checkpoints()
            grpc_address = client.address
    except CrowdtrainError as e:  # CoordinatorUnavailable: what failed (`failure`), then what to do
        message = str(e)
        failure = getattr(e, "failure", "") or message
        advice = message[len(failure) :].lstrip("; ") if message.startswith(failure) else ""
        return CoordinatorFacts(
            address, error=clean_display(failure, 400), error_next_step=clean_display(advice, 300)
        )
    facts = CoordinatorFacts(
        address,
        grpc_address=grpc_address,
        round_trip_s=time.monotonic() - started,
        checkpoint_bytes=_latest_checkpoint_bytes(listing),
    )
    if is_http_url(address):
        parts = urllib.parse.urlsplit(address)
        base = f"{parts.scheme.lower()}://{parts.netloc}"
    else:
        base = clean_display(listing.http_base_url, 300).rstrip("/")
    facts = dataclasses.replace(facts, http_base=base)
    refused = plaintext_refusal(base, tls) if is_http_url(base) else f"it names no HTTP address ({base!r})"
    if refused:
        return dataclasses.replace(facts, http_error=refused)
    http_tls = tls if tls.enabled else ClientTls(enabled=base.lower().startswith("https://"))
    try:
        text, clock = _get(f"{base}/api/v1/run", http_tls)
    except (OSError, ValueError, CrowdtrainError) as e:  # urllib's errors are OSErrors
        return dataclasses.replace(facts, http_error=clean_display(str(e), 300))
    facts = dataclasses.replace(facts, clock=clock, min_peer_version=_minimum_version(base, http_tls))
    try:
        return dataclasses.replace(facts, manifest=RunManifest.from_json(text.decode("utf-8", "replace")))
    except CrowdtrainError as e:  # ManifestError: a format or fields this crowdtrain does not read
        return dataclasses.replace(facts, manifest_error=clean_display(str(e), 400))
