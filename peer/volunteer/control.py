"""Local control of a running peer: `crowdtrain ctl status|pause|resume|finish-and-pause|set KEY=VALUE`.

A peer listens on a Unix socket that only its user can open: `peer-PID.sock` in a directory of
mode 0700 (`$CROWDTRAIN_CONFIG_DIR/ctl`, else `$XDG_RUNTIME_DIR/crowdtrain`, else the config
directory's `ctl`), the socket itself 0600, and where the system tells (SO_PEERCRED) a caller of
another uid is refused. The protocol is one line of JSON each way:

    -> {"action": "status"}                         <- {"ok": true, "phase": "training", "epoch": 12, ...}
    -> {"action": "set", "setting": "threads=2"}    <- {"ok": true, "message": "threads: 1 -> 2"}
    -> garbage, or over 4 KiB, or too slow          <- {"ok": false, "error": "..."} (the peer goes on)

`pause` stops computing at once (as SIGUSR1); what it accumulated is still handed in to the round
(peer/volunteer/pause_gate.py). `finish-and-pause` keeps computing until the swarm's epoch turns,
then pauses with nothing pending. `resume` lifts either (as SIGUSR2). Settings that can change
live (`LIVE_KEYS`) change by `ctl set` or when SIGHUP makes the peer read its peer.toml again;
any other setting is refused by `set`, and a SIGHUP names those that wait for a restart.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from crowdtrain.peer.errors import CrowdtrainError
from crowdtrain.peer.machine.pause import CTL_PAUSE_REASON, parse_schedule
from crowdtrain.peer.settings.commands import PeerConfig
from crowdtrain.peer.settings.layered import CONFIG_DIR_ENV, default_config_dir, value_from_text
from crowdtrain.peer.volunteer.meter import standing_text

logger = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 4096
MAX_REPLY_BYTES = 256 * 1024
IO_TIMEOUT_S = 2.0  # a caller must send its whole request (and take the reply) within this
ACCEPT_POLL_S = 0.5  # how often the server looks for shutdown and a SIGHUP
MAX_SOCKET_PATH_BYTES = 100  # AF_UNIX paths are at most 107 bytes on Linux, 103 on macOS
ACTIONS = ("status", "pause", "resume", "finish-and-pause", "set")
PAUSE_KEYS = ("schedule", "pause_when_busy", "pause_on_battery")
LIVE_KEYS = (*PAUSE_KEYS, "threads", "max_upload_mbps")
_SOCKET_NAME = re.compile(r"peer-([0-9]+)\.sock")


class ControlError(CrowdtrainError):
    """A local control request failed; the message says why and what to do."""


# ---------------------------------------------------------------- pure parts


def uid_allowed(caller_uid: int | None, own_uid: int) -> bool:
    """Whether a caller may control this peer: only its own user. None (the system cannot tell the
    caller's uid) leaves it to the socket's 0700 directory."""
    return caller_uid is None or caller_uid == own_uid


def parse_request(line: bytes) -> dict:
    """One request line -> {"action": ..., ...}; ControlError for anything else."""
    try:
        request = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ControlError("the request is not one line of JSON") from None
    if not isinstance(request, dict) or request.get("action") not in ACTIONS:
        raise ControlError(f'the request needs an "action": one of {", ".join(ACTIONS)}')
    if request["action"] == "set" and not isinstance(request.get("setting"), str):
        raise ControlError('"set" needs a "setting": "KEY=VALUE"')
    return request


def parse_assignment(text: str) -> tuple[str, object]:
    """`KEY=VALUE` -> (key, value typed as the setting); only `LIVE_KEYS` change live."""
    key, eq, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not eq or not key:
        raise ControlError(f"{text[:60]!r} is not KEY=VALUE, e.g. crowdtrain ctl set threads=2")
    known = {f.name for f in dataclasses.fields(PeerConfig)}
    if key not in known:
        raise ControlError(f"{key[:60]!r} is not a peer setting; live ones: {', '.join(LIVE_KEYS)}")
    if key not in LIVE_KEYS:
        raise ControlError(
            f"{key} cannot change while the peer runs: edit it in peer.toml (or the flag) and restart "
            f"the peer; settings that change live: {', '.join(LIVE_KEYS)}"
        )
    try:
        return key, value_from_text(PeerConfig, key, raw, f"ctl set {key}")
    except CrowdtrainError as e:
        raise ControlError(str(e)) from None


def live_changes(old, new) -> tuple[dict, tuple[str, ...]]:
    """Pure: what differs between two configs: ({live key: new value}, the other keys that differ,
    which wait for a restart)."""
    live, restart = {}, []
    for f in dataclasses.fields(old):
        before, after = getattr(old, f.name), getattr(new, f.name)
        if before == after:
            continue
        if f.name in LIVE_KEYS:
            live[f.name] = after
        else:
            restart.append(f.name)
    return live, tuple(restart)


def _finite(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


# ---------------------------------------------------------------- where the sockets live


def control_dir() -> Path:
    """The directory of this user's peers' control sockets."""
    if not os.environ.get(CONFIG_DIR_ENV) and os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "crowdtrain"
    return default_config_dir() / "ctl"


def private_dir(path: Path) -> Path:
    """`path`, created with mode 0700 (tightened if it is ours and looser); ControlError when it
    belongs to another user."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise ControlError(
            f"{path} belongs to uid {info.st_uid}, not to you; remove it or set {CONFIG_DIR_ENV}"
        )
    if info.st_mode & 0o077:
        path.chmod(0o700)
    return path


