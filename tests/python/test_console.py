"""The operators' console in a real browser: headless Chromium (Debian's `chromium` and
`chromium-driver`, installed by scripts/chromium.sh) driven with Selenium against the real
server and model. Signs in, creates a customer and a key, uses the key with the official
OpenAI SDK, finds the request in the log and the overview's counters moved, revokes the key
(the next SDK call is a 401), and signs out (the console then refuses the old session). On a
customer's page it registers a LoRA adapter with its own price (the SDK's request to it is
billed at that price) and removes it (the next request is a 404), as keys are managed there.

Screenshots of each screen go to $TOLLGATE_ARTIFACTS/console (default: a directory under the
system's temporary directory), never into the repository."""

import os
import shutil
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from conftest import customer_keys, start_server, stop_server

ADMIN = "admin-console-token-7d41"
MODEL = "smollm2-135m"
ARTIFACTS = Path(os.environ.get("TOLLGATE_ARTIFACTS", Path(tempfile.gettempdir()) / "tollgate-artifacts")) / "console"


@pytest.fixture(scope="module")
def server():
    tmp = tempfile.mkdtemp(prefix="tollgate-console-")
    srv = start_server({"TOLLGATE_ADMIN_TOKEN": ADMIN}, ["--database", os.path.join(tmp, "ledger.db")])
    yield srv
    assert stop_server(srv) == 0


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    assert chromium and driver, "headless Chromium is missing: run scripts/chromium.sh"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1440,1000",
                "--disable-gpu", "--no-first-run", "--password-store=basic"]:
        options.add_argument(arg)
    b = webdriver.Chrome(service=Service(driver), options=options)
    b.implicitly_wait(5)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    yield b
    b.quit()


def shot(browser, name):
    browser.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def text(browser, css):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.CSS_SELECTOR, css).text


