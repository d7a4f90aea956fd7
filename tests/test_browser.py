"""The chat page at / in a real headless Chromium (Debian's chromium + chromium-driver,
driven by Selenium), against a real server on the tiny pair: a message streams in, the
slider's lam reaches the server, compare shows one answer per lam.

Every answer is checked against what the API itself returns for the same messages at the
same lam (temperature 0), so a page that sent the wrong lam, or none, fails.

Skips where no browser is installed, unless DERA_REQUIRE_BROWSER is set (CI sets it).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from server_process import start_server

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
MAX_TOKENS = 8


def _browser_or_skip():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        from selenium import webdriver
    except ImportError:
        webdriver = None
    missing = [
        name
        for name, found in (
            ("selenium", webdriver),
            ("chromium", chromium),
            ("chromedriver", driver),
        )
        if not found
    ]
    if missing:
        reason = (
            f"the browser test needs {', '.join(missing)} "
            "(apt install chromium chromium-driver; pip install selenium)"
        )
        if os.environ.get("DERA_REQUIRE_BROWSER"):
            pytest.fail(reason)
        pytest.skip(reason)
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1200,900",
    ):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def page_server(aligned_path, reference_path):
    process, base = start_server(
        ["-m", str(aligned_path), "-mr", str(reference_path), "-c", "2048", "--parallel", "4"]
    )
    yield base
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    driver = _browser_or_skip()
    yield driver
    driver.quit()


def _api_reply(base: str, question: str, lam: float, **extra):
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
    return client.chat.completions.create(
        model="dera-local",
        messages=[{"role": "user", "content": question}],
        temperature=0,
        max_tokens=MAX_TOKENS,
        extra_body={"dera_lambda": lam, **extra},
    )


def _api_answer(base: str, question: str, lam: float, **extra) -> str:
    return _api_reply(base, question, lam, **extra).choices[0].message.content


def _set(browser, element_id: str, value: str) -> None:
    """Sets an input's value the way a user's edit would (an input event follows)."""
    browser.execute_script(
        "const el = document.getElementById(arguments[0]); el.value = arguments[1];"
        "el.dispatchEvent(new Event('input')); el.dispatchEvent(new Event('change'));",
        element_id,
        value,
    )


def _send(browser, text: str) -> None:
    from selenium.webdriver.common.by import By

    box = browser.find_element(By.ID, "prompt")
    box.clear()
    box.send_keys(text)
    browser.find_element(By.ID, "send").click()


def _wait_done(browser, selector: str, count: int) -> list:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def finished(driver):
        found = driver.find_elements(By.CSS_SELECTOR, selector)
        errors = [e.text for e in found if "error" in e.get_attribute("class")]
        assert not errors, errors
        done = [e for e in found if e.get_attribute("data-done") == "true"]
        return done if len(done) >= count else False

    return WebDriverWait(browser, 60).until(finished)


def _text(element) -> str:
    return element.find_element("css selector", ".text").text


def test_chat_page_streams_carries_the_slider_lam_and_compares(browser, page_server):
    from selenium.webdriver.common.by import By

    question = "hello"
    expected = {lam: _api_answer(page_server, question, lam) for lam in (0.0, 1.0, 2.0)}
    assert len(set(expected.values())) == 3  # lam changes the answer: the check has teeth

    browser.get(page_server + "/")
    assert browser.title == "dera-local"
    browser.find_element(By.ID, "settings").click()
    _set(browser, "temperature", "0")
    _set(browser, "max-tokens", str(MAX_TOKENS))
    _set(browser, "lam", "0")
    assert browser.find_element(By.ID, "lam-value").text == "0"
    # Count the updates of the answer as they arrive (a stream, not one final write).
    browser.execute_script(
        "window.updates = 0; new MutationObserver((records) => { window.updates +="
        " records.length; }).observe(document.getElementById('messages'),"
        " {subtree: true, childList: true, characterData: true});"
    )
    _send(browser, question)
    [first] = _wait_done(browser, ".message.assistant", 1)
    assert first.get_attribute("data-lam") == "0"
    assert _text(first) == expected[0.0]
    assert browser.execute_script("return window.updates") >= 2

    browser.find_element(By.ID, "new-chat").click()
    _set(browser, "lam", "2")
    _send(browser, question)
    [second] = _wait_done(browser, ".message.assistant", 1)
    assert second.get_attribute("data-lam") == "2"
    assert _text(second) == expected[2.0]

    browser.find_element(By.ID, "new-chat").click()
    browser.find_element(By.ID, "compare-toggle").click()
    _set(browser, "compare-lams", "0, 1, 2")
    _send(browser, question)
    columns = _wait_done(browser, ".compare-column", 3)
    answers = {float(c.get_attribute("data-lam")): _text(c) for c in columns}
    assert answers == expected
    # Under each answer: its tokens, tokens/s and the KL to the reference, the API's own.
    for column in columns:
        lam = float(column.get_attribute("data-lam"))
        stats = column.find_element(By.CSS_SELECTOR, ".stats")
        reply = _api_reply(page_server, question, lam)
        kl = reply.model_extra["dera"]["kl_to_reference"]
        # The page's three answers were decoded in one batch, the API's alone: the same
        # tokens, float32 rounding apart (~1e-8 relative here).
        assert float(stats.get_attribute("data-kl")) == pytest.approx(kl, rel=1e-6)
        assert f"KL to the reference {kl:.3f} nats" in stats.text
        assert int(stats.get_attribute("data-tokens")) == reply.usage.completion_tokens
        assert "tokens/s" in stats.text
    # The slider spans the server's lam range.
    slider = browser.find_element(By.ID, "lam")
    assert (slider.get_attribute("min"), slider.get_attribute("max")) == ("0", "2")

    ARTIFACTS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(ARTIFACTS / "chat-page-compare.png"))


def test_the_page_sends_a_negative_prompt_and_scale(browser, page_server):
    from selenium.webdriver.common.by import By

    question = "hello"
    guided = {"dera_negative_prompt": "Be rude.", "dera_cfg_scale": 2.5}
    expected = _api_answer(page_server, question, 1.0, **guided)
    assert expected != _api_answer(page_server, question, 1.0)  # guidance changes it

    browser.get(page_server + "/")
    browser.find_element(By.ID, "settings").click()
    _set(browser, "temperature", "0")
    _set(browser, "max-tokens", str(MAX_TOKENS))
    _set(browser, "lam", "1")
    _set(browser, "negative", "Be rude.")
    _set(browser, "cfg-scale", "2.5")
    _send(browser, question)
    [answer] = _wait_done(browser, ".message.assistant", 1)
    assert _text(answer) == expected


def test_the_exact_toggle_asks_for_exact_realignment_and_shows_its_cost(browser, page_server):
    """With Exact on, the page sends dera_exact: at lam 1 one attempt is the answer (its
    cost under it); at lam 2 the server's one-line refusal is the reply, marked an error."""
    from selenium.webdriver.common.by import By

    browser.get(page_server + "/")
    browser.find_element(By.ID, "settings").click()
    _set(browser, "temperature", "1")
    _set(browser, "max-tokens", str(MAX_TOKENS))
    _set(browser, "lam", "1")
    browser.find_element(By.ID, "exact-toggle").click()
    _send(browser, "hello")
    [answer] = _wait_done(browser, ".message.assistant", 1)
    stats = answer.find_element(By.CSS_SELECTOR, ".stats")
    assert stats.get_attribute("data-attempts") == "1"
    assert "exact: 1 attempts (0 killed)" in stats.text

    browser.find_element(By.ID, "new-chat").click()
    _set(browser, "lam", "2")
    _send(browser, "hello")

    def refused(driver):
        found = driver.find_elements(By.CSS_SELECTOR, ".message.assistant.error")
        return found[0] if found else False

    from selenium.webdriver.support.ui import WebDriverWait

    error = WebDriverWait(browser, 60).until(refused)
    assert "exact realignment needs 0 <= lam <= 1" in _text(error)


def test_the_page_and_its_files_are_served_and_other_paths_are_404(page_server):
    """Browsers get the page at /; a client that does not ask for HTML gets
    `Ollama is running` there, as Ollama answers."""
    import urllib.error
    import urllib.request

    html = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}  # as browsers ask
    for path, kind in (
        ("/", "text/html"),
        ("/chat.js", "text/javascript"),
        ("/chat.css", "text/css"),
    ):
        request = urllib.request.Request(page_server + path, headers=html)
        with urllib.request.urlopen(request) as response:
            assert response.headers["Content-Type"].startswith(kind)
            assert len(response.read()) > 500
    # Ollama's health probe of its base URL (no HTML asked for): Ollama's own answer
    for method in ("GET", "HEAD"):
        probe = urllib.request.Request(page_server + "/", method=method)
        with urllib.request.urlopen(probe) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            assert response.read() == (b"Ollama is running" if method == "GET" else b"")
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(page_server + "/secrets.txt")
    assert missing.value.code == 404
