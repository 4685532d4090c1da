"""The playground (docs/api.md) in a real headless Chromium, against a real local Ray Serve.

The browser is Debian's `chromium` driven through `chromium-driver` by selenium, with no download
and no traffic but to 127.0.0.1. Without them these tests skip and say so (`.ci/run` installs
them). The screenshots land in build/test-artifacts/ (or $FLUX_SERVE_TEST_ARTIFACTS).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from serve_app import errors
from tests.serve.apps import KEY

pytestmark = [pytest.mark.serve, pytest.mark.browser]

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("FLUX_SERVE_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts"))
WAIT_S = 120  # a 256², 4-step image on a busy 2-core machine, with room to spare
LONG = {"width": "1024", "height": "1024", "steps": "150"}  # many seconds on the small model: a job to cancel
ROOT_LORAS = {"aitk/style.safetensors", "aitk/other.safetensors", "peft.safetensors", "kohya.safetensors"}


def _find(*names: str) -> str | None:
    return next((path for path in map(shutil.which, names) if path), None)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium for the module, with a fresh profile (its own local storage)."""
    chromium = _find("chromium", "chromium-browser")
    driver = _find("chromedriver")
    if not (chromium and driver):
        pytest.skip("no Chromium: the browser tests need Debian's `chromium` and `chromium-driver` packages "
                    "(`apt-get install chromium chromium-driver`; .ci/run installs them)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the `test` extra)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox",  # no sandbox: CI runs as root
                 "--disable-dev-shm-usage", "--window-size=1100,1300",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}",
                 # nothing but the page's own traffic: no update checks, sync or other Google services
                 "--no-first-run", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-default-apps", "--disable-extensions"):
        options.add_argument(flag)
    # Selenium Manager is never asked: both binaries are given, so nothing is downloaded.
    chrome = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    yield chrome
    chrome.quit()


@pytest.fixture(scope="module")
def url(app_url):
    """The session's shared app (tests/serve/apps.py): `flux`, the preview model `flux-preview` and others."""
    return app_url


def wait(browser, condition, timeout_s: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout_s, poll_frequency=0.1).until(lambda _: condition())


def by_id(browser, element_id: str):
    return browser.find_element("id", element_id)


def open_page(browser, url: str) -> None:
    browser.get(f"{url}/")
    wait(browser, lambda: by_id(browser, "generate").is_enabled(), 30)


def fill(browser, **values: str) -> None:
    for element_id, value in values.items():
        field = by_id(browser, element_id)
        field.clear()
        field.send_keys(value)


def newest_card(browser):
    return browser.find_element("css selector", "#results > li")


def loaded_images(browser, card) -> list[tuple[int, int]]:
    """The natural sizes of the card's images once every one has loaded (else [])."""
    return browser.execute_script(
        "const imgs = [...arguments[0].querySelectorAll('img.result')];"
        "return imgs.length && imgs.every(i => i.complete && i.naturalWidth)"
        " ? imgs.map(i => [i.naturalWidth, i.naturalHeight]) : [];", card)


def error_text(browser, element_id: str) -> str:
    return by_id(browser, f"{element_id}-error").get_attribute("textContent")


def lora_suggestions(browser) -> list[str]:
    """The paths the LoRA field offers (its datalist's options)."""
    return browser.execute_script("return [...document.getElementById('lora').list.options].map(o => o.value)")


# ---- the page, over plain HTTP ---------------------------------------------------------------


def test_the_page_and_its_files_keep_to_their_own_origin(url):
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "img-src 'self' blob: data:" in csp and "frame-ancestors 'none'" in csp
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["x-frame-options"] == "DENY"
    html = page.text
    # Nothing inline (the policy would block it anyway), nothing from another site.
    assert not re.search(r"<script(?![^>]*\bsrc=)", html) and not re.search(r"\sstyle=|\son\w+=", html)
    assert not re.search(r"(src|href)=\"(https?:)?//", html)
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        asset = httpx.get(f"{url}/static/{name}")
        assert asset.status_code == 200 and asset.headers["content-type"].startswith(kind)
        assert asset.headers["x-content-type-options"] == "nosniff"
    assert "innerHTML" not in httpx.get(f"{url}/static/app.js").text
    # Only those files: no listing, no way out of the folder.
    for path in ("/static/", "/static/index.html", "/static/..%2Fplayground.py", "/static/%2e%2e/api.py",
                 "/static/../serving/playground.py"):
        answer = httpx.get(f"{url}{path}")
        assert answer.status_code == 404, path


