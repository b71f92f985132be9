"""The doctor's verdicts: each check a pure function of what was measured, returning a frozen `Check`.

    check_torch(TorchFacts("2.13.0+cpu", gpu_driver="nvidia (nvidia-smi)"))  # warn: a CPU build on a GPU
    check_memory(ram, device, preset_models(), run_model)                    # which models' training fits
    check_disk(DiskFacts("~/.cache/crowdtrain", free_bytes), run_disk_needs(manifest, ckpt_bytes))
    check_coordinator(facts); check_compatible(facts, __version__); check_clock(facts)
    check_reachable(coordinator_given, global_addresses)                     # a skip that says why

Rules are reused, not restated: the device `crowdtrain peer` picks (machine/device.choose_device)
and its precision (machine/accumulate.decide_precision); what training a model needs in memory
(run/modelsize.fits_before_building: machine/fit.py's static count of weights, gradients,
optimizer state and hivemind's copies; activations are measured when the peer joins); the join
refusal's version rule (checks.version_verdict) and the manifest's format (RunManifest.from_json,
applied where the facts are gathered: peer/doctor/measure.py).

Whether other peers can reach this one is checked by the coordinator dialing the peer's DHT port
(`CheckReachability`, coordinator/api/reachability.py), which takes a session: only a joined peer
can ask. So that check is a skip saying so (and what this machine's addresses suggest), not a guess.
"""

from __future__ import annotations

from dataclasses import dataclass

from crowdtrain.peer.checks import version_verdict
from crowdtrain.peer.machine.accumulate import decide_precision
from crowdtrain.peer.machine.device import DeviceError, choose_device
from crowdtrain.peer.machine.fit import format_bytes
from crowdtrain.peer.run.manifest import MANIFEST_FORMAT_VERSION, MAX_SHARD_BYTES, PRESETS, RunManifest
from crowdtrain.peer.run.modelsize import build_needs, fits_before_building

VERDICTS = ("ok", "warn", "fail", "skip")
# Clocks. hivemind's DHT authorizer (our SwarmAuthorizer is one) refuses a request stamped more than
# 60 s from the receiver's clock (hivemind/utils/auth.py, _MAX_CLIENT_SERVICER_TIME_DIFF), and the
# coordinator refuses a Join signed more than 300 s from its own (AdmissionSettings.max_join_skew_s):
# past 60 s the swarm refuses this peer. Far below that, averaging groups form in matchmaking windows
# of 3-15 s (the presets' matchmaking_time_s) that peers time by their own clocks: warn past 5 s. The
# HTTP Date header has whole seconds, so a reading is +/- 0.5 s plus half the round trip; only a
# skew beyond the threshold by more than that counts.
CLOCK_WARN_S = 5.0
CLOCK_FAIL_S = 60.0
FLOAT32_BYTES = 4  # a checkpoint's model.safetensors holds the float32 weights peer/run/model.py builds
# Without a run to ask: what the largest preset takes to start, at most: the eval shard and one training
# shard as large as a manifest may name (2 x 512 MiB), and its checkpoint twice (a resume pull is
# staged beside the previous one before the swap): about 2 GB.
LARGEST_PRESET = max(PRESETS.values(), key=lambda p: p.num_parameters())
DISK_FLOOR_BYTES = 2 * MAX_SHARD_BYTES + 2 * FLOAT32_BYTES * LARGEST_PRESET.num_parameters()
# a CPU-only torch on a machine with a GPU: the wheel index of a GPU build (pytorch.org/get-started
# lists the tags each torch release has)
CUDA_WHEELS = "https://download.pytorch.org/whl/cu128"
ROCM_WHEELS = "https://download.pytorch.org/whl/rocm6.4"


@dataclass(frozen=True)
class Check:
    """One verdict: `name` (stable, for scripts), ok|warn|fail|skip, one line, the next step."""

    name: str
    verdict: str
    detail: str
    next_step: str = ""  # what to do, on warn or fail

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict {self.verdict!r} is not one of {VERDICTS}")


# ------------------------------------------------------------------ torch and the hardware (pure)


@dataclass(frozen=True)
class TorchFacts:
    version: str  # torch.__version__ ("" when torch does not import)
    import_error: str = ""  # why torch did not import
    cuda_build: str = ""  # torch.version.cuda: the CUDA it was built for ("" for a CPU or ROCm build)
    hip_build: str = ""  # torch.version.hip: the ROCm it was built for
    gpu_names: tuple[str, ...] = ()  # the GPUs torch sees (CUDA or ROCm), by index
    gpu_bf16: tuple[bool, ...] = ()  # whether each of them computes in bf16
    mps: bool = False  # Apple's Metal is available
    gpu_driver: str = ""  # a GPU found without torch: "nvidia (nvidia-smi)", "amd (/dev/kfd)", ""


