"""The web page in a real headless browser (Debian's chromium + chromedriver, driven by Selenium):
upload a bundled sample image, see every expert's sub-caption and the composed caption, ask a
question, see the answer and the expert that gave it. Saves a screenshot as a test artifact."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests.helpers.serving import (  # noqa: F401
    IMAGES,
    ServerThread,
    data_url,
    engine_fixture,
    run_dirs_fixture,
    serve_config,
    trained_fixture,
)

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER}: apt-get install chromium chromium-driver", allow_module_level=True)
selenium = pytest.importorskip("selenium", reason="selenium is not installed: pip install -r requirements-serve.txt")
httpx = pytest.importorskip("httpx")


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="rsmoe-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={profile}"):
        opts.add_argument(flag)
    # An explicit driver path: Selenium Manager is never run, so nothing is downloaded.
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def artifacts_dir(tmp_path):
    d = os.environ.get("RSMOE_TEST_ARTIFACTS")
    if d:
        os.makedirs(d, exist_ok=True)
        return d
    return str(tmp_path)


def test_page_captions_an_upload_and_answers_a_question(browser, engine, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from rsmoe.serving.app import create_app

    image = IMAGES[0]
    question = "How many buildings are there?"
    with ServerThread(create_app(engine, serve_config())) as s:
        # What the API says about the same image: the page must show exactly this.
        api_caption = httpx.post(s.url + "/v1/caption", json={"image": data_url(image)}, timeout=60).json()
        api_answer = httpx.post(s.url + "/v1/ask", json={"image": data_url(image), "question": question}, timeout=60).json()

        browser.get(s.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: "experts:" in d.find_element(By.ID, "model-info").text)
        text = lambda el: el.get_attribute("textContent")  # exact text, unlike el.text

        browser.find_element(By.ID, "file").send_keys(image)
        rows = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#experts tr[data-expert]") or False)
        assert [r.get_attribute("data-expert") for r in rows] == engine.names
        shown = {r.get_attribute("data-expert"): text(r.find_element(By.CSS_SELECTOR, "span.text")) for r in rows}
        assert shown == api_caption["experts"]
        assert text(browser.find_element(By.ID, "caption")) == (api_caption["caption"] or "(empty)")
        assert browser.execute_script("return document.getElementById('preview').naturalWidth") == 256
        cut = {r.get_attribute("data-expert") for r in rows if r.find_elements(By.CSS_SELECTOR, ".cut")}
        assert cut == set(api_caption["truncated"])

        browser.find_element(By.ID, "question").send_keys(question)
        browser.find_element(By.ID, "ask").click()
        wait.until(lambda d: d.find_element(By.ID, "answer-box").is_displayed())
        assert text(browser.find_element(By.ID, "answer-expert")) == api_answer["expert"] == "objects"
        assert text(browser.find_element(By.ID, "answer")) == (api_answer["answer"] or "(empty)")
        assert not browser.find_element(By.ID, "error").is_displayed()
        shot = os.path.join(artifacts_dir(tmp_path), "serving_page.png")
        assert browser.save_screenshot(shot)
        print(f"screenshot: {shot}")

        # A file that is not an image: the page shows the server's one-line message, and keeps working.
        bad = tmp_path / "notes.png"
        bad.write_bytes(b"these are not pixels")
        browser.find_element(By.ID, "file").send_keys(str(bad))
        err = wait.until(lambda d: d.find_element(By.ID, "error") if d.find_element(By.ID, "error").is_displayed() else False)
        assert "not an image" in err.text
        assert httpx.get(s.url + "/health").json()["status"] == "ok"
