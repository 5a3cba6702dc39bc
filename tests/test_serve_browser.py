"""The chat page in a real headless browser (Debian's chromium, driven by Selenium through chromium-driver):
upload a demo photo, add an in-context example, ask a question, wait for the tiny trained model's streamed reply
in the page, check it is the API's reply to the same conversation, clear the chat. A screenshot of the page with
the reply is saved (OTTERFAST_SERVE_SCREENSHOT=docs/serve.png writes the README's; OTTERFAST_SERVE_MODEL=DIR
serves that model folder instead of the test's own, e.g. runs/demo/train-otter/export after `./dev demo`).

Skipped, saying why, only where chromium, chromium-driver or selenium is missing (`./dev setup` installs the
browser when it runs as root with apt)."""

from __future__ import annotations

import base64
import io
import os
import shutil
import time

import pytest
from test_serve import LiveServer, trained_otter

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401

    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER and HAVE_SELENIUM),
    reason="the browser test needs Debian's chromium and chromium-driver (`./dev setup` installs them as root with "
           "apt; or apt-get install chromium chromium-driver) and selenium (requirements.txt)")


@pytest.fixture(scope="module")
def page_server(demo_index, tmp_path_factory):
    from otterfast.generate import Generator
    from otterfast.serve.app import create_app

    path = os.environ.get("OTTERFAST_SERVE_MODEL") or trained_otter(demo_index, tmp_path_factory)
    s = LiveServer(create_app(Generator(path), path=path))
    yield s
    s.close()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,1000", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    # explicit driver path: Selenium Manager would otherwise look for (and try to download) a driver
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def demo_photo(path: str, name: str) -> str:
    """One of the demo dataset's photos (scikit-image's), as a JPEG file."""
    import skimage.data
    from PIL import Image

    Image.fromarray(getattr(skimage.data, name)()).convert("RGB").save(path, quality=90)
    return path


def wait_for(driver, condition, timeout: float = 60, what: str = ""):
    t0 = time.time()
    while True:
        value = condition(driver)
        if value:
            return value
        assert time.time() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_page_streams_a_reply_about_an_uploaded_photo(page_server, browser, tmp_path):
    from selenium.webdriver.common.by import By

    d = browser
    d.get(page_server.url + "/")
    model_id = page_server.app.app.state.model_id
    wait_for(d, lambda d: d.find_element(By.ID, "model-name").text == model_id, 30, "the model's name")
    info = d.find_element(By.ID, "model-info").text
    assert "otter" in info and "context" in info

    # an in-context example: an image, its question and answer
    d.find_element(By.ID, "add-example").click()
    row = d.find_element(By.CSS_SELECTOR, ".example-row")
    row.find_element(By.CSS_SELECTOR, ".ex-image").send_keys(demo_photo(str(tmp_path / "coffee.jpg"), "coffee"))
    row.find_element(By.CSS_SELECTOR, ".ex-question").send_keys("What is shown in this image?")
    row.find_element(By.CSS_SELECTOR, ".ex-answer").send_keys("This is part of a photo of a cup of coffee on a saucer.")
    wait_for(d, lambda d: row.get_attribute("data-url"), 10, "the example's image")

    # the question: a demo photo, picked with the file input
    photo = demo_photo(str(tmp_path / "astronaut.jpg"), "astronaut")
    d.find_element(By.ID, "images").send_keys(photo)
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#pending img"), 10, "the photo's thumbnail")
    question = "What is shown in this image?"
    d.find_element(By.ID, "question").send_keys(question)
    d.find_element(By.ID, "send").click()

    reply = wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]"), 120,
                     "the streamed reply")[0]
    assert not d.find_elements(By.CSS_SELECTOR, ".msg.error"), d.find_element(By.CSS_SELECTOR, ".msg.error").text
    text = reply.find_element(By.CSS_SELECTOR, ".text").text
    assert text.strip(), "empty reply"
    assert int(reply.get_attribute("data-chunks")) >= 2  # it came in pieces, as server-sent events
    assert reply.get_attribute("data-finish") in ("stop", "length")
    assert len(d.find_elements(By.CSS_SELECTOR, ".msg.user img")) == 1

    # the same conversation through the API gives the same reply (same photo bytes, same example)
    def url(p):
        with open(p, "rb") as f:
            return "data:image/jpeg;base64," + base64.b64encode(f.read()).decode()

    from test_serve import user

    status, out = page_server.chat({"messages": [
        user("What is shown in this image?", url(str(tmp_path / "coffee.jpg"))),
        {"role": "assistant", "content": "This is part of a photo of a cup of coffee on a saucer."},
        user(question, url(photo))], "max_tokens": 64})
    assert status == 200 and out["choices"][0]["message"]["content"] == text

    shot = str(tmp_path / "serve.png")
    d.save_screenshot(shot)
    if os.environ.get("OTTERFAST_SERVE_SCREENSHOT"):
        shutil.copy(shot, os.environ["OTTERFAST_SERVE_SCREENSHOT"])
    assert os.path.getsize(shot) > 10_000

    d.find_element(By.ID, "clear").click()
    wait_for(d, lambda d: not d.find_elements(By.CSS_SELECTOR, "#chat .msg"), 10, "the chat to clear")