def gpu_build_command(torch_version: str, driver: str) -> str:
    """The command that replaces a CPU-only torch with a build for the GPU `driver` names."""
    release = torch_version.split("+", 1)[0]
    index = ROCM_WHEELS if driver.startswith("amd") else CUDA_WHEELS
    return f"pip install --force-reinstall 'torch=={release}' --index-url {index}"


def check_torch(facts: TorchFacts, gpu: int = -1) -> Check:
    """Pure: does this torch build use this machine's hardware, and where would a peer train?"""
    if facts.import_error:
        return Check(
            "torch",
            "fail",
            f"torch does not import: {facts.import_error}",
            "reinstall torch in crowdtrain's environment: pip install --force-reinstall torch",
        )
    build = "CPU"
    if facts.cuda_build or facts.hip_build:
        build = f"CUDA {facts.cuda_build}" if facts.cuda_build else f"ROCm {facts.hip_build}"
    label = f"torch {facts.version} ({build} build)"
    try:
        device, _ = choose_device("auto", gpu, len(facts.gpu_names), facts.mps)
    except DeviceError:  # only --gpu N can name a device that is not there
        seen = len(facts.gpu_names)
        advice = f"pass --gpu 0 to {seen - 1}, or leave it out" if seen else "leave out --gpu"
        if not seen and facts.gpu_driver and not (facts.cuda_build or facts.hip_build):
            advice = f"install a GPU build of torch: {gpu_build_command(facts.version, facts.gpu_driver)}"
        return Check("torch", "fail", f"{label}: --gpu {gpu}, but torch sees {seen} GPU(s)", advice)
    if device.startswith("cuda"):
        index = int(device.partition(":")[2])
        bf16 = facts.gpu_bf16[index] if index < len(facts.gpu_bf16) else False
        precision = "bf16" if decide_precision("cuda", "auto", bf16)[0] else "fp32 (no bf16 on this GPU)"
        return Check("torch", "ok", f"{label}: {device} {facts.gpu_names[index]} ({precision})")
    if facts.gpu_driver and not (facts.cuda_build or facts.hip_build):
        return Check(
            "torch",
            "warn",
            f"{label}, but this machine has a GPU ({facts.gpu_driver}): it would train on the CPU",
            f"install a GPU build of torch: {gpu_build_command(facts.version, facts.gpu_driver)}",
        )
    if facts.gpu_driver:
        return Check(
            "torch",
            "warn",
            f"{label} sees no GPU though a driver is here ({facts.gpu_driver}): it would train on the CPU",
            "run nvidia-smi (or rocm-smi): the driver may be older than the build needs, or "
            "CUDA_VISIBLE_DEVICES hides the GPUs",
        )
    if device == "mps":
        return Check("torch", "ok", f"{label}: Apple MPS (fp32)")
    return Check("torch", "ok", f"{label}: no GPU; trains on the CPU")


# ------------------------------------------------------------------ memory against the presets (pure)


@dataclass(frozen=True)
class ModelToFit:
    label: str  # "tiny", or "the run's tiny model"
    num_parameters: int
    mode: str  # the run's swarm mode: what hivemind keeps beside the model
    overlap: bool


def preset_models() -> tuple[ModelToFit, ...]:
    return tuple(
        ModelToFit(p.name, p.num_parameters(), p.swarm.mode, p.swarm.overlap_communication)
        for p in PRESETS.values()
    )


