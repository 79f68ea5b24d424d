"""Copy finished runs into the committed results folder, without weights or checkpoints.

    python scripts/collect_results.py runs/comparison            # -> results/<run_id>/
    python scripts/collect_results.py runs/comparison --dest results --dry-run

A run is copied only when its record.json exists (a finished run); model/, checkpoints/, eval/request_cache/ and the
lock file stay behind (they are large or machine-specific). Everything the leaderboard reads is kept:
record.json, spec.yaml, run.json, eval/ (per-example results for the paired tests) and artifacts/.
Then `harness leaderboard --write` renders leaderboard/ from results/.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

LEFT_BEHIND = ("model", "checkpoints", ".lock", "request_cache", "tensorboard")  # request_cache: lm-eval SQLite, resume only
MAX_FILE_BYTES = 20 * 1024 * 1024  # anything larger is not a result file: report it, don't commit it


def collect(source: Path, dest: Path, dry_run: bool) -> list[Path]:
    if not source.is_dir():
        sys.exit(f"error: {source}: not a directory of runs")
    copied = []
    for run_dir in sorted(p for p in source.iterdir() if p.is_dir()):
        if not (run_dir / "record.json").is_file():
            print(f"skipped {run_dir.name}: no record.json (unfinished run)")
            continue
        large = [p for p in run_dir.rglob("*") if p.is_file() and p.stat().st_size > MAX_FILE_BYTES
                 and not any(part in LEFT_BEHIND for part in p.relative_to(run_dir).parts)]
        if large:
            sys.exit(f"error: {large[0]} is over {MAX_FILE_BYTES >> 20} MiB; not a result file to commit")
        target = dest / run_dir.name
        print(f"{'would copy' if dry_run else 'copied'} {run_dir} -> {target}")
        if not dry_run:
            staging = target.with_name(target.name + ".partial")
            shutil.rmtree(staging, ignore_errors=True)
            shutil.copytree(run_dir, staging, ignore=shutil.ignore_patterns(*LEFT_BEHIND))
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        copied.append(target)
    return copied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="a folder of run directories (e.g. runs/comparison)")
    parser.add_argument("--dest", type=Path, default=Path("results"))
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    copied = collect(args.source, args.dest, args.dry_run)
    print(f"{len(copied)} run(s)")


if __name__ == "__main__":
    main()
