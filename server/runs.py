"""Who uses a registry namespace, and which jobs serve it.

Beside the replica entries, a namespace folder holds:

- ``.owners/<run id>``: one file per launcher run using the namespace's
  servers, touched every few seconds. Server jobs stop themselves when no
  owner has been touched for ``orphan_grace_s`` (the launcher was killed, or
  its node was lost), so no GPU job outlives its runs by more than that.
- ``.jobs.json``: the cluster kind and job ids submitted for the namespace,
  so that another process (``launcher.down``, a run joining a shared pool)
  can stop them without the submitting process.

Imports nothing from launcher/.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

OWNERS = ".owners"
JOBS_FILE = ".jobs.json"


@dataclass
class JobRecord:
    kind: str  # local | slurm
    job_ids: list[str]
    server_hash: str = ""


class Owners:
    """Heartbeat files of the runs using one namespace."""

    def __init__(self, root: str | Path, namespace: str) -> None:
        self.folder = Path(root) / namespace / OWNERS

    def touch(self, run_id: str) -> None:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.folder / run_id).touch()

    def remove(self, run_id: str) -> None:
        (self.folder / run_id).unlink(missing_ok=True)

    def alive(self, grace_s: float, now: float | None = None) -> list[str]:
        """Runs whose heartbeat is younger than ``grace_s``."""
        now = time.time() if now is None else now
        alive = []
        try:
            for path in self.folder.iterdir():
                try:
                    if now - path.stat().st_mtime <= grace_s:
                        alive.append(path.name)
                except FileNotFoundError:
                    continue
        except FileNotFoundError:
            return []
        return sorted(alive)


class OwnerHeartbeat:
    """Touches a run's owner file from a daemon thread until stopped."""

    def __init__(self, owners: Owners, run_id: str, every_s: float) -> None:
        self.owners, self.run_id, self.every_s = owners, run_id, every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"owner-heartbeat-{run_id}", daemon=True)

    def start(self) -> "OwnerHeartbeat":
        self.owners.touch(self.run_id)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.owners.touch(self.run_id)
            except OSError:  # a hiccup of the shared filesystem: the next beat may work
                pass


def record_jobs(root: str | Path, namespace: str, record: JobRecord) -> None:
    path = Path(root) / namespace / JOBS_FILE
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(record)))
    os.replace(tmp, path)


def recorded_jobs(root: str | Path, namespace: str) -> JobRecord | None:
    try:
        return JobRecord(**json.loads((Path(root) / namespace / JOBS_FILE).read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None
