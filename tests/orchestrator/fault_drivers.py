"""The fault drivers of the fault table (`bench/faults.py` prints it; tests/orchestrator/
test_faults.py asserts the rows the other tests do not cover). Each runs a tiny real sweep,
injects one fault and returns its `Row`s: what happened, whether the work resumed, what is
recorded where, and how much was lost. Tools (processes, runs, read-back): faults.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.orchestrator.faults import (
    REPO,
    MlflowServer,
    Row,
    descendants,
    finished,
    kill_leftovers,
    kill_newest,
    kill_tree,
    outcome,
    overrides,
    parquet_rows,
    phase_result,
    start,
    wait_for,
)

# -- 1-4: a Ray process SIGKILLed inside this process's Ray -------------------------------
# what: (glob under the sweep's trials/, process title, kill once Ray registered the hit?, row)
KILLS = {
    "search": ("trial-*/ray/*/checkpoint_*/state.json", "ray::RayTrainWorker", True,
               "a Ray Train worker SIGKILLed in the search"),
    "finetune": ("trial-*/ray/*/checkpoint_*/finetune/state.json", "ray::RayTrainWorker", True,
                 "a Ray Train worker SIGKILLed in the fine-tune"),
    "export": ("trial-*/ray/*/checkpoint_*/subnet", "ray::RayTrainWorker", False,
               "a Ray Train worker SIGKILLed during the subnet export"),
    "driver": ("trial-*/ray/*/checkpoint_*/state.json", "ray::ImplicitFunc", True,
               "the trial driver (Tune's trial actor) SIGKILLed, another Ray on the machine"),
}
# Kills that run beside a second Ray (a bare head): Train's clean-up of a dead driver's CPUs
# asks the state API, which a worker once failed to find with two Rays on the machine.
BESIDE_ANOTHER_RAY = {"driver"}


def stop_head(head: Any) -> None:
    """A test head stopped as its tests stop it, and the workers it leaves behind."""
    below = descendants(head.proc.pid)
    head.stop()
    kill_leftovers(below)


def _registered(checkpoint: Path) -> bool:
    """Whether Ray Train has registered this checkpoint (a restart resumes from it)."""
    snap = checkpoint.parent / "checkpoint_manager_snapshot.json"
    return snap.exists() and checkpoint.name in snap.read_text()


def killed_in_process(base: Path, cache: Path, what: str, hang_s: float = 150) -> Row:
    """A Train worker (search, fine-tune, export) or the trial driver (Tune's trial actor)
    SIGKILLed during a 1-trial sweep (2 search + 2 fine-tune epochs; 6 fine-tune epochs of
    0.1 s each for a kill in the fine-tune, so that it lands before the last) on the Ray this
    process started: once epoch 1's checkpoint is registered, or (export) the moment the
    exported subnet's checkpoint reaches storage. Resumed: the phase went on from a checkpoint.
    A sweep that has not finished `hang_s` after the kill is stopped (SIGINT, as Ctrl-C).
    BESIDE_ANOTHER_RAY kills run while a second Ray head runs on the machine."""
    from tests.orchestrator.ray_head import start_head

    other = start_head(base / "other-ray.log") if what in BESIDE_ANOTHER_RAY else None
    try:
        return _killed_in_process(base, cache, what, hang_s)
    finally:
        if other is not None:
            stop_head(other)


def _killed_in_process(base: Path, cache: Path, what: str, hang_s: float) -> Row:
    import ray

    from orchestrator.config import load_config
    from orchestrator.phases import run_pretrain
    from orchestrator.sweep import run_sweep

    pattern, title, after_registered, fault = KILLS[what]
    cfg = load_config(None, overrides(base, cache, what, 1, **{
        "search.epochs": 2, "finetune.epochs": 6 if what == "finetune" else 2,
        "scaling.max_failures": 2}))
    dense = run_pretrain(cfg)
    t0, box, trials, ended = time.perf_counter(), {}, cfg.run_dir / "trials", threading.Event()

    def watch() -> None:
        try:
            hits = wait_for(lambda: ended.is_set() or sorted(trials.glob(pattern)), 600,
                            pattern, poll=0.02)
            if hits is True:
                raise AssertionError(f"the sweep ended before {pattern} appeared")
            hit = hits[0]
            ckpt = next(p for p in hit.parents if p.name.startswith("checkpoint_"))
            if after_registered:
                wait_for(lambda: _registered(ckpt), 120, f"{ckpt.name} registered")
            box["pid"] = kill_newest(os.getpid(), title)
            box["registered"] = _registered(ckpt)
            wait_for(lambda: ended.is_set() or finished(cfg.run_dir), hang_s,
                     "finished trial after the kill (stopped with SIGINT)")
        except AssertionError as e:
            box["error"] = e
            if not ended.is_set():
                os.kill(os.getpid(), signal.SIGINT)  # Tune stops the sweep as on Ctrl-C
        except BaseException as e:  # noqa: BLE001 - reported in the row
            box["error"] = e

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        run_sweep(cfg, dense, ray.cluster_resources())
    except BaseException as e:  # noqa: BLE001 - KeyboardInterrupt included: reported
        box.setdefault("error", e)
    ended.set()
    th.join(timeout=60)
    out = outcome(cfg.run_dir)
    killed = f"{title[5:]} pid {box['pid']} killed" if "pid" in box else "nothing killed"
    if "error" in box or not out.finished:
        e = box.get("error")
        return Row.of(fault, f"{killed}; then {type(e).__name__}: {str(e)[:200]}", False, out,
                      False, t0)
    search, tuned = phase_result(cfg.run_dir, "search"), phase_result(cfg.run_dir, "finetune")
    step = search["resumed_from_epoch"] if what != "finetune" else tuned["resumed_from_epoch"]
    phase = "fine-tune" if what == "finetune" else "search"
    moment = (f"after {phase} epoch 1's checkpoint was registered" if after_registered else
              "as the exported subnet's checkpoint reached storage "
              f"({'registered' if box['registered'] else 'not yet registered'})")
    how = f"resumed after {phase} epoch {step}" if step else "restarted from scratch"
    return Row.of(fault, f"{killed} {moment}; {how}", bool(step), out, True, t0)


# -- 5 and 8b: the orchestrator SIGKILLed mid-sweep; a second sweep in its folder ----------
def orchestrator_killed(base: Path, cache: Path) -> list[Row]:
    """`python -m orchestrator.run` (2 trials): while it runs, the same command again (refused:
    the folder is in use); then the first SIGKILLed, process group and all, with one trial
    finished and the second running; then the same command: it resumes, the finished trial
    kept as it was (its files untouched), nothing duplicated."""
    args, run_dir = overrides(base, cache, "killed", 2), base / "runs" / "killed"
    t0 = time.perf_counter()
    first = start(args, base / "first.log")
    wait_for(lambda: list((run_dir / "trials").glob("trial-*")), 600, "a first trial",
             first.proc)
    written = (run_dir / "config.yaml").stat().st_mtime_ns
    second = start(args, base / "second.log")
    rc2 = second.wait(600)
    refusal = [x for x in second.text().splitlines() if "in use by another sweep" in x]
    # refused before writing anything: the first sweep's files are as it left them
    alive = first.proc.poll() is None and (run_dir / "config.yaml").stat().st_mtime_ns == written
    t1 = time.perf_counter()
    wait_for(lambda: finished(run_dir) and len(list((run_dir / "trials").glob("trial-*"))) > 1,
             600, "one finished trial and a second one running", first.proc)
    done = finished(run_dir)[0]
    stamp = done.stat().st_mtime
    kill_tree(first.proc)
    rerun = start(args, base / "rerun.log")
    rc = rerun.wait(900)
    out = outcome(run_dir)
    resumed = "[sweep] resuming" in rerun.text() and done.stat().st_mtime == stamp
    killed = Row.of("orchestrator SIGKILLed mid-sweep, same command rerun",
                    f"killed with 1 of 2 trials finished; rerun exited {rc}"
                    + ("; Tune experiment restored, finished trial kept" if resumed else ""),
                    resumed, out, rc == 0, t0)
    said = refusal[-1].split("; wait")[0] if refusal else second.text()[-300:]
    busy = Row("second sweep in the same folder", f"exit {rc2}: {said}", "n.a.",
               f"first sweep {'kept running' if alive else 'DISTURBED'}; then {out.text()}",
               out.lost, out.duplicates, t1 - t0, bool(refusal) and rc2 != 0 and alive)
    return [killed, busy]


# -- 8a: two sweeps at once on one machine -------------------------------------------------
def open_store_child(output_dir: str, name: str, at: float) -> None:
    """In a child process: open a sweep's embedded MLflow store (its Tracker) at time `at`."""
    from orchestrator.config import load_config
    from orchestrator.tracking import Tracker

    cfg = load_config(None, [f"output_dir={output_dir}", f"name={name}", "sweep=null"])
    while time.time() < at:
        time.sleep(0.001)
    late = time.time() - at
    Tracker(cfg)
    print(f"opened, {late:.2f} s late at the start signal")


def store_opened_at_once(base: Path, n: int = 2) -> int:
    """How many of `n` processes opening one new SQLite MLflow store at the same instant get it
    (two sweeps started at once reach it within a second or so; MLflow creates the tables on
    the first open)."""
    at = time.time() + 12  # every child has imported MLflow and Ray by then
    procs = [subprocess.Popen(
        [sys.executable, "-c", "from tests.orchestrator.fault_drivers import open_store_child;"
         f" open_store_child({str(base / 'store')!r}, 'n{i}', {at})"], cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(n)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    late = [float(o.split("opened, ")[1].split()[0]) for o in outs if "opened, " in o]
    assert all(x < 0.5 for x in late), f"a child missed the start signal: {late} s late"
    return len(late)


def two_sweeps(base: Path, cache: Path | None = None) -> list[Row]:
    """Two `python -m orchestrator.run` at once, other names, one output folder (so one MLflow
    store, new, and one dense cache, empty: both need the same dense model at once), each its
    own embedded Ray: both finish, the dense model is trained once (the other sweep waits for
    it), each results.parquet and MLflow experiment holds its own trial only. (`cache` is not
    used: a warm one would hide both races.) First, the race on the new MLflow store alone,
    made exact: 2 processes open one at the same instant."""
    t0 = time.perf_counter()
    opened = store_opened_at_once(base)
    runs = {n: start(overrides(base, base / "cache", n, 1), base / f"{n}.log")
            for n in ("alpha", "beta")}
    codes = {n: r.wait(900) for n, r in runs.items()}
    outs = {n: outcome(base / "runs" / n) for n in runs}
    mixed = sum(len(set(o.parquet) - o.finished) + len(set(o.mlflow) - o.finished)
                for o in outs.values())
    logs = [r.text() for r in runs.values()]
    trained = sum(t.count("[pretrain] training dense") for t in logs)
    waited = sum("[pretrain] waiting: pid" in t and "[pretrain] cache hit" in t for t in logs)
    row = Row("two sweeps at once (other names)", f"a new MLflow store opened by 2 processes "
              f"at once: {opened}/2 ok; the dense model trained {trained} time(s), {waited} "
              f"sweep(s) waited for it; the sweeps' exit codes {codes}; {mixed} row(s) of the "
              "other sweep", "n.a.", "; ".join(f"{n}: {o.text()}" for n, o in outs.items()),
              sum(o.lost for o in outs.values()), sum(o.duplicates for o in outs.values()),
              time.perf_counter() - t0)
    row.ok = (opened == 2 and set(codes.values()) == {0} and not mixed and not row.lost
              and not row.duplicates and trained == 1 and waited == 1)
    return [row]


# -- 6: the MLflow server killed mid-sweep, restarted on its port and store ----------------
def mlflow_killed(base: Path, cache: Path, outage: str) -> list[Row]:
    """The tracking server SIGKILLed as the second of 2 trials starts. `short`: back on its port
    and store once that trial has finished (~30 s later; MLflow's client retries each call for
    ~4 min). `long`: every call fails at once (MLFLOW_HTTP_REQUEST_MAX_RETRIES=0) and the
    server stays down until the sweep has ended; then the same command again, which must log
    what was missed, without duplicates."""
    server = MlflowServer(base / "mlflow")
    server.start()
    name = f"tracked-{outage}"
    args, run_dir = overrides(base, cache, name, 2, **{"mlflow.tracking_uri": server.url}), \
        base / "runs" / name
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"} if outage == "long" else {}
    t0 = time.perf_counter()
    try:
        run = start(args, base / f"{name}.log", env)
        wait_for(lambda: len(list((run_dir / "trials").glob("trial-*"))) > 1, 600,
                 "a second trial", run.proc)
        server.kill()
        down = time.perf_counter()
        if outage == "short":
            wait_for(lambda: len(finished(run_dir)) > 1, 600, "the second trial's end",
                     run.proc)
            time.sleep(2)
            server.start()
            down = time.perf_counter() - down
            rc, said = run.wait(900), ""
        else:
            rc = run.wait(900)
            said = (f"sweep exited {rc} with the server down, parquet "
                    f"{len(parquet_rows(run_dir))}/{len(finished(run_dir))}; ")
            server.start()
            rerun = start(args, base / f"{name}-rerun.log", env)
            rc = rerun.wait(900) or rc
            caught = rerun.text().count("missed earlier")
            said += f"rerun exited {rerun.proc.returncode}, logged {caught} missed trial(s)"
        out = outcome(run_dir, server.url)
    finally:
        server.kill()
    warned = run.text().count("[mlflow] WARNING")
    said = (said or f"server down {down:.0f} s, back after the trial ended; sweep exited "
            f"{rc}, {warned} tracking warning(s)")
    return [Row.of(f"MLflow server killed, {outage} outage", said, None, out, rc == 0, t0)]


# -- 7: a full disk while a checkpoint is written ------------------------------------------
def _model() -> tuple[Any, Any]:
    """The same small model and AdamW state in every process (seeded, one step)."""
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 256)).sum().backward()
    opt.step()
    return model, opt


def full_disk_child(folder: str) -> None:
    """In a child process: a checkpoint and a weights file, then both written again under a
    file-size limit (SIGXFSZ ignored, so writes fail with EFBIG); prints the errors as JSON.
    400 kB lets the weights (263 kB) through and stops the optimizer state (527 kB) midway."""
    import resource

    import torch

    from trainers.checkpoint import save_checkpoint, save_weights

    model, opt = _model()
    save_checkpoint(folder, model, {"epoch": 0}, opt)
    save_weights(model, Path(folder).parent / "weights.safetensors")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    errors = []
    for limit, write in ((400_000, lambda: save_checkpoint(folder, model, {"epoch": 1}, opt)),
                         (100_000, lambda: save_weights(
                             model, Path(folder).parent / "weights.safetensors"))):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        try:
            write()
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - which error, and whether it names the file
            errors.append(f"{type(e).__name__}: {e}")
    print(json.dumps(errors))


def disk_full(base: Path, cache: Path | None = None) -> list[Row]:
    """Expected: each write refused naming its file; the previous checkpoint and weights file
    load as they were (epoch 0, equal weights); no temporary file left behind."""
    import torch

    from trainers.checkpoint import load_checkpoint, load_weights

    folder, weights = base / "ckpt", base / "weights.safetensors"
    base.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", "from tests.orchestrator.fault_drivers import "
                        f"full_disk_child; full_disk_child({str(folder)!r})"], cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    errors = json.loads(r.stdout.strip().splitlines()[-1])
    want, _ = _model()

    def loads_as_before(load: Callable[[Any], dict | None]) -> bool:
        got = torch.nn.Linear(256, 256)
        try:
            state = load(got) or {"epoch": 0}
        except (OSError, ValueError):
            return False
        return state["epoch"] == 0 and all(torch.equal(a, b) for a, b in zip(
            want.state_dict().values(), got.state_dict().values(), strict=True))

    same = [loads_as_before(lambda m: load_checkpoint(folder, m, torch.optim.AdamW(
        m.parameters()))), loads_as_before(lambda m: load_weights(m, weights))]
    named = [bool(e) and e.startswith("OSError") and name in e
             for e, name in zip(errors, ("optimizer.pt", weights.name), strict=True)]
    left = [p.name for p in base.rglob(".*.tmp-*")]
    said = ("both refused, naming the file: " + "; ".join(
        e.split(" (")[0].removeprefix("OSError: ") for e in errors) if all(named)
        else f"errors: {[(e or 'none')[:130] for e in errors]}")
    intact = (f"previous checkpoint {'loads, epoch 0, same weights' if same[0] else 'BROKEN'}; "
              f"previous weights file {'loads, same' if same[1] else 'BROKEN'}; "
              f"{len(left)} temporary file(s) left")
    lost = same.count(False)
    return [Row("disk full while a checkpoint is written", said, "n.a.", intact, lost, 0,
                time.perf_counter() - t0, all(named) and not lost and not left)]


