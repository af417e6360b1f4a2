"""End to end in a real browser: Debian's Chromium, headless, driven by Playwright for Python
(pinned to 1.64.x, whose bundled Chromium has the same major version, 156; `playwright install`
is never run: the system browser is launched by path). Skipped when either is missing
(`apt-get install chromium`, `pip install playwright==1.64.1`).

A uvicorn server on a free loopback port serves a database holding a text run, an image run and a
generation run (the tiny Llama), with the toy classifier as live model. The browser opens the runs
list, sorts the run table by clicking a header, filters the example browser with its form, sorts a
generation run's examples by the disagreement ρ of its two methods and opens one (its generation
matrices), opens an image example, runs a live explanation (and, with the tiny CNN as live model,
uploads an image and a text file named .png), and checks that the XSS payloads never run (no
dialog opens). A screenshot of each page is saved (under $SALIENCE_ARTIFACTS when set, else the test's temporary folder) and checked
to be non-blank (its pixels are not one colour).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from servekit import GENERATION_METHODS, XSS, build_generation_db, build_image_db, build_text_db

import salience
from salience.serve import create_app
from salience.serve.live import LiveModel
from tiny_cnn import photo, tiny_classifier

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed (pip install playwright==1.64.1)")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="Debian's chromium is not installed (apt-get install chromium)")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def _serving(database: Path, live: LiveModel) -> Iterator[str]:
    """A uvicorn server of the viewer in a thread on a free loopback port: its base URL."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(database, live=live), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(5)
        live.close()


