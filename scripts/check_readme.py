"""Run the README's "Using it" block as written, top to bottom, in a fresh clone.

    python scripts/check_readme.py            # clones HEAD into a temporary folder, runs there
    python scripts/check_readme.py --keep     # keeps the folder to look at

The clone has no `.venv`: the commands run with this environment's `bin/` first on PATH (what
`make install` would have made) and the clone first on PYTHONPATH, so the code run is the
clone's. Each line runs in bash with `set -e -o pipefail`; the first failing line stops it."""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def using_it_block(readme: str) -> list[str]:
    """The command lines of the first ```bash block under '## Using it' (comments kept: bash drops them)."""
    section = readme.split("## Using it", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    if block is None:
        raise SystemExit("README: no ```bash block under '## Using it'")
    return [line for line in block.group(1).splitlines() if line.strip()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--ray-lock", help="a lock file to hold (flock) while a line that starts Ray runs, on a machine shared with other Ray users")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="haagenti-readme-")
    clone = os.path.join(work, "haagenti")
    subprocess.run(["git", "clone", "-q", REPO, clone], check=True)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"], PYTHONPATH=clone)
    with open(os.path.join(clone, "README.md")) as f:
        lines = using_it_block(f.read())
    status = 0
    for line in lines:
        t0 = time.perf_counter()
        cmd = ["bash", "-c", "set -e -o pipefail\n" + line]
        if args.ray_lock and line.startswith("haagenti dedup"):
            cmd = ["flock", args.ray_lock] + cmd
        p = subprocess.run(cmd, cwd=clone, env=env, capture_output=True, text=True)
        print(f"[{'ok' if p.returncode == 0 else 'FAILED'} {time.perf_counter() - t0:6.1f}s] {line}", flush=True)
        if p.returncode:
            print(p.stdout[-3000:] + p.stderr[-3000:])
            status = 1
            break
    if args.keep:
        print(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
