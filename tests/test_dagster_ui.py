"""The Dagster UI on the demo, in headless Chromium: snapshot assets and drill results visible."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_dagster_support import REPO_ROOT, dagster_home, subprocess_env

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = REPO_ROOT / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"demo ui exited early:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise AssertionError(f"{url} did not answer in {seconds}s:\n{log.read_text()[-4000:]}")


@pytest.fixture
def demo_ui(tmp_path: Path) -> Iterator[str]:
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    port = _free_port()
    home = dagster_home(tmp_path / "home")
    env = subprocess_env(home, PGKLOSET_DEMO_DIR=str(tmp_path / "demo"))
    log = tmp_path / "demo-ui.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pgkloset_dagster.demo", "ui", "--port",
                                 str(port)], env=env, cwd=tmp_path, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/server_info", proc, log, 300)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _dismiss_signup(page: object) -> None:
    skip = page.get_by_role("button", name="Skip")  # type: ignore[attr-defined]
    try:
        skip.click(timeout=8000)
    except Exception:  # the dialog is not always shown
        pass


def test_ui_shows_snapshot_assets_and_drill_checks(demo_ui: str) -> None:
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{demo_ui}/assets/pgkloset/demo", wait_until="networkidle")
            _dismiss_signup(page)
            page.get_by_text("demo_shop").first.wait_for(timeout=60000)
            text = page.inner_text("body")
            assert "demo_metrics" in text and "_globals" in text
            page.screenshot(path=str(ARTIFACTS / "dagster-ui-assets.png"), full_page=True)

            page.goto(f"{demo_ui}/assets/pgkloset/demo/demo_shop?view=checks",
                      wait_until="networkidle")
            _dismiss_signup(page)
            page.get_by_text("restore_drill").first.wait_for(timeout=60000)
            page.wait_for_timeout(1500)
            text = page.inner_text("body")
            assert "restore_drill" in text
            assert "Passed" in text, text[:3000]
            page.screenshot(path=str(ARTIFACTS / "dagster-ui-drill-check.png"), full_page=True)

            page.goto(f"{demo_ui}/assets/pgkloset/demo/demo_shop", wait_until="networkidle")
            _dismiss_signup(page)
            page.get_by_text("snapshot_id").first.wait_for(timeout=60000)
            text = page.inner_text("body")
            for field in ("logical_bytes", "new_stored_bytes", "dedup_ratio", "total_rows"):
                assert field in text
            page.screenshot(path=str(ARTIFACTS / "dagster-ui-snapshot.png"), full_page=True)
        finally:
            browser.close()