def socket_path(directory: Path, pid: int) -> Path:
    return directory / f"peer-{pid}.sock"


def listed_peers(directory: Path) -> list[int]:
    """The pids of the control sockets in `directory`, live processes only (stale sockets of
    peers killed without cleaning up are removed: the directory is this user's alone)."""
    pids = []
    for path in sorted(directory.glob("peer-*.sock")) if directory.is_dir() else []:
        match = _SOCKET_NAME.fullmatch(path.name)
        if match is None:
            continue
        pid = int(match[1])
        if _alive(pid):
            pids.append(pid)
        else:
            path.unlink(missing_ok=True)
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process reuses the pid
        return False
    return True


def caller_uid(conn: socket.socket) -> int | None:
    """The connecting process's uid (Linux SO_PEERCRED); None where the system does not tell."""
    option = getattr(socket, "SO_PEERCRED", None)
    if option is None:
        return None
    try:
        _pid, uid, _gid = struct.unpack(
            "3i", conn.getsockopt(socket.SOL_SOCKET, option, struct.calcsize("3i"))
        )
    except OSError:
        return None
    return uid


def read_line(conn: socket.socket, limit: int, timeout_s: float) -> bytes:
    """The first line `conn` sends (without its newline), within `timeout_s` in all and `limit` bytes."""
    deadline, buf = time.monotonic() + timeout_s, bytearray()
    while b"\n" not in buf:
        left_s = deadline - time.monotonic()
        if left_s <= 0:
            raise ControlError(f"no complete line within {timeout_s:g} s")
        conn.settimeout(left_s)
        try:
            chunk = conn.recv(min(65536, limit + 1 - len(buf)))
        except TimeoutError:
            raise ControlError(f"no complete line within {timeout_s:g} s") from None
        if not chunk:
            break
        buf += chunk
        if len(buf) > limit and b"\n" not in buf[: limit + 1]:
            raise ControlError(f"a line over {limit} bytes")
    return bytes(buf).split(b"\n", 1)[0]


def _drain(conn: socket.socket) -> None:
    """Read what the caller still sends (bounded) before closing: a Unix socket closed with
    unread data resets the caller's connection, which may lose it the reply."""
    deadline, left = time.monotonic() + IO_TIMEOUT_S, MAX_REQUEST_BYTES * 16
    while left > 0 and time.monotonic() < deadline:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = conn.recv(min(65536, left))
        if not chunk:
            return
        left -= len(chunk)


def _encoded(reply: dict) -> bytes:
    return json.dumps(reply, allow_nan=False).encode("utf-8") + b"\n"


# ---------------------------------------------------------------- the peer's side


