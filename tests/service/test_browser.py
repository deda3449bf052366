"""The browser page in headless Chromium, against a live ``ddsnet serve``: pick a photo, send it, see it back."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from service.app import build_app
from service.settings import Settings
from tests.service.conftest import uvicorn_server

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="Chromium and chromedriver are not installed")


@pytest.fixture
def server_url(tiny_checkpoint):
    with uvicorn_server(build_app(Settings(checkpoint=tiny_checkpoint, tile=64))) as (base, _):
        yield base


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=390,844"):  # a phone's width
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


def test_the_page_denoises_a_picked_photo_and_shows_what_ran(server_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    clean = np.full((72, 96, 3), 120, np.uint8)
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 25, clean.shape), 0, 255).astype(np.uint8)
    photo = tmp_path / "noisy.png"
    Image.fromarray(noisy).save(photo)

    browser.get(f"{server_url}/")
    browser.find_element(By.ID, "file").send_keys(str(photo))
    browser.find_element(By.CSS_SELECTOR, "input[name=quality][value=fast]").click()
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "result").is_displayed()
                                     or d.find_element(By.ID, "error").is_displayed())
    assert not browser.find_element(By.ID, "error").is_displayed(), browser.find_element(By.ID, "error").text
    assert browser.find_element(By.ID, "subnet").text == "2"  # fast: the slimmest of the tiny table's three
    assert "requested" in browser.find_element(By.ID, "reason").text
    size = browser.execute_script("const image = document.getElementById('after');"
                                  "return [image.naturalWidth, image.naturalHeight];")
    assert size == [96, 72]
    assert browser.find_element(By.ID, "download").get_attribute("href").startswith("blob:")
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 0

    # auto on an idle server: the reason shown is the server's (DDSNet-Reason), the gate's pick.
    browser.find_element(By.CSS_SELECTOR, "input[name=quality][value=auto]").click()
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "reason").text == "picked by the gate")


def test_the_page_shows_the_apis_error_detail(server_url, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_bytes(b"these are not pixels")
    browser.get(f"{server_url}/")
    browser.find_element(By.ID, "file").send_keys(str(not_an_image))
    browser.find_element(By.ID, "send").click()
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "error").is_displayed())
    assert "not an image" in browser.find_element(By.ID, "error").text
