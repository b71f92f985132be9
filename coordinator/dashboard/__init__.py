"""How the run is read by people: the web dashboard the HTTP server serves (`api.webserver`), the
numbers it shows (each defined once, here, and shared with `crowdtrain status`), the status table,
and the status views built at most once per second.

    join.py       The dashboard's "Join this run" box and its pull commands: what a newcomer copies,
    numbers.py    The run's headline numbers, each defined once: the dashboard (/api/v1/dashboard) and
    render.py     The operator's status table, as `crowdtrain status` prints it
    snapshots.py  Status views built at most once per second, off the event loops
    static/       the dashboard's page and scripts (index.html, app.js, peer.html, peer.js, style.css)
"""

from pathlib import Path

STATIC_DIR = Path(__file__).parent / "static"  # the dashboard's files, served under /static/
