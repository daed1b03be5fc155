"""The web front end end to end, in headless Chromium (Debian's chromium + chromium-driver).

Starts ``web/server.py`` on a free loopback port, loads the sample case, runs the pix2pix demo
model, waits for the slice views' frames, checks the metrics table against ``app.run_translation``
on the same input, cancels a diffusion run, and checks that bad uploads give the CLI's one line
while the page stays usable. Screenshot: ``Screenshots/web-result-layout.png``.

    web/.venv/bin/python -m pytest -q web/tests
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import WebDriverWait

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = ROOT / "Screenshots" / "web-result-layout.png"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER", "/usr/bin/chromedriver")
sys.path.insert(0, str(ROOT / "web"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "web" / "server.py"), "--port", str(port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    t0 = time.monotonic()
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, f"the server exited:\n{log.read_text()[-3000:]}"
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, f"the server did not answer:\n{log.read_text()[-3000:]}"
                time.sleep(0.5)
        print(f"server answered {time.monotonic() - t0:.1f} s after start")
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        print(log.read_text()[-4000:])


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def page(server, downloads):
    for tool in (CHROMIUM, CHROMEDRIVER):  # a failure, not a skip: CI must have them
        assert Path(tool).is_file(), f"{tool} is missing: apt-get install -y chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    try:
        driver.get(server[0])
        yield driver
    finally:
        driver.quit()


def _wait(driver, seconds: float = 60):
    return WebDriverWait(driver, seconds, poll_frequency=0.2)


def _message(driver) -> str:
    return driver.find_element(By.ID, "message").text.strip()


def _wait_message(driver, predicate, seconds: float = 60) -> str:
    _wait(driver, seconds).until(lambda d: predicate(_message(d)))
    return _message(driver)


def _pick(driver, box: str, name: str, *, exact: bool = False) -> None:
    """Choose the list entry holding ``name`` (or titled exactly ``name``) in the select in ``#box``."""
    driver.find_element(By.CSS_SELECTOR, f"#{box} .v-field").click()
    test = f"normalize-space(.//div[contains(@class, 'v-list-item-title')])='{name}'" if exact else \
        f"contains(., '{name}')"
    item = _wait(driver, 10).until(ec.element_to_be_clickable(
        (By.XPATH, f"//div[contains(@class, 'v-list-item')][{test}]")))
    item.click()
    _wait(driver, 10).until(lambda d: name in d.find_element(By.ID, box).text)
    _wait(driver, 10).until(ec.invisibility_of_element_located((By.CSS_SELECTOR, ".v-overlay--active .v-list")))


def _set_field(driver, element_id: str, value: str) -> None:
    field = driver.find_element(By.CSS_SELECTOR, f"#{element_id}")
    field.click()
    field.send_keys("\ue009a")  # Ctrl+A
    field.send_keys(value)