def check_memory(
    ram: tuple[int, str], device: tuple[int, str] | None, models: tuple[ModelToFit, ...], run_model=None
) -> Check:
    """Pure: which models' training fits the memory free now (`ram` and `device`: the bytes training
    may plan on and where that figure comes from, as fit.available_bytes says; `device` None: the
    CPU trains). `run_model`: the run's own, which decides the verdict when given."""

    def needs(m: ModelToFit) -> str:
        need_ram, need_device, _ = build_needs(
            m.num_parameters, on_cpu=device is None, mode=m.mode, overlap=m.overlap
        )
        on_device = f" + {format_bytes(need_device)} on the GPU" if device is not None else ""
        return f"{format_bytes(need_ram)} of RAM{on_device}"

    def fits(m: ModelToFit) -> bool:
        return fits_before_building(m.num_parameters, ram, device, mode=m.mode, overlap=m.overlap)[0]

    have = f"{format_bytes(ram[0])} RAM" + (f", {format_bytes(device[0])} GPU" if device is not None else "")
    have += " usable"
    advice = "close programs using memory, or use a machine with more"
    if run_model is not None:
        if fits(run_model):
            return Check("memory", "ok", f"{run_model.label} needs {needs(run_model)}; {have}")
        return Check("memory", "fail", f"{run_model.label} needs {needs(run_model)}; {have}", advice)
    fitting = [m.label for m in models if fits(m)]
    too_big = [m for m in models if not fits(m)]
    if not too_big:
        return Check("memory", "ok", f"every preset fits; {have}")
    smallest = min(too_big, key=lambda m: m.num_parameters)
    short = f"{smallest.label} needs {needs(smallest)}; {have}"
    if not fitting:
        return Check("memory", "fail", f"no preset fits: {short}", advice)
    return Check("memory", "warn", f"fits {', '.join(fitting)}; not {short}", f"for larger runs: {advice}")


# ------------------------------------------------------------------ disk (pure)


@dataclass(frozen=True)
class DiskFacts:
    path: str  # the cache directory, as shown
    free_bytes: int  # on its file system
    cached_bytes: int = 0  # already in this run's cache directory (the peer reuses what is there)


def run_disk_needs(manifest: RunManifest, checkpoint_bytes: int | None) -> tuple[int, int, str]:
    """Pure: (bytes to start, bytes for the whole run, what they hold) in a run's cache directory:
    the eval shard, one training shard (the largest) to start or all of them (a peer moves on to
    another shard when it finishes one, and keeps what it read), and the published checkpoint twice
    (a resume pull is staged beside the previous one). `checkpoint_bytes`: the latest published
    checkpoint's files; None (none yet): the model's float32 weights."""
    shards = [s.size_bytes for s in manifest.data.shards] or [0]
    checkpoint = (
        checkpoint_bytes if checkpoint_bytes is not None else FLOAT32_BYTES * manifest.model.num_parameters
    )
    base = manifest.data.eval.size_bytes + 2 * checkpoint
    what = f"{len(shards)} shards of {format_bytes(sum(shards))}, checkpoints of {format_bytes(checkpoint)}"
    return base + max(shards), base + sum(shards), what


def check_disk(disk: DiskFacts, needs: tuple[int, int, str] | None) -> Check:
    """Pure: is there room in the cache directory for the run (`needs`: `run_disk_needs`), or, not
    knowing the run, for what the largest preset takes to start (DISK_FLOOR_BYTES)?"""
    room = disk.free_bytes + disk.cached_bytes
    where = f"{format_bytes(room)} free in {disk.path}"
    advice = "free space there, or pass --cache-dir on a larger disk (to doctor and peer alike)"
    if needs is None:
        floor = f"a {LARGEST_PRESET.name} run may need {format_bytes(DISK_FLOOR_BYTES)} to start"
        if room >= DISK_FLOOR_BYTES:
            return Check("disk", "ok", f"{where}; {floor}")
        return Check("disk", "warn", f"{where}, but {floor}", advice)
    start, whole, what = needs
    if room < start:
        return Check(
            "disk", "fail", f"{where}; the run needs {format_bytes(start)} to start ({what})", advice
        )
    if room < whole:
        return Check(
            "disk",
            "warn",
            f"{where}: enough to start, not for all of the run's {format_bytes(whole)} ({what})",
            advice,
        )
    return Check("disk", "ok", f"{where}; the run needs up to {format_bytes(whole)}")


# ------------------------------------------------------------------ the coordinator (pure)


@dataclass(frozen=True)
class ClockReading:
    """The coordinator's HTTP Date header (whole seconds) and this machine's clock around the request."""

    server_unix_s: float
    sent_unix_s: float
    received_unix_s: float


def clock_skew(reading: ClockReading) -> tuple[float, float]:
    """Pure: (this machine's clock minus the coordinator's, its uncertainty), in seconds. The Date
    header truncates to the second: its middle is taken, +/- 0.5 s, plus half the round trip."""
    local = (reading.sent_unix_s + reading.received_unix_s) / 2
    round_trip = max(0.0, reading.received_unix_s - reading.sent_unix_s)
    return local - (reading.server_unix_s + 0.5), 0.5 + round_trip / 2


