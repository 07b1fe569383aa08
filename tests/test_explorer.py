"""The trace explorer: traces through the server, `dengine explore` writing the page, and the page itself driven
in a real headless browser (Debian's chromium through selenium): scrubber, compare mode, tree mode."""

from __future__ import annotations

import random
import re
import shutil

import msgspec
import pytest
from fastapi.testclient import TestClient

from dengine import LLM, LLMEngine, SamplingParams
from dengine.async_engine import AsyncLLMEngine
from dengine.cli import main as cli_main
from dengine.serve.server import OpenAIServer, create_app
from dengine.tasks import get_task
from dengine.trace import Trace

MASK = "\u00b7"


def _replayed_text(trace: Trace, step: int) -> str:
    """What the page's canvas shows after `step`: each committed token's text, a dot where still masked."""
    cells = [MASK] * trace.params.gen_length
    for s in trace.steps[: step + 1]:
        for c in s.commits:
            cells[c.position - len(trace.prompt_token_ids)] = c.text.replace("\n", "\u23ce")
    return "".join(cells)


def _canvases(trace: Trace) -> list[list[int | None]]:
    cells: list[int | None] = [None] * trace.params.gen_length
    out = []
    for s in trace.steps:
        for c in s.commits:
            cells[c.position - len(trace.prompt_token_ids)] = c.token_id
        out.append(list(cells))
    return out


def _first_divergence(a: Trace, b: Trace) -> int | None:
    x, y = _canvases(a), _canvases(b)
    for i in range(max(len(x), len(y))):
        if x[min(i, len(x) - 1)] != y[min(i, len(y) - 1)]:
            return i
    return None


def _answer(trace: Trace) -> list[int]:
    stops = [i for i, t in enumerate(trace.token_ids) if t in trace.stop_token_ids]
    return trace.token_ids[: stops[0] + 1] if stops else trace.token_ids


# -- the server and the command -------------------------------------------------------------------


@pytest.fixture(scope="module")
def sudoku():
    return LLM("llada-sudoku", dtype="float32"), get_task("sudoku4")


def test_server_returns_the_trace_with_a_whole_response_only(chat_folders, seed):
    engine = LLMEngine(chat_folders["llada"], dtype="float32", kv_cache_memory=1 << 22, block_size=8)
    server = OpenAIServer(AsyncLLMEngine(engine), "tiny", SamplingParams(gen_length=16, block_length=8))
    with TestClient(create_app(server)) as client:
        body = {"prompt": "Add: a1 b2", "cache_policy": "entropy", "temperature": 0.7, "seed": seed % 1000}
        traced = client.post("/v1/completions", json={**body, "trace": True}).json()
        trace = msgspec.convert(traced["trace"], Trace)
        assert len(trace.steps) == traced["dengine"]["nfe"] and trace.cache_policy == "entropy"
        assert trace.text == traced["choices"][0]["text"] and trace.params.seed == seed % 1000
        plain = client.post("/v1/completions", json=body).json()
        assert plain["trace"] is None and plain["choices"] == traced["choices"]

        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                         "trace": True}).json()
        assert chat["trace"]["text"] == chat["choices"][0]["message"]["content"]

        refused = client.post("/v1/completions", json={**body, "trace": True, "stream": True})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "trace"

        page = client.get("/explore")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "dengine explorer" in page.text and '"d2cache"' in page.text
        assert not re.search(r"<(script|link|img)[^>]+(src|href)=\"(?!data:)", page.text), "nothing from outside"


def test_the_router_in_front_of_the_engines_serves_the_same_page():
    from dengine.explore import render_page
    from dengine.serve.router import Relay, router_app

    app = router_app(Relay(lambda *call: None, (), retry_timeout_s=1), lambda what: None, "tiny", 1 << 20)
    with TestClient(app) as client:
        assert client.get("/explore").text == render_page()