def test_page_shows_a_bad_request_as_an_error(page_server, browser, tmp_path):
    """A reply that fails (here: too many images for the server's limit) shows its error message in the page."""
    from selenium.webdriver.common.by import By

    d = browser
    d.get(page_server.url + "/")
    limit = page_server.app.app.state.worker.limits.max_images
    photos = [demo_photo(str(tmp_path / f"moon{i}.jpg"), "moon") for i in range(limit + 1)]
    d.find_element(By.ID, "images").send_keys("\n".join(photos))  # several files picked at once
    wait_for(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#pending img")) == limit + 1, 20, "thumbnails")
    d.find_element(By.ID, "question").send_keys("What is it?")
    d.find_element(By.ID, "send").click()
    err = wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.error"), 30, "the error")[0]
    assert f"400: messages: {limit + 1} images" in err.text and f"over the limit of {limit}" in err.text


# Draws a 4-colour clip (red, green, blue, yellow; 0.3 s each) on a canvas, records it with the browser's own
# MediaRecorder (WebM, VP8: chromium encodes it itself, so no video file or encoder is needed here), and puts it
# in the page's video picker as a user's pick would (a File in the input, then its change event).
RECORD_AND_PICK_CLIP = """
const done = arguments[arguments.length - 1];
const c = document.createElement("canvas"); c.width = 96; c.height = 64;
const g = c.getContext("2d");
const colours = ["#ff0000", "#00ff00", "#0000ff", "#ffff00"];
const rec = new MediaRecorder(c.captureStream(30), {mimeType: "video/webm"});
const chunks = [];
rec.ondataavailable = (e) => { if (e.data.size) chunks.push(e.data); };
rec.onstop = () => {
  const file = new File(chunks, "clip.webm", {type: "video/webm"});
  const dt = new DataTransfer(); dt.items.add(file);
  const input = document.getElementById("video");
  input.files = dt.files;
  input.dispatchEvent(new Event("change"));
  done(file.size);
};
const t0 = performance.now();
g.fillStyle = colours[0]; g.fillRect(0, 0, 96, 64);
rec.start();
const timer = setInterval(() => {
  const k = Math.floor((performance.now() - t0) / 300);
  if (k >= colours.length) { clearInterval(timer); rec.stop(); return; }
  g.fillStyle = colours[k]; g.fillRect(0, 0, 96, 64);
}, 20);
"""

# Keeps a copy of every chat request the page sends.
RECORD_REQUESTS = """
window.sentBodies = [];
const original = window.fetch;
window.fetch = (url, opts) => {
  if (opts && opts.body) window.sentBodies.push(opts.body);
  return original(url, opts);
};
"""


def test_page_sends_a_picked_video_as_frames(page_server, browser):
    """The video picker: a short clip becomes N frames spread over it (here 4, one per colour of the clip), sent as
    one video part; the reply streams in and equals the API's reply to the same frames."""
    import json

    import numpy as np
    from PIL import Image
    from selenium.webdriver.common.by import By

    d = browser
    d.get(page_server.url + "/")
    wait_for(d, lambda d: d.find_element(By.ID, "model-name").text, 30, "the model's name")
    frames_box = d.find_element(By.ID, "video-frames")
    frames_box.clear()
    frames_box.send_keys("4")
    d.set_script_timeout(30)
    size = d.execute_async_script(RECORD_AND_PICK_CLIP)
    assert size > 0, "the browser recorded an empty clip"
    wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#pending img"), 20, "the video's thumbnail")
    assert not d.find_elements(By.CSS_SELECTOR, ".msg.error"), d.find_element(By.CSS_SELECTOR, ".msg.error").text
    assert "4 frames" in d.find_element(By.ID, "pending").get_attribute("innerHTML")

    d.execute_script(RECORD_REQUESTS)
    d.find_element(By.ID, "question").send_keys("What happens in this video?")
    d.find_element(By.ID, "send").click()
    reply = wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done]"), 120,
                     "the streamed reply")[0]
    assert not d.find_elements(By.CSS_SELECTOR, ".msg.error"), d.find_element(By.CSS_SELECTOR, ".msg.error").text
    text = reply.find_element(By.CSS_SELECTOR, ".text").text
    assert text.strip(), "empty reply"

    sent = json.loads(d.execute_script("return window.sentBodies[0];"))
    parts = sent["messages"][-1]["content"]
    video = [p for p in parts if p["type"] == "video"]
    assert len(video) == 1 and len(video[0]["frames"]) == 4
    assert not [p for p in parts if p["type"] == "image_url"]

    # each frame is one colour of the clip, in order (spread evenly: the middle of each quarter)
    expected = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]])
    for url, colour in zip(video[0]["frames"], expected):
        assert url.startswith("data:image/jpeg;base64,")
        im = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        assert im.size == (96, 64)
        mean = np.asarray(im, dtype=np.float64).reshape(-1, 3).mean(0)
        assert np.abs(mean - colour).max() < 40, (mean, colour)

    # the API gives the same reply to the same request
    status, out = page_server.chat({**sent, "stream": False})
    assert status == 200 and out["choices"][0]["message"]["content"] == text