@dataclass(frozen=True)
class CoordinatorFacts:
    given: str  # the address as the volunteer typed it
    error: str = ""  # why it could not be reached ("" when it answered)
    error_next_step: str = ""  # what to do about it, when the error said
    grpc_address: str = ""  # where its gRPC API answered
    round_trip_s: float = 0.0  # of that answer
    http_base: str = ""  # its HTTP API
    http_error: str = ""  # why the HTTP API could not be read
    manifest: RunManifest | None = None
    manifest_error: str = ""  # why the run's manifest is refused (format, fields)
    min_peer_version: str | None = None  # the run's minimum crowdtrain; None: not published
    checkpoint_bytes: int | None = None  # the latest published checkpoint's files; None: none yet
    clock: ClockReading | None = None


def check_coordinator(facts: CoordinatorFacts | None) -> Check:
    """Pure: did the coordinator's gRPC API answer (and its HTTP API, which serves the shards)?"""
    if facts is None:
        return Check("coordinator", "skip", "no --coordinator given: this machine only")
    if facts.error:
        advice = facts.error_next_step or "check the address (the operator's join line) and the network"
        return Check("coordinator", "fail", facts.error, advice)
    via = f" (from {facts.given})" if facts.grpc_address != facts.given else ""
    detail = f"gRPC {facts.grpc_address}{via} answered in {facts.round_trip_s * 1000:.0f} ms"
    if facts.http_error:
        return Check(
            "coordinator",
            "fail",
            f"{detail}; its HTTP API did not: {facts.http_error}",
            "the coordinator's HTTP port serves the data shards: ask its operator to open it",
        )
    return Check("coordinator", "ok", f"{detail}; HTTP {facts.http_base}")


def check_compatible(facts: CoordinatorFacts | None, our_version: str) -> Check:
    """Pure: would the run take this crowdtrain: its minimum version (the join refusal's own rule)
    and its manifest (format and fields this version reads)?"""
    if facts is None:
        return Check("compatible", "skip", "needs --coordinator")
    if facts.error or facts.http_error:
        return Check("compatible", "skip", "needs its answer")
    if facts.manifest_error:
        return Check(
            "compatible", "fail", facts.manifest_error, f"upgrade crowdtrain (this is {our_version})"
        )
    allowed, why = version_verdict(our_version, facts.min_peer_version or "")
    if not allowed:  # "this run needs crowdtrain >= X and this peer runs Y; upgrade with: ..."
        refusal, _, upgrade = why.partition("; ")
        return Check("compatible", "fail", refusal, upgrade)
    run = f"run {facts.manifest.run_id}, manifest format {MANIFEST_FORMAT_VERSION}" if facts.manifest else ""
    if facts.min_peer_version is None:
        return Check(
            "compatible",
            "ok",
            f"{run}; minimum version not published by this coordinator (the join checks it)",
        )
    return Check("compatible", "ok", f"version {why}; {run}")


def check_reachable(global_addresses: tuple[str, ...]) -> Check:
    """Pure: what can be said before joining about other peers reaching this one, given this
    machine's globally routable addresses (see the module docstring: the coordinator's dial takes a
    session, so this is a skip that says so)."""
    when = "checked once joined (the coordinator dials the peer)"
    if global_addresses:
        return Check("reachable", "skip", f"{when}; public IP {global_addresses[0]}")
    return Check(
        "reachable",
        "skip",
        f"{when}; private IPs only: behind NAT, with no forwarded --listen-port, it runs in client mode",
    )


def check_clock(facts: CoordinatorFacts | None) -> Check:
    """Pure: does this machine's clock agree with the coordinator's (see CLOCK_WARN_S)?"""
    if facts is None:
        return Check("clock", "skip", "needs --coordinator")
    if facts.clock is None:
        answered = not (facts.error or facts.http_error)
        return Check(
            "clock", "skip", "its HTTP answer had no Date header" if answered else "needs its answer"
        )
    skew, uncertainty = clock_skew(facts.clock)
    detail = f"{skew:+.1f} s from the coordinator's clock (+/- {uncertainty:.1f} s)"
    advice = "set this machine's clock: enable NTP (timedatectl set-ntp true, or the OS's time settings)"
    beyond = abs(skew) - uncertainty
    if beyond > CLOCK_FAIL_S:
        return Check(
            "clock", "fail", f"{detail}: the swarm refuses messages over {CLOCK_FAIL_S:.0f} s off", advice
        )
    if beyond > CLOCK_WARN_S:
        return Check("clock", "warn", f"{detail}: averaging groups may miss this peer", advice)
    return Check("clock", "ok", detail)
