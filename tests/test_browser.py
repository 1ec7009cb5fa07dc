"""The app in a real browser: Debian's chromium driven by Playwright (no browser download) against
`streamlit run` on localhost. Opens every page, applies a filter, clicks a neuron into the detail page,
and saves a screenshot of each step under test-artifacts/browser/."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import store

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = ROOT / "test-artifacts" / "browser"
PAGES = {  # URL path -> the page's title
    "": "dpo-neurons", "Neuron_groups": "Neuron groups", "Layers": "Layers", "Neuron": "Neuron detail",
    "Interventions": "Interventions", "Compare_runs": "Compare runs", "SQL": "SQL", "Prompts": "Prompts",
}

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError("chromium is missing: `make test` installs Debian's chromium package")
    pytest.skip("Debian's chromium is not installed (make test installs it)", allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_run, tmp_path_factory):
    """`streamlit run` on the tiny run's store, as a researcher launches it."""
    cfg, _ = tiny_run
    path = tmp_path_factory.mktemp("browser") / "store.duckdb"
    shutil.copyfile(cfg.run.store, path)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app/Home.py", "--server.port", str(port),
         "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env={**os.environ, "STORE": str(path)}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise RuntimeError("streamlit did not answer on /_stcore/health within 60 s")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(app_url):
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--headless"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield page
        browser.close()


def settled(page: Page) -> None:
    """Wait until Streamlit has finished running the script (its status widget disappears)."""
    page.wait_for_timeout(300)
    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=60_000)
    expect(page.get_by_test_id("stSpinner")).to_have_count(0, timeout=60_000)


def test_every_page_renders_without_an_exception(page, app_url):
    assert {f.stem.split("_", 1)[1] for f in (ROOT / "app" / "pages").glob("*.py")} == set(PAGES) - {""}
    for path, title in PAGES.items():
        page.goto(f"{app_url}/{path}")
        expect(page.get_by_role("heading", name=title, exact=True)).to_be_visible(timeout=60_000)
        settled(page)
        expect(page.get_by_test_id("stException")).to_have_count(0)
        page.screenshot(path=SHOTS / f"page-{path or 'Home'}.png", full_page=True)


def test_filter_then_click_a_neuron_into_the_detail_page(page, app_url, tiny_run):
    cfg, run_id = tiny_run
    con = store.connect(cfg.run.store)
    (n_tp,), = con.execute("SELECT count(*) FROM neurons WHERE run_id = ? AND group_code = 'TP-'", [run_id]).fetchall()
    (layer, neuron), = con.execute("SELECT layer, neuron FROM neurons WHERE run_id = ? AND group_code = 'TP-' "
                                   "ORDER BY abs(delta) DESC, layer, neuron LIMIT 1", [run_id]).fetchall()
    con.close()

    page.goto(f"{app_url}/Neuron_groups")
    expect(page.get_by_role("heading", name="Neuron groups", exact=True)).to_be_visible(timeout=60_000)
    settled(page)
    page.get_by_test_id("stSidebar").get_by_test_id("stSelectbox").filter(has_text="Preset").click()
    page.get_by_role("option", name="toxic dampened (TP-)").click()
    expect(page.get_by_text(f"{n_tp:,} of", exact=False).first).to_be_visible(timeout=60_000)
    settled(page)
    page.screenshot(path=SHOTS / "groups-filtered-TP-.png", full_page=True)

    # The table's first row is the top TP- neuron; a click on its row marker selects it and opens the neuron.
    grid = page.get_by_test_id("stDataFrame").first
    grid.scroll_into_view_if_needed()
    box = grid.bounding_box()
    page.mouse.click(box["x"] + 15, box["y"] + 35 + 17)
    expect(page).to_have_url(f"{app_url}/Neuron?run={run_id}&layer={layer}&neuron={neuron}", timeout=60_000)
    expect(page.get_by_role("heading", name=f"L{layer}.N{neuron} ")).to_contain_text("group TP-", timeout=60_000)
    settled(page)
    page.screenshot(path=SHOTS / "neuron-detail-after-click.png", full_page=True)
