"""The chat page of `oxtune deploy`, end to end: the real binary serving the demo model, and
headless Chromium (Debian's chromium + chromium-driver) driving the page through Selenium.

    scripts/browser-test.sh            # installs what is missing, builds, runs this file
    pytest tests/browser -v            # when chromium, chromedriver and the venv are there

Environment:
    OXTUNE_BIN          the oxtune binary (default: target/debug/oxtune)
    OXTUNE_DEMO_MODEL   the model directory (default: models/SmolLM2-135M-Instruct, made by
                        scripts/fetch-demo-model.sh)
    CHROMIUM, CHROMEDRIVER   the browser and driver (default: found on PATH)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

REPO = Path(__file__).resolve().parents[2]
BIN = Path(os.environ.get("OXTUNE_BIN", REPO / "target/debug/oxtune"))
MODEL = Path(os.environ.get("OXTUNE_DEMO_MODEL", REPO / "models/SmolLM2-135M-Instruct"))
API_KEY = "browser-test-key"
RUNNING_METRIC = "oxtune:num_requests_running"
READY_TIMEOUT_S = 120  # model load in a debug build
ANSWER_TIMEOUT_S = 180  # a short CPU answer from a debug build


# ---- the server --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


class Server:
    """`oxtune deploy` on a free port; its output goes to a log file shown on failure."""

    def __init__(self, log_path: Path, extra_args: list[str]):
        if not BIN.is_file():
            pytest.fail(f"{BIN} is missing: run `cargo build -p oxtune` (or scripts/browser-test.sh)")
        if not (MODEL / "config.json").is_file():
            pytest.fail(f"{MODEL} is missing: run scripts/fetch-demo-model.sh first")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "wb")
        args = [str(BIN), "deploy", "--model", str(MODEL), "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(args + extra_args, stdout=self.log, stderr=subprocess.STDOUT)

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"oxtune deploy exited with {self.process.returncode}:\n{self.logs()}")
            # Readiness, not liveness: /health answers 200 while the model is still loading.
            try:
                if http_get(self.url + "/health/ready")[0] == 200:
                    return
            except OSError:
                pass  # not listening yet
            time.sleep(0.3)
        pytest.fail(f"oxtune deploy was not ready after {READY_TIMEOUT_S} s:\n{self.logs()}")

    def requests_running(self) -> float:
        """The sum of the running-requests gauge over its label sets, from /metrics."""
        status, _, body = http_get(self.url + "/metrics", {"Authorization": f"Bearer {API_KEY}"})
        assert status == 200, f"/metrics answered {status}: {body[:200]!r}"
        values = [
            float(line.rsplit(None, 1)[1])
            for line in body.decode().splitlines()
            if line.startswith(RUNNING_METRIC) and not line.startswith("#")
        ]
        assert values, f"/metrics has no {RUNNING_METRIC}:\n{body.decode()[:2000]}"
        return sum(values)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def start_server(tmp_path_factory: pytest.TempPathFactory, name: str, extra_args: list[str]):
    server = Server(tmp_path_factory.mktemp(name) / "deploy.log", extra_args)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from start_server(tmp_path_factory, "open", [])


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory):
    yield from start_server(tmp_path_factory, "auth", ["--api_key", API_KEY])


# ---- the browser -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver():
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")
    if not chromium or not chromedriver:
        pytest.fail("chromium and chromedriver are needed: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(executable_path=chromedriver), options=options)
    try:
        yield browser
    finally:
        browser.quit()


def wait(browser, condition, timeout_s: float = 30, message: str = ""):
    return WebDriverWait(browser, timeout_s, poll_frequency=0.1).until(condition, message)


def by_id(browser, element_id: str):
    return browser.find_element(By.ID, element_id)


def status(browser) -> tuple[str, str]:
    element = by_id(browser, "status")
    return element.get_attribute("data-state"), element.text


def wait_idle(browser, timeout_s: float) -> tuple[str, str]:
    """Waits for the request in flight to end (done, stopped or error) and the Send button to
    come back; returns the status (state, text)."""
    wait(
        browser,
        lambda b: status(b)[0] in ("done", "stopped", "error") and by_id(b, "send").is_enabled(),
        timeout_s,
        f"the page did not return to idle; status: {status(browser)}",
    )
    return status(browser)


def open_page(browser, url: str) -> None:
    browser.get(url + "/")
    # Records each request body the page sends, to check what the conversation sends.
    browser.execute_script(
        """
        window.sentBodies = [];
        const original = window.fetch;
        window.fetch = (url, options) => {
          if (options && options.body) window.sentBodies.push(JSON.parse(options.body));
          return original(url, options);
        };
        """
    )


def model_ids(browser) -> list[str]:
    return [option.get_attribute("value") for option in Select(by_id(browser, "model")).options]


def wait_models(browser) -> list[str]:
    wait(browser, lambda b: model_ids(b), 30, f"the model picker stayed empty; status: {status(browser)}")
    return model_ids(browser)


def set_value(browser, element_id: str, value: str) -> None:
    element = by_id(browser, element_id)
    element.clear()
    element.send_keys(value)


def assistant_messages(browser):
    return browser.find_elements(By.CSS_SELECTOR, "#messages .assistant")


# ---- tests -------------------------------------------------------------------------------


def test_page_is_served_as_html(server):
    status_code, headers, body = http_get(server.url + "/")
    assert status_code == 200
    content_type = {key.lower(): value for key, value in headers.items()}["content-type"]
    assert content_type.replace(" ", "").lower() == "text/html;charset=utf-8"
    page = body.decode()
    for element_id in ("model", "system", "temperature", "max_tokens", "prompt", "send", "stop", "messages", "status"):
        assert f'id="{element_id}"' in page, element_id
    # Self-contained: nothing loaded from another host.
    assert "http://" not in page and "https://" not in page


def test_the_model_answers_and_the_conversation_continues(server, driver):
    open_page(driver, server.url)
    status_code, _, body = http_get(server.url + "/v1/models")
    assert status_code == 200
    served = [entry["id"] for entry in json.loads(body)["data"]]
    assert wait_models(driver) == served
    assert any("SmolLM2" in model for model in served), served

    set_value(driver, "temperature", "0")
    set_value(driver, "max_tokens", "48")
    # Counts the updates of the transcript: a streamed answer arrives in several pieces.
    driver.execute_script(
        """
        window.numUpdates = 0;
        new MutationObserver((records) => { window.numUpdates += records.length; })
          .observe(document.getElementById("messages"), {subtree: true, childList: true, characterData: true});
        """
    )
    prompt = by_id(driver, "prompt")
    prompt.send_keys("What is the capital of France?")
    prompt.send_keys(Keys.ENTER)  # Enter sends
    wait(driver, lambda b: not by_id(b, "send").is_enabled(), 10, "Send did not disable while busy")
    assert by_id(driver, "stop").is_enabled()

    state, text = wait_idle(driver, ANSWER_TIMEOUT_S)
    assert state == "done", text
    answers = assistant_messages(driver)
    assert len(answers) == 1
    assert "Paris" in answers[0].text, answers[0].text
    assert driver.execute_script("return window.numUpdates") > 3, "the answer did not arrive in pieces"
    assert not by_id(driver, "stop").is_enabled()
    first = driver.execute_script("return window.sentBodies.at(-1)")
    assert first["stream"] is True and first["temperature"] == 0 and first["max_tokens"] == 48
    assert first["messages"] == [{"role": "user", "content": "What is the capital of France?"}]

    # Shift+Enter is a new line, not a send; the second turn resends the whole history.
    set_value(driver, "system", "You are a helpful assistant.")
    prompt.send_keys("And of Italy?", Keys.SHIFT, Keys.ENTER, Keys.SHIFT, "Answer in one word.")
    assert by_id(driver, "send").is_enabled(), "Shift+Enter sent the message"
    by_id(driver, "send").click()
    state, text = wait_idle(driver, ANSWER_TIMEOUT_S)
    assert state == "done", text
    second = driver.execute_script("return window.sentBodies.at(-1)")
    assert [message["role"] for message in second["messages"]] == ["system", "user", "assistant", "user"]
    assert second["messages"][2]["content"] == answers[0].text
    assert second["messages"][3]["content"] == "And of Italy?\nAnswer in one word."
    assert len(assistant_messages(driver)) == 2

    by_id(driver, "new_chat").click()
    assert assistant_messages(driver) == []
    assert driver.find_elements(By.CSS_SELECTOR, "#messages .user") == []


def test_stop_aborts_the_generation(server, driver):
    open_page(driver, server.url)
    wait_models(driver)
    set_value(driver, "temperature", "0.8")
    set_value(driver, "seed", "7")
    set_value(driver, "max_tokens", "4000")
    by_id(driver, "prompt").send_keys("Write a very long story about a dragon and a lighthouse keeper.", Keys.ENTER)

    # Stop once the answer has started streaming.
    wait(
        driver,
        lambda b: assistant_messages(b) and len(assistant_messages(b)[-1].text) > 20,
        ANSWER_TIMEOUT_S,
        f"no streamed text; status: {status(driver)}",
    )
    assert status(driver)[0] == "busy"
    assert server.requests_running() == 1
    by_id(driver, "stop").click()

    state, text = wait_idle(driver, 10)
    assert state == "stopped", text
    assert not by_id(driver, "stop").is_enabled()
    # The server sees the connection close and frees the request.
    deadline = time.monotonic() + 15
    while server.requests_running() != 0:
        assert time.monotonic() < deadline, f"{RUNNING_METRIC} stayed above 0 after Stop"
        time.sleep(0.2)
    # The page is usable again: the stopped answer is kept and a new message goes through.
    set_value(driver, "max_tokens", "8")
    by_id(driver, "prompt").send_keys("Hello", Keys.ENTER)
    state, text = wait_idle(driver, ANSWER_TIMEOUT_S)
    assert state == "done", text


def test_a_wrong_api_key_shows_an_error(auth_server, driver):
    # The page itself needs no key: the key is typed into it.
    assert http_get(auth_server.url + "/")[0] == 200
    open_page(driver, auth_server.url)
    wait(driver, lambda b: status(b)[0] == "error", 10, "listing models without a key did not fail")

    set_value(driver, "api_key", API_KEY)
    by_id(driver, "api_key").send_keys(Keys.TAB)  # change event: stored, models reloaded
    assert wait_models(driver)
    wait(driver, lambda b: status(b)[0] == "idle", 10)
    assert driver.execute_script("return localStorage.getItem('oxtune.api_key')") == API_KEY

    set_value(driver, "api_key", "not-the-key")
    by_id(driver, "api_key").send_keys(Keys.TAB)
    wait(driver, lambda b: status(b)[0] == "error", 10, "a wrong key did not fail the model list")
    by_id(driver, "prompt").send_keys("Hello", Keys.ENTER)
    state, text = wait_idle(driver, 30)
    assert state == "error", text
    answer = assistant_messages(driver)[-1]
    assert "error" in answer.get_attribute("class").split()
    assert "Error:" in answer.text and len(answer.text) > len("Error: "), answer.text
    # The request carried the wrong key as a Bearer token, and the server refused it.
    assert driver.execute_script("return window.sentBodies.length") == 1
    driver.execute_script("localStorage.clear()")