# ---- the page in a browser -------------------------------------------------------------------


def test_the_page_opens_with_flux_and_the_api_defaults(url, browser):
    open_page(browser, url)
    models = {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["models"]}
    assert by_id(browser, "model").get_attribute("value") == "flux"
    flux = models["flux"]
    assert [by_id(browser, i).get_attribute("value") for i in ("width", "height", "steps", "guidance", "seed")] == [
        str(flux["default_width"]), str(flux["default_height"]), str(flux["default_steps"]),
        f"{flux['default_guidance_scale']:g}", ""]
    assert flux["description"] in by_id(browser, "model-description").text
    assert not by_id(browser, "key-section").is_displayed()  # this server wants no key
    assert not by_id(browser, "job-name").is_displayed()  # `flux` is a reference model

    # A preview model brings its own steps and guidance, and a job name field.
    from selenium.webdriver.support.ui import Select

    Select(by_id(browser, "model")).select_by_value("flux-preview")
    assert [by_id(browser, i).get_attribute("value") for i in ("steps", "guidance")] == ["20", "3.5"]
    assert by_id(browser, "job-name").is_displayed()
    assert "ai-toolkit's training preview" in by_id(browser, "model-description").text

    # Every control has a label a screen reader can read out.
    unlabeled = browser.execute_script(
        "return [...document.querySelectorAll('input, select, textarea')]"
        ".filter(e => !e.labels.length && !e.getAttribute('aria-label')).map(e => e.id)")
    assert unlabeled == []


def test_generate_shows_the_image_its_seed_a_download_and_the_request_as_curl(url, browser):
    from selenium.webdriver.support.ui import Select

    open_page(browser, url)
    Select(by_id(browser, "model")).select_by_value("flux")
    fill(browser, prompt="[trigger] a lighthouse at dusk", trigger="sks", width="256", height="256", steps="4")
    by_id(browser, "generate").click()

    card = wait(browser, lambda: newest_card(browser) if by_id(browser, "generate").is_enabled() else None)
    assert wait(browser, lambda: loaded_images(browser, card)) == [[256, 256]]
    caption = card.find_element("css selector", "figcaption").text
    assert "seed 42" in caption and "256×256" in caption  # the API's default seed for the first prompt
    download = card.find_element("css selector", "a[download]")
    assert download.get_attribute("href").startswith("blob:") and download.get_attribute("download").endswith(".jpg")
    assert by_id(browser, "progress").get_attribute("value") == "1"
    assert by_id(browser, "progress-text").text == "succeeded"

    # The curl command is the request the page sent: run as printed, it is accepted as the same request.
    curl = card.find_element("css selector", "textarea.curl").get_attribute("value")
    body = json.loads(re.search(r"-d '(.*)'$", curl, re.S).group(1))
    assert body == {"model": "flux", "trigger_word": "sks", "output_format": "jpeg", "prompts": [
        {"prompt": "[trigger] a lighthouse at dusk", "width": 256, "height": 256, "sample_steps": 4,
         "guidance_scale": 4}]}
    assert "Authorization" not in curl  # this server wants no key
    if shutil.which("curl"):
        sent = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60)
        assert json.loads(sent.stdout)["status"] == "queued", sent.stdout + sent.stderr

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "playground.png"))


