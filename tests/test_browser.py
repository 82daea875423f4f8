"""Headless Chromium opens the upload page, uploads real photos and sees their captions."""
import os
import shutil
import threading
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from server.app import create_app

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER) and os.environ.get("CI") != "true":
    pytest.skip("chromium and chromium-driver are not installed (make chromium)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402 (only once Chromium is known to be there)
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

WAIT_S = 30


@pytest.fixture(scope="module")
def calibrated_captioner(calibrated_checkpoint):
    from captioner.inference import Captioner

    return Captioner.from_pretrained(calibrated_checkpoint, device="cpu")


@pytest.fixture
def caption_requests():
    """The query string of every POST /v1/captions the live server answers, in order."""
    return []


@pytest.fixture
def live_server(calibrated_captioner, caption_requests):
    app = create_app({"CAPTIONER": calibrated_captioner})

    def recording_app(environ, start_response):
        if environ["REQUEST_METHOD"] == "POST" and environ["PATH_INFO"] == "/v1/captions":
            caption_requests.append(environ.get("QUERY_STRING", ""))
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, recording_app, threaded=True)
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
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def photo_paths(tmp_path, photos):
    """cat.jpg and coffee.jpg, and broken.jpg, which is not an image."""
    paths = {}
    for name in ("cat", "coffee"):
        paths[name] = tmp_path / f"{name}.jpg"
        photos[name].save(paths[name])
    paths["broken"] = tmp_path / "broken.jpg"
    paths["broken"].write_bytes(b"this is not a jpeg")
    return paths


def choose(browser, *paths):
    browser.find_element(By.ID, "file").send_keys("\n".join(str(p) for p in paths))


def cards_when_settled(browser, count):
    """The result cards, once there are `count` and none is waiting for its caption."""
    def settled(driver):
        cards = driver.find_elements(By.CSS_SELECTOR, "#results .card")
        states = [card.get_attribute("data-state") for card in cards]
        return cards if len(cards) == count and "pending" not in states else False

    return WebDriverWait(browser, WAIT_S).until(settled)


def card_parts(card):
    def texts(selector):
        return [element.text for element in card.find_elements(By.CSS_SELECTOR, selector)]

    return {
        "state": card.get_attribute("data-state"),
        "filename": card.find_element(By.CSS_SELECTOR, ".filename").text,
        "caption": card.find_element(By.CSS_SELECTOR, ".caption").text,
        "error": card.find_element(By.CSS_SELECTOR, ".error").text,
        "preview": card.find_element(By.CSS_SELECTOR, ".preview"),
        "confidence": card.find_element(By.CSS_SELECTOR, ".confidence"),
        "objects": texts(".objects li"),
        "alternatives": texts(".alternatives li"),
    }


def caption_words(caption):
    return caption.rstrip(".").lower().split()


def catch_clipboard(browser):
    browser.execute_script(
        "window.copied = []; navigator.clipboard.writeText = async (text) => { window.copied.push(text); };")


