"""A new user's path end to end: a trained model, `hihpq encode`, `hihpq serve`, then a search from the web page in
headless Chromium (Debian's chromium + chromium-driver, driven by Selenium)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(
        not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()),
        reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium chromium-driver)",
    ),
]
K = 6


@pytest.fixture(scope="module")
def server(served_index, tmp_path_factory):
    _, _, _, index = served_index
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "hihpq.cli", "serve", str(index), "--port", str(port), "-k", str(K)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"hihpq serve exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if json.load(r)["status"] == "ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"hihpq serve did not answer within 180 s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1200,900"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def loaded_results(driver) -> list[dict]:
    """The result cards on the page: id, distance text and whether the thumbnail has decoded."""
    return driver.execute_script(
        """return [...document.querySelectorAll('#results .result')].map(li => {
             const img = li.querySelector('img');
             return {id: Number(li.dataset.id), distance: li.querySelector('.distance').textContent,
                     loaded: img.complete && img.naturalWidth > 0};
           });"""
    )


def wait_for_results(driver, k: int, previous: list | None = None) -> list[dict]:
    from selenium.webdriver.support.ui import WebDriverWait

    def ready(d):
        cards = loaded_results(d)
        fresh = previous is None or cards != previous
        return cards if fresh and len(cards) == k and all(c["loaded"] for c in cards) else False

    return WebDriverWait(driver, 60, poll_frequency=0.2).until(ready, message=f"{k} loaded result thumbnails")


def test_search_from_the_web_page(server, browser, served_index):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    _, images, _, _ = served_index
    browser.get(server)
    WebDriverWait(browser, 30).until(lambda d: "items" in d.find_element(By.ID, "index-info").text)
    assert browser.find_element(By.ID, "k-input").get_attribute("value") == str(K)

    query = sorted((images / "blue").iterdir())[1]
    browser.find_element(By.ID, "file-input").send_keys(str(query.resolve()))
    cards = wait_for_results(browser, K)
    distances = [float(c["distance"]) for c in cards]
    assert distances == sorted(distances) and all(d >= 0 for d in distances)
    assert browser.find_element(By.ID, "query-caption").text == query.name
    assert browser.find_element(By.ID, "error").get_attribute("hidden") is not None
    if os.environ.get("HIHPQ_SCREENSHOT"):  # for looking at the page while developing it
        browser.save_screenshot(os.environ["HIHPQ_SCREENSHOT"])

    # clicking a result searches by its id: the query becomes that item, which is its own nearest neighbour
    target = cards[2]["id"]
    browser.find_elements(By.CSS_SELECTOR, "#results .result")[2].click()
    WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, "query-img").get_attribute("src").endswith(f"/items/{target}/image")
    )
    again = wait_for_results(browser, K, previous=cards)
    assert float(again[0]["distance"]) < 0.01 and target in [c["id"] for c in again]
    assert f"item #{target}" in browser.find_element(By.ID, "query-caption").text
    assert browser.execute_script("return document.getElementById('query-img').naturalWidth") > 0


def test_the_page_shows_the_servers_message_for_a_bad_file(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(server)
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"this is not a picture")
    browser.find_element(By.ID, "file-input").send_keys(str(bad))
    box = WebDriverWait(browser, 30).until(
        lambda d: d.find_element(By.ID, "error") if d.find_element(By.ID, "error").text else False
    )
    assert box.text.startswith("400") and "not an image" in box.text