def test_the_page_fits_a_phone_width_window(url, browser):
    browser.set_window_size(390, 844)
    try:
        open_page(browser, url)
        width = browser.execute_script("return [document.documentElement.scrollWidth, window.innerWidth]")
        assert width[0] <= width[1], width  # nothing scrolls sideways
        for element_id in ("model", "prompt", "lora", "width", "generate"):
            box = by_id(browser, element_id).rect
            assert box["x"] >= 0 and box["x"] + box["width"] <= width[1], element_id
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "playground-phone.png"))
    finally:
        browser.set_window_size(1100, 1300)


def test_a_bad_lora_path_shows_lora_not_found_beside_the_lora_field_as_text(url, browser):
    open_page(browser, url)
    fill(browser, lora="missing/<b>nope</b>.safetensors", width="64", height="64", steps="1")
    by_id(browser, "generate").click()
    wait(browser, lambda: error_text(browser, "lora"))
    text = error_text(browser, "lora")
    assert text.startswith(f"{errors.LORA_NOT_FOUND}: ") and "<b>nope</b>" in text  # the API's own words, as text
    assert browser.find_elements("css selector", "#lora-error *") == []  # no markup came to life
    assert by_id(browser, "lora").get_attribute("aria-invalid") == "true"
    assert error_text(browser, "form") == "" and error_text(browser, "prompt") == ""


def test_a_value_out_of_bounds_shows_beside_its_own_field(url, browser):
    open_page(browser, url)
    fill(browser, width="10", steps="4")
    by_id(browser, "generate").click()
    wait(browser, lambda: error_text(browser, "width"))
    assert error_text(browser, "width").startswith(f"{errors.VALIDATION_ERROR}: prompts.0.width: ")
    assert error_text(browser, "height") == "" and error_text(browser, "lora") == ""
    # Fixed, it goes through, and the error is gone.
    fill(browser, width="64", height="64", steps="1")
    by_id(browser, "generate").click()
    wait(browser, lambda: by_id(browser, "progress-text").text == "succeeded")
    assert error_text(browser, "width") == ""


def test_a_failed_job_shows_its_error_code(url, browser):
    open_page(browser, url)
    fill(browser, prompt="[[fail]] this prompt fails its call", width="64", height="64", steps="1")
    by_id(browser, "generate").click()
    wait(browser, lambda: by_id(browser, "progress-text").text.startswith("failed"))
    assert errors.GENERATION_FAILED in by_id(browser, "progress-text").text
    assert error_text(browser, "form").startswith(f"{errors.GENERATION_FAILED}: ")
    assert newest_card(browser).find_element("css selector", ".status").text.startswith(
        f"failed: {errors.GENERATION_FAILED}")


def test_recent_results_stay_in_this_browser_and_say_when_they_expired(url, browser):
    open_page(browser, url)
    before = [card.get_attribute("data-request-id") for card in browser.find_elements("css selector", "#results > li")]
    assert len(before) >= 3  # the lighthouse, the 64² image and the failed job
    # A result the server no longer holds (its jobs are kept for a limited time).
    browser.execute_script(
        "const list = JSON.parse(localStorage.getItem('flux-serve.results'));"
        "list.unshift({request_id: 'f'.repeat(32), model: 'flux', prompt: 'long ago', curl: '', status: 'succeeded',"
        " images: [{index: 0, seed: 9, width: 64, height: 64, format: 'png', url: '/v1/requests/' + 'f'.repeat(32) + '/images/0'}]});"
        "localStorage.setItem('flux-serve.results', JSON.stringify(list));")
    browser.refresh()
    wait(browser, lambda: by_id(browser, "generate").is_enabled(), 30)
    cards = browser.find_elements("css selector", "#results > li")
    assert [card.get_attribute("data-request-id") for card in cards] == ["f" * 32, *before]
    assert wait(browser, lambda: cards[0].find_element("css selector", ".note").text).startswith(
        "seed 9: expired on the server")
    lighthouse = next(card for card in cards if "lighthouse" in card.text)
    assert wait(browser, lambda: loaded_images(browser, lighthouse)) == [[256, 256]]