def save_screenshot(browser, name, width, tmp_path):
    """The whole page at `width` CSS pixels, as page-<name>.png."""
    height = browser.execute_script("return document.documentElement.scrollHeight;")
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})
    folder = Path(os.environ.get("CAPTIONER_SCREENSHOT_DIR", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(folder / f"page-{name}.png"))
    assert (folder / f"page-{name}.png").stat().st_size > 1000
    shutil.copy(folder / f"page-{name}.png", f"/tmp/page-{name}.png")  # a copy for the release note


def test_upload_two_photos_and_see_two_captions(live_server, browser, photo_paths):
    browser.get(live_server + "/")
    assert browser.title == "captioner"
    choose(browser, photo_paths["cat"], photo_paths["coffee"])
    cards = [card_parts(card) for card in cards_when_settled(browser, 2)]
    assert [card["filename"] for card in cards] == ["cat.jpg", "coffee.jpg"]
    for card in cards:
        assert card["state"] == "done", card["error"]
        assert card["caption"][0].isupper() and card["caption"].endswith(".")  # alt text is a sentence
        assert card["preview"].get_attribute("src").startswith("blob:")
        assert card["preview"].get_attribute("alt") == card["caption"]
        assert card["confidence"].text.startswith("Confidence ") and "%" in card["confidence"].text
        assert card["confidence"].get_attribute("data-level") in ("high", "medium", "low")
        assert card["alternatives"] == []  # "Show alternatives" is off by default
    cat = cards[0]
    assert cat["objects"] and cat["objects"][0].startswith("cat ")  # the detected object, shown as a tag
    assert "cat" in caption_words(cat["caption"])  # grounding is on by default

    catch_clipboard(browser)
    browser.find_element(By.ID, "copy-csv").click()
    browser.find_element(By.ID, "copy-html").click()
    csv_text, html_text = browser.execute_script("return window.copied;")
    assert csv_text.splitlines()[0] == "filename,caption,confidence,objects"
    assert csv_text.splitlines()[1].startswith(f"cat.jpg,{cat['caption']},")
    assert html_text.splitlines() == [f'<img src="{c["filename"]}" alt="{c["caption"]}">' for c in cards]


def test_changing_an_option_captions_the_photos_again(live_server, browser, photo_paths, caption_requests):
    browser.get(live_server + "/")
    choose(browser, photo_paths["cat"])
    cards_when_settled(browser, 1)
    assert "grounding=true" in caption_requests[-1] and "n_best=1" in caption_requests[-1]

    browser.find_element(By.ID, "alternatives").click()
    WebDriverWait(browser, WAIT_S).until(lambda _: len(caption_requests) == 2)
    card = card_parts(cards_when_settled(browser, 1)[0])
    assert card["state"] == "done", card["error"]
    assert len(card["alternatives"]) == 2  # three candidates: the caption and two others
    assert not any(char.isdigit() for line in card["alternatives"] for char in line)  # no log scores
    assert "n_best=3" in caption_requests[-1] and "beam_size=3" in caption_requests[-1]

    browser.find_element(By.ID, "careful").click()
    WebDriverWait(browser, WAIT_S).until(lambda _: len(caption_requests) == 3)
    assert "beam_size=5" in caption_requests[-1]
    browser.find_element(By.ID, "grounding").click()
    WebDriverWait(browser, WAIT_S).until(lambda _: len(caption_requests) == 4)
    assert "grounding=false" in caption_requests[-1]
    assert card_parts(cards_when_settled(browser, 1)[0])["state"] == "done"

    choose(browser, photo_paths["cat"])  # the same file again: its card is captioned again
    WebDriverWait(browser, WAIT_S).until(lambda _: len(caption_requests) == 5)
    assert len(cards_when_settled(browser, 1)) == 1


def test_a_bad_file_shows_its_error_beside_the_other_photo(live_server, browser, photo_paths):
    browser.get(live_server + "/")
    choose(browser, photo_paths["cat"], photo_paths["broken"])
    cat, broken = (card_parts(card) for card in cards_when_settled(browser, 2))
    assert cat["state"] == "done" and cat["caption"]
    assert broken["state"] == "error"
    assert "broken.jpg" in broken["error"] and not broken["caption"]
    assert broken["filename"] == "broken.jpg"

    browser.find_element(By.ID, "clear").click()
    assert browser.find_elements(By.CSS_SELECTOR, "#results .card") == []
    assert not browser.find_element(By.ID, "copy-csv").is_enabled()


def test_page_is_labelled_and_the_drop_zone_works_from_the_keyboard(live_server, browser):
    from selenium.webdriver.common.keys import Keys

    browser.get(live_server + "/")
    unlabelled = browser.execute_script("""
        return [...document.querySelectorAll('input, button')]
          .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.textContent.trim())
          .map((el) => el.id);""")
    assert unlabelled == []
    assert browser.find_element(By.ID, "results").get_attribute("aria-live") == "polite"
    assert browser.find_element(By.ID, "file").get_attribute("multiple") is not None
    browser.execute_script(
        "window.picked = 0; document.getElementById('file').click = () => { window.picked += 1; };")
    browser.find_element(By.ID, "drop").send_keys(Keys.ENTER)
    browser.find_element(By.ID, "drop").send_keys(Keys.SPACE)
    assert browser.execute_script("return window.picked;") == 2


def test_page_fits_a_phone_and_screenshots(live_server, browser, photo_paths, tmp_path):
    browser.get(live_server + "/")
    browser.find_element(By.ID, "alternatives").click()
    choose(browser, photo_paths["cat"], photo_paths["coffee"], photo_paths["broken"])
    cards_when_settled(browser, 3)
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 1200, "height": 900, "deviceScaleFactor": 1, "mobile": False})
    save_screenshot(browser, "desktop", 1200, tmp_path)

    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 400, "height": 800, "deviceScaleFactor": 1, "mobile": True})
    assert browser.execute_script("return window.innerWidth;") == 400
    assert browser.execute_script("return document.documentElement.scrollWidth;") <= 400
    save_screenshot(browser, "phone", 400, tmp_path)
