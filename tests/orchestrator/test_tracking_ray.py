"""MLflow tracking of a real sweep: a real `mlflow server` on 127.0.0.1, real Ray, real data.

One tiny 2-trial sweep (budgets 40% and 60%) is recorded on the server once per module; the
tests read it back through MLflow's client, the report command and a headless browser.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from orchestrator.config import load_config
from orchestrator.phases import run_pretrain
from orchestrator.sweep import run_sweep
from tests.conftest import tiny_overrides

pytestmark = pytest.mark.ray

POINTS = [{"search.budget": 0.4, "search.ofb.temperature": 1.0},
          {"search.budget": 0.6, "search.ofb.temperature": 1.0}]
SPACE = {"search.budget": {"type": "choice", "values": [0.4, 0.6]},
         "search.ofb.temperature": {"type": "uniform", "low": 0.5, "high": 2.0}}


@pytest.fixture(scope="module")
def tracked_sweep(ray_cluster, mlflow_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tracked")
    over = tiny_overrides(tmp, **{
        "name": "tracked", "search.epochs": 3, "search.ofb.alpha_lr": 0.05,
        "search.ofb.eliminations_per_epoch": 4, "finetune.epochs": 0.5,
        "mlflow.tracking_uri": mlflow_server})
    over += ["sweep.num_samples=2", f"sweep.space={json.dumps(SPACE)}",
             f"sweep.points_to_evaluate={json.dumps(POINTS)}"]
    cfg = load_config(None, over)
    dense = run_pretrain(cfg)
    rows = run_sweep(cfg, dense, ray_cluster)
    return cfg, dense, rows


def _client(url):
    from mlflow import MlflowClient

    return MlflowClient(url)


def _runs(url, name):
    c = _client(url)
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if r.data.tags.get("ofb_role") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId")]
    return c, parents, children


def test_parent_and_child_runs(tracked_sweep, mlflow_server):
    cfg, dense, rows = tracked_sweep
    c, parents, children = _runs(mlflow_server, "tracked")
    assert len(parents) == 1 and len(children) == 2
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "sweep-tracked"
    p = parent.data.params
    assert p["model.embed_dim"] == "32" and p["search.method"] == "ofb"
    assert json.loads(p["sweep.space"]) == SPACE
    assert parent.data.tags["dataset"] == "fashion_mnist"
    assert len(parent.data.tags["mlflow.source.git.commit"]) == 40  # code version
    assert parent.inputs.dataset_inputs[0].dataset.name == "fashion_mnist"
    m = parent.data.metrics
    assert m["dense_macs"] == dense.macs and m["pretrain_cpu_core_hours"] > 0
    assert 0 < m["dense_top1"] <= 1
    assert m["cost_ratio/ofb_search_vs_dense_training"] > 0  # the cost comparison
    assert {a.path for a in c.list_artifacts(parent.info.run_id, "report")} >= {
        "report/pareto.png", "report/table.txt", "report/comparison.json"}

    by_trial = {r["trial_id"]: r for r in rows}
    assert {ch.data.tags["trial_id"] for ch in children} == set(by_trial)
    for ch in children:
        row = by_trial[ch.data.tags["trial_id"]]
        assert ch.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert ch.info.status == "FINISHED" and ch.data.tags["status"] == "finished"
        assert ch.data.tags["method"] == "ofb"
        assert ch.data.tags["budget"] == f"{round(100 * row['search.budget'])}pct"
        assert float(ch.data.params["search.budget"]) == row["search.budget"]
        fm = ch.data.metrics
        assert fm["top1"] == pytest.approx(row["top1"]) and fm["macs"] == row["macs"]
        assert fm["params"] == row["params"]
        for k in ("search_cpu_core_hours", "finetune_cpu_core_hours",
                  "pretrain_share_cpu_core_hours"):
            assert fm[k] > 0, k
        assert fm["total_cpu_core_hours"] == pytest.approx(
            fm["search_cpu_core_hours"] + fm["finetune_cpu_core_hours"]
            + fm["pretrain_share_cpu_core_hours"])
        assert not any(k.startswith("total_gpu") for k in fm)  # CPU only: one unit
        epochs = [x.step for x in c.get_metric_history(ch.info.run_id, "search/val_top1")]
        assert epochs == list(range(1, len(epochs) + 1)) and len(epochs) >= 1
        for curve in ("search/expected_macs", "search/live_candidates", "search/lambda",
                      "search/mask_ratio", "search/loss_search", "finetune/val_top1"):
            assert c.get_metric_history(ch.info.run_id, curve), curve


def test_subnet_models_and_registry_alias(tracked_sweep, mlflow_server, fmnist_dir):
    import mlflow

    from search_space.subnet import load_subnet
    from trainers.data import build_splits

    cfg, _, rows = tracked_sweep
    c, _, children = _runs(mlflow_server, "tracked")
    mlflow.set_tracking_uri(mlflow_server)
    splits = build_splits(cfg.data)
    x = torch.stack([splits.test[i][0] for i in range(8)])
    by_trial = {r["trial_id"]: r for r in rows}
    for ch in children:
        assert [a.path for a in c.list_artifacts(ch.info.run_id, "subnet")] == [
            "subnet/arch.json"]
        model = mlflow.pyfunc.load_model(ch.data.tags["ofb_model_uri"])
        got = model.predict(x.numpy())
        want = load_subnet(by_trial[ch.data.tags["trial_id"]]["subnet_path"])(x).detach()
        assert got.shape == (8, 10)
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5)
    for budget in (0.4, 0.6):
        label = f"{round(100 * budget)}pct"
        best = max((r for r in rows if r["search.budget"] == budget), key=lambda r: r["top1"])
        for alias in (f"best-{label}", f"ofb-{label}"):
            v = c.get_model_version_by_alias("tracked-subnet", alias)
            assert v.run_id == best["mlflow_run_id"], alias
    loaded = mlflow.pyfunc.load_model("models:/tracked-subnet@best-40pct")
    assert loaded.predict(x.numpy()).shape == (8, 10)


def test_parquet_run_ids_and_rerun_adds_nothing(tracked_sweep, mlflow_server, ray_cluster):
    import pyarrow.parquet as pq

    cfg, dense, rows = tracked_sweep
    table = pq.read_table(cfg.run_dir / "results.parquet")
    _, _, children = _runs(mlflow_server, "tracked")
    ids = {ch.data.tags["trial_id"]: ch.info.run_id for ch in children}
    assert {r["trial_id"]: r["mlflow_run_id"] for r in table.to_pylist()} == ids
    c = _client(mlflow_server)
    before = {i: len(c.get_metric_history(i, "search/val_top1")) for i in ids.values()}
    run_sweep(cfg, dense, ray_cluster)  # the same sweep again: restored, nothing new
    _, parents, again = _runs(mlflow_server, "tracked")
    assert len(parents) == 1 and sorted(r.info.run_id for r in again) == sorted(ids.values())
    assert {i: len(c.get_metric_history(i, "search/val_top1")) for i in ids.values()} == before
    versions = c.search_model_versions("name='tracked-subnet'")
    assert len(versions) == len({v.run_id for v in versions})  # no version registered twice


def test_report_command(tracked_sweep, mlflow_server, tmp_path):
    cfg, _, rows = tracked_sweep
    out = tmp_path / "rep"
    r = subprocess.run([sys.executable, "-m", "orchestrator.report", "tracked", "--tracking-uri",
                        mlflow_server, "--out", str(out)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "== subnets per method and budget" in r.stdout
    for label in ("40pct", "60pct"):
        assert any(line.split()[:2] == ["ofb", label] for line in r.stdout.splitlines())
    assert "ofb search vs dense training" in r.stdout
    png = out / "pareto.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    # the sweep folder works as a source too, and gives the same table
    r2 = subprocess.run([sys.executable, "-m", "orchestrator.report", str(cfg.run_dir),
                         "--no-log"], capture_output=True, text=True, timeout=300)
    assert r2.returncode == 0, r2.stderr
    assert r2.stdout.split("\n\n")[0] == r.stdout.split("\n\n")[0]


@pytest.mark.browser
def test_mlflow_ui_shows_the_sweep(tracked_sweep, mlflow_server):
    """Headless Chromium (Debian's) opens the UI served on loopback and finds every run."""
    import shutil
    import time

    from selenium import webdriver
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser, driver_bin = shutil.which("chromium"), shutil.which("chromedriver")
    if not (browser and driver_bin):
        pytest.fail("chromium/chromedriver missing: run `make browser` (scripts/ensure_browser.sh)")
    c, parents, children = _runs(mlflow_server, "tracked")
    exp_id, parent = parents[0].info.experiment_id, parents[0].info.run_id
    kids = {ch.info.run_id: ch.info.run_name for ch in children}
    opts = Options()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              "--disable-background-networking", "--disable-extensions", "--no-first-run",
              "--window-size=1600,1000"):
        opts.add_argument(a)
    # an explicit driver path: Selenium Manager never tries to download one
    driver = webdriver.Chrome(service=Service(executable_path=driver_bin), options=opts)

    def link(run_id):
        return By.CSS_SELECTOR, f'a[href$="/runs/{run_id}"]'

    def shows(d, run_id, name):
        return any(e.is_displayed() and e.text == name for e in d.find_elements(*link(run_id)))

    try:
        wait = WebDriverWait(driver, 60, 0.2, (StaleElementReferenceException,))
        # MLflow 3 opens experiments on its GenAI page; the runs table is the ML workflow's
        driver.get(f"{mlflow_server}/#/experiments/{exp_id}/runs?workflowType=machine_learning")
        wait.until(lambda d: shows(d, parent, "sweep-tracked"))
        expand = (By.CSS_SELECTOR,
                  f'[row-id="{parent}"] [col-id="attributes.`Run Name`"] button')
        deadline = time.time() + 60
        while not all(shows(driver, r, n) for r, n in kids.items()):  # children start folded
            assert time.time() < deadline, "the trial runs never appeared under the sweep run"
            try:
                driver.find_element(*expand).click()
                WebDriverWait(driver, 5, 0.2, (StaleElementReferenceException,)).until(
                    lambda d: all(shows(d, r, n) for r, n in kids.items()))
            except (StaleElementReferenceException, TimeoutException):
                pass
        for run_id, name in kids.items():  # each trial's page names its parent
            driver.get(f"{mlflow_server}/#/experiments/{exp_id}/runs/{run_id}")
            wait.until(lambda d: shows(d, parent, "sweep-tracked"))
            body = driver.find_element(By.TAG_NAME, "body").text
            assert name in body and "Parent run" in body
    finally:
        driver.quit()
