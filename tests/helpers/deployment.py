"""
Airflow 3.3 deployed the way users run it, on loopback: API server, scheduler, dag-processor and
a separate triggerer as their own processes (LocalExecutor, SQLite), driven through the REST API.
The deployment tests and ``bench/mapped_pool.py`` run on it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.helpers import REPO, free_port, wait_until


class Deployment:
    """Airflow's components as separate processes (each in its own process group), and a REST client."""

    def __init__(
        self,
        home: Path,
        doc2x_connection: str,
        *,
        dags_folder: Path = REPO / "example_dags",
        parallelism: int = 4,
    ) -> None:
        port = free_port()
        bin_dir = str(Path(sys.executable).parent)
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{port}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10",
            "AIRFLOW_CONN_DOC2X_DEFAULT": doc2x_connection,
            "DOC2X_PACING_DIR": str(home / "pacing"),
        }
        self.home = home
        self.api = httpx.Client(base_url=f"http://localhost:{port}", timeout=30)
        self.processes: dict[str, subprocess.Popen] = {}
        self.dag_of_run: dict[str, str] = {}
        migrate = subprocess.run(["airflow", "db", "migrate"], env=self.env, capture_output=True, text=True)
        assert migrate.returncode == 0, migrate.stderr[-3000:]
        for component in ("api-server", "scheduler", "dag-processor", "triggerer"):
            self.start(component)
        wait_until(self.healthy, timeout=120, interval=0.5, message="Airflow's components to report healthy")

    def start(self, component: str) -> None:
        log = open(self.home / f"{component}.log", "ab")  # noqa: SIM115 - the process owns it
        self.processes[component] = subprocess.Popen(
            ["airflow", component], env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def kill(self, component: str, sig: int = signal.SIGKILL) -> None:
        """Signal the component's whole process group (its children outlive a plain kill)."""
        process = self.processes.pop(component)
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        for component in list(self.processes):
            self.kill(component, signal.SIGTERM)

    def healthy(self) -> bool:
        try:
            health = self.api.get("/api/v2/monitor/health").json()
        except (httpx.TransportError, ValueError):
            return False
        return all(health.get(part, {}).get("status") == "healthy" for part in ("scheduler", "triggerer"))

    def set_pool(self, name: str, slots: int) -> None:
        """Create or resize a pool; deferred tasks do not hold its slots (Airflow's default)."""
        body = {"name": name, "slots": slots, "include_deferred": False}
        if self.api.get(f"/api/v2/pools/{name}").status_code == 200:
            self.api.patch(f"/api/v2/pools/{name}", json=body).raise_for_status()
        else:
            self.api.post("/api/v2/pools", json=body).raise_for_status()

    def trigger(self, dag_id: str, conf: dict) -> str:
        wait_until(
            lambda: self.api.get(f"/api/v2/dags/{dag_id}").status_code == 200,
            timeout=120,
            interval=0.5,
            message=f"the DAG {dag_id} to be parsed",
        )
        self.api.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
        answer = self.api.post(f"/api/v2/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})
        answer.raise_for_status()
        run_id = answer.json()["dag_run_id"]
        self.dag_of_run[run_id] = dag_id
        return run_id

    def _task_instance_path(self, run_id: str, task_id: str) -> str:
        return f"/api/v2/dags/{self.dag_of_run[run_id]}/dagRuns/{run_id}/taskInstances/{task_id}"

    def task_instance(self, run_id: str, task_id: str, map_index: int = -1) -> dict:
        path = self._task_instance_path(run_id, task_id)
        answer = self.api.get(path if map_index < 0 else f"{path}/{map_index}")
        return answer.json() if answer.status_code == 200 else {}

    def task_state(self, run_id: str, task_id: str) -> str | None:
        return self.task_instance(run_id, task_id).get("state")

    def run_state(self, run_id: str) -> str:
        return self.api.get(f"/api/v2/dags/{self.dag_of_run[run_id]}/dagRuns/{run_id}").json()["state"]

    def wait_for_run(self, run_id: str, timeout: float = 240, *, must_succeed: bool = True) -> str:
        def finished() -> str | None:
            dead = [name for name, process in self.processes.items() if process.poll() is not None]
            if dead:  # a run nobody schedules any more would only time out: say why now
                raise AssertionError(f"Airflow's {', '.join(dead)} exited during run {run_id}\n{self.logs()}")
            state = self.run_state(run_id)
            return state if state in ("success", "failed") else None

        state = wait_until(finished, timeout=timeout, interval=0.5, message=f"run {run_id} to finish")
        assert state == "success" or not must_succeed, self.logs()
        return state

    def xcom(self, run_id: str, task_id: str, map_index: int = -1) -> object:
        """What the task instance returned, as stored; None when it returned nothing."""
        answer = self.api.get(
            f"{self._task_instance_path(run_id, task_id)}/xcomEntries/return_value",
            params={"map_index": map_index},
        )
        return answer.json()["value"] if answer.status_code == 200 else None

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}" for path in self.home.glob("*.log")
        )
