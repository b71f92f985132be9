"""`crowdtrain invite create|list|revoke`: invite codes for `--admission invite`, run on the
coordinator's machine against its data directory (the SQLite store, like `crowdtrain ban`).

    CODE=$(crowdtrain invite create --data-dir runs/mine --uses 5 --expires-in-s 86400 --note "lab")
    crowdtrain invite list --data-dir runs/mine
    crowdtrain invite revoke --data-dir runs/mine ID
"""

from __future__ import annotations

import sys

from crowdtrain.coordinator import config as cfg
from crowdtrain.peer.errors import CrowdtrainError


def _invite_book(data_dir: str):
    from pathlib import Path

    from crowdtrain.coordinator.admission.invites import InviteBook
    from crowdtrain.coordinator.peers.store import Store

    path = Path(data_dir).expanduser() / "state.sqlite3"
    if not path.exists():
        raise CrowdtrainError(f"{path} does not exist; pass the coordinator's --data-dir")
    return InviteBook(Store(path, flush_interval_s=0))


def cmd_invite_create(config: cfg.InviteCreateConfig) -> int:
    import time

    book = _invite_book(config.data_dir)
    try:
        code, invite = book.create(time.time(), config.uses, config.expires_in_s, config.note)
    except ValueError as e:
        raise CrowdtrainError(f"{e}; see `crowdtrain invite create --help`") from None
    finally:
        book.store.close()
    expires = _utc(invite.expires_unix_s) if invite.expires_unix_s is not None else "never"
    print(code)  # alone on stdout: `CODE=$(crowdtrain invite create ...)`
    print(
        f"invite {invite.invite_id}: {invite.uses_left} use(s), expires {expires}; volunteers join with "
        "`crowdtrain peer --invite CODE`; the code is shown only now",
        file=sys.stderr,
    )
    return 0


def _utc(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def cmd_invite_list(config: cfg.InviteListConfig) -> int:
    import time

    from crowdtrain.coordinator.admission.invites import invite_usable

    book = _invite_book(config.data_dir)
    try:
        invites = book.list()
    finally:
        book.store.close()
    now = time.time()
    print(f"{'ID':<8}  {'USES LEFT':>9}  {'EXPIRES':<23}  {'STATE':<9}  NOTE")
    for i in invites:
        usable, why = invite_usable(i, now)
        state = (
            "usable" if usable else "revoked" if i.revoked else "expired" if "expired" in why else "used up"
        )
        expires = _utc(i.expires_unix_s) if i.expires_unix_s is not None else "never"
        print(f"{i.invite_id:<8}  {i.uses_left:>9}  {expires:<23}  {state:<9}  {i.note}".rstrip())
    return 0


def cmd_invite_revoke(config: cfg.InviteRevokeConfig) -> int:
    book = _invite_book(config.data_dir)
    try:
        ended = book.revoke(config.invite_id)
    finally:
        book.store.close()
    if ended is None:
        raise CrowdtrainError(f"no invite {config.invite_id!r}; `crowdtrain invite list` shows the IDs")
    print(
        f"revoked invite {config.invite_id}; ended {ended} session(s) admitted with it (their swarm tokens "
        "are not renewed: they leave the swarm within --swarm-token-ttl-s)"
    )
    return 0


# `crowdtrain invite create|list|revoke` (run on the coordinator's machine)
INVITE_COMMANDS = {
    "create": (
        cfg.InviteCreateConfig,
        cmd_invite_create,
        "mint an invite code (printed once) for invite admission",
    ),
    "list": (
        cfg.InviteListConfig,
        cmd_invite_list,
        "list invites: id, uses left, expiry, note (never the codes)",
    ),
    "revoke": (
        cfg.InviteRevokeConfig,
        cmd_invite_revoke,
        "revoke an invite and end the sessions it admitted",
    ),
}
