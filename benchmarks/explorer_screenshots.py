"""The screenshots of docs/explorer.md: traces from the embedded models, each explorer mode in headless chromium.

    python benchmarks/explorer_screenshots.py --out docs/explorer

Writes one PNG per view (the traces and offline pages go to a temporary folder). Needs chromium,
chromium-driver and selenium.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import msgspec
from selenium import webdriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from dengine import LLM, SamplingParams
from dengine.explore import render_page

SUDOKU = "Complete the sudoku .23./...2/.4../.3.."  # one where a never-refreshing cache goes wrong
OPEN_SUDOKU = "Complete the sudoku 1.../..../..../...."  # many valid completions: samples branch


def traces(model: str) -> dict[str, list]:
    """The traces each view shows, decoded by one embedded model."""
    llm = LLM(model, dtype="float32")
    base = SamplingParams(gen_length=24, trace=True)

    def chat(question, params):
        return [o.trace for o in llm.chat([[{"role": "user", "content": question}]] * len(params), params,
                                          use_tqdm=False)]

    never = {"tau": 1e9, "k": 0}
    return {
        "steps": chat(SUDOKU, [base.replace(cache_policy="entropy")]),
        "compare": chat(SUDOKU, [base.replace(cache_policy="none"),
                                 base.replace(cache_policy="entropy", cache_config=never)]),
        "tree": chat(OPEN_SUDOKU, [base.replace(temperature=1.5, seed=seed) for seed in range(16)]),
        "d2cache": chat(SUDOKU, [base.replace(cache_policy="d2cache")]),
    }


def shoot(driver, page: Path, view: str, png: Path, prepare=None) -> None:
    driver.get(page.resolve().as_uri())
    if view != "step":
        driver.find_element(By.CSS_SELECTOR, f"header button[data-view={view}]").click()
    if prepare:
        prepare(driver)
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": 1200, "height": height, "deviceScaleFactor": 1, "mobile": False})
    driver.save_screenshot(str(png))
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    print(f"wrote {png}")


def hover_step(driver) -> None:
    scrubber = driver.find_element(By.ID, "scrubber")
    driver.execute_script("arguments[0].value = 9; arguments[0].dispatchEvent(new Event('input'))", scrubber)
    ActionChains(driver).move_to_element(driver.find_element(By.CSS_SELECTOR, "#canvas .tok.new")).perform()


def jump(driver) -> None:
    driver.find_element(By.ID, "jump-divergence").click()


def mark(driver) -> None:
    labels = driver.find_elements(By.CSS_SELECTOR, "#tree .tchildren .tlabel")
    labels[1].find_element(By.CSS_SELECTOR, ".mark-bad").click()
    driver.find_elements(By.CSS_SELECTOR, "#tree .tchildren .tlabel")[-1].find_element(
        By.CSS_SELECTOR, ".mark-good").click()
    driver.find_element(By.ID, "tree-export-btn").click()


def served_compare(driver, png: Path) -> None:
    """The page as `dengine serve` serves it (here uvicorn in a thread, without Ray), after Run A and B."""
    import socket
    import threading

    import uvicorn
    from selenium.webdriver.support.ui import WebDriverWait

    from dengine.async_engine import AsyncLLMEngine
    from dengine.serve.server import OpenAIServer, create_app

    engine = AsyncLLMEngine.from_model("llada-sudoku", dtype="float32", cache_policy="entropy")
    app = create_app(OpenAIServer(engine, "llada-sudoku", SamplingParams(gen_length=24)))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True).start()
    WebDriverWait(driver, 60).until(lambda _: server.started)
    driver.get(f"http://127.0.0.1:{sock.getsockname()[1]}/explore")
    prompt = driver.find_element(By.ID, "run-prompt")
    prompt.clear()
    prompt.send_keys(SUDOKU)
    driver.find_element(By.ID, "run-config-b").send_keys('{"tau": 1e9, "k": 0}')
    driver.find_element(By.ID, "run-compare").click()
    WebDriverWait(driver, 60).until(lambda _: "loaded" in driver.find_element(By.ID, "status").text)
    jump(driver)
    driver.save_screenshot(str(png))
    print(f"wrote {png}")
    server.should_exit = True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/explorer"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900"):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))
    pages = Path(tempfile.mkdtemp(prefix="dengine-explorer-"))
    try:
        for model in ("llada-sudoku", "dream-sudoku"):
            for name, found in traces(model).items():
                page = pages / f"{model}-{name}.html"
                (pages / f"{model}-{name}.json").write_bytes(msgspec.json.encode(found))
                page.write_text(render_page(found), encoding="utf-8")
                view, prepare = {"steps": ("step", hover_step), "compare": ("compare", jump),
                                 "tree": ("tree", mark), "d2cache": ("step", hover_step)}[name]
                shoot(driver, page, view, args.out / f"{model}-{name}.png", prepare)
        served_compare(driver, args.out / "served-compare.png")
    finally:
        driver.quit()


if __name__ == "__main__":
    main()
