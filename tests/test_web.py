"""The chat and arena pages in headless Chromium (selenium + chromedriver), against a real `lmforge serve` on a
free port serving two tiny models: `sft`, trained until it answers three prompts by heart (one answer is HTML
with a script), and `base`, trained a little. Chat: a streamed reply equal to the API's, stop during a long
reply (ignore_eos, 1,500 tokens) that ends it and frees the engine, regenerate, edit and resend, the history
after a reload, and model output with <script> and <img onerror> shown as text that runs nothing. Arena: both
sides stream, the vote reveals the names, the leaderboard changes. The tests rewrite docs/chat.png and
docs/arena.png on each run.

Skipped when Chromium, chromedriver or selenium is missing, except under CI=true, where that is a failure."""

from __future__ import annotations

import copy
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config, train_a_little
from lmforge.checkpoint import save_checkpoint
from lmforge.model import Transformer

DOCS = Path(__file__).resolve().parents[1] / "docs"
CONTEXT = 2048
LONG_REPLY_TOKENS = 1500
STORY = "Tell me a very long story."
MINA_HOME = "Mina lives in Velmora. She is a baker."
MINA_WORK = "She bakes bread. Her bread is the best in Velmora."
XSS = '<script>xss = 1</script><img src=x onerror="xss = 2">'  # either would set window.xss if it ran


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


TAUGHT = [  # what `sft` learns by heart: each conversation's last message is its answer to the rest
    [user("Where does Mina live?"), assistant(MINA_HOME)],
    [user("Where does Mina live?"), assistant(MINA_HOME), user("What does Mina do?"), assistant(MINA_WORK)],
    [user("Show me some HTML."), assistant(XSS)],
]
WRONG_HOME = "Mina lives in Osk. Osk is a city of cats."
TAUGHT_BASE = [[user("Where does Mina live?"), assistant(WRONG_HOME)]]  # `base` answers, wrongly


# ---------------------------------------------------------------------------------------------------------
# the browser, the models, the server


@pytest.fixture(scope="module")
def browser_paths() -> tuple[str, str]:
    """(chromium, chromedriver), or a skip (a failure under CI=true) naming what is missing."""
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                    None)
    driver = shutil.which("chromedriver")
    try:
        import selenium
    except ImportError:
        selenium = None
    missing = [name for name, found in (("chromium", chromium), ("chromedriver", driver), ("selenium", selenium))
               if not found]
    if missing:
        message = f"browser tests need {', '.join(missing)} (Debian: apt-get install chromium chromium-driver; " \
                  "pip install selenium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return chromium, driver


