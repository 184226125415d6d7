"""The service's web page at ``/``: served publicly, self-contained, in step with the method and
control registries; and, in a real headless Chromium (Debian's ``chromium`` and
``chromium-driver``, driven by selenium), an upload inverted and edited end to end, and a
wrong API key shown as the service's problem."""

from __future__ import annotations

import base64
import io
import os
import re
import shutil
import socket
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the service needs pyinv[serve]")
pytest.importorskip("httpx", reason="the service needs pyinv[serve]")

from fastapi.testclient import TestClient  # noqa: E402

from pyinv.control.registry import CONTROL_NAMES  # noqa: E402
from pyinv.inversion import METHODS  # noqa: E402
from pyinv.serve.app import create_app  # noqa: E402
from pyinv.serve.engine import Engine, Limits  # noqa: E402
from pyinv.serve.store import InversionStore  # noqa: E402

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "red-circle.png"
KEY = "web-test-key"
IDS = ("image", "source", "method", "steps", "targets", "control", "apikey", "run", "result", "timings", "error")


class Page(HTMLParser):
    """What a test reads from the page: element ids, the options of each select, and every
    URL-valued attribute."""

    def __init__(self, html: str):
        super().__init__()
        self.ids: set[str] = set()
        self.options: dict[str, list[str]] = {}
        self.urls: list[str] = []
        self._select: str | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "select":
            self._select = attrs.get("id")
            self.options[self._select] = []
        elif tag == "option" and self._select is not None:
            self.options[self._select].append(attrs.get("value", ""))
        self.urls += [attrs[name] for name in ("src", "href", "action", "formaction") if attrs.get(name)]

    def handle_endtag(self, tag):
        if tag == "select":
            self._select = None


@pytest.fixture(scope="module")
def page_client(editor, tmp_path_factory):
    engine = Engine(editor, InversionStore(tmp_path_factory.mktemp("web-inversions")), Limits())
    # start=False: the page's routes need no model work
    with TestClient(create_app(engine, api_key=KEY, start=False), raise_server_exceptions=False) as client:
        yield client


def test_the_page_is_public_html_with_the_controls(page_client):
    response = page_client.get("/")  # no Authorization: the page itself is public
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    page = Page(response.text)
    assert set(IDS) <= page.ids
    assert page_client.get("/v1/models").status_code == 401  # while the API still needs the key
    assert "/" not in page_client.get("/openapi.json").json()["paths"]


def test_the_page_lists_every_method_and_control(page_client):
    page = Page(page_client.get("/").text)
    assert page.options["method"] == list(METHODS)
    assert page.options["control"] == ["", *CONTROL_NAMES]  # "": the method's default


def test_the_page_loads_nothing_from_elsewhere(page_client):
    html = page_client.get("/").text
    page = Page(html)
    assert all(url.startswith(("data:", "#")) or "//" not in url for url in page.urls), page.urls
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", html, re.I)
    assert not re.search(r"https?://", html), "the page names no external URL"
    assert "@import" not in html and '<link rel="stylesheet"' not in html
    # the page's requests are relative (they work under whatever prefix it is served at)
    assert re.findall(r"call\(\"([^\"]+)\"", html) == ["v1/inversions", "v1/edits"]


# ---------------------------------------------------------------------------------- browser
# the system's browser and its driver ($PYINV_CHROMIUM, $PYINV_CHROMEDRIVER elsewhere)
CHROMIUM = os.environ.get("PYINV_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = os.environ.get("PYINV_CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = (
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1200,900",
)  # fmt: skip


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium driven by the system chromedriver (never a download: with the
    driver's path given, selenium's manager is not run — and it is made to fail if it were)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
        from selenium.webdriver.common.selenium_manager import SeleniumManager
    except ImportError:
        pytest.skip("the browser tests need selenium (pip install 'pyinv[browser]')")
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).is_file()]
    if missing:
        need = "chromium and chromedriver (Debian: apt-get install chromium chromium-driver)"
        pytest.skip(f"the browser tests need {need}: no {', '.join(missing)}")

    def no_manager(self, args):
        raise AssertionError(f"selenium manager must not run (it would download a driver): {args}")

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SeleniumManager, "binary_paths", no_manager, raising=False)
        mp.setenv("SE_OFFLINE", "true")
        driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def live_url(browser, editor, tmp_path_factory):
    """The service (with an API key) on a free local port, served by uvicorn in a thread."""
    uvicorn = pytest.importorskip("uvicorn", reason="the service needs pyinv[serve]")
    engine = Engine(editor, InversionStore(tmp_path_factory.mktemp("live-inversions")), Limits())
    config = uvicorn.Config(create_app(engine, api_key=KEY), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 120  # the engine warms the model up before the server listens
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def fill(driver, url, key, targets, steps="3", control="p2p", method="direct"):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    driver.get(url)
    driver.find_element(By.ID, "image").send_keys(str(EXAMPLE))
    driver.find_element(By.ID, "source").send_keys("a red circle on a blue background")
    Select(driver.find_element(By.ID, "method")).select_by_value(method)
    driver.find_element(By.ID, "steps").send_keys(steps)
    driver.find_element(By.ID, "targets").send_keys("\n".join(targets))
    Select(driver.find_element(By.ID, "control")).select_by_value(control)
    driver.find_element(By.ID, "apikey").send_keys(key)
    driver.find_element(By.ID, "run").click()


def test_the_page_inverts_and_edits_an_upload(browser, live_url, editor):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    targets = ["a green circle on a blue background", "a red square on a blue background"]
    start = time.perf_counter()
    fill(browser, live_url, KEY, targets)
    WebDriverWait(browser, 120, poll_frequency=0.1).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#result img.edited") or d.find_element(By.ID, "error").text
    )
    seconds = time.perf_counter() - start
    assert browser.find_element(By.ID, "error").text == ""
    assert not browser.find_element(By.ID, "error").is_displayed()

    edited = browser.find_elements(By.CSS_SELECTOR, "#result img.edited")
    assert [img.get_attribute("alt") for img in edited] == targets
    side = editor.model.image_size
    for img in edited:
        src = img.get_attribute("src")
        assert src.startswith("data:image/png;base64,")
        decoded = Image.open(io.BytesIO(base64.b64decode(src.removeprefix("data:image/png;base64,"))))
        assert decoded.format == "PNG" and decoded.size == (side, side)
        assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img) == side
    (source,) = browser.find_elements(By.CSS_SELECTOR, "#result img.input")  # before, beside the afters
    assert source.get_attribute("src").startswith("blob:")
    assert browser.execute_script("return arguments[0].naturalWidth", source) == Image.open(EXAMPLE).width

    timings = browser.find_element(By.ID, "timings").text
    assert re.search(r"invert \d+\.\d\d s", timings) and re.search(r"edit \d+\.\d\d s", timings), timings
    assert re.search(r"PSNR (\d+\.\d\d dB|exact)", timings) and "3 steps" in timings, timings
    assert browser.find_element(By.ID, "run").is_enabled()
    print(f"browser invert + edit: {seconds:.2f} s")


def test_a_wrong_api_key_shows_the_problem(browser, live_url):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    fill(browser, live_url, "not-the-key", ["a green circle on a blue background"])
    error = browser.find_element(By.ID, "error")
    WebDriverWait(browser, 30, poll_frequency=0.1).until(lambda d: error.text)
    assert error.is_displayed()
    assert "a valid bearer token is required" in error.text, error.text
    assert browser.find_elements(By.CSS_SELECTOR, "#result img") == []
    assert browser.find_element(By.ID, "timings").text == ""