def test_explore_command_embeds_every_trace_and_names_bad_files(sudoku, tmp_path, capsys, seed):
    llm, _ = sudoku
    outputs = llm.generate(["Complete the sudoku 1..."] * 2,
                           [SamplingParams(gen_length=8, temperature=1.0, seed=seed + i, trace=True) for i in range(2)],
                           use_tqdm=False)
    (tmp_path / "one.json").write_bytes(msgspec.json.encode(outputs[0]))  # a whole RequestOutput
    (tmp_path / "list.json").write_bytes(msgspec.json.encode([outputs[1].trace, outputs[0].trace]))
    cli_main(["explore", str(tmp_path / "one.json"), str(tmp_path / "list.json"), "-o", str(tmp_path / "p.html")])
    assert "3 traces ->" in capsys.readouterr().out
    page = (tmp_path / "p.html").read_text()
    embedded = re.search(r'<script id="dengine-traces" type="application/json">(.*?)</script>', page, re.S).group(1)
    assert msgspec.json.decode(embedded, type=list[Trace]) == [outputs[0].trace, outputs[1].trace, outputs[0].trace]

    (tmp_path / "bad.json").write_text('{"choices": []}')
    with pytest.raises(SystemExit):
        cli_main(["explore", str(tmp_path / "bad.json"), "-o", str(tmp_path / "q.html")])
    assert "bad.json: expected a trace" in capsys.readouterr().err


# -- the page in a browser ------------------------------------------------------------------------


def _browser_paths() -> tuple[str, str]:
    browser = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("no headless browser here: install Debian's chromium and chromium-driver "
                    "(`apt-get install chromium chromium-driver`; .ci/run does it where apt is available)")
    return browser, driver


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium (the test extra) drives the browser")
    from selenium.webdriver.chrome.service import Service

    binary, driver_path = _browser_paths()
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1200,900"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "SEVERE"})
    driver = webdriver.Chrome(options=options, service=Service(driver_path))
    yield driver
    driver.quit()


def _chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def _open(browser, tmp_path, traces: list[Trace]):
    from selenium.webdriver.common.by import By

    path = tmp_path / "page.html"
    (tmp_path / "traces.json").write_bytes(msgspec.json.encode(traces))
    cli_main(["explore", str(tmp_path / "traces.json"), "-o", str(path)])
    browser.get(path.as_uri())
    assert browser.get_log("browser") == []
    return lambda element_id: browser.find_element(By.ID, element_id)


def test_scrubber_shows_the_canvas_of_each_step(browser, sudoku, tmp_path, seed):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    llm, task = sudoku
    problem = random.Random(seed).choice(task.held_out(50))
    params = SamplingParams(gen_length=24, cache_policy="entropy", trace=True)
    trace = llm.chat(_chat(problem.question), params, use_tqdm=False)[0].trace
    element = _open(browser, tmp_path, [trace])

    # an offline page with a trace: no Run form, one line saying so, and no first-screen hint
    assert not element("run-panel").is_displayed() and not element("empty-hint").is_displayed()
    assert "recorded traces only" in element("offline-note").text
    assert element("status").text == "1 trace loaded"

    # the trace opens at its last step (the finished answer), and the scrubber goes back from there
    last = len(trace.steps) - 1
    assert element("step-label").text == f"step {last} of {last}"
    assert element("canvas").text == _replayed_text(trace, last) and MASK not in element("canvas").text
    scrubber = element("scrubber")
    scrubber.send_keys(Keys.HOME)
    assert element("step-label").text == f"step 0 of {last}"
    assert element("canvas").text == _replayed_text(trace, 0) != _replayed_text(trace, last)
    scrubber.send_keys(Keys.END)
    assert element("canvas").text == _replayed_text(trace, last) and MASK not in element("canvas").text
    target = random.Random(seed).randrange(1, last)
    scrubber.send_keys(Keys.HOME, *[Keys.ARROW_RIGHT] * target)
    assert element("step-label").text == f"step {target} of {last}"
    assert element("canvas").text == _replayed_text(trace, target)
    assert element("canvas").text.count(MASK) == trace.params.gen_length - sum(
        len(s.commits) for s in trace.steps[: target + 1])
    info = element("step-info").text
    step = trace.steps[target]
    assert ("full recompute" if step.full else "partial") in info and step.decision.reason in info

    commit = step.commits[0]
    token = browser.find_element(By.CSS_SELECTOR, f"#canvas .tok[data-position='{commit.position}']")
    assert "new" in token.get_attribute("class").split()
    ActionChains(browser).move_to_element(token).perform()
    tip = element("tooltip").text
    assert f"committed at step {target}" in tip and f"{100 * commit.confidence:.2f}%" in tip
    assert all(f"{100 * a.prob:.2f}%" in tip for a in commit.alternatives)

    bars = browser.find_elements(By.CSS_SELECTOR, "#timeline rect.bar")
    assert [("full" in b.get_attribute("class")) for b in bars] == [s.full for s in trace.steps]