def wait(browser, condition, what):
    """Waits (10 s at most) for `condition(browser)`: a form's submission or a click navigates
    asynchronously."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    ignored = (NoSuchElementException, StaleElementReferenceException)
    WebDriverWait(browser, 10, ignored_exceptions=ignored).until(lambda b: condition(b), message=what)


def wait_url(browser, suffix):
    wait(browser, lambda b: b.current_url.rstrip("/").endswith(suffix), f"never reached {suffix}")


def fill(browser, form_css, **fields):
    from selenium.webdriver.common.by import By

    form = browser.find_element(By.CSS_SELECTOR, form_css)
    for name, value in fields.items():
        field = form.find_element(By.NAME, name)
        field.clear()
        field.send_keys(value)
    return form


def test_console_end_to_end(server, browser):
    from selenium.webdriver.common.by import By

    base = f"http://{server.addr}"
    # Not signed in: sent to the login page; a wrong token is refused.
    browser.get(f"{base}/console")
    assert browser.current_url.endswith("/console/login")
    fill(browser, "form", token="wrong").submit()
    wait(browser, lambda b: "Wrong admin token" in b.page_source, "no refusal shown")
    shot(browser, "01-login")
    fill(browser, "form", token=ADMIN).submit()
    wait_url(browser, "/console")
    cookie = browser.get_cookie("tollgate_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie.get("expiry")
    assert not cookie["secure"], "plain HTTP without a proxy saying https"
    before = int(text(browser, "#requests-24h"))

    # A customer and a key; the secret is shown once.
    browser.get(f"{base}/console/customers")
    fill(browser, "form.grid", id="web-co", name="Web Co", budget_usd="10", rpm="600").submit()
    wait_url(browser, "/console/customers/web-co")
    fill(browser, "form.grid[action$='/keys']", name="browser-key")
    browser.find_element(By.ID, "create-key").click()
    secret = text(browser, "#secret")
    assert secret.startswith("tg-") and len(secret) == 67
    shot(browser, "03-customer-new-key")
    key_id = text(browser, "#new-key h2").split()[-1]

    # The key works with the SDK; the request shows up in the log.
    client = OpenAI(base_url=server.base_url, api_key=secret, max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi"}], max_tokens=5
    )
    request_id = raw.headers["x-request-id"]
    raw.parse()
    deadline = time.time() + 20
    while True:
        browser.get(f"{base}/console/requests?customer_id=web-co")
        if request_id in browser.page_source or time.time() > deadline:
            break
        time.sleep(0.3)
    ids = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#requests td.request-id")]
    assert ids == [request_id], ids
    shot(browser, "04-requests")
    # Filters: another status shows nothing.
    browser.get(f"{base}/console/requests?customer_id=web-co&status=failed")
    assert request_id not in browser.page_source

    # The overview's counters moved.
    browser.get(f"{base}/console")
    assert int(text(browser, "#requests-24h")) == before + 1
    assert int(text(browser, "#output-24h")) > 0
    assert browser.find_elements(By.CSS_SELECTOR, "svg.chart rect.bar")
    assert MODEL in text(browser, "#live")
    shot(browser, "02-overview")

    for page in ["models", "invoices?customer_id=web-co", "customers"]:
        browser.get(f"{base}/console/{page}")
        assert "Error" not in browser.title, browser.page_source[:500]
        shot(browser, "05-" + page.split("?")[0])
    browser.get(f"{base}/console/invoices?customer_id=web-co")
    assert text(browser, "#invoice-total") != "0.000000000"

    # The CSV export, with the browser's session.
    jar = {"tollgate_console": cookie["value"]}
    csv = httpx.get(f"{base}/console/usage.csv", params={"group_by": "customer,model"}, cookies=jar)
    assert csv.status_code == 200 and csv.headers["content-type"].startswith("text/csv")
    assert csv.text.splitlines()[0] == "customer_id,model,requests,input_tokens,output_tokens,cost_usd,cached_input_tokens"
    assert any(line.startswith(f"web-co,{MODEL},1,") for line in csv.text.splitlines()), csv.text

    # A form without the session's CSRF token is refused, even with the cookie.
    forged = httpx.post(f"{base}/console/keys/{key_id}/revoke", cookies=jar, data={"csrf": "guess"})
    assert forged.status_code == 403
    cross = httpx.post(
        f"{base}/console/keys/{key_id}/revoke", cookies=jar, headers={"Origin": "https://evil.example"}, data={}
    )
    assert cross.status_code == 403
    client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)

    # Revoke in the console: the next SDK call is a 401.
    browser.get(f"{base}/console/customers/web-co")
    browser.find_element(By.CSS_SELECTOR, f"#key-{key_id} button[name=revoke]").click()
    wait(
        browser,
        lambda b: b.find_element(By.CSS_SELECTOR, f"#key-{key_id} td.state").text.startswith("revoked"),
        "the key never showed as revoked",
    )
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)

    # The audit log names the console session for each change.
    browser.get(f"{base}/console/audit")
    rows = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#audit tbody tr")]
    assert any("key.revoked" in r and "console: console session sess_" in r for r in rows), rows
    assert any("customer.created" in r and "web-co" in r for r in rows), rows
    shot(browser, "06-audit")

    # Sign out: back to the login page, and the old session is dead on the server too.
    browser.find_element(By.ID, "logout").click()
    wait_url(browser, "/console/login")
    browser.get(f"{base}/console/customers")
    assert browser.current_url.endswith("/console/login")
    refused = httpx.get(f"{base}/console/customers", cookies=jar)
    assert refused.status_code == 303 and refused.headers["location"] == "/console/login"
    assert httpx.post(f"{base}/console/customers", cookies=jar, data={"id": "x"}).status_code == 403

    # Nothing secret reached the log.
    log = "".join(server.log)
    for s in [secret, ADMIN, cookie["value"]]:
        assert s not in log


def sign_in(browser, base):
    browser.get(f"{base}/console/login")
    fill(browser, "form", token=ADMIN).submit()
    wait_url(browser, "/console")


def test_console_manages_a_customers_adapters(server, browser, tmp_path):
    from lora_common import record, shape, write_adapter
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    base = f"http://{server.addr}"
    write_adapter(tmp_path / "pirate", shape(), 4, zero_b=False, seed=11)
    key = customer_keys(server, ADMIN, ["ad-co"])["ad-co"]
    sign_in(browser, base)
    browser.get(f"{base}/console/customers/ad-co")
    form = fill(browser, "form.grid[action$='/adapters']", name="pirate", path=str(tmp_path / "pirate"),
                input_per_mtok="2", output_per_mtok="3")
    Select(form.find_element(By.NAME, "base_model")).select_by_value(MODEL)
    browser.find_element(By.ID, "create-adapter").click()
    wait(browser, lambda b: b.find_elements(By.CSS_SELECTOR, "#adapter-pirate"), "the adapter never showed")
    cells = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#adapter-pirate td")]
    assert cells[:4] == [f"{MODEL}:pirate", MODEL, "in 2 / out 3 per Mtok", str(tmp_path / "pirate")], cells
    assert cells[4], "no creation time"
    shot(browser, "07-customer-adapters")

    # Its owner's key uses it, billed at its own price.
    client = OpenAI(base_url=server.base_url, api_key=key, max_retries=0, timeout=120)
    raw = client.chat.completions.with_raw_response.create(
        model=f"{MODEL}:pirate", messages=[{"role": "user", "content": "Say hi"}], max_tokens=4)
    raw.parse()
    rec = record(server, raw.headers["x-request-id"], ADMIN)
    assert (rec["adapter"], str(rec["input_price_per_mtok"]), str(rec["output_price_per_mtok"])) == (
        "pirate", "2", "3"), rec

    # A bad price is refused with its key named; nothing is registered.
    form = fill(browser, "form.grid[action$='/adapters']", name="bad", path=str(tmp_path / "pirate"),
                input_per_mtok="abc", output_per_mtok="3")
    browser.find_element(By.ID, "create-adapter").click()
    wait(browser, lambda b: "price.input_per_mtok" in b.page_source, "no refusal naming the price")
    browser.get(f"{base}/console/customers/ad-co")
    assert not browser.find_elements(By.CSS_SELECTOR, "#adapter-bad")

    # Removing it without the session's CSRF token is refused; with the button it is gone.
    jar = {"tollgate_console": browser.get_cookie("tollgate_console")["value"]}
    forged = httpx.post(f"{base}/console/customers/ad-co/adapters/pirate/remove", cookies=jar,
                        data={"csrf": "guess"})
    assert forged.status_code == 403
    browser.find_element(By.CSS_SELECTOR, "#adapter-pirate button[name=remove]").click()
    wait(browser, lambda b: not b.find_elements(By.CSS_SELECTOR, "#adapter-pirate"), "never removed")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=f"{MODEL}:pirate", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=2)

    browser.get(f"{base}/console/audit")
    rows = [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#audit tbody tr")]
    for action in ["adapter.added", "adapter.removed"]:
        assert any(action in r and "ad-co/pirate" in r and "console session" in r for r in rows), rows


def test_console_is_off_without_an_admin_token():
    srv = start_server({"TOLLGATE_ADMIN_TOKEN": ""}, ["--no-database"])
    try:
        r = httpx.get(f"http://{srv.addr}/console/login")
        assert r.status_code == 404
    finally:
        assert stop_server(srv) == 0
