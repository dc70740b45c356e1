"""Run the scratch notebook in JupyterLab (headless Debian chromium, driven by playwright), change two
controls of the explorer and screenshot its cell to the path in argv[1]."""
import sys
import time

from playwright.sync_api import sync_playwright

URL = "http://127.0.0.1:8899/lab/tree/explorer_shot.ipynb"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]
IDLE = ".jp-Notebook-ExecutionIndicator[data-status='idle']"

with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=FLAGS)
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, device_scale_factor=1)
    page.goto(URL)
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    page.add_style_tag(content=".Toastify, .jp-cell-toolbar { display: none !important; }")
    page.wait_for_selector(IDLE, timeout=120_000)
    page.locator(".jp-Notebook").first.click()
    page.get_by_role("menuitem", name="Run", exact=True).click(timeout=10_000)  # by role: "text=Run" can miss
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click(timeout=10_000)
    page.wait_for_selector(".jp-OutputArea-output .widget-vbox .jp-OutputArea-output img", timeout=300_000)
    page.wait_for_selector(IDLE, timeout=300_000)
    widget = page.locator(".jp-OutputArea-output:has(.widget-vbox)").last
    first = widget.locator(".widget-output img").first.get_attribute("src")
    widget.locator(".widget-dropdown:has(label:text-is('method')) select").select_option("integrated_gradients")
    page.wait_for_function("(src) => { const i = [...document.querySelectorAll('.widget-vbox .widget-output img')].pop();"
                           " return i && i.src !== src; }", arg=first, timeout=300_000)
    readout = widget.locator(".widget-readout").first
    readout.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("3")
    page.keyboard.press("Enter")
    time.sleep(1)
    page.wait_for_selector(IDLE, timeout=300_000)
    page.evaluate("document.activeElement && document.activeElement.blur()")
    time.sleep(3)
    page.locator(".jp-Notebook .jp-CodeCell").last.screenshot(path=sys.argv[1])
    browser.close()