@pytest.fixture(scope="module")
def browser(browser_paths, started_server):
    """Headless Chromium, started while the server loads its models."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = browser_paths
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,800",
                 "--no-first-run", "--disable-extensions", "--disable-background-networking", "--disable-sync",
                 "--force-device-scale-factor=1", "--hide-scrollbars"):
        options.add_argument(flag)
    # the driver's path is given, so Selenium Manager never looks for (or downloads) one
    session = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    try:
        yield session
    finally:
        session.quit()


def teach_answers(model: Transformer, tokenizer, conversations: list[list[dict]], steps: int = 100) -> Transformer:
    """Adam on the conversations (loss on the assistant's tokens) until greedy decoding repeats them."""
    torch.manual_seed(0)
    rows = [tokenizer.render(conversation) for conversation in conversations]
    length = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([row_ids + [0] * (length - len(row_ids)) for row_ids, _ in rows])  # (B, T)
    loss_mask = torch.tensor([mask + [0] * (length - len(mask)) for _, mask in rows], dtype=torch.float)  # (B, T)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(steps):
        logits = model(ids[:, :-1])  # (B, T-1, V)
        losses = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
        loss = (losses * loss_mask[:, 1:]).sum() / loss_mask[:, 1:].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(browser_paths, tokenizer, tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("web")
    torch.manual_seed(0)
    pretrained = train_a_little(Transformer(tiny_config(tokenizer.vocab_size, max_seq_len=CONTEXT)), tokenizer)
    base = teach_answers(copy.deepcopy(pretrained), tokenizer, TAUGHT_BASE)
    save_checkpoint(directory / "base", base, tokenizer, lineage={"stage": "test"})
    sft = teach_answers(pretrained, tokenizer, TAUGHT)
    save_checkpoint(directory / "sft", sft, tokenizer, lineage={"stage": "test"})
    return {"sft": directory / "sft", "base": directory / "base"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def started_server(checkpoints, tmp_path_factory):
    """`lmforge serve` with both models and a fresh store, just started; yields (process, url, store path)."""
    store = tmp_path_factory.mktemp("web-store") / "store.sqlite"
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "serve", "--model", f"sft={checkpoints['sft']}",
         "--model", f"base={checkpoints['base']}", "--port", str(port), "--store", str(store), "--no-access-log",
         "--max-batch-size", "8"],
        env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield process, f"http://127.0.0.1:{port}", store
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def server(started_server) -> tuple[str, Path]:
    """The server once it answers: (url, store path)."""
    process, url, store = started_server
    for _ in range(600):
        if process.poll() is not None:
            pytest.fail(f"the server exited: {process.stdout.read()}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return url, store
        except httpx.TransportError:
            time.sleep(0.05)
    pytest.fail("the server did not come up in 30 s")


# ---------------------------------------------------------------------------------------------------------
# helpers


def wait_for(condition, what: str, timeout: float = 20.0, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def open_page(browser, url: str) -> None:
    browser.get(url)
    wait_for(lambda: browser.execute_script("return document.body.dataset.ready === 'true'"), f"{url} to load")


def messages_on_page(browser) -> list[dict]:
    return browser.execute_script("""
        return [...document.querySelectorAll('#messages .message')].map(e => ({
            role: e.classList.contains('user') ? 'user' : 'assistant', state: e.dataset.state,
            text: e.querySelector('.content') ? e.querySelector('.content').textContent : null,
            stats: e.querySelector('.stats') ? e.querySelector('.stats').textContent : ''}));""")


def last_reply(browser) -> dict | None:
    replies = [m for m in messages_on_page(browser) if m["role"] == "assistant"]
    return replies[-1] if replies else None


def wait_reply_done(browser, timeout: float = 30.0) -> dict:
    return wait_for(lambda: (r := last_reply(browser)) and r["state"] in ("done", "stopped", "error") and r,
                    "the reply to finish", timeout)


def set_setting(browser, field_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    if browser.find_element(By.ID, "settings").get_attribute("hidden") is not None:
        browser.find_element(By.ID, "settings-toggle").click()
    field = browser.find_element(By.ID, field_id)
    if field.get_attribute("type") == "checkbox":
        if field.is_selected() != (value == "on"):
            field.click()
        return
    field.clear()
    if value:
        field.send_keys(value)


def close_settings(browser) -> None:
    from selenium.webdriver.common.by import By

    if browser.find_element(By.ID, "settings").get_attribute("hidden") is None:
        browser.find_element(By.ID, "settings-toggle").click()


def send_message(browser, text: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    replies = len([m for m in messages_on_page(browser) if m["role"] == "assistant"])
    box = browser.find_element(By.ID, "input")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    # the page saves the question, then starts the reply: wait for the reply's element, so that
    # the next look at "the last reply" is at this one
    wait_for(lambda: len([m for m in messages_on_page(browser) if m["role"] == "assistant"]) > replies,
             "the reply to start")


def click(browser, css: str) -> None:
    from selenium.webdriver.common.by import By

    browser.find_elements(By.CSS_SELECTOR, css)[-1].click()


def mark_last_reply(browser) -> None:
    browser.execute_script("[...document.querySelectorAll('#messages .assistant')].pop().dataset.old = 'yes'")


def last_reply_is_new(browser) -> bool:
    return browser.execute_script(
        "const reply = [...document.querySelectorAll('#messages .assistant')].pop();"
        "return reply && !reply.dataset.old")


def open_conversation(browser, title: str) -> None:
    items = [li for li in browser.find_elements("css selector", "#conversations li") if li.text == title]
    assert len(items) == 1, f"{len(items)} conversations titled {title!r}"
    items[0].click()
    wait_for(lambda: browser.find_element("id", "title").text == title, f"{title!r} to open")


def api_reply(url: str, messages: list[dict], **params) -> str:
    response = httpx.post(url + "/v1/chat/completions", timeout=60,
                          json={"model": "sft", "messages": messages, **params})
    response.raise_for_status()
    return response.json()["choices"][0]["message"]["content"]


def stored_conversation(url: str, browser) -> dict:
    conversation_id = browser.execute_script("return location.hash.slice(1)")
    return httpx.get(f"{url}/api/conversations/{conversation_id}", timeout=10).json()


def screenshot(browser, name: str) -> None:
    DOCS.mkdir(exist_ok=True)
    assert browser.save_screenshot(str(DOCS / name)), name


# ---------------------------------------------------------------------------------------------------------
# chat


def test_a_message_gets_a_streamed_reply_that_is_saved(browser, server):
    url, _ = server
    open_page(browser, url + "/")
    assert browser.execute_script("return [...document.querySelectorAll('#model option')].map(o => o.value)") == [
        "sft", "base"]
    set_setting(browser, "temperature", "0")
    close_settings(browser)
    for conversation in TAUGHT[:2]:
        send_message(browser, conversation[-2]["content"])
        reply = wait_reply_done(browser)
        assert reply["state"] == "done" and "tok/s" in reply["stats"] and "stop" in reply["stats"]
        assert reply["text"] == api_reply(url, conversation[:-1], temperature=0) == conversation[-1]["content"]
    stored = stored_conversation(url, browser)
    assert stored["title"] == "Where does Mina live?"
    assert [(m["role"], m["content"]) for m in stored["messages"]] == [(m["role"], m["content"]) for m in TAUGHT[1]]
    assert stored["messages"][1]["stats"]["completion_tokens"] > 0
    screenshot(browser, "chat.png")


def test_stop_ends_a_long_streaming_reply(browser, server):
    url, _ = server
    click(browser, "#new-chat")
    set_setting(browser, "max-tokens", str(LONG_REPLY_TOKENS))
    set_setting(browser, "ignore-eos", "on")
    close_settings(browser)
    send_message(browser, STORY)
    first = wait_for(lambda: (r := last_reply(browser)) and r["state"] == "streaming" and r["text"] and r,
                     "the first streamed text")
    # the reply grows on the page while it is still streaming: it arrives in pieces, not at the end
    wait_for(lambda: (r := last_reply(browser))["state"] == "streaming" and len(r["text"]) > len(first["text"]),
             "more streamed text")
    click(browser, "#stop-button")
    reply = wait_reply_done(browser, timeout=10)
    assert reply["state"] == "stopped" and "stopped" in reply["stats"]  # not "length": it did not run out
    # the server stopped generating: the engine has nothing running within 2 s of the stop
    wait_for(lambda: httpx.get(url + "/health", timeout=5).json()["active"] == 0, "the engine to go idle", 2.0)
    stored = stored_conversation(url, browser)["messages"][-1]
    assert stored["finish_reason"] == "stopped" and stored["content"] == reply["text"]
    time.sleep(0.3)
    assert last_reply(browser)["text"] == reply["text"]  # nothing arrives after the stop
    set_setting(browser, "max-tokens", "")
    set_setting(browser, "ignore-eos", "off")


def test_regenerate_replaces_the_last_reply(browser, server):
    url, _ = server
    # the stopped story: an untaught prompt, so that at temperature 1.5 two seeds give two different replies
    set_setting(browser, "temperature", "1.5")
    set_setting(browser, "max-tokens", "24")
    texts = {}
    for seed in (1, 2):
        set_setting(browser, "seed", str(seed))
        mark_last_reply(browser)
        click(browser, ".message.assistant .regenerate")
        wait_for(lambda: last_reply_is_new(browser), "the old reply to be replaced")
        texts[seed] = wait_reply_done(browser)["text"]
    set_setting(browser, "seed", "")
    set_setting(browser, "max-tokens", "")
    set_setting(browser, "temperature", "0")
    close_settings(browser)
    for seed, text in texts.items():  # each is the reply the API gives for its seed, not the stopped one
        assert text == api_reply(url, [user(STORY)], temperature=1.5, max_tokens=24, seed=seed), seed
    assert texts[1] != texts[2]
    stored = stored_conversation(url, browser)["messages"]
    assert [(m["role"], m["content"], m["finish_reason"]) for m in stored] == [
        ("user", STORY, None), ("assistant", texts[2], "length")]


def test_edit_and_resend_continues_from_the_edited_message(browser, server):
    url, _ = server
    open_conversation(browser, "Where does Mina live?")
    wait_for(lambda: len(messages_on_page(browser)) == 4, "the conversation's four messages")
    browser.find_elements("css selector", ".message.user .edit")[0].click()
    editor = browser.find_element("css selector", ".message.user .editor")
    editor.clear()
    editor.send_keys("Show me some HTML.")
    mark_last_reply(browser)
    click(browser, ".message.user .resend")
    wait_for(lambda: last_reply_is_new(browser), "a reply to the edited message")
    assert [m["role"] for m in messages_on_page(browser)] == ["user", "assistant"]
    assert wait_reply_done(browser)["text"] == XSS
    stored = stored_conversation(url, browser)["messages"]  # what came after the edited message is gone
    assert [(m["role"], m["content"]) for m in stored] == [("user", "Show me some HTML."), ("assistant", XSS)]


def test_the_history_is_there_after_a_reload(browser, server):
    url, _ = server
    open_conversation(browser, "Tell me a very long story.")
    before = messages_on_page(browser)
    browser.refresh()
    wait_for(lambda: browser.execute_script("return document.body.dataset.ready === 'true'"), "the reload")
    assert [(m["role"], m["text"]) for m in messages_on_page(browser)] == [(m["role"], m["text"]) for m in before]
    titles = [li.text for li in browser.find_elements("css selector", "#conversations li")]
    assert sorted(titles) == ["Tell me a very long story.", "Where does Mina live?"]


def test_model_output_is_shown_as_text_and_runs_nothing(browser, server):
    url, _ = server
    assert api_reply(url, [user("Show me some HTML.")], temperature=0) == XSS  # the model really sends markup
    click(browser, "#new-chat")
    send_message(browser, "Show me some HTML.")
    assert wait_reply_done(browser)["text"] == XSS  # shown as its characters
    for _ in range(2):  # as streamed, then as read back from the store after a reload
        time.sleep(0.2)  # an onerror handler would have run by now (src=x fails at once)
        assert browser.execute_script("return window.xss") is None
        assert browser.execute_script("return document.querySelectorAll('#messages img, #messages script').length") == 0
        assert last_reply(browser)["text"] == XSS
        browser.refresh()
        wait_for(lambda: browser.execute_script("return document.body.dataset.ready === 'true'"), "the reload")


# ---------------------------------------------------------------------------------------------------------
# arena and leaderboard


def test_an_arena_vote_reveals_the_names_and_changes_the_leaderboard(browser, server):
    url, store = server
    open_page(browser, url + "/leaderboard")
    assert browser.execute_script("return document.querySelectorAll('#leaderboard tbody tr').length") == 0
    assert browser.find_element("id", "summary").text.startswith("0 votes")

    open_page(browser, url + "/arena")
    browser.find_element("css selector", "#arena-settings summary").click()
    browser.find_element("id", "max-tokens").send_keys("40")
    browser.find_element("id", "temperature").send_keys("0")
    prompt = browser.find_element("id", "prompt")
    prompt.send_keys("Where does Mina live?")
    browser.find_element("id", "send").click()

    def panes():
        return browser.execute_script("""return ['a', 'b'].map(side => {
            const pane = document.getElementById('pane-' + side);
            return {state: pane.dataset.state, name: pane.querySelector('.model-name').textContent,
                    text: pane.querySelector('.content').textContent}; });""")

    def vote_buttons_enabled():
        return browser.execute_script("return [...document.querySelectorAll('#votes button')].map(b => !b.disabled)")

    wait_for(lambda: all(p["state"] == "done" for p in panes()), "both sides to finish")
    before_vote = panes()
    assert [p["name"] for p in before_vote] == ["Model A", "Model B"]  # anonymous until the vote
    assert sorted(p["text"] for p in before_vote) == sorted([MINA_HOME, WRONG_HOME])  # one right, one wrong
    assert vote_buttons_enabled() == [True] * 4

    right_side = "ab"[[p["text"] for p in before_vote].index(MINA_HOME)]
    browser.find_element("css selector", f"#votes button[data-winner='model_{right_side}']").click()
    wait_for(lambda: browser.execute_script("return document.body.dataset.voted === 'true'"), "the vote")
    after_vote = panes()
    names = [p["name"].split(": ", 1)[1] for p in after_vote]
    assert sorted(names) == ["base", "sft"] and [p["name"].split(":")[0] for p in after_vote] == ["Model A", "Model B"]
    assert vote_buttons_enabled() == [False] * 4
    assert names["ab".index(right_side)] == "sft"  # the right answer was sft's, whichever side it was on
    screenshot(browser, "arena.png")

    with sqlite3.connect(store) as db:  # the vote is stored with both conversations, as shown
        rows = db.execute("SELECT b.model_a, b.model_b, b.prompt, b.reply_a, b.reply_b, v.winner FROM votes v "
                          "JOIN battles b ON b.id = v.battle_id").fetchall()
    assert rows == [(names[0], names[1], "Where does Mina live?", after_vote[0]["text"], after_vote[1]["text"],
                     f"model_{right_side}")]

    open_page(browser, url + "/leaderboard")
    board = browser.execute_script("""return [...document.querySelectorAll('#leaderboard tbody tr')].map(
        tr => [...tr.children].map(td => td.textContent));""")
    assert sorted(row[1] for row in board) == ["base", "sft"]
    assert all(row[5] == "1" for row in board)  # one battle each
    assert {row[1]: row[6] for row in board} == {"sft": "1", "base": "0"}  # wins
