"""Headless Chromium opens the upload page, uploads real photos and sees their captions."""
import contextlib
import json
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

from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402 (only once Chromium is there)
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
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
def caption_answers():
    """The JSON body of every answer to POST /v1/captions, in order."""
    return []


@contextlib.contextmanager
def serving(captioner, caption_requests, caption_answers):
    """The app around `captioner` on a free local port (its URL), recording each POST
    /v1/captions' query string and answer."""
    app = create_app({"CAPTIONER": captioner})

    def recording_app(environ, start_response):
        if environ["REQUEST_METHOD"] != "POST" or environ["PATH_INFO"] != "/v1/captions":
            return app(environ, start_response)
        caption_requests.append(environ.get("QUERY_STRING", ""))
        answer = app(environ, start_response)
        try:
            body = b"".join(answer)
        finally:
            if hasattr(answer, "close"):
                answer.close()
        caption_answers.append(json.loads(body))
        return [body]

    server = make_server("127.0.0.1", 0, recording_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


@pytest.fixture
def live_server(calibrated_captioner, caption_requests, caption_answers):
    with serving(calibrated_captioner, caption_requests, caption_answers) as url:
        yield url


@pytest.fixture
def live_attention_server(attention_captioner, caption_requests, caption_answers):
    """The same, serving a model with soft attention (GET /v1/model says "attention": true)."""
    with serving(attention_captioner, caption_requests, caption_answers) as url:
        yield url


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
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # for page_errors
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


def page_errors(browser):
    """The console's errors since the last call (a refused Content-Security-Policy, a script
    error), less the missing favicon's 404."""
    return [entry["message"] for entry in browser.get_log("browser")
            if entry["level"] == "SEVERE" and "favicon.ico" not in entry["message"]]


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


# Reads the heat map canvas at the centre of each attention cell: the canvas must cover the
# <img> box, and the photo is drawn in it whole (object-fit: contain, centred), the grid over
# the whole photo. -> rows x cols alpha values (0-255).
SAMPLE_CELLS = """
const [canvas, img, rows, cols] = arguments;
const box = img.getBoundingClientRect();
const scale = Math.min(box.width / img.naturalWidth, box.height / img.naturalHeight);
const [w, h] = [img.naturalWidth * scale, img.naturalHeight * scale];
const [x0, y0] = [(box.width - w) / 2, (box.height - h) / 2];
const [sx, sy] = [canvas.width / box.width, canvas.height / box.height];
const context = canvas.getContext("2d");
const alphas = [];
for (let r = 0; r < rows; r++) {
  alphas.push([]);
  for (let c = 0; c < cols; c++) {
    const x = Math.floor((x0 + (c + 0.5) * w / cols) * sx), y = Math.floor((y0 + (r + 0.5) * h / rows) * sy);
    alphas[r].push(context.getImageData(x, y, 1, 1).data[3]);
  }
}
return alphas;"""


def argmax(grid):
    flat = [value for row in grid for value in row]
    return divmod(flat.index(max(flat)), len(grid[0]))


def same_box(a, b, tolerance=1.5):
    return all(abs(a[key] - b[key]) <= tolerance for key in ("x", "y", "width", "height"))


def overlay_shows(card, index):
    """The card's heat map canvas once it is visible and drawn for word `index`."""
    def shown(_):
        found = card.find_elements(By.CSS_SELECTOR, ".heatmap")
        return found[0] if found and found[0].is_displayed() and found[0].get_attribute("data-index") == str(index) \
            else False
    return shown


def overlay_hidden(card):
    return lambda _: not any(canvas.is_displayed() for canvas in card.find_elements(By.CSS_SELECTOR, ".heatmap"))


def test_attention_words_lay_their_weights_over_the_photo(live_attention_server, browser, photos, caption_requests,
                                                          caption_answers, tmp_path):
    rocket = tmp_path / "rocket.jpg"  # 640x427: the squashed 7x7 grid is not square on the page
    photos["rocket"].save(rocket)
    browser.get(live_attention_server + "/")
    WebDriverWait(browser, WAIT_S).until(lambda driver: driver.find_element(By.ID, "attention-hint").is_displayed())
    choose(browser, rocket)
    card_element = cards_when_settled(browser, 1)[0]
    card = card_parts(card_element)
    assert card["state"] == "done", card["error"]
    assert len(caption_requests) == 1 and "attention=true" in caption_requests[0].split("&")
    result = caption_answers[0]["results"][0]
    attention = result["attention"]
    assert [entry["word"] for entry in attention] == result["caption"].split()

    # One focusable element per caption word; the caption still reads as a sentence.
    words = card_element.find_elements(By.CSS_SELECTOR, ".caption .word")
    assert [word.text.lower() for word in words] == [entry["word"] for entry in attention]
    assert all(word.get_attribute("tabindex") == "0" for word in words)
    assert card["caption"] == result["caption"][0].upper() + result["caption"][1:] + "."
    assert card["preview"].get_attribute("alt") == card["caption"]
    assert browser.execute_script("return getComputedStyle(arguments[0]).objectFit;", card["preview"]) == "contain"
    assert card_element.find_elements(By.CSS_SELECTOR, ".heatmap") == []  # nothing drawn before a word is pointed at

    drawn = []
    for index, (word, entry) in enumerate(zip(words, attention, strict=True)):
        ActionChains(browser).move_to_element(word).perform()
        overlay = WebDriverWait(browser, WAIT_S).until(overlay_shows(card_element, index))
        assert "active" in word.get_attribute("class").split()
        assert same_box(overlay.rect, card["preview"].rect), (overlay.rect, card["preview"].rect)
        assert overlay.get_attribute("data-word") == entry["word"]
        weights = entry["weights"]
        assert len(weights) == 7 and all(len(row) == 7 for row in weights)
        peak = argmax(weights)
        assert overlay.get_attribute("data-peak") == f"{peak[0]},{peak[1]}"
        # The pixels: the brightest cell of the drawing is the word's heaviest position, and
        # any two positions whose weights clearly differ are drawn in that order.
        alphas = browser.execute_script(SAMPLE_CELLS, overlay, card["preview"], 7, 7)
        assert alphas[peak[0]][peak[1]] == max(max(row) for row in alphas), (entry["word"], alphas, weights)
        assert min(min(row) for row in alphas) > 0  # semi-transparent all over the photo
        cells = [(weights[r][c], alphas[r][c]) for r in range(7) for c in range(7)]
        spread = max(w for w, _ in cells) - min(w for w, _ in cells)
        for w1, a1 in cells:
            for w2, a2 in cells:
                if w1 > w2 + 0.1 * spread:
                    assert a1 > a2, (entry["word"], w1, a1, w2, a2)
        drawn.append((peak, browser.execute_script("return arguments[0].toDataURL();", overlay)))
    peaks = {peak for peak, _ in drawn}
    assert len(peaks) > 1, "every word of the rocket caption peaks at the same position"
    assert len({image for _, image in drawn}) == len({json.dumps(entry["weights"]) for entry in attention})

    ActionChains(browser).move_to_element(browser.find_element(By.TAG_NAME, "h1")).perform()
    WebDriverWait(browser, WAIT_S).until(overlay_hidden(card_element))
    assert card_element.find_elements(By.CSS_SELECTOR, ".caption .word.active") == []

    # From the keyboard: Tab reaches the first word, the arrow keys go along, Escape leaves.
    browser.find_element(By.ID, "clear").send_keys(Keys.TAB)
    assert browser.switch_to.active_element == words[0]
    WebDriverWait(browser, WAIT_S).until(overlay_shows(card_element, 0))
    words[0].send_keys(Keys.ARROW_RIGHT)
    assert browser.switch_to.active_element == words[1]
    WebDriverWait(browser, WAIT_S).until(overlay_shows(card_element, 1))
    words[1].send_keys(Keys.END)
    WebDriverWait(browser, WAIT_S).until(overlay_shows(card_element, len(words) - 1))
    words[-1].send_keys(Keys.ESCAPE)
    WebDriverWait(browser, WAIT_S).until(overlay_hidden(card_element))

    # At phone width the map is drawn again at the photo's new size.
    browser.execute_script("arguments[0].focus();", words[1])
    WebDriverWait(browser, WAIT_S).until(overlay_shows(card_element, 1))
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                            {"width": 400, "height": 800, "deviceScaleFactor": 2, "mobile": True})
    WebDriverWait(browser, WAIT_S).until(lambda _: card["preview"].rect["width"] < 400)
    overlay = WebDriverWait(browser, WAIT_S).until(overlay_shows(card_element, 1))
    WebDriverWait(browser, WAIT_S).until(
        lambda driver: driver.execute_script("return arguments[0].width;", overlay) == round(2 * overlay.rect["width"]))
    assert same_box(overlay.rect, card["preview"].rect)
    alphas = browser.execute_script(SAMPLE_CELLS, overlay, card["preview"], 7, 7)
    peak = argmax(attention[1]["weights"])
    assert alphas[peak[0]][peak[1]] == max(max(row) for row in alphas)
    assert browser.execute_script("return document.documentElement.scrollWidth;") <= 400
    save_screenshot(browser, "attention", 400, tmp_path)
    assert page_errors(browser) == []


def test_a_model_without_attention_is_never_asked_for_it(live_server, browser, photo_paths, caption_requests):
    browser.get(live_server + "/")
    choose(browser, photo_paths["cat"], photo_paths["coffee"])
    cards = cards_when_settled(browser, 2)
    assert len(caption_requests) == 2 and not any("attention" in query for query in caption_requests)
    assert not browser.find_element(By.ID, "attention-hint").is_displayed()
    for card in cards:
        assert card.get_attribute("data-state") == "done"
        assert card.find_elements(By.CSS_SELECTOR, ".caption .word") == []
        ActionChains(browser).move_to_element(card.find_element(By.CSS_SELECTOR, ".caption")).perform()
        ActionChains(browser).move_to_element(card.find_element(By.CSS_SELECTOR, ".preview")).perform()
        assert card.find_elements(By.CSS_SELECTOR, ".heatmap") == []
        preview = card.find_element(By.CSS_SELECTOR, ".preview")
        assert browser.execute_script("return getComputedStyle(arguments[0]).objectFit;", preview) == "cover"
    assert page_errors(browser) == []