def test_compare_mode_highlights_the_first_difference(browser, sudoku, tmp_path, seed):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    llm, task = sudoku
    problems = task.held_out(60)
    random.Random(seed).shuffle(problems)
    base = SamplingParams(gen_length=24, trace=True)
    exact, cached = "none", base.replace(cache_policy="entropy", cache_config={"tau": 1e9, "k": 0})
    for problem in problems:  # a never-refreshing cache goes wrong on most puzzles; find one
        a, b = (o.trace for o in llm.chat([_chat(problem.question)] * 2, [base.replace(cache_policy=exact), cached],
                                          use_tqdm=False))
        divergence = _first_divergence(a, b)
        if divergence is not None:
            break
    assert divergence is not None, "no puzzle where a never-refreshing cache changes the decoding"
    element = _open(browser, tmp_path, [a])  # B comes through the page's file input, as a whole output
    (tmp_path / "b.json").write_bytes(msgspec.json.encode({"trace": b}))
    element("file").send_keys(str(tmp_path / "b.json"))
    WebDriverWait(browser, 10).until(lambda _: element("status").text == "2 traces loaded")
    browser.find_element(By.CSS_SELECTOR, "header button[data-view=compare]").click()
    last = max(len(a.steps), len(b.steps)) - 1  # the pair opens at its last step: both answers
    assert element("compare-scrubber").get_attribute("value") == str(last)
    assert element("compare-label").text == f"step {last}"

    note = element("first-divergence")
    assert note.get_attribute("data-step") == str(divergence) and "found" in note.get_attribute("class")
    assert f"first difference after step {divergence}" in note.text
    assert a.steps[divergence].decision.reason in note.text and b.steps[divergence].decision.reason in note.text
    element("jump-divergence").click()
    assert element("compare-scrubber").get_attribute("value") == str(divergence)
    x, y = _canvases(a)[divergence], _canvases(b)[divergence]
    differing = {len(a.prompt_token_ids) + g for g in range(len(x)) if x[g] != y[g]}
    for canvas in ("canvas-a", "canvas-b"):
        marked = browser.find_elements(By.CSS_SELECTOR, f"#{canvas} .tok.diff")
        assert {int(t.get_attribute("data-position")) for t in marked} == differing
    if divergence > 0:
        element("compare-scrubber").send_keys("\ue012")  # one step back: identical canvases, nothing marked
        assert not browser.find_elements(By.CSS_SELECTOR, ".tok.diff")
    assert browser.find_elements(By.ID, "divergence-marker")


