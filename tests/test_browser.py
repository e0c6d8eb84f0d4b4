"""The web demo in a real browser: Debian's Chromium and chromedriver driven by Selenium (nothing downloads a
browser). The server is started as a user starts it (`python app.py --port P`, tests/conftest.py app_server);
the test types a prompt, presses the button, sees the progress bar, waits for the gallery and judges the
images the page shows; an empty prompt shows an error and the next request still works; two overlapping
requests from two tabs both finish. Timings are printed (pytest -s) and the page's screenshot is written to
$CLIPGEN_SCREENSHOT when set (the README's docs/app.png)."""
import io
import os
import shutil
import time
import urllib.request

import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("no Chromium here (apt install chromium chromium-driver): the browser tests are skipped",
                allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

PROMPT = "a large red circle in the top left"


@pytest.fixture(scope="module")
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


def wait_for(check, timeout: float, poll: float = 0.02):
    """check() until it returns something true (returned), or fail after timeout seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"gave up after {timeout} s waiting for {check.__doc__ or check}")


def open_page(driver, port) -> float:
    """Load the page; seconds until the prompt box takes input."""
    start = time.time()
    driver.get(f"http://127.0.0.1:{port}/")

    def ready():
        """the prompt box"""
        boxes = driver.find_elements(By.CSS_SELECTOR, "#prompt textarea")
        return boxes and boxes[0].is_displayed() and boxes[0].is_enabled()

    wait_for(ready, 30)
    return time.time() - start


def gallery(driver):
    return driver.find_elements(By.CSS_SELECTOR, "#gallery img")


def generate(driver, prompt: str, expect: int = 4, timeout: float = 60) -> tuple[float, bool]:
    """Type the prompt, press Generate, wait for `expect` images; (seconds, whether a progress bar showed)."""
    box = driver.find_element(By.CSS_SELECTOR, "#prompt textarea")
    box.clear()
    box.send_keys(prompt)
    before = [img.get_attribute("src") for img in gallery(driver)]
    start = time.time()
    driver.find_element(By.CSS_SELECTOR, "#generate").click()
    progress = False

    def done():
        """the gallery's new images"""
        nonlocal progress
        progress = progress or bool(driver.find_elements(By.CSS_SELECTOR, "#gallery .progress-bar, #gallery .eta-bar"))
        srcs = [img.get_attribute("src") for img in gallery(driver)]
        return len(srcs) == expect and srcs != before and all(srcs)

    wait_for(done, timeout, poll=0.01)
    return time.time() - start, progress


def shown_images(driver) -> list[Image.Image]:
    """The gallery's pictures as the browser downloads them: PNG files (the download button saves these)."""
    out = []
    for img in gallery(driver):
        picture = Image.open(io.BytesIO(urllib.request.urlopen(img.get_attribute("src"), timeout=30).read()))
        assert picture.format == "PNG", picture.format
        out.append(picture.convert("RGB"))
    return out


def test_prompt_to_gallery_in_a_real_browser(app_server, browser):
    from evaluation.judge import judge

    _, port = app_server
    load = open_page(browser, port)
    generate(browser, "a blue square")  # the first request loads the models (once per process)
    seconds, progress = generate(browser, PROMPT)
    print(f"\npage load to interactive {load:.2f} s; button to gallery (16 candidates) {seconds:.2f} s")
    assert progress, "no progress bar while the tokens were drawn"
    verdicts = [judge(img).describe() for img in shown_images(browser)]
    assert sum(v == "large red circle, top left" for v in verdicts) >= 3, verdicts
    captions = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#gallery .caption-label")]
    assert len(captions) == 4 and all(c.startswith("CLIP ") for c in captions), captions
    assert load < 10 and seconds < 30  # the targets (2 s, 3 s) are measured and reported, not asserted here
    if os.environ.get("CLIPGEN_SCREENSHOT"):
        browser.save_screenshot(os.environ["CLIPGEN_SCREENSHOT"])


def test_an_empty_prompt_shows_an_error_and_the_next_request_works(app_server, browser):
    _, port = app_server
    open_page(browser, port)
    browser.find_element(By.CSS_SELECTOR, "#prompt textarea").clear()
    browser.find_element(By.CSS_SELECTOR, "#generate").click()

    def toast():
        """the error message"""
        return [e.text for e in browser.find_elements(By.CSS_SELECTOR, "[data-testid='toast-text']") if e.text]

    assert any("type a prompt first" in t for t in wait_for(toast, 20))
    generate(browser, "a green triangle")
    assert len(shown_images(browser)) == 4


def test_two_overlapping_requests_both_finish(app_server, browser):
    _, port = app_server
    tabs = []
    for prompt in ("a yellow diamond", "a purple circle"):
        if tabs:
            browser.switch_to.new_window("tab")
        open_page(browser, port)
        box = browser.find_element(By.CSS_SELECTOR, "#prompt textarea")
        box.send_keys(prompt)
        browser.find_element(By.CSS_SELECTOR, "#generate").click()
        tabs.append(browser.current_window_handle)
    for handle in tabs:
        browser.switch_to.window(handle)

        def filled():
            """four images in this tab"""
            return len([i for i in gallery(browser) if i.get_attribute("src")]) == 4

        wait_for(filled, 60)
    browser.close()
    browser.switch_to.window(tabs[0])
