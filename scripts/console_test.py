"""Drives the console and the API docs in headless Chromium (run by scripts/console-test.sh).

Usage: console_test.py URL WORKDIR SCREENSHOT_DIR

A newcomer's path, from the console alone: give the key, see the tags (and the bundle that
failed validation), get a prediction in the playground, start a stage-2 job from the form
(a bad value first: the server's 422 must appear next to its field), watch it to the end
with its curves, and read the API in /docs. Screenshots at 1280x800 and at phone width.
"""

import json
import sys
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

URL, WORK, SHOTS = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
ADMIN_KEY = "console-admin"


def wait_ready(url, seconds=60):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url + "/ready", timeout=2)
            return
        except Exception:
            time.sleep(0.2)
    sys.exit("the server did not become ready")


def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in [
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,800",
        # Offline but for the server: any other host fails to resolve.
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    ]:
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service("/usr/bin/chromedriver"))


def until(driver, what, check, seconds=30):
    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.2).until(lambda d: check(d))
    except TimeoutException:
        shot(driver, "failure")
        sys.exit(f"timed out waiting for {what}")


def viewport(driver, width, height, mobile=False):
    """The page's own size (a window size would include the browser's frame)."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})


def shot(driver, name):
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def view_ready(driver, section):
    until(
        driver,
        f"the {section} view",
        lambda d: d.execute_script(
            "const v = document.getElementById('view');"
            "return v.dataset.view === arguments[0] && v.dataset.ready === 'true';",
            section,
        ),
    )


def go(driver, hash_, section):
    driver.execute_script("document.getElementById('view').dataset.ready = '';")
    driver.execute_script("location.hash = arguments[0]", hash_)
    view_ready(driver, section)


def check(cond, message):
    if not cond:
        sys.exit(f"FAILED: {message}")
    print(f"ok: {message}")


def unlabelled_controls(driver):
    """Form controls that a screen reader could not name."""
    return driver.execute_script(
        "return [...document.querySelectorAll('#view input, #view select, #view textarea')]"
        ".filter(el => el.labels.length === 0 && !el.getAttribute('aria-label')).map(el => el.outerHTML)"
    )


def main():
    wait_ready(URL)
    d = browser()
    try:
        run(d)
        errors = [
            e for e in d.get_log("browser")
            if e["level"] == "SEVERE" and "401" not in e["message"] and "403" not in e["message"]
            and "422" not in e["message"]
        ]
        check(not errors, f"no script or CSP errors in the browser log {errors}")
    finally:
        d.quit()


def run(d):
    # --- the key: the first API call answers 401, the dialog asks; the key stays out of URLs.
    viewport(d, 1280, 800)
    d.get(URL + "/")
    until(d, "the key dialog", lambda d: d.find_element(By.ID, "key-dialog").get_attribute("open") is not None)
    check("401" not in d.current_url, "the console asks for the key")
    d.find_element(By.ID, "key-input").send_keys(ADMIN_KEY)
    d.find_element(By.ID, "key-save").click()
    view_ready(d, "tags")
    until(d, "the tags table", lambda d: "Score" in d.find_element(By.ID, "view").text)
    check(ADMIN_KEY not in d.current_url, "the key is not in the URL")
    check(
        d.execute_script("return sessionStorage.getItem('tagllm.key')") == ADMIN_KEY
        and d.execute_script("return localStorage.length") == 0,
        "the key is kept in session storage only",
    )

    # --- Tags: served tags with kinds, versions, metrics; the failed bundle with its reason.
    view = d.find_element(By.ID, "view").text
    check("Lang" in view and "Score" in view and "regression" in view, "the tags table lists Lang and Score")
    check("held-out: mse" in view, "the tags table shows Score's held-out metrics")
    failed = d.find_element(By.CSS_SELECTOR, ".failed-bundles").text
    check("Broken" in failed and len(failed) > len("Broken: "), f"the failed bundle shows with its reason: {failed!r}")
    until(d, "the server line", lambda d: "parameters" in d.find_element(By.ID, "server").text)
    shot(d, "tags")
    go(d, "#/tags/Score", "tags")
    check("Metrics" in d.find_element(By.ID, "view").text, "a tag's page shows its metrics")
    shot(d, "tag")

    # --- Playground: a regression prediction with the tag versions used.
    go(d, "#/playground/Score", "playground")
    check(Select(d.find_element(By.ID, "pg-function")).first_selected_option.get_attribute("value") == "Score",
          "the playground opens on the chosen tag")
    slot = d.find_element(By.ID, "pg-slot-text")
    slot.send_keys("the cat sat on the mat")
    d.find_element(By.CSS_SELECTOR, "#pg-form button[type=submit]").click()
    value = until(d, "the prediction", lambda d: d.find_elements(By.ID, "pg-value"))[0].text
    float(value)
    result = d.find_element(By.ID, "pg-result").text
    check("Score v1" in result and "Lang v1" in result, f"the prediction {value} names the tag versions used")
    check(not unlabelled_controls(d), "every playground control has a label")
    shot(d, "playground")
    # A custom template that generates text.
    Select(d.find_element(By.ID, "pg-function")).select_by_value("")
    tpl = d.find_element(By.ID, "pg-template")
    check(tpl.get_attribute("readonly") is None and "<Score>" in tpl.get_attribute("value"),
          "a custom template starts from the chosen tag's, editable")
    tpl.clear()
    tpl.send_keys("<Lang> {prompt}")
    until(d, "the custom slot", lambda d: d.find_elements(By.ID, "pg-slot-prompt"))
    d.find_element(By.ID, "pg-slot-prompt").send_keys("the cat")
    d.find_element(By.ID, "pg-max").clear()
    d.find_element(By.ID, "pg-max").send_keys("4")
    d.find_element(By.CSS_SELECTOR, "#pg-form button[type=submit]").click()
    until(d, "generated text", lambda d: d.find_elements(By.ID, "pg-text"))
    check("finish reason" in d.find_element(By.ID, "pg-result").text, "a custom template generates text")

    # --- Train: a bad value gets the server's 422 next to its field; then a real job.
    go(d, "#/train", "train")
    check(not unlabelled_controls(d), "every training form control has a label")
    Select(d.find_element(By.ID, "tr-stage")).select_by_value("2")
    d.find_element(By.ID, "tr-tag").send_keys("Score2")
    d.find_element(By.ID, "tr-template").send_keys("<Lang> {text} scores <Score2>")
    Select(d.find_element(By.ID, "tr-head")).select_by_value("regression")
    d.find_element(By.ID, "tr-target").send_keys("score")
    d.find_element(By.ID, "tr-data-file").send_keys(str(WORK / "train.jsonl"))
    d.find_element(By.ID, "tr-eval-file").send_keys(str(WORK / "eval.jsonl"))
    for field, value in [("tr-steps", "40"), ("tr-batch", "0"), ("tr-eval-every", "10")]:
        el = d.find_element(By.ID, field)
        el.clear()
        el.send_keys(value)
    d.find_element(By.CSS_SELECTOR, "#train-form button[type=submit]").click()
    err = until(d, "the field error", lambda d: [e for e in d.find_elements(By.ID, "tr-batch-error") if e.is_displayed()])[0]
    check("batch_size" in err.text, f"the 422 shows next to batch_size: {err.text!r}")
    check(d.find_element(By.ID, "tr-batch").get_attribute("aria-invalid") == "true", "the field is marked invalid")
    shot(d, "train-error")
    el = d.find_element(By.ID, "tr-batch")
    el.clear()
    el.send_keys("4")
    d.find_element(By.CSS_SELECTOR, "#train-form button[type=submit]").click()
    view_ready(d, "jobs")
    job_url = d.current_url
    check("#/jobs/" in job_url, "the form opens the new job's page")
    until(d, "the job to succeed",
          lambda d: d.find_element(By.CSS_SELECTOR, "#view h1").get_attribute("data-state") in ("succeeded", "failed"),
          seconds=180)
    check(d.find_element(By.CSS_SELECTOR, "#view h1").get_attribute("data-state") == "succeeded",
          "the job ran to the end: " + d.find_element(By.ID, "job-summary").text)
    # The curve: a training-loss line and held-out points, drawn from /jobs/{id}/curve.
    until(d, "the curve", lambda d: len(d.find_elements(By.CSS_SELECTOR, "#job-curve svg path")) >= 2)
    label = d.find_element(By.CSS_SELECTOR, "#job-curve svg").get_attribute("aria-label")
    check("training loss" in label and "held-out loss" in label, f"the chart draws both curves: {label}")
    check(len(d.find_elements(By.CSS_SELECTOR, "#job-curve svg circle")) >= 4, "held-out points at steps 10, 20, 30 and 40")
    shot(d, "job")
    go(d, "#/jobs", "jobs")
    check("succeeded" in d.find_element(By.ID, "view").text, "the jobs list shows the finished job")
    shot(d, "jobs")
    go(d, "#/tags", "tags")
    check("Score2" in d.find_element(By.ID, "view").text, "the trained tag is served")

    # --- Keyboard: the skip link, then the sections, in tab order.
    d.get(URL + "/#/tags")
    d.refresh()  # a fresh document: focus starts at the top
    view_ready(d, "tags")
    body = d.find_element(By.TAG_NAME, "body")
    order = []
    for _ in range(7):
        body.send_keys(Keys.TAB) if not order else d.switch_to.active_element.send_keys(Keys.TAB)
        order.append(d.switch_to.active_element.text)
    check(order[:7] == ["Skip to content", "tagllm", "Tags", "Playground", "Jobs", "Train", "API docs"],
          f"tab order reaches every section: {order}")
    d.switch_to.active_element.send_keys(Keys.SHIFT, Keys.TAB)
    d.switch_to.active_element.send_keys(Keys.ENTER)
    view_ready(d, "train")  # fails unless Enter on the focused link opened Train
    print("ok: a section opens from the keyboard")

    # --- Phone width: nothing wider than the screen.
    viewport(d, 390, 844, mobile=True)
    for section in ["tags", "playground"]:
        go(d, f"#/{section}", section)
        overflow = d.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        check(overflow <= 0, f"{section} fits a phone-width viewport (overflow {overflow}px)")
        shot(d, f"{section}-phone")
    viewport(d, 1280, 800)

    # --- /docs: Swagger UI renders the live document, offline.
    d.get(URL + "/docs")
    until(d, "Swagger UI", lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock"), seconds=30)
    title = d.find_element(By.CSS_SELECTOR, ".swagger-ui .info .title").text
    ops = len(d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock"))
    spec = json.load(urllib.request.urlopen(URL + "/openapi.json"))
    want = sum(len(v) for v in spec["paths"].values())
    check("tagllm" in title and ops == want, f"/docs renders all {want} operations ({ops})")
    shot(d, "docs")


if __name__ == "__main__":
    main()
