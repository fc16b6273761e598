"""Airflow: submit each nightly slot as a Ray job. The slot id is the run's logical date, so a
task retry submits the same slot and attempt: `orchestrator.submit` answers "already
submitted" instead of failing (Ray refuses a reused submission id) and `--follow` follows the
job already running, so the task's state is the job's and no second job races it. A FAILED
slot is resubmitted as attempt 2 (resuming its folder) by `orchestrator.schedule` or by hand
with `--attempt 2`.

Copy into the DAGs folder; set REPO to the checkout the Airflow workers can run.
"""

from __future__ import annotations

import pendulum
from airflow import DAG
from airflow.operators.bash import BashOperator

REPO = "/opt/ofb-orchestrator"

with DAG(
    dag_id="ofb_nightly_sweep",
    schedule="0 2 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
) as dag:
    BashOperator(
        task_id="submit_slot",
        bash_command=(
            f"cd {REPO} && .venv/bin/python -m orchestrator.submit --config configs/nightly.yaml"
            " --schedule nightly --slot {{ logical_date.strftime('%Y%m%dT%H%MZ') }}"
            " --follow"
        ),
    )