def test_the_lora_field_suggests_the_files_of_the_lora_root(url, browser, lora_root):
    listed = httpx.get(f"{url}/v1/loras").json()
    names = [entry["path"] for entry in listed["loras"]]
    assert ROOT_LORAS <= set(names) and names == sorted(names) and listed["truncated"] is False
    assert not any(part.startswith(".") for name in names for part in name.split("/"))  # not the download cache
    assert all(entry["size_bytes"] == (lora_root / entry["path"]).stat().st_size for entry in listed["loras"])

    open_page(browser, url)
    assert by_id(browser, "lora").get_dom_attribute("list") == "lora-files"
    assert wait(browser, lambda: lora_suggestions(browser), 30) == names


def test_cancel_ends_a_running_job_and_the_page_shows_it_canceled(url, browser):
    open_page(browser, url)
    assert not by_id(browser, "cancel").is_displayed()  # nothing runs
    fill(browser, prompt="a picture that takes its time", lora="", **LONG)
    by_id(browser, "generate").click()
    wait(browser, lambda: "step" in by_id(browser, "progress-text").text)  # running: it reports its steps
    card = newest_card(browser)
    request_id = card.get_attribute("data-request-id")
    by_id(browser, "cancel").click()

    wait(browser, lambda: by_id(browser, "generate").is_enabled())
    assert by_id(browser, "progress-text").text == f"canceled: {errors.CANCELED}"
    assert card.find_element("css selector", ".status").text.startswith(f"canceled: {errors.CANCELED}")
    assert not by_id(browser, "cancel").is_displayed()
    assert error_text(browser, "form") == ""  # a cancel asked for is no error
    status = httpx.get(f"{url}/v1/requests/{request_id}/status").json()
    assert status["status"] == "canceled" and status["error_code"] == errors.CANCELED
    # The page remembers the job as canceled.
    stored = browser.execute_script("return JSON.parse(localStorage.getItem('flux-serve.results'))[0]")
    assert (stored["request_id"], stored["status"]) == (request_id, "canceled")


# ---- with an API key -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_url(auth_app_url):
    """The app of its own behind the API key KEY (tests/serve/apps.py); tests/conftest.py runs it last."""
    return auth_app_url


def test_with_a_key_the_page_asks_for_it_and_sends_it_on_every_call(keyed_url, browser):
    url = keyed_url
    # The page and its files stay open; the API does not.
    assert httpx.get(f"{url}/").status_code == 200 and httpx.get(f"{url}/static/app.js").status_code == 200
    assert httpx.get(f"{url}/v1/models").status_code == 401

    browser.get(f"{url}/")
    browser.execute_script("localStorage.clear()")
    browser.refresh()
    wait(browser, lambda: error_text(browser, "api-key"), 30)
    assert error_text(browser, "api-key").startswith(f"{errors.UNAUTHORIZED}: ")
    assert by_id(browser, "api-key").is_displayed() and not by_id(browser, "generate").is_enabled()

    fill(browser, **{"api-key": KEY + "\n"})  # Enter uses the key
    wait(browser, lambda: by_id(browser, "generate").is_enabled(), 30)
    assert by_id(browser, "model").get_attribute("value") == "flux" and error_text(browser, "api-key") == ""
    assert ROOT_LORAS <= set(wait(browser, lambda: lora_suggestions(browser), 30))  # /v1/loras got the key too
    fill(browser, prompt="a key-holder's picture", width="64", height="64", steps="1")
    by_id(browser, "generate").click()

    # The stream or status, the result and the image all needed the key: an image shown proves each call sent it.
    card = wait(browser, lambda: newest_card(browser) if by_id(browser, "generate").is_enabled() else None)
    assert wait(browser, lambda: loaded_images(browser, card)) == [[64, 64]]
    assert card.find_element("css selector", "img.result").get_attribute("src").startswith("blob:")
    curl = card.find_element("css selector", "textarea.curl").get_attribute("value")
    assert '-H "Authorization: Bearer $FLUX_SERVE_API_KEY"' in curl and KEY not in curl
    assert browser.execute_script("return localStorage.getItem('flux-serve.api-key')") == KEY
