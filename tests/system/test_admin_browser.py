"""The admin in a real browser: Debian's headless Chromium, driven by Selenium, against the
live server (pytest-django's, threads of this process on the test database).

bin/setup --dev installs chromium and chromium-driver (as root, with apt-get); without them,
or without selenium, the test is skipped and says why. Nothing is downloaded: the driver
and the browser are named by path, so Selenium Manager is never asked.

The session page's screenshots (with the start form, and after the start) are kept as test
artefacts: in the test's tmp dir and at test-artifacts/admin-session-form.png and
test-artifacts/admin-session.png in the repository root (git-ignored).
"""

import base64
import os
import shutil
from pathlib import Path

import pytest

from sessions_app import services as session_services
from tests.helpers import image_bytes
from tests.maintenance_helpers import stored_samples
from tests.processes import REPO
from training_app.models import TrainingRun

# The admin on PostgreSQL is tested without a browser (tests/*/test_admin.py), in both passes.
pytestmark = [pytest.mark.browser, pytest.mark.one_pass]

CHROMIUM = os.environ.get("SDXL_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SDXL_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
ARTIFACTS = REPO / "test-artifacts"
# Flags that keep Chromium off the network (this runs on closed ones too) and out of the
# user's profile.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,1000",
)


@pytest.fixture
def browser(tmp_path):
    webdriver = pytest.importorskip(
        "selenium.webdriver", reason="selenium is not installed (bin/setup --dev installs it)"
    )
    from selenium.webdriver.chrome.service import Service

    for program in (CHROMIUM, CHROMEDRIVER):
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            pytest.skip(
                f"{program} not found: bin/setup --dev installs Debian's chromium and "
                "chromium-driver when run as root (apt-get install chromium chromium-driver)"
            )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(
        service=Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "driver.log")),
        options=options,
    )
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_admin_session_page_starts_a_training(
    browser, live_server, django_user_model, queue_namespace, tmp_path
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    django_user_model.objects.create_superuser("admin", password="browser-test-pw")
    session = session_services.session_create()
    session_services.session_image_add(session.pk, image_bytes(), "a red square")
    earlier = TrainingRun.objects.create(session=session, status="completed", step=2)
    stored_samples(earlier, 2, prompts=("a red square", "sks on a beach"))
    wait = WebDriverWait(browser, 15)

    # Log in through the form.
    browser.get(f"{live_server.url}/admin/login/?next=/admin/")
    browser.find_element(By.ID, "id_username").send_keys("admin")
    browser.find_element(By.ID, "id_password").send_keys("browser-test-pw")
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait.until(expected_conditions.presence_of_element_located((By.ID, "user-tools")))

    # The session list, then the session's page.
    browser.get(f"{live_server.url}/admin/sessions_app/session/")
    browser.find_element(By.LINK_TEXT, f"session_{session.pk}").click()
    wait.until(expected_conditions.presence_of_element_located((By.ID, "start-training")))
    assert "a red square" in browser.page_source

    keep_screenshot(browser, tmp_path / "admin-session-form.png")

    # Start a training from the form.
    form = browser.find_element(By.ID, "start-training")
    form.find_element(By.NAME, "steps").send_keys("2")
    form.find_element(By.NAME, "rank").send_keys("8")
    form.find_element(By.NAME, "resolution").send_keys("64")
    form.find_element(By.NAME, "trigger").send_keys("sks")
    form.find_element(By.NAME, "start").click()

    success = wait.until(
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, ".messagelist .success"))
    )
    run = TrainingRun.objects.get(status="queued")
    assert f"{run.pk} queued: 2 steps, rank 8." in success.text
    assert run.parameters["steps"] == 2 and run.parameters["trigger"] == "sks"
    runs = browser.find_element(By.ID, "training_runs-group")
    assert "queued" in runs.text and "completed" in runs.text
    assert browser.find_elements(By.ID, "cancel-training")  # the active run can be cancelled
    sample_thumbnails = browser.find_elements(By.CSS_SELECTOR, "figure img")
    assert len(sample_thumbnails) == 2
    assert all(
        browser.execute_script("return arguments[0].naturalWidth", image) > 0
        for image in sample_thumbnails
    ), "a sample thumbnail did not load"

    keep_screenshot(browser, tmp_path / "admin-session.png")


def keep_screenshot(browser, path: Path) -> None:
    """The whole page (not just the window) as a PNG at `path`, copied to test-artifacts/."""
    shot = browser.execute_cdp_cmd(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}
    )
    path.write_bytes(base64.b64decode(shot["data"]))
    assert path.read_bytes().startswith(b"\x89PNG")
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copyfile(path, ARTIFACTS / path.name)
