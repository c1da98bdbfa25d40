"""The web console (`/ui`): its data endpoints, the metric series, the run-folder reader, and the pages in a real
headless Chromium (Debian's `chromium` + `chromium-driver`, driven by Selenium).

The gateway runs under a real uvicorn on 127.0.0.1 in front of the mock upstream; the run folders are written by a
real `reasonlite run` (tiny random student, scripted teacher on 127.0.0.1), the tune study by Optuna itself.
Browser tests save screenshots under tests/artifacts/console/ and fail on any error in the browser's console log.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from gateway_helpers import serve, serve_gateway, upstream_model

from reasonlite.config import build_config
from reasonlite.data.retail_math import retail_math_splits
from reasonlite.pipeline import run_pipeline
from slm_fusion.app import create_app
from slm_fusion.backends.mock_upstream import ANSWER, MockUpstream
from slm_fusion.config import FusionConfig, load_fusion_config
from slm_fusion.metrics import LATENCY_BUCKETS, GatewayMetrics, MetricSeries, _quantile
from slm_fusion.routing.evaluate import cascade_curve, write_report
from slm_fusion.ui import runs

sys.path.insert(0, str(Path(__file__).parent))
from teacher_server import ServerState, ThreadedServer

KEY = "console-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
ARTIFACTS = Path(__file__).parent / "artifacts" / "console"


# ------------------------------------------------------------------------------------------------ the metric series


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_series_are_rates_and_histogram_quantiles_of_the_registry_between_two_snapshots():
    metrics, clock = GatewayMetrics(), Clock()
    series = MetricSeries(metrics, interval_s=2.0, points=10, clock=clock)
    assert series.read() == {}  # the first read only takes the baseline
    for seconds in (0.02, 0.02, 0.02, 0.2):
        metrics.observe_request("m", "/v1/chat/completions", 200, seconds)
    metrics.observe_tokens("m", 10, 50)
    metrics.observe_request("", "other", 200, 0.001)  # a page or /health: no model, not a series
    clock.now += 1.0
    assert series.read() == {}, "a read within interval_s takes no new point"
    clock.now += 1.0
    (point,) = series.read()["m"]
    assert point["t"] == 1002.0
    assert point["requests_per_s"] == pytest.approx(4 / 2.0)
    assert point["tokens_per_s"] == pytest.approx(50 / 2.0)
    # 3 of 4 requests in (0.01, 0.025], one in (0.1, 0.25]: rank 2 is 2/3 into the first, rank 3.8 is 0.8 into the second
    assert point["p50_ms"] == pytest.approx(10 + 15 * 2 / 3)
    assert point["p95_ms"] == pytest.approx(100 + 150 * 0.8)
    clock.now += 2.0
    quiet = series.read()["m"][-1]
    assert quiet["requests_per_s"] == 0 and quiet["p50_ms"] is None and quiet["p95_ms"] is None


def test_series_keep_a_bounded_number_of_points():
    metrics, clock = GatewayMetrics(), Clock()
    series = MetricSeries(metrics, interval_s=1.0, points=3, clock=clock)
    for _ in range(10):
        metrics.observe_request("m", "/v1/completions", 200, 0.05)
        series.read()
        clock.now += 1.0
    assert len(series.read()["m"]) == 3


def test_quantile_past_the_last_bucket_is_the_last_finite_bound():
    counts = [0.0] * len(LATENCY_BUCKETS) + [2.0]  # both observations above 300 s
    assert _quantile(0.5, counts) == 1000 * LATENCY_BUCKETS[-1]
    assert _quantile(0.5, [0.0] * (len(LATENCY_BUCKETS) + 1)) is None


# ------------------------------------------------------------------------------------------------ run folders


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory) -> Path:
    """Two real `reasonlite run` folders (the second changes only the learning rate), a run still training (only a
    checkpoint's trainer_state.json), a run with nothing but its config, and an Optuna study of `reasonlite tune`'s
    shape (`runs_dir/tune-<study>/study.db`, the objectives named)."""
    import optuna

    root = tmp_path_factory.mktemp("console-runs")
    splits = retail_math_splits(8, 3, seed=0, n_test_heldout=2)
    script = {e.question: [f"```python\n{e.program}\n```"] for e in splits["train"]}

    def config(name: str, **train) -> object:
        return build_config({
            "name": name, "runs_dir": str(root),
            "data": {"source": "retail_math", "n_train": 8, "n_test": 3, "n_test_heldout_templates": 2},
            "teacher": {"kind": "openai", "base_url": server.base_url, "model": "teacher-1", "temperature": 0.0},
            "student": {"model": "tiny-random-llama", "format": "pal", "lora_r": 4},
            "train": {"max_steps": 2, "batch_size": 4, "max_length": 256, "save_steps": 100, **train},
            "eval": {"splits": ["test"], "max_new_tokens": 12, "batch_size": 4, "budgets": [8]},
        })

    with ThreadedServer(ServerState(script=script)) as server:
        run_pipeline(config("baseline"))
        run_pipeline(config("higher-lr", learning_rate=5e-4))
    training = root / "in-training"
    state = next((root / "baseline" / "train" / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    (training / "train" / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    shutil.copy(state, training / "train" / "checkpoints" / "checkpoint-2" / "trainer_state.json")
    shutil.copy(root / "baseline" / "config.yaml", training / "config.yaml")
    (root / "bare").mkdir()
    (root / "bare" / "config.yaml").write_text("name: bare\ntune: {study_name: nothing-here}\n")
    # A fixed age per run (newest first: bare, in-training, higher-lr, baseline): files written within one clock tick
    # would otherwise tie, and the listing order, and so which run each page column shows, would follow the disk.
    now = time.time()
    for age, name in enumerate(("bare", "in-training", "higher-lr", "baseline")):
        os.utime(root / name / "config.yaml", (now - 60 * age, now - 60 * age))

    (root / "tune-reasonlite").mkdir()
    study = optuna.create_study(study_name="reasonlite", directions=["maximize", "minimize"],
                                storage=f"sqlite:///{root / 'tune-reasonlite' / 'study.db'}")
    study.set_metric_names(["accuracy", "mean_tokens"])
    dist = {"train.learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)}
    for lr, values in ((1e-4, (0.5, 40.0)), (3e-4, (0.6, 60.0)), (5e-4, (0.4, 70.0)), (2e-5, (0.3, 20.0))):
        study.add_trial(optuna.trial.create_trial(params={"train.learning_rate": lr}, distributions=dist,
                                                  values=list(values)))
    return root


def test_a_finished_run_reads_as_reasonlite_wrote_it(runs_dir):
    folder = runs.run_folder(runs_dir, "baseline")
    run = runs.read_run(runs_dir, folder)
    metrics = json.loads((folder / "train" / "metrics.json").read_text())
    summary = json.loads((folder / "eval" / "summary.json").read_text())
    assert run["config"] == (folder / "config.yaml").read_text()
    assert run["stages"] == json.loads((folder / "pipeline.json").read_text())["stages"]
    assert run["loss"] == [{"step": h["step"], "loss": h["loss"]} for h in metrics["loss_history"]]
    assert run["loss_source"] == "train/metrics.json"
    assert run["train"]["steps"] == metrics["steps"] == 2
    assert [(r["split"], r["target"], r["accuracy"]) for r in run["eval"]] == [
        (split, target, m["accuracy"]) for split, per in summary["splits"].items() for target, m in per.items()]
    (student,) = [s for s in run["accuracy_vs_tokens"] if s["name"] == "student-test"]
    result = json.loads((folder / "eval" / "student-test" / "result.json").read_text())
    assert [p["budget"] for p in student["points"]] == [p["budget"] for p in result["points"]]
    assert len(student["points"]) == 2  # the run's own budget and eval.budgets' 8
    assert run["problems"] == []


def test_the_tune_front_is_optunas_and_missing_parts_are_not_present(runs_dir):
    tune = runs.read_run(runs_dir, runs_dir / "baseline")["tune"]
    assert tune["objectives"] == ["accuracy", "mean_tokens"] and tune["directions"] == ["maximize", "minimize"]
    front = {t["params"]["train.learning_rate"] for t in tune["trials"] if t["pareto"]}
    assert front == {1e-4, 3e-4, 2e-5}  # 5e-4 (0.4 at 70 tokens) is dominated by 1e-4 (0.5 at 40)

    training = runs.read_run(runs_dir, runs_dir / "in-training")
    assert training["loss_source"] == "train/checkpoints/checkpoint-2/trainer_state.json"
    assert training["loss"] and training["eval"] is None and training["train"] is None

    bare = runs.read_run(runs_dir, runs_dir / "bare")
    assert {k: bare[k] for k in ("stages", "train", "loss", "eval", "accuracy_vs_tokens", "tune")} == dict.fromkeys(
        ("stages", "train", "loss", "eval", "accuracy_vs_tokens", "tune"))
    assert [r["name"] for r in runs.list_runs(runs_dir)][-1] == "baseline"  # newest first; tune-* is no run
    assert runs.run_folder(runs_dir, "..") is None and runs.run_folder(runs_dir, "tune-reasonlite") is None


def test_a_file_that_does_not_parse_is_a_problem_not_an_error(tmp_path):
    (tmp_path / "broken" / "eval").mkdir(parents=True)
    (tmp_path / "broken" / "config.yaml").write_text("name: broken\n")
    (tmp_path / "broken" / "eval" / "summary.json").write_text("{not json")
    run = runs.read_run(tmp_path, tmp_path / "broken")
    assert run["eval"] is None and run["problems"] and "summary.json does not parse" in run["problems"][0]


# ------------------------------------------------------------------------------------------------ the gateway


@pytest.fixture(scope="module")
def route_eval_dir(tmp_path_factory) -> Path:
    """`route_eval.json` as `slm-fusion route-eval` writes it, from a replayed cascade curve."""
    out = tmp_path_factory.mktemp("route-eval")
    outcomes = [{"small_answer": "1", "agreement": a, "exec_error": False, "no_answer": False,
                 "small_correct": sc, "big_correct": 1} for a, sc in ((1.0, 1), (0.4, 0), (0.7, 1), (0.3, 0))]
    write_report({"routers": [], "cascades": [{"name": "cheap-first", "small": "a", "big": "b", "n": 4,
                                               "curve": cascade_curve(outcomes), "outcomes": outcomes}]}, out)
    return out


@pytest.fixture(scope="module")
def gateway(runs_dir, route_eval_dir):
    with serve(MockUpstream()) as upstream:
        config = {
            "server": {"api_keys": [KEY], "access_log": False},
            "models": [upstream_model("mock-a", upstream.url), upstream_model("mock-b", upstream.url, replicas=2),
                       upstream_model("broken", upstream.url, "fail-500")],
            "routers": {"by-topic": {"type": "rules", "default": "mock-a",
                                     "rules": [{"model": "mock-b", "keywords": ["poem"]}]}},
            "virtual_models": {"auto": {"router": "by-topic"}},
            "routing": {"fallbacks": {"broken": ["mock-a"]}},
            "ui": {"runs_dir": str(runs_dir), "route_eval_dir": str(route_eval_dir), "sample_interval_s": 0.5,
                   "recent_routes": 50},
        }
        with serve_gateway(config) as served:
            yield served


def test_pages_are_public_and_data_needs_the_api_key(gateway):
    with httpx.Client(base_url=gateway.url) as http:
        for page in ("/ui/models", "/ui/playground", "/ui/routing", "/ui/runs", "/ui/static/common.js"):
            assert http.get(page).status_code == 200, page
        assert KEY not in http.get("/ui/models").text
        assert http.get("/ui", follow_redirects=False).headers["location"] == "/ui/models"
        for data in ("/ui/api/models", "/ui/api/metrics", "/ui/api/routes", "/ui/api/runs", "/ui/api/runs/baseline"):
            refused = http.get(data)
            assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error", data
            assert http.get(data, headers=AUTH).status_code == 200, data
        missing = http.get("/ui/api/runs/nope", headers=AUTH)
        assert missing.status_code == 404 and "ui.runs_dir" in missing.json()["error"]["message"]
        assert http.get("/ui/nope").status_code == 404


def test_route_decisions_and_fallbacks_are_kept_newest_first(gateway):
    client = openai.OpenAI(base_url=gateway.v1, api_key=KEY)
    client.chat.completions.create(model="auto", messages=[{"role": "user", "content": "write a poem"}])
    client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "hi"}])
    recent = httpx.get(gateway.url + "/ui/api/routes", headers=AUTH).json()["recent"]
    fallback, routed = recent[0], recent[1]
    assert (routed["asked"], routed["router"], routed["model"], routed["score"]) == ("auto", "by-topic", "mock-b", 1.0)
    assert "poem" in routed["reason"]
    assert (fallback["router"], fallback["path"], fallback["model"]) == ("fallback", ["broken", "mock-a"], "mock-a")
    gw = gateway.app.state.gateway
    assert gw.recent_routes.maxlen == 50


def test_models_show_replicas_and_the_route_eval_curve_is_served(gateway):
    models = {m["name"]: m for m in httpx.get(gateway.url + "/ui/api/models", headers=AUTH).json()["models"]}
    assert len(models["mock-b"]["replicas"]) == 2 and models["mock-b"]["replicas"][0]["healthy"]
    assert models["broken"]["fallbacks"] == ["mock-a"]
    assert models["auto"]["kind"] == "virtual" and models["auto"]["targets"] == ["mock-a", "mock-b"]
    report = httpx.get(gateway.url + "/ui/api/routes", headers=AUTH).json()["route_eval"]
    (cascade,) = report["cascades"]
    assert cascade["name"] == "cheap-first" and cascade["curve"][-1] == {"threshold": "big only", "escalated": 1.0,
                                                                         "accuracy": 1.0}
    assert "outcomes" not in cascade


def test_a_streamed_reasoning_answer_carries_its_votes_like_the_json_answer(gateway):
    client = openai.OpenAI(base_url=gateway.v1, api_key=KEY)
    ask = {"model": "mock-a", "messages": [{"role": "user", "content": "2+3?"}], "n": 3, "extra_body": {"vote": True}}
    whole = client.chat.completions.create(**ask).choices[0].model_extra["slm_fusion"]
    details = [c.choices[0].model_extra["slm_fusion"] for c in client.chat.completions.create(**ask, stream=True)
               if c.choices and (c.choices[0].model_extra or {}).get("slm_fusion")]
    assert details == [whole] and whole["votes"] == {"5": 3}


def test_the_console_can_be_turned_off_and_its_folders_are_relative_to_the_yaml(tmp_path, monkeypatch):
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # a `runs/` in the directory the test runs from must not count
    (tmp_path / "gw.yaml").write_text("ui: {runs_dir: runs, route_eval_dir: ../evals}\n")
    cfg = load_fusion_config(tmp_path / "gw.yaml")
    assert cfg.ui.runs_dir == str(tmp_path / "runs") and cfg.ui.route_eval_dir == str(tmp_path.parent / "evals")
    app = create_app(FusionConfig.model_validate({"server": {"api_keys": [KEY]}, "ui": {"enabled": False}}))
    http = TestClient(app)  # in-process; no lifespan needed for a 404
    assert http.get("/ui/models").status_code == 404
    assert http.get("/ui/api/models", headers=AUTH).status_code == 404


# ------------------------------------------------------------------------------------------------ in Chromium


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def browser(gateway):
    found = _chromium()
    if found is None:
        pytest.skip("no Chromium: install Debian's `chromium` and `chromium-driver` (.ci/run does) to run the "
                    "console's browser tests")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the `test` extra")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                "--disable-gpu"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=found[1]))
    driver.set_page_load_timeout(20)
    try:
        driver.get(gateway.url + "/ui/models")
        driver.find_element("id", "key-input").send_keys(KEY)
        driver.find_element("css selector", "#key-form button").click()  # kept in sessionStorage; the page reloads
        _wait(driver, lambda d: d.find_element("id", "key-state").text == "key set")
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        yield driver
    finally:
        driver.quit()


def _wait(driver, condition, timeout: float = 30.0):  # generous: a loaded 2-core CI box imports optuna slowly
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def _console_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _shot(driver, name: str) -> None:
    path = ARTIFACTS / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def test_every_page_loads_its_data_without_console_errors(browser, gateway):
    ready = {
        "models": lambda d: len(d.find_elements("css selector", "#models-table tbody tr")) == 4,
        "routing": lambda d: d.find_elements("css selector", "#route-eval svg circle"),
        # the newest two: "bare" (a config only: no charts) beside "in-training" (a checkpoint's loss curve)
        "runs": lambda d: d.find_elements("css selector", "#col-a h2")
        and d.find_elements("css selector", "#col-b svg circle"),
        "playground": lambda d: len(d.find_elements("css selector", "#model option")) == 4,
    }
    browser.get_log("browser")  # drop what the key form's page logged
    for page, loaded in ready.items():
        browser.get(f"{gateway.url}/ui/{page}")
        _wait(browser, loaded)
        _shot(browser, page)
        assert _console_errors(browser) == [], page
    assert browser.find_element("id", "status").text == ""


def test_the_runs_page_shows_two_runs_side_by_side(browser, gateway):
    browser.get(gateway.url + "/ui/runs")
    _wait(browser, lambda d: len(d.find_elements("css selector", "#col-b h2")) == 1)
    # every run is listed; the two columns show the two chosen runs, each with its charts and eval table
    options = [o.get_attribute("value") for o in browser.find_elements("css selector", "#run-a option")]
    assert set(options) == {"baseline", "higher-lr", "in-training", "bare"}
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "run-a")).select_by_value("baseline")
    Select(browser.find_element("id", "run-b")).select_by_value("higher-lr")
    _wait(browser, lambda d: d.find_element("css selector", "#col-a h2").text == "baseline"
          and d.find_element("css selector", "#col-b h2").text == "higher-lr")
    for column in ("col-a", "col-b"):
        charts = browser.find_elements("css selector", f"#{column} svg.chart")
        assert len(charts) == 3, column  # loss, accuracy vs tokens, the tune front
        assert charts[0].get_attribute("data-points") == "2"  # two logged training steps
        assert charts[2].get_attribute("data-points") == "4"  # four trials
        assert len(browser.find_elements("css selector", f"#{column} table.eval tbody tr")) == 2  # student, base
    _shot(browser, "runs-compare")
    Select(browser.find_element("id", "run-b")).select_by_value("bare")
    _wait(browser, lambda d: d.find_element("css selector", "#col-b h2").text == "bare")
    # stages, training, loss, eval, accuracy vs tokens, tune: none of them exists for a run that only has a config
    assert len(browser.find_elements("css selector", "#col-b .absent")) == 6
    assert _console_errors(browser) == []


def test_a_streamed_playground_reply_appears(browser, gateway):
    browser.get(gateway.url + "/ui/playground")
    _wait(browser, lambda d: len(d.find_elements("css selector", "#model option")) == 4)
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "model")).select_by_value("auto")
    # Count the updates the reply's text goes through: a streamed reply grows delta by delta.
    browser.execute_script("""
        window.updates = 0;
        new MutationObserver(records => { window.updates += records.length; })
          .observe(document.getElementById('transcript'), {subtree: true, childList: true, characterData: true});""")
    browser.find_element("id", "prompt").send_keys("write a poem about the sea")
    browser.find_element("id", "send").click()
    _wait(browser, lambda d: d.find_element("id", "chat-state").text == "done")
    reply = browser.find_element("css selector", ".msg.assistant .text").text
    assert reply == ANSWER
    assert browser.execute_script("return window.updates") > len(ANSWER.split()) // 2
    details = browser.find_element("id", "details").text
    assert "mock-b" in details and "by-topic" in details and "poem" in details  # who answered, and why
    _shot(browser, "playground-stream")
    assert _console_errors(browser) == []


def test_the_playground_shows_the_votes_of_a_reasoning_answer(browser, gateway):
    browser.get(gateway.url + "/ui/playground")
    _wait(browser, lambda d: len(d.find_elements("css selector", "#model option")) == 4)
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "model")).select_by_value("mock-a")
    browser.find_element("id", "vote").click()
    n = browser.find_element("id", "n")
    n.clear()
    n.send_keys("3")
    browser.find_element("id", "prompt").send_keys("what is 2 + 3?")
    browser.find_element("id", "send").click()
    _wait(browser, lambda d: d.find_element("id", "chat-state").text == "done")
    details = browser.find_element("id", "details").text
    assert "5: 3" in details and "agreement 1.00 over 3 samples" in details
    assert "reasoning" in details and "answer" in details
    _shot(browser, "playground-vote")
    assert _console_errors(browser) == []


def test_the_metric_chart_updates_after_requests(browser, gateway):
    browser.get(gateway.url + "/ui/models")
    chart = "#chart-rps"
    _wait(browser, lambda d: d.find_element("css selector", chart).get_attribute("data-points") is not None)
    before = float(browser.find_element("css selector", chart).get_attribute("data-sum"))
    client = openai.OpenAI(base_url=gateway.v1, api_key=KEY)
    for _ in range(20):
        client.chat.completions.create(model="mock-a", messages=[{"role": "user", "content": "hi"}])

    def grew(d) -> bool:
        sums = [float(d.find_element("css selector", c).get_attribute("data-sum") or 0)
                for c in (chart, "#chart-tps")]
        return sums[0] > before and sums[1] > 0

    _wait(browser, grew)
    lines = browser.find_elements("css selector", f"{chart} polyline[data-series='mock-a']")
    assert lines or browser.find_elements("css selector", f"{chart} circle")
    _shot(browser, "models-metrics")
    assert _console_errors(browser) == []