def test_tree_mode_merges_samples_filters_and_exports_marks(browser, sudoku, tmp_path, seed):
    from selenium.webdriver.common.by import By

    llm, _ = sudoku
    rng = random.Random(seed)
    puzzle = "/".join("".join(rng.choice("1234") if rng.random() < 0.1 else "." for _ in range(4)) for _ in range(4))
    params = [SamplingParams(gen_length=24, temperature=1.5, seed=rng.randrange(10**6), trace=True) for _ in range(10)]
    traces = [o.trace for o in llm.chat([_chat(f"Complete the sudoku {puzzle}")] * 10, params, use_tqdm=False)]
    texts = {}
    for trace in traces:
        by_position = {c.position: c.text for s in trace.steps for c in s.commits}
        texts[tuple(_answer(trace))] = "".join(by_position[len(trace.prompt_token_ids) + g]
                                               for g in range(len(_answer(trace))))
    element = _open(browser, tmp_path, traces)
    browser.find_element(By.CSS_SELECTOR, "header button[data-view=tree]").click()
    (group,) = [o.text for o in element("tree-prompt").find_elements(By.TAG_NAME, "option")]
    # labelled by the question, without the chat template's role markers
    assert group.startswith(f"Complete the sudoku {puzzle} \u00b7 ") and group.endswith(" (10 samples)")
    assert "user" not in group and "assistant" not in group

    def paths():
        """Each leaf's phrases joined from the root: the answers the tree shows."""
        return browser.execute_script("""
            return [...document.querySelectorAll('#tree .tnode')].filter((n) => !n.querySelector('.tchildren'))
              .map((leaf) => { const parts = []; for (let n = leaf; n && n.id !== 'tree'; n = n.parentElement)
                if (n.classList.contains('tnode')) parts.unshift(n.querySelector(':scope > .tlabel .phrase').textContent);
                return parts.slice(1).join(''); });""")

    def set_filter(min_prob, max_branches):
        for field, value in (("min-prob", min_prob), ("max-branches", max_branches)):
            browser.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                                   element(field), str(value))

    set_filter(0, 20)
    assert sorted(paths()) == sorted(texts.values())
    assert element("tree-summary").text == "10 responses · 0% evaluated"
    single = browser.execute_script("""return [...document.querySelectorAll('#tree .tchildren')]
        .filter((c) => c.children.length === 1 && !c.previousElementSibling.querySelector('.hidden-branches')
                       && c.parentElement.parentElement.id !== 'tree').length""")
    assert single == 0, "single-child runs are collapsed into one phrase"

    # One branch a node: from the root down, the child most samples took (on a tie, the one met first), which
    # need not be the most frequent answer overall.
    answers = [tuple(_answer(trace)) for trace in traces]
    group, depth = list(range(len(answers))), 0
    while len({answers[i] for i in group}) > 1:
        children: dict[int | None, list[int]] = {}
        for i in group:  # in sample order: the first child met is the first the page created
            children.setdefault(answers[i][depth] if depth < len(answers[i]) else None, []).append(i)
        group, depth = max(children.values(), key=len), depth + 1
    set_filter(0, 1)
    (only,) = paths()
    assert only == texts[answers[group[0]]]

    set_filter(0, 20)
    # bad on the first branch under the root, good on the last answer below it (overriding the inherited bad)
    first = browser.find_element(By.CSS_SELECTOR, "#tree > .tnode > .tchildren > .tnode > .tlabel")
    prefix = first.find_element(By.CSS_SELECTOR, ".phrase").text
    first.find_element(By.CSS_SELECTOR, ".mark-bad").click()
    leaves = [p for p in paths() if p.startswith(prefix)]
    good = leaves[-1]
    leaf_labels = browser.find_elements(By.CSS_SELECTOR, "#tree .tnode:not(:has(.tchildren)) > .tlabel")
    leaf_labels[paths().index(good)].find_element(By.CSS_SELECTOR, ".mark-good").click()
    assert "inherited" in browser.find_elements(By.CSS_SELECTOR, "#tree .tnode:not(:has(.tchildren)) > .tlabel")[
        paths().index(leaves[0])].get_attribute("class").split() or len(leaves) == 1
    element("tree-export-btn").click()
    exported = msgspec.json.decode(element("tree-export").get_attribute("value"))
    assert exported["samples"] == 10 and exported["max_branches"] == 20
    # a branch that is one answer is its own leaf: marking it good replaces its bad mark
    assert sorted(m["mark"] for m in exported["marks"]) == (["bad", "good"] if len(leaves) > 1 else ["good"])
    for output in exported["outputs"]:
        expected = "good" if output["answer"] == good else "bad" if output["answer"].startswith(prefix) else None
        assert output["mark"] == expected, output
    marked = sum(o["mark"] is not None for o in exported["outputs"])
    assert exported["evaluated"] == marked / 10
    assert element("tree-summary").text == f"10 responses · {round(100 * marked / 10)}% evaluated"


def _serving(app):
    """The app on a real port (uvicorn in a thread), so the page's Run buttons reach it over HTTP."""
    import socket
    import threading
    import time

    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def live_server(chat_folders):
    """A tiny LLaDA served with gen_length 16 and block_length 8 by default."""
    engine = LLMEngine(chat_folders["llada"], dtype="float32", kv_cache_memory=1 << 22, block_size=8)
    yield from _serving(create_app(OpenAIServer(AsyncLLMEngine(engine), "tiny",
                                                SamplingParams(gen_length=16, block_length=8))))


