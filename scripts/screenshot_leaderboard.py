"""Open the static leaderboard page in headless Chromium: save a screenshot and the rendered DOM, and
check that the tables and plots rendered (a table cell per run and metric, images loaded).

Run: python scripts/screenshot_leaderboard.py [leaderboard/index.html] [--png shot.png] [--dom dom.html]
Needs a Chromium binary (Debian: apt-get install -y chromium). Exits 1 when the page did not render.
"""

from __future__ import annotations

import argparse
import html
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# No network, no background services, a throwaway profile: the page is a local file.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--allow-file-access-from-files")


def find_chromium() -> str | None:
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _chromium(binary: str, page: Path, extra: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        command = [binary, *FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=5000", *extra,
                   page.resolve().as_uri()]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def screenshot(page: Path, png: Path, *, width: int = 1280, height: int = 1800, timeout: float = 120) -> None:
    binary = find_chromium()
    if binary is None:
        raise RuntimeError("no Chromium binary found (apt-get install -y chromium)")
    png.parent.mkdir(parents=True, exist_ok=True)
    result = _chromium(binary, page, [f"--screenshot={png.resolve()}", f"--window-size={width},{height}"], timeout)
    if not png.is_file() or png.stat().st_size == 0:
        raise RuntimeError(f"chromium wrote no screenshot (exit {result.returncode}): {result.stderr.strip()[-500:]}")


def dump_dom(page: Path, *, timeout: float = 120) -> str:
    """The DOM after Chromium parsed and laid out the page (what a browser shows, not the file's text)."""
    binary = find_chromium()
    if binary is None:
        raise RuntimeError("no Chromium binary found (apt-get install -y chromium)")
    result = _chromium(binary, page, ["--dump-dom"], timeout)
    if result.returncode != 0 or "<html" not in result.stdout:
        raise RuntimeError(f"chromium --dump-dom failed (exit {result.returncode}): {result.stderr.strip()[-500:]}")
    return result.stdout


def table_cells(dom: str) -> list[list[str]]:
    """Rows of text cells of every table.leaderboard in the dumped DOM (tags stripped)."""
    rows = []
    for table in re.findall(r'<table class="leaderboard">(.*?)</table>', dom, flags=re.S):
        for row in re.findall(r"<tr>(.*?)</tr>", table, flags=re.S):
            cells = re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, flags=re.S)
            rows.append([" ".join(html.unescape(re.sub(r"<[^>]+>", " ", cell)).split()) for cell in cells])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("page", nargs="?", type=Path, default=ROOT / "leaderboard" / "index.html")
    parser.add_argument("--png", type=Path, default=Path("leaderboard-screenshot.png"))
    parser.add_argument("--dom", type=Path, default=None, help="also save the rendered DOM here")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=1800)
    args = parser.parse_args()
    if not args.page.is_file():
        print(f"error: {args.page} not found; run `harness leaderboard --write` first", file=sys.stderr)
        return 2
    try:
        screenshot(args.page, args.png, width=args.width, height=args.height)
        dom = dump_dom(args.page)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.dom:
        args.dom.write_text(dom, encoding="utf-8")
    rows = table_cells(dom)
    images = re.findall(r'<img src="([^"]+)"', dom)
    missing = [src for src in images if not (args.page.parent / src).is_file()]
    print(f"{args.png}: {len(rows)} table rows, {len(images)} plots" + (f", missing {missing}" if missing else ""))
    return 0 if rows and not missing else 1


if __name__ == "__main__":
    sys.exit(main())