# -- 9: the Ray head restarted between two schedule calls ----------------------------------
SLOT = "20261124T1000Z"  # of cron "0 * * * *", due at 10:00 UTC


def head_restarted(base: Path, cache: Path) -> list[Row]:
    """A scheduled slot (a 1-trial sweep as a Ray job) runs to its end; the head is stopped and
    a new one started (a new session: Ray has forgotten the job); the next schedule call, in
    the same slot's hour, must not submit it again."""
    import yaml

    from orchestrator import schedule
    from orchestrator.schedules.ledger import Ledger
    from tests.orchestrator.ray_head import start_head
    from tests.orchestrator.test_schedule_head import nested

    saved = {k: os.environ.pop(k) for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
             if k in os.environ}  # they would override the Jobs client's address
    f, ledger = base / "nightly.yaml", Ledger(base / "runs", "nightly")

    def call(head: Any, now: str) -> int:
        f.write_text(yaml.safe_dump(nested(overrides(base, cache, "nightly", 1, **{
            "schedule.cron": "0 * * * *", "schedule.address": head.url}))))
        return schedule.main(["--config", str(f), "--now", now])

    t0 = time.perf_counter()
    try:
        head = start_head(base / "head1.log")
        try:
            call(head, "2026-11-24T10:01Z")
            sid = ledger.read(SLOT)["attempts"][-1]["submission_id"]
            status = head.wait(sid, 900)
        finally:
            stop_head(head)
        head = start_head(base / "head2.log")
        try:
            call(head, "2026-11-24T10:20Z")
            jobs = [j.submission_id for j in head.client().list_jobs()
                    if (j.submission_id or "").startswith("ofb-")]
        finally:
            stop_head(head)
    finally:
        os.environ.update(saved)
    attempts = ledger.read(SLOT)["attempts"]
    out = outcome(base / "runs" / f"nightly-{SLOT}", experiment="nightly")
    said = (f"slot job {status}; after the restart: {len(attempts)} attempt(s) in the ledger "
            f"({attempts[-1]['status']}), {len(jobs)} job(s) submitted to the new head")
    return [Row.of("Ray head restarted between two schedule calls", said, None, out,
                   status == "SUCCEEDED" and len(attempts) == 1 and not jobs, t0)]