class ControlServer:
    """Serves `handle(request) -> reply` on this process's control socket, one caller at a time,
    on its own daemon thread, which also calls `on_tick()` every `ACCEPT_POLL_S` (a SIGHUP's
    reload). A socket that cannot be opened is logged: the peer trains on without local control.
    Lifecycle: `start()` once, `shutdown()` (idempotent) removes the socket."""

    def __init__(
        self,
        handle: Callable[[dict], dict],
        directory: Path | None = None,
        on_tick: Callable[[], None] = lambda: None,
    ):
        self.handle, self.on_tick = handle, on_tick
        self.directory = directory
        self.path: Path | None = None
        self._sock: socket.socket | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> ControlServer:
        try:
            self._sock = self._listen()
        except (OSError, ControlError) as e:
            logger.warning("no local control (crowdtrain ctl) for this peer: %s", e)
        self._thread = threading.Thread(target=self._run, name="crowdtrain-ctl", daemon=True)
        self._thread.start()
        return self

    def _listen(self) -> socket.socket:
        directory = private_dir(self.directory or control_dir())
        listed_peers(directory)  # clears stale sockets
        path = socket_path(directory, os.getpid())
        if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
            raise ControlError(
                f"{path} is too long for a Unix socket; set {CONFIG_DIR_ENV} to a shorter directory"
            )
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # born 0600: no moment where another user could connect
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        path.chmod(0o600)
        sock.listen(8)
        sock.settimeout(ACCEPT_POLL_S)
        self.path = path
        return sock

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.on_tick()
            except Exception:  # a failed reload must not end local control
                logger.exception("local control: a periodic task failed")
            if self._sock is None:
                self._stop.wait(ACCEPT_POLL_S)
                continue
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                if not self._stop.is_set():  # else: shutdown()'s wake-up call
                    self.serve(conn)

    def serve(self, conn: socket.socket) -> None:
        """Answer one caller; nothing it sends can raise out of here."""
        if not uid_allowed(caller_uid(conn), os.getuid()):
            logger.warning("local control: refused a caller of another user")
            reply = {"ok": False, "error": "this peer takes commands from its own user only"}
        else:
            reply = self._reply(conn)
        try:
            conn.settimeout(IO_TIMEOUT_S)
            conn.sendall(_encoded(reply))
            conn.shutdown(socket.SHUT_WR)
            _drain(conn)
        except (OSError, ValueError):
            pass

    def _reply(self, conn: socket.socket) -> dict:
        try:
            return self.handle(parse_request(read_line(conn, MAX_REQUEST_BYTES, IO_TIMEOUT_S)))
        except CrowdtrainError as e:
            return {"ok": False, "error": str(e)}
        except OSError as e:
            return {"ok": False, "error": f"reading the request failed: {e}"}
        except Exception:
            logger.exception("local control: a request failed")
            return {"ok": False, "error": "the peer failed to answer; its log has the details"}

    def shutdown(self) -> None:
        self._stop.set()
        if self.path is not None:  # wake accept() now rather than at its next timeout
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as wake:
                    wake.settimeout(0.5)
                    wake.connect(str(self.path))
            except OSError:
                pass
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=ACCEPT_POLL_S + IO_TIMEOUT_S + 1)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


