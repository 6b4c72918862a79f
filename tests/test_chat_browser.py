"""chat.py --web in a real browser: Debian's headless chromium types a question and reads the streamed answer.

Needs `apt-get install -y chromium chromium-driver` and `pip install selenium`; skipped without them.
No browser is downloaded: selenium drives /usr/bin/chromium through /usr/bin/chromedriver.
"""

import shutil

import pytest

import chat
from medlora.answer import AnswerPath
from medlora.generation import GenerationSettings
from tests.conftest import chatty_tiny_model
from tests.test_chat import serving

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1280,900",
)

pytestmark = pytest.mark.browser


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    for program in (CHROMIUM, CHROMEDRIVER):
        if not shutil.which(program):
            pytest.skip(f"{program} not found: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_question_typed_in_the_page_gets_a_streamed_answer(browser, tokenizer):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app = chat.build_app(AnswerPath(chatty_tiny_model(), tokenizer, None, GenerationSettings(max_new_tokens=12)), "tiny test model")
    with serving(app) as url:
        browser.get(url)
        wait = WebDriverWait(browser, 30)
        question = wait.until(lambda page: page.find_element(By.CSS_SELECTOR, "#question textarea"))
        assert chat.DISCLAIMER in browser.find_element(By.TAG_NAME, "body").text
        browser.find_element(By.XPATH, f"//button[contains(., '{chat.EXAMPLE_QUESTIONS[0]}')]").click()
        wait.until(lambda page: question.get_attribute("value") == chat.EXAMPLE_QUESTIONS[0])
        question.clear()
        question.send_keys("What is hypertension?")
        browser.find_element(By.CSS_SELECTOR, "#send").click()
        answer = wait.until(lambda page: page.find_element(By.CSS_SELECTOR, '#chat [data-testid="bot"]').text.strip())
        assert "What is hypertension?" in browser.find_element(By.CSS_SELECTOR, '#chat [data-testid="user"]').text
        assert answer

        browser.find_element(By.CSS_SELECTOR, "#clear").click()
        wait.until(lambda page: not page.find_elements(By.CSS_SELECTOR, '#chat [data-testid="bot"]'))


def test_related_flashcards_panel_shows_html_as_text(browser, tokenizer):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from data import QAPair
    from medlora.sources import FlashcardIndex, Sources, cards_text

    card = QAPair("What is <b>hypertension</b>?", "Blood pressure <script>alert(1)</script> that stays high.", "pathology")
    sources = Sources(FlashcardIndex([card, QAPair("What is insulin?", "A pancreatic hormone.", "physiology")]), "test cards")
    path = AnswerPath(chatty_tiny_model(), tokenizer, None, GenerationSettings(max_new_tokens=8), sources)
    app = chat.build_app(path, "tiny test model")
    with serving(app) as url:
        browser.get(url)
        wait = WebDriverWait(browser, 30)
        question = wait.until(lambda page: page.find_element(By.CSS_SELECTOR, "#question textarea"))
        assert "Related flashcards" in browser.find_element(By.TAG_NAME, "body").text
        question.send_keys("What is hypertension?")
        browser.find_element(By.CSS_SELECTOR, "#send").click()
        panel = wait.until(lambda page: page.find_element(By.CSS_SELECTOR, "#sources textarea").get_attribute("value") or None)
        assert panel == cards_text(sources.search("What is hypertension?", 2))
        assert "<b>hypertension</b>" in panel and "<script>alert(1)</script>" in panel  # shown as text
        assert not browser.find_elements(By.CSS_SELECTOR, "#sources b, #sources script")  # never rendered
