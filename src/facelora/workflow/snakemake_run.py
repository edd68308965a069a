"""`facelora snakemake ARGS`: Snakemake with the profile from params.yaml, recovering from a
killed run by itself.

A Snakemake killed with SIGKILL leaves its lock in .snakemake/locks, and the next run refuses
to start until `snakemake --unlock`. This wrapper holds an OS lock (flock) on
.snakemake/facelora-run.lock while Snakemake runs; the kernel drops it when the process dies,
however it dies. So when the wrapper gets that lock and Snakemake's lock files are still there,
no run started through it is alive: the locks are stale and are removed with `--unlock`.
Half-written outputs of the killed jobs are redone (`--rerun-incomplete` in the profiles);
finished jobs are kept.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
from pathlib import Path

from facelora.errors import MissingInput

RUN_LOCK = Path(".snakemake") / "facelora-run.lock"
SNAKEMAKE_LOCKS = Path(".snakemake") / "locks"


def snakemake_binary() -> str:
    found = shutil.which("snakemake") or shutil.which(
        "snakemake", path=str(Path(sys.executable).parent)
    )
    if found is None:
        raise MissingInput("snakemake is not installed in this environment: pip install -e .")
    return found


def run_snakemake(profile: str, args: list[str], workdir: Path = Path(".")) -> int:
    """Run `snakemake --profile PROFILE ARGS` in `workdir`; return its exit status."""
    snakemake = snakemake_binary()
    lock_path = workdir / RUN_LOCK
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(
                f"facelora snakemake: another run is active in {workdir.resolve()}; "
                "wait for it to finish",
                file=sys.stderr,
            )
            return 1
        stale = workdir / SNAKEMAKE_LOCKS
        if stale.is_dir() and any(stale.iterdir()):
            print("facelora snakemake: removing the locks of a killed run", file=sys.stderr)
            subprocess.call([snakemake, "--unlock", "--cores", "1"], cwd=workdir)
        command = [snakemake, "--profile", profile, *args]
        print(" ".join(command), file=sys.stderr, flush=True)
        return subprocess.call(command, cwd=workdir)