class PeerControl:
    """What `crowdtrain ctl` can read and change of a running `Volunteer` (peer/volunteer/trainer.py).
    Threads: `handle` and `tick` run on the control server's thread; `apply_in_loop` on the training
    loop's (torch's thread count is set by the thread that computes)."""

    def __init__(self, volunteer, source=None):
        self.volunteer = volunteer
        self.source = source  # a layered.ConfigSource: the flags, environment and peer.toml it started from
        self.page_url = ""  # the peer's page on the dashboard, once joined
        self.reload_requested = threading.Event()  # set by SIGHUP
        self._lock = threading.Lock()
        self._pending_threads: int | None = None

    def handle(self, request: dict) -> dict:
        action = request["action"]
        if action == "status":
            return self.status()
        if action == "set":
            key, value = parse_assignment(request["setting"])
            return {
                "ok": True,
                "message": self.apply({key: value}) + " (for this run; put it in peer.toml to keep it)",
            }
        gate, pauser = self.volunteer.pause_gate, self.volunteer.pauser
        if action == "resume":
            gate.resume()
            decision = pauser.decision
            still = f"; still paused: {decision.reason}" if decision.paused else ""
            return {"ok": True, "message": "resumed" + still}
        if pauser.manual:
            return {"ok": True, "message": f"already paused: {pauser.decision.reason}"}
        opt = self.volunteer.opt
        if action == "finish-and-pause" and opt is not None:
            epoch = opt.local_epoch
            gate.finish_then_pause(epoch)
            return {"ok": True, "message": f"training on until epoch {epoch} turns (its round), then pausing"}
        gate.finish_after_epoch = None
        pauser.pause(CTL_PAUSE_REASON)
        return {
            "ok": True,
            "message": "paused: computing stops now; samples accumulated for this round are handed in",
        }

    def status(self) -> dict:
        v = self.volunteer
        report, decision = v.stats.get(), v.pauser.decision
        heartbeat = v.heartbeat
        answer = heartbeat.answer if heartbeat is not None else None
        phase = report.phase
        if phase == "training" and decision.paused:
            phase = "pausing"  # decided; the loop pauses after its current step
        return {
            "ok": True,
            "pid": os.getpid(),
            "name": v.name,
            "phase": phase,
            "pause_reason": decision.reason if decision.paused else "",
            "finish_and_pause_after_epoch": v.pause_gate.finish_after_epoch,
            "epoch": report.local_epoch,
            "samples_total": report.samples_total,
            "samples_per_s": _finite(report.samples_per_s),
            "accepted_samples": answer.accepted_samples if answer is not None else 0,
            "standing": standing_text(answer),
            "page": self.page_url,
            "coordinator": v.config.coordinator,
            "config_file": str(self.source.path) if self.source is not None else "",
            "live_settings": {key: getattr(v.config, key) for key in LIVE_KEYS},
        }

    def apply(self, values: dict) -> str:
        """Change live settings (all checked before any applies); what changed, as text."""
        v = self.volunteer
        with self._lock:
            new = dataclasses.replace(v.config, **values)
            if "threads" in values and new.threads < 1:
                raise ControlError(
                    "threads must be 1 or more while the peer runs (0, torch's default, takes a restart)"
                )
            settings = dataclasses.replace(
                v.pauser.settings,
                schedule=parse_schedule(new.schedule),
                busy_threshold_pct=new.pause_when_busy,
                pause_on_battery=bool(new.pause_on_battery),
            )
            if "max_upload_mbps" in values:
                self._set_upload_cap(new.max_upload_mbps)
            old, v.config = v.config, new
            if "threads" in values:
                self._pending_threads = new.threads
            if any(key in values for key in PAUSE_KEYS):
                v.pauser.update(settings)
        changed = [f"{key}: {getattr(old, key)!r} -> {getattr(new, key)!r}" for key in values]
        logger.info("settings changed live: %s", ", ".join(changed))
        return ", ".join(changed)

    def _set_upload_cap(self, max_upload_mbps: float) -> None:
        """The cap is shared with hivemind's processes, so it must exist before they start: it
        changes live where the peer started with one, or before it joined the swarm."""
        v = self.volunteer
        if v.upload_limit is not None:
            v.upload_limit.set_mbps(max_upload_mbps)  # UploadLimitError (a CrowdtrainError) when unusable
        elif v.dht is not None and max_upload_mbps > 0:
            raise ControlError(
                "max_upload_mbps: this peer started without an upload cap, and one must be in place "
                "before hivemind's processes start; put it in peer.toml (or the flag) and restart the peer"
            )
        elif max_upload_mbps != 0:
            from crowdtrain.peer.machine.bandwidth import upload_cap

            upload_cap(max_upload_mbps)  # checked now; installed when the peer joins the swarm

    def apply_in_loop(self) -> None:
        """On the training loop's thread: what must be applied there (torch's threads)."""
        if self._pending_threads is None:
            return
        with self._lock:
            threads, self._pending_threads = self._pending_threads, None
        import torch

        torch.set_num_threads(threads)

    def tick(self) -> None:
        if self.reload_requested.is_set():
            self.reload_requested.clear()
            self.reload()

    def reload(self) -> None:
        """Read peer.toml again (SIGHUP) and apply what may change live; log the rest."""
        if self.source is None:
            logger.warning("SIGHUP: this peer has no settings file to read again")
            return
        try:
            new, _ = self.source.load()
            live, restart = live_changes(self.volunteer.config, new)
            changed = self.apply(live) if live else "no live setting changed"
        except CrowdtrainError as e:
            logger.error("SIGHUP: not reloaded, the running settings stay as they were: %s", e)
            return
        waiting = f"; these wait for a restart: {', '.join(restart)}" if restart else ""
        logger.info("reloaded %s: %s%s", self.source.path, changed, waiting)