@pytest.fixture(scope="module")
def server(toy_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("browser")
    database, text_run = build_text_db(folder, toy_dir)
    _, image_run = build_image_db(folder, database.name)
    _, generation_run = build_generation_db(folder, database.name)
    with _serving(database, LiveModel("toy", model=salience.load_model(str(toy_dir)), time_limit=30)) as base:
        yield base, text_run, image_run, generation_run, database


@pytest.fixture(scope="module")
def image_server(server):
    """The same database with the tiny CNN as live model (image uploads)."""
    with _serving(server[4], LiveModel("tiny-cnn", model=tiny_classifier(), time_limit=30)) as base:
        yield base


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.dialogs = []  # any alert() from an injected script would land here
    page.on("dialog", lambda dialog: (page.dialogs.append(dialog.message), dialog.dismiss()))
    yield page
    context.close()


def _shot(page, name: str, tmp_path: Path) -> Path:
    folder = Path(os.environ.get("SALIENCE_ARTIFACTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"viewer-{name}.png"
    page.screenshot(path=str(path), full_page=True)
    pixels = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert pixels.std() > 5 and len(np.unique(pixels)) > 16, f"{path} looks blank"
    return path


def test_runs_list_and_sorting_the_run_table(server, page, tmp_path):
    base, text_run, image_run, _, _ = server
    page.goto(base + "/")
    assert page.title().startswith("runs")
    assert page.locator(f"a:has-text('{text_run}')").count() == 1 and page.locator(f"a:has-text('{image_run}')").count() == 1
    _shot(page, "runs", tmp_path)
    page.click(f"a:has-text('{text_run}')")
    page.click("thead a:has-text('comprehensiveness')")
    assert "sort=comprehensiveness" in page.url
    rows = page.locator("table.summary tbody tr")
    means = [float(rows.nth(i).locator("td").first.inner_text().split()[0]) for i in range(rows.count())]
    assert means == sorted(means, reverse=True)  # comprehensiveness: higher is better, best first
    page.click("thead a:has-text('comprehensiveness')")  # a second click reverses
    means = [float(rows.nth(i).locator("td").first.inner_text().split()[0]) for i in range(rows.count())]
    assert means == sorted(means) and "order=asc" in page.url
    assert page.locator("svg.curve polyline").count() == 2
    _shot(page, "run", tmp_path)
    assert page.dialogs == []


def test_filtering_examples_and_the_xss_payload_stays_inert(server, page, tmp_path):
    base, text_run, _, _, _ = server
    page.goto(f"{base}/runs/{text_run}/examples?per=50")
    assert XSS in page.locator("section.example .input").first.inner_text()  # shown as text
    assert page.evaluate("document.scripts.length") == 0 and page.locator("section.example img").count() == 0
    page.select_option("select[name=label]", "1")
    page.click("button:has-text('apply')")
    assert "label=1" in page.url
    labels = page.locator("section.example header span:has-text('label') b").all_inner_texts()
    total = int(re.search(r"(\d+) matching example", page.content()).group(1))
    assert labels and set(labels) == {"1"} and len(labels) == total
    _shot(page, "examples", tmp_path)
    assert page.dialogs == []


def test_image_example_and_live_explanation(server, page, tmp_path):
    base, _, image_run, _, _ = server
    page.goto(f"{base}/runs/{image_run}/examples")
    page.click("section.example header a >> nth=0")
    assert "/example?id=" in page.url
    overlay = page.locator("img.overlay").first
    assert overlay.evaluate("img => img.complete && img.naturalWidth > 100")  # the data: PNG decoded
    _shot(page, "image-example", tmp_path)
    page.goto(base + "/explain")
    page.fill("textarea[name=text]", f"{XSS} the film was good")
    page.check("input[value=occlusion]")
    page.check("input[value=saliency]")
    with page.expect_navigation():
        page.click("button:has-text('explain')")
    assert page.locator(".method .explanation").count() == 2
    assert XSS in page.locator("textarea[name=text]").input_value()
    _shot(page, "live", tmp_path)
    assert page.dialogs == []


def test_generation_run_sorted_by_disagreement_and_its_matrices(server, page, tmp_path):
    base, _, _, generation_run, _ = server
    page.goto(f"{base}/runs/{generation_run}/examples")
    page.select_option("select[name=rank_a]", GENERATION_METHODS[0])
    page.select_option("select[name=rank_b]", GENERATION_METHODS[1])
    page.select_option("select[name=sort]", "rho")
    page.click("button:has-text('apply')")
    assert "sort=rho" in page.url and "rank_a=" in page.url
    shown = [float(t.split(" = ")[-1]) for t in page.locator("span.rho").all_inner_texts()]
    assert len(shown) == 2 and shown == sorted(shown)
    page.click("section.example header a >> nth=0")
    assert "/example?id=" in page.url
    matrices = page.locator("table.matrix")
    assert matrices.count() == len(GENERATION_METHODS)
    assert all(matrices.nth(i).locator("tbody tr").count() == 3 for i in range(matrices.count()))  # 3 generated tokens
    assert page.evaluate("document.scripts.length") == 0
    _shot(page, "generation-example", tmp_path)
    assert page.dialogs == []


def test_image_upload_on_the_live_page(image_server, page, tmp_path):
    picture = tmp_path / "cat.png"
    Image.fromarray(photo(40, 60, seed=4)).save(picture)
    page.goto(image_server + "/explain")
    page.set_input_files("input[name=image]", str(picture))  # Chromium's own multipart encoding
    page.check("input[value=saliency]")
    with page.expect_navigation():
        page.click("button:has-text('explain')")
    overlays = page.locator(".method img.overlay")
    assert overlays.count() >= 1 and page.locator("code.upload").inner_text() == "cat.png"
    assert all(overlays.nth(i).evaluate("img => img.complete && img.naturalWidth > 100") for i in range(overlays.count()))
    _shot(page, "live-upload", tmp_path)
    not_image = tmp_path / "notes.png"
    not_image.write_text("only text")
    page.goto(image_server + "/explain")
    page.set_input_files("input[name=image]", str(not_image))
    with page.expect_navigation():
        page.click("button:has-text('explain')")
    assert "not an image Pillow can read" in page.locator("p.error").inner_text()
    assert page.dialogs == []
