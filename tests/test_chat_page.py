"""serve.py's chat page (chat_page.html at GET /) in a real browser: Debian's chromium, headless, driven by Selenium
through the system chromedriver, against a real serve.py on a tiny model made here. A user without the API key sees
the server's error; with it, a reply streams in (the text grows while it arrives), Stop ends a reply and frees its
slot on the server, and the page renders to a PNG. Skips when chromium or chromedriver is absent (.ci/run installs
them, so CI runs it)."""
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import convert
from conftest import ROOT, char_tokenizer_folder, tiny_transformer

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
API_KEY = "page-test-key"
pytestmark = pytest.mark.slow


def get_json(url, key=None):
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.load(response)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The base URL of serve.py on a tiny random model with a long context, so that a reply takes long enough to be
    seen growing and to be stopped."""
    folder = str(tmp_path_factory.mktemp("page") / "model")
    tok = char_tokenizer_folder(folder)
    model = tiny_transformer(tok.vocab_size, max_seq_len=2048)
    # tied embeddings: a zero row scores 0, below the best of the other random logits, so a greedy reply never picks
    # one of the char tokenizer's special tokens (ids 0-2: stop tokens, and text-less), one character a token
    with torch.no_grad():
        model.embed.weight[:3] = 0
    convert.save_pretrained(model, folder)
    cmd = [sys.executable, os.path.join(ROOT, "serve.py"), f"--ckpt={folder}", "--port=0", "--dtype=float32",
           "--parallel=2", f"--api_key={API_KEY}"]
    process = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output = []
    try:
        for line in process.stdout:  # "serving <name> on http://HOST:PORT" once the socket is up
            output.append(line)
            if line.startswith("serving ") and (found := re.search(r"http://[\w.]+:\d+", line)):
                url = found.group()
                break
        else:
            pytest.fail("serve.py ended before listening:\n" + "".join(output))
        # read on, or a full pipe would block the server
        threading.Thread(target=output.extend, args=(process.stdout,), daemon=True).start()
        deadline = time.time() + 60
        while True:  # /health answers 503 until the model is loaded
            try:
                if get_json(url + "/health")["status"] == "ok":
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.time() < deadline and process.poll() is None, \
                "serve.py never became healthy:\n" + "".join(output)
            time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--window-size=1000,800", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
        options.add_argument(arg)
    # an explicit driver path: Selenium Manager would otherwise try to download one
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def wait_for(condition, timeout=30, what="the page"):
    deadline = time.time() + timeout
    while not (result := condition()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
    return result


def open_page(driver, url):
    from selenium.webdriver.common.by import By
    driver.get(url + "/")
    status = driver.find_element(By.ID, "status")
    # no key yet: /health is open, /v1/models answers the server's 401 message
    wait_for(lambda: "401" in status.text, what=f"a 401 on the status line (it says {status.text!r})")
    driver.find_element(By.TAG_NAME, "summary").click()  # open the settings
    return status


def set_field(driver, element_id, value):
    from selenium.webdriver.common.by import By
    field = driver.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)


def last_reply(driver):
    from selenium.webdriver.common.by import By
    replies = driver.find_elements(By.CSS_SELECTOR, ".assistant > span:first-child")
    return replies[-1].get_attribute("textContent") if replies else ""  # .text would trim the reply's white space


def test_page_streams_a_reply_stops_one_and_shows_errors(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    driver = browser
    status = open_page(driver, server)
    set_field(driver, "temperature", "0")
    set_field(driver, "max-tokens", "400")

    # without the key, a message gets the server's error body shown, and the text is given back to retry
    driver.find_element(By.ID, "input").send_keys("hello there", Keys.ENTER)
    error = driver.find_element(By.ID, "error")
    wait_for(lambda: "401" in error.text, what="the 401 error")
    assert driver.find_element(By.ID, "input").get_attribute("value") == "hello there"
    assert not driver.find_elements(By.CSS_SELECTOR, ".message")

    set_field(driver, "api-key", API_KEY + Keys.TAB)  # the change event refreshes the status line
    wait_for(lambda: status.text.startswith("ready"), what=f"the ready status (it says {status.text!r})")
    assert "model" in status.text  # the model's id: its folder's name

    # a streamed reply: the text grows across polls before the reply ends
    driver.find_element(By.ID, "send").click()
    seen = []
    while driver.find_element(By.ID, "send").get_attribute("disabled") or not seen:
        text = last_reply(driver)
        if text and (not seen or text != seen[-1]):
            seen.append(text)
        time.sleep(0.01)
    seen.append(last_reply(driver))
    assert error.text == ""
    assert len(seen) >= 3, f"the reply did not arrive in pieces: {seen}"
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:])), "each poll extends the text shown before"
    first = seen[-1]
    assert len(first) == 400  # one character a token; no stop token can come (see the fixture)
    assert "(cut at max tokens)" in driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1].text

    # the second turn is sent with the history, and Stop ends it: the slot is free on the server at once
    set_field(driver, "max-tokens", "1500")  # within the context left after the first turn
    driver.find_element(By.ID, "input").send_keys("and then?", Keys.ENTER)
    wait_for(lambda: len(driver.find_elements(By.CSS_SELECTOR, ".assistant")) == 2 and len(last_reply(driver)) > 5,
             what=f"the second reply (error line: {error.text!r})")
    assert get_json(server + "/metrics", API_KEY)["active"] == 1
    driver.find_element(By.ID, "stop").click()
    wait_for(lambda: "(stopped)" in driver.find_elements(By.CSS_SELECTOR, ".assistant")[-1].text,
             what="the stopped note")
    stopped = last_reply(driver)
    assert 0 < len(stopped) < 1500 and driver.find_element(By.ID, "send").is_enabled()
    wait_for(lambda: get_json(server + "/metrics", API_KEY)["active"] == 0, timeout=5, what="the slot to be freed")
    time.sleep(0.3)
    assert last_reply(driver) == stopped, "the reply kept growing after Stop"
    assert error.text == ""
    # the history the next request sends: both turns, the stopped reply as far as it came
    assert driver.execute_script("return history") == [
        {"role": "user", "content": "hello there"}, {"role": "assistant", "content": first},
        {"role": "user", "content": "and then?"}, {"role": "assistant", "content": stopped}]

    shot = tmp_path / "chat_page.png"
    assert driver.save_screenshot(str(shot))
    assert shot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and shot.stat().st_size > 1000