@pytest.fixture(scope="module")
def sudoku_server():
    """The default model as `dengine serve` serves it (its task's lengths as the defaults), in float32."""
    from dengine.assets import resolve_model
    from dengine.tasks import generation_lengths, task_of_folder

    folder = resolve_model("llada-sudoku")
    gen_length, block_length = generation_lengths(task_of_folder(folder))
    engine = LLMEngine(folder, dtype="float32", cache_policy="entropy")
    yield from _serving(create_app(OpenAIServer(AsyncLLMEngine(engine), "llada-sudoku",
                                                SamplingParams(gen_length=gen_length, block_length=block_length))))


def _finished(browser, count: int, timeout: float = 30) -> None:
    """Wait until the run just started ends; fail on its error, else expect count traces on the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    status, error = browser.find_element(By.ID, "status"), browser.find_element(By.ID, "run-error")
    running = browser.find_element(By.ID, "run-status")
    WebDriverWait(browser, timeout).until(lambda _: running.get_attribute("textContent") == "")
    assert not error.is_displayed(), error.text
    assert status.text == f"{count} trace{'' if count == 1 else 's'} loaded"


ERROR_RED = "rgba(183, 28, 28, 1)"


def test_the_served_page_runs_prompts_on_its_server(browser, live_server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{live_server}/explore")
    assert browser.get_log("browser") == []
    element = lambda element_id: browser.find_element(By.ID, element_id)  # noqa: E731
    status, run_error = element("status"), element("run-error")
    # the first screen: the Run form, and a hint of what to do instead of empty views
    assert element("run-panel").is_displayed() and element("run-compare").is_enabled()
    assert not element("offline-note").is_displayed() and status.text == ""
    hint = element("empty-hint")
    assert hint.is_displayed() and "Type a prompt above and press Run" in hint.text
    assert not element("view-step").is_displayed()

    prompt = element("run-prompt")
    prompt.clear()
    prompt.send_keys("Add: a1 b2")
    element("run-config-b").send_keys('{"tau": 1e9, "k": 0}')
    element("run-compare").click()
    _finished(browser, 2)
    assert not hint.is_displayed() and "active" in element("view-compare").get_attribute("class")
    labels = [o.text for o in element("compare-a").find_elements(By.TAG_NAME, "option")]
    assert "tiny" not in labels[0] and " none " in labels[0] and ' entropy {"tau":1000000000,"k":0} ' in labels[1]
    assert labels[0].startswith("Add: a1 b2 \u00b7 ") and len(set(labels)) == 2
    assert element("first-divergence").text
    scrubber = element("compare-scrubber")
    assert scrubber.get_attribute("value") == scrubber.get_attribute("max") != "0"

    element("run-samples").clear()
    element("run-samples").send_keys("4")
    element("run-tree").click()
    _finished(browser, 6)
    assert "active" in element("view-tree").get_attribute("class")
    assert element("tree-summary").text == "4 responses · 0% evaluated"

    # an error shows right under the Run form, red, as an alert, and names what is wrong
    element("run-config-a").send_keys("{not json")
    element("run-one").click()
    WebDriverWait(browser, 10).until(lambda _: run_error.is_displayed())
    assert run_error.get_attribute("role") == "alert" and run_error.value_of_css_property("color") == ERROR_RED
    assert run_error.text.startswith("Run failed: cache_config A is not JSON")
    assert browser.execute_script("return arguments[0].contains(arguments[1])", element("run-panel"), run_error)
    button, box = element("run-one").rect, run_error.rect
    assert 0 <= box["y"] - (button["y"] + button["height"]) < 40, (button, box)
    assert status.text == "6 traces loaded"
    element("run-config-a").clear()
    element("run-block-length").send_keys("5")  # does not divide the server's gen_length 16: the server refuses
    element("run-one").click()
    WebDriverWait(browser, 30).until(lambda _: "the server refused it" in run_error.text)
    assert "block_length" in run_error.text and run_error.is_displayed()
    refused = browser.get_log("browser")  # the browser logs the 400; nothing else went wrong
    assert len(refused) == 1 and "status of 400" in refused[0]["message"], refused

    # the next successful run clears it, and opens its trace at the last step
    element("run-block-length").clear()
    element("run-one").click()
    _finished(browser, 7)
    assert not run_error.is_displayed() and run_error.text == ""
    last = int(element("scrubber").get_attribute("max"))
    # the final canvas: every position decoded, except those after the answer's EOS when the server stopped there
    answer = element("canvas").text.split("<|endoftext|>")[0]
    assert element("step-label").text == f"step {last} of {last}" and MASK not in answer


def test_every_parameter_box_shows_the_default_the_page_uses(browser, live_server):
    from selenium.webdriver.common.by import By

    browser.get(f"{live_server}/explore")
    element = lambda element_id: browser.find_element(By.ID, element_id)  # noqa: E731
    boxes = browser.find_elements(By.CSS_SELECTOR, "#run-panel input:not([type=checkbox]), #view-tree input")

    def defaults() -> dict[str, str]:
        """Each box's default as its label names it; every box names one and shows one as its placeholder."""
        named = {}
        for box in boxes:
            label = box.find_element(By.XPATH, "./ancestor::label").get_attribute("textContent")
            found = re.search(r"\(default ([^)]+)\)", label)
            assert found and box.get_attribute("placeholder"), label
            named[box.get_attribute("id")] = found.group(1)
        return named

    before = defaults()
    assert len(before) == 12
    assert before["run-gen-length"] == before["run-block-length"] == "from the server"
    assert before["run-threshold"] == "off" and before["run-config-a"].startswith("{}")
    for box in ("run-temperature", "run-seed", "run-samples", "run-tree-temperature", "min-prob", "max-branches"):
        assert element(box).get_attribute("value") == before[box] == element(box).get_attribute("placeholder")
    assert float(before["run-tree-temperature"]) > 0 and int(before["run-samples"]) > 1

    # blank boxes send what their labels name; a run reads the server's own defaults back
    element("run-temperature").clear()
    element("run-seed").clear()
    element("run-one").click()
    _finished(browser, 1)
    (label,) = [o.text for o in element("step-trace").find_elements(By.TAG_NAME, "option")]
    assert f" · T {before['run-temperature']} · seed {before['run-seed']} · " in label
    after = defaults()
    assert after["run-gen-length"] == "16" and after["run-block-length"] == "8"  # live_server's
    assert after["run-steps"].startswith("16") and after["run-threshold"] == "off"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#canvas .tok")) == 16

    element("run-samples").clear()
    element("run-tree-temperature").clear()
    element("run-tree").click()
    _finished(browser, 1 + int(before["run-samples"]))
    assert element("tree-summary").text == f"{before['run-samples']} responses · 0% evaluated"
    group = element("tree-prompt").find_element(By.CSS_SELECTOR, "option:checked").text
    assert f" · T {before['run-tree-temperature']} (" in group