def install_reload_signal(control: PeerControl) -> Callable[[], None]:
    """SIGHUP makes the peer read its settings file again (on the control thread, within
    `ACCEPT_POLL_S`). Main thread only; returns a function that puts the old handler back."""
    hup = getattr(signal, "SIGHUP", None)
    if hup is None:
        return lambda: None
    previous = signal.getsignal(hup)
    signal.signal(hup, lambda signum, frame: control.reload_requested.set())
    return lambda: signal.signal(hup, previous if previous is not None else signal.SIG_DFL)


# ---------------------------------------------------------------- the caller's side


def ask(path: Path, request: dict, timeout_s: float = 5.0) -> dict:
    """Send one request to the peer at `path`; its reply."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(path))
            sock.sendall(_encoded(request))
            reply = json.loads(read_line(sock, MAX_REPLY_BYTES, timeout_s))
    except (FileNotFoundError, ConnectionRefusedError):
        raise ControlError(f"no peer answers at {path} (did it stop?)") from None
    except PermissionError:
        raise ControlError(f"not allowed to open {path}: it belongs to another user") from None
    except (OSError, ValueError) as e:
        raise ControlError(f"the peer at {path} did not answer properly: {e}") from None
    if not isinstance(reply, dict):
        raise ControlError(f"the peer at {path} answered something else than a reply")
    return reply


def find_peer(pid: int = 0, directory: Path | None = None) -> Path:
    """The control socket of this user's peer `pid`, or of the only one running (0)."""
    directory = directory or control_dir()
    pids = listed_peers(directory)
    if pid:
        if pid not in pids:
            raise ControlError(f"no peer with pid {pid} listens in {directory}; running: {pids or 'none'}")
        return socket_path(directory, pid)
    if not pids:
        raise ControlError(
            f"no crowdtrain peer of yours runs on this machine (no control socket in {directory}); "
            "start one with `crowdtrain peer`"
        )
    if len(pids) > 1:
        raise ControlError(f"{len(pids)} peers run here (pids {', '.join(map(str, pids))}): pass --pid")
    return socket_path(directory, pids[0])


def format_status(reply: dict) -> str:
    """`crowdtrain ctl status` for people."""
    phase = reply["phase"] + (f" ({reply['pause_reason']})" if reply.get("pause_reason") else "")
    if reply.get("finish_and_pause_after_epoch") is not None:
        phase += f"; pausing once epoch {reply['finish_and_pause_after_epoch']} turns"
    rate = reply.get("samples_per_s")
    lines = [
        f"peer {reply['name']} (pid {reply['pid']}): {phase}",
        f"epoch {reply['epoch']}, {reply['samples_total']:,} samples computed"
        + (f" at {rate:.1f}/s" if rate else "")
        + (f", {reply['standing']}" if reply.get("standing") else ""),
    ]
    if reply.get("page"):
        lines.append(f"page: {reply['page']}")
    live = " ".join(f"{k}={v!r}" for k, v in reply.get("live_settings", {}).items())
    lines.append(f"live settings: {live} (crowdtrain ctl set KEY=VALUE)")
    if reply.get("config_file"):
        lines.append(
            f"settings file: {reply['config_file']} (SIGHUP or `systemctl --user reload` reads it again)"
        )
    return "\n".join(lines)


def run_ctl(config) -> int:
    """`crowdtrain ctl ACTION [KEY=VALUE] [--json] [--pid N]`."""
    if config.action not in ACTIONS:
        raise ControlError(f"unknown action {config.action[:40]!r}; one of {', '.join(ACTIONS)}")
    request = {"action": config.action}
    if config.action == "set":
        if not config.setting:
            raise ControlError(f"crowdtrain ctl set takes KEY=VALUE; live settings: {', '.join(LIVE_KEYS)}")
        parse_assignment(config.setting)  # a non-live key or bad value is refused here already
        request["setting"] = config.setting
    elif config.setting:
        raise ControlError(f"crowdtrain ctl {config.action} takes no {config.setting[:40]!r}")
    reply = ask(find_peer(config.pid), request, config.timeout_s)
    if not reply.get("ok"):
        raise ControlError(f"the peer refused: {reply.get('error', 'no reason given')}")
    if config.json:
        print(json.dumps(reply, indent=2))
    else:
        print(format_status(reply) if config.action == "status" else reply.get("message", "done"))
    return 0
