"""Take the README's screenshot of the web page: serve RUN (with a library) on
loopback, drop audio files on the page in headless Chromium, save a PNG.

    python scripts/screenshot.py RUN --db LIBRARY --out docs/page.png AUDIO...
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from playwright.sync_api import sync_playwright

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path)
    p.add_argument("audio", type=Path, nargs="+")
    p.add_argument("--db", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("docs/page.png"))
    p.add_argument("--long", type=float, default=6.0)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "soundtag.cli", "serve", str(args.run), "--db", str(args.db),
                               "--port", str(port), "--long", str(args.long)])
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                httpx.get(f"{base}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.2)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(base + "/")
            page.wait_for_selector("#lib-items li")
            page.set_input_files("#files", [str(a) for a in args.audio])
            page.wait_for_function(f"document.querySelectorAll('.result[data-state=done]').length == {len(args.audio)}",
                                   timeout=60_000)
            page.get_by_role("button", name="similar").first.click()
            page.wait_for_function("document.querySelector('#lib-status').textContent.startsWith('sounds like')")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(30)
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