def test_the_default_tree_branches_on_the_default_model(browser, sudoku_server):
    from selenium.webdriver.common.by import By

    browser.get(f"{sudoku_server}/explore")
    element = lambda element_id: browser.find_element(By.ID, element_id)  # noqa: E731
    element("run-tree").click()  # the prompt and settings as the page pre-fills them
    samples = int(element("run-samples").get_attribute("value"))
    _finished(browser, samples, timeout=180)
    assert element("tree-summary").text == f"{samples} responses · 0% evaluated"
    element("tree-export-btn").click()
    outputs = msgspec.json.decode(element("tree-export").get_attribute("value"))["outputs"]
    assert sorted(o["seed"] for o in outputs) == list(range(samples))
    assert len({o["answer"] for o in outputs}) >= 3, "the samples should diverge into several answers"
    assert len(browser.find_elements(By.CSS_SELECTOR, "#tree .tnode:not(:has(.tchildren))")) >= 2


def test_the_offline_page_explains_itself_and_shows_load_errors_by_the_file_input(browser, sudoku, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    element = _open(browser, tmp_path, [])  # a page written from a file holding no trace
    hint = element("empty-hint")
    assert hint.is_displayed() and "dengine explore TRACE.json -o page.html" in hint.text
    assert '"trace": true' in hint.text and not element("view-step").is_displayed()
    assert not element("run-panel").is_displayed() and element("offline-note").is_displayed()
    assert "recorded traces only" in element("offline-note").text and element("status").text == ""

    error, file_input = element("load-error"), element("file")
    for name, text, problem in (("bad.json", '{"choices": []}', "bad.json: no trace here"),
                                ("broken.json", "{not json", "broken.json: not JSON")):
        (tmp_path / name).write_text(text)
        file_input.send_keys(str(tmp_path / name))
        WebDriverWait(browser, 10).until(lambda _, problem=problem: problem in error.text)
        assert error.is_displayed() and error.get_attribute("role") == "alert"
        assert error.value_of_css_property("color") == ERROR_RED
        box, field = error.rect, file_input.rect
        assert 0 <= box["y"] - (field["y"] + field["height"]) < 40, (field, box)  # right under the file input
        assert box["x"] < field["x"] + field["width"] and field["x"] < box["x"] + box["width"]
        assert hint.is_displayed()

    llm, _ = sudoku
    trace = llm.generate(["Complete the sudoku 1..."], SamplingParams(gen_length=8, trace=True), use_tqdm=False)[0]
    (tmp_path / "good.json").write_bytes(msgspec.json.encode(trace))
    file_input.send_keys(str(tmp_path / "good.json"))
    WebDriverWait(browser, 10).until(lambda _: element("status").text == "1 trace loaded")
    assert not error.is_displayed() and not hint.is_displayed()
    last = len(trace.trace.steps) - 1
    assert element("step-label").text == f"step {last} of {last}"
    assert element("canvas").text == _replayed_text(trace.trace, last)


def test_labels_name_the_question_tell_traces_apart_and_count_in_the_singular(browser, sudoku, chat_folders,
                                                                             tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    llm, task = sudoku
    question = task.held_out(1)[0].question
    params = SamplingParams(gen_length=24, seed=0, trace=True)
    same, other, again = (o.trace for o in llm.chat(
        [_chat(question)] * 3, [params.replace(cache_policy=p) for p in ("none", "entropy", "none")], use_tqdm=False))
    raw = llm.generate([question], params.replace(gen_length=8), use_tqdm=False)[0].trace
    one = llm.chat([_chat(question)], params.replace(gen_length=1), use_tqdm=False)[0].trace
    assert len(one.steps) == 1
    dream = LLM(chat_folders["dream"], dtype="float32", kv_cache_memory=1 << 22, block_size=8)
    qwen = dream.chat([_chat("Hi there, reverse 42")], params.replace(gen_length=8), use_tqdm=False)[0].trace
    assert qwen.prompt_tokens[0] == "<|im_start|>", "a chat template with a system turn"
    element = _open(browser, tmp_path, [same, other, again, raw, one, qwen])
    assert element("status").text == "6 traces loaded"

    labels = [o.text for o in element("step-trace").find_elements(By.TAG_NAME, "option")]
    assert len(set(labels)) == 6, labels
    for label in labels:
        assert "user" not in label and "assistant" not in label and "<|" not in label and "system" not in label
    assert all(label.startswith(f"{question} \u00b7 ") for label in labels[:5])
    assert labels[5].startswith("Hi there, reverse 42 \u00b7 ")
    assert " none " in labels[0] and " entropy " in labels[1]
    assert labels[0].endswith(" #1") and labels[2] == labels[0][: -len("#1")] + "#2"  # the same request twice
    assert " \u00b7 1 step \u00b7 " in labels[4] and not any("1 steps" in label for label in labels)

    Select(element("step-trace")).select_by_index(4)
    assert ", 1 full" in element("step-summary").text and " 1 step, " in element("step-summary").text
    assert element("step-label").text == "step 0 of 0"

    browser.find_element(By.CSS_SELECTOR, "header button[data-view=tree]").click()
    groups = [o.text for o in element("tree-prompt").find_elements(By.TAG_NAME, "option")]
    assert len(groups) == 5 and len(set(groups)) == 5, groups
    assert groups[0].endswith(" (2 samples)") and all(g.endswith(" (1 sample)") for g in groups[1:])
    assert not any("user" in g or "assistant" in g or "system" in g for g in groups)
    Select(element("tree-prompt")).select_by_index(1)
    assert element("tree-summary").text == "1 response · 0% evaluated"
    root = browser.find_element(By.CSS_SELECTOR, "#tree > .tnode > .tlabel .prob")
    assert root.text == "1 sample"
