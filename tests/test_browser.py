"""Headless Chromium opens the upload page, uploads a real photo and sees its caption."""
import os
import shutil
import threading

import pytest
from werkzeug.serving import make_server

from server.app import create_app

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER) and os.environ.get("CI") != "true":
    pytest.skip("chromium and chromium-driver are not installed (make chromium)", allow_module_level=True)


@pytest.fixture(scope="module")
def calibrated_captioner(calibrated_checkpoint):
    from captioner.inference import Captioner

    return Captioner.from_pretrained(calibrated_checkpoint, device="cpu")


@pytest.fixture
def live_server(calibrated_captioner):
    server = make_server("127.0.0.1", 0, create_app({"CAPTIONER": calibrated_captioner}), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


@pytest.fixture
def browser(tmp_path):
    assert CHROMIUM and CHROMEDRIVER, "CI must have chromium and chromium-driver (make chromium)"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=900,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_upload_a_photo_and_see_its_caption(live_server, browser, photos, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    photo = tmp_path / "cat.jpg"
    photos["cat"].save(photo)
    browser.get(live_server + "/")
    assert browser.title == "captioner"
    browser.find_element(By.ID, "file").send_keys(str(photo))
    caption = browser.find_element(By.ID, "caption")
    WebDriverWait(browser, 30).until(lambda d: caption.get_attribute("data-state") in ("done", "error"))
    assert caption.get_attribute("data-state") == "done", browser.find_element(By.ID, "error").text
    assert caption.text.strip()
    assert browser.find_element(By.ID, "preview").get_attribute("src").startswith("blob:")
    alternatives = browser.find_elements(By.CSS_SELECTOR, "#alternatives li")
    assert len(alternatives) == 2  # the page asks for 3 candidates
    tags = [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#objects li")]
    assert tags and tags[0].startswith("cat ")  # the detected object, shown as a tag
    assert "cat" in caption.text.split()  # grounding is on by default
    confidence = browser.find_element(By.ID, "confidence")
    assert confidence.text.startswith("Confidence ") and "%" in confidence.text
    assert confidence.get_attribute("data-level") in ("high", "medium", "low")
    browser.save_screenshot(str(tmp_path / "page.png"))
    assert (tmp_path / "page.png").stat().st_size > 1000
    shutil.copy(tmp_path / "page.png", os.environ.get("CAPTIONER_SCREENSHOT", tmp_path / "page-copy.png"))


def test_bad_file_shows_an_error(live_server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"this is not a jpeg")
    browser.get(live_server + "/")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 30).until(lambda d: error.is_displayed())
    assert "broken.jpg" in error.text