def _view_images(driver) -> dict[str, np.ndarray]:
    """Each slice view's current frame (the streamed image), by view label order on the page."""
    images = {}
    for i, img in enumerate(driver.find_elements(By.CSS_SELECTOR, "img.image-display-area")):
        if img.size["width"] > 10 and img.get_attribute("src"):
            images[i] = np.asarray(Image.open(io.BytesIO(img.screenshot_as_png)).convert("L"), dtype=np.float32)
    return images


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def test_sample_case_pix2pix_metrics_cancel_and_bad_input(page, server, downloads, tmp_path):
    from session import sample_case

    from MedTranslateLib import app
    from MedTranslateLib import io as mio
    from MedTranslateLib.runtime import first_line

    driver = page
    banner = _wait(driver, 60).until(ec.presence_of_element_located((By.ID, "not-for-diagnosis")))
    assert "NOT FOR DIAGNOSIS" in banner.text

    t0 = time.monotonic()
    _wait(driver, 30).until(ec.element_to_be_clickable((By.ID, "load-sample"))).click()
    _wait(driver, 60).until(lambda d: "Phantom" in d.find_element(By.ID, "case-label").text)
    _wait(driver, 60).until(lambda d: sum(float(a.std()) > 2.0 for a in _view_images(d).values()) >= 2)
    print(f"sample case loaded and its first frames shown {time.monotonic() - t0:.1f} s after the click")
    _pick(driver, "model-box", "pix2pix_ct_cta_demo")
    assert "output in HU" in driver.find_element(By.ID, "model-caps").text
    _set_field(driver, "seed", "0")
    _pick(driver, "device-box", "CPU", exact=True)
    driver.find_element(By.ID, "run").click()
    _wait(driver, 150).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#metrics .metric-row")) > 0)
    print(f"sample case + pix2pix run shown after {time.monotonic() - t0:.1f} s")

    # the slice views show frames: source, synthetic, reference, both difference maps not blank
    def frames_ready(d):
        images = _view_images(d)
        return len(images) >= 5 and sum(float(a.std()) > 2.0 for a in images.values()) >= 5

    _wait(driver, 60).until(frames_ready)
    print(f"server memory after the pix2pix run: {_rss_mib(server[1].pid):.0f} MiB RSS")

    # the metrics table holds the library's numbers for the same input and options
    options = app.TranslationOptions(model="pix2pix_ct_cta_demo", seed=0, device="cpu")
    outcome = app.run_translation(app.TranslationRequest(sample_case().case, options))
    rows = driver.find_elements(By.CSS_SELECTOR, "#metrics .metric-row")
    shown = {r.find_element(By.CSS_SELECTOR, ".m-region").text: r for r in rows}
    assert set(shown) == set(outcome.result.metrics), (set(shown), set(outcome.result.metrics))
    for region, values in outcome.result.metrics.items():
        for key, digits in (("mae", 2), ("psnr", 2), ("ssim", 4), ("rmse", 2)):
            text = shown[region].find_element(By.CSS_SELECTOR, f".m-{key}").text
            assert abs(float(text) - values[key]) <= 1.01 * 10 ** -digits, (region, key, text, values[key])
        identity = shown[region].find_element(By.CSS_SELECTOR, ".m-identity_mae").text
        assert abs(float(identity) - outcome.result.baseline_metrics[region]["mae"]) <= 0.0101
    assert "MAE and RMSE in HU" in driver.find_element(By.ID, "result-caption").text
    driver.find_element(By.ID, "download").click()
    saved = downloads / "synthetic_cta_arterial_pix2pix_ct_cta_demo.nii.gz"
    _wait(driver, 30).until(lambda d: saved.is_file() and not list(downloads.glob("*.crdownload")))
    back = mio.read_volume(saved)
    np.testing.assert_allclose(back.array, outcome.result.synthetic.array, atol=1e-2)
    assert back.same_geometry(outcome.result.synthetic)
    SCREENSHOT.parent.mkdir(exist_ok=True)
    driver.save_screenshot(str(SCREENSHOT))

    # a diffusion run, cancelled: the page stays usable and keeps the previous result
    _pick(driver, "model-box", "resshift_ct_cta_demo")
    _set_field(driver, "samples", "16")
    driver.find_element(By.ID, "run").click()
    _wait(driver, 60).until(lambda d: "slices" in d.find_element(By.ID, "progress-text").text)
    # the page answers during the run: a slice scroll in the source view brings a new frame
    source_view = driver.find_elements(By.CSS_SELECTOR, "img.image-display-area")[0]
    before = source_view.get_attribute("src")
    t_scroll = time.monotonic()
    driver.find_elements(By.CSS_SELECTOR, ".v-slider-thumb")[0].send_keys(Keys.ARROW_UP)
    _wait(driver, 30).until(lambda d: source_view.get_attribute("src") != before)
    print(f"slice-scroll frame during a run: {time.monotonic() - t_scroll:.2f} s")
    assert driver.find_element(By.ID, "cancel").is_displayed(), "the run ended before the scroll was checked"
    driver.find_element(By.ID, "cancel").click()
    t_cancel = time.monotonic()
    assert _wait_message(driver, lambda m: m.startswith("Cancelled"), 60) == "Cancelled: nothing was added."
    print(f"cancel took {time.monotonic() - t_cancel:.1f} s")
    assert driver.find_element(By.ID, "run").is_enabled()
    assert len(driver.find_elements(By.CSS_SELECTOR, "#metrics .metric-row")) == len(rows)

    # bad uploads: the CLI's one line (read_volume's error for the same file name), page usable
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16), np.float32)), str(flat))
    nan = tmp_path / "nan.nii.gz"
    vol = np.zeros((4, 8, 8), np.float32)
    vol[1, 2, 3] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(vol), str(nan))
    wrong = tmp_path / "notes.nrrd"
    wrong.write_text("this is not an image\n")
    for path in (flat, nan, wrong):
        with pytest.raises(ValueError) as err:
            mio.read_volume(path)
        expected = first_line(err.value).replace(f"{tmp_path}/", "")
        driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(path))
        assert _wait_message(driver, lambda m, e=expected: m == e, 30) == expected
    assert "Phantom" in driver.find_element(By.ID, "case-label").text
    assert driver.find_element(By.ID, "run").is_enabled()

    # a bad option is one line too, and nothing starts
    _set_field(driver, "seed", "abc")
    driver.find_element(By.ID, "run").click()
    assert _wait_message(driver, lambda m: "seed" in m, 30) == "the seed must be a whole number, got 'abc'"
    assert not driver.find_element(By.ID, "cancel").is_displayed()

    # a good upload replaces the case; its modality is unknown, so every model is offered
    scan = tmp_path / "scan.nrrd"
    mio.write_volume(sample_case().case.source, scan)
    driver.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(scan))
    _wait(driver, 30).until(lambda d: d.find_element(By.ID, "case-label").text.startswith("scan.nrrd"))
    assert _message(driver) == f"Loaded. {len(app.model_choices(None))} model(s) fit this case."
    assert not driver.find_elements(By.CSS_SELECTOR, "#metrics .metric-row")
