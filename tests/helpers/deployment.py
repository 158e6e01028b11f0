"""
Airflow 3.3 deployed the way users run it, on loopback, and driven through the REST API.

- :class:`Deployment`: API server, scheduler, dag-processor and a separate triggerer as their own
  processes (LocalExecutor, SQLite). ``tests/test_deployment.py`` and ``bench/mapped_pool.py``.
- :class:`CeleryDeployment`: production's shape. PostgreSQL is the metadata database, Redis the
  Celery broker (and the store a ``redis`` connection for pacing can point at, or a Redis of its
  own that a test can stop and start while Celery goes on), CeleryExecutor with
  several workers that each stand for a host of their own (hostname, pacing folder, temporary
  folder), two triggerers, a scheduler, a dag-processor and the API server.
  ``tests/test_deployment_celery.py`` and ``bench/celery_pacing.py``.

Every process is started in a process group of its own and stopped by its pid and group, together
with its descendants (Airflow runs each task in a group of its own, which a signal to the
component's group does not reach), at teardown and when start-up fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import psutil
from cryptography.fernet import Fernet

from tests.helpers import REPO, free_port, wait_until

#: Where Debian installs PostgreSQL's server binaries (not on PATH); the newest version is used.
POSTGRES_BIN = max(
    Path("/usr/lib/postgresql").glob("*/bin"),
    key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0,
    default=Path("/usr/lib/postgresql/15/bin"),
)


def hostname() -> str:
    """``[core] hostname_callable`` of a deployment's processes: the host each of them stands for."""
    return os.environ.get("DEPLOYMENT_HOSTNAME") or socket.getfqdn()


def stop_processes(processes: list[subprocess.Popen], sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """
    Signal each process's group, then wait for them; SIGKILL what is left, descendants included.

    With SIGKILL this is a host dying: the groups and every descendant go at once, task processes
    (in groups of their own) included.
    """
    descendants: list[psutil.Process] = []
    for process in processes:
        with suppress(psutil.NoSuchProcess):
            descendants += psutil.Process(process.pid).children(recursive=True)
        with suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
    if sig == signal.SIGKILL:
        for child in descendants:
            with suppress(psutil.NoSuchProcess):
                child.kill()
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        with suppress(ProcessLookupError):  # members of the group that outlived its leader
            os.killpg(process.pid, signal.SIGKILL)
    for child in descendants:
        with suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(descendants, timeout=10)


class Postgres:
    """
    PostgreSQL from Debian in a private data directory on a free loopback port.

    PostgreSQL refuses to run as root, so as root its commands run as the ``postgres`` system user
    (``runuser``), in a folder that user owns. The server runs as our child (in its own process
    group, not daemonized by ``pg_ctl start``, so that its exit is reaped), and is stopped with
    ``pg_ctl -m fast stop``.
    """

    user = "airflow"

    @staticmethod
    def missing() -> str | None:
        """Why this machine cannot run it, or None."""
        if not (POSTGRES_BIN / "postgres").exists():
            return f"PostgreSQL's server is not installed ({POSTGRES_BIN}/postgres; .ci/run installs it)"
        if os.geteuid() == 0 and shutil.which("runuser") is None:
            return "running as root without runuser, and PostgreSQL refuses to run as root"
        return None

    def __init__(self) -> None:
        self.port = free_port()
        # Not under pytest's temporary folder: that is private to root, and the server's user must reach it.
        self.root = Path(tempfile.mkdtemp(prefix="doc2x-postgres-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self.process: subprocess.Popen | None = None
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        try:
            self._run("initdb", "-D", self.data, "-A", "trust", "-U", self.user, "-E", "UTF8", "--no-sync")
            server = [str(POSTGRES_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port)]
            server += ["-k", str(self.root), "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200"]
            for setting in ("fsync=off", "synchronous_commit=off", "full_page_writes=off"):  # a test database
                server += ["-c", setting]
            with open(self.log, "ab") as log:
                self.process = subprocess.Popen(
                    self._as_server_user(server),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.root,
                    start_new_session=True,
                )
            wait_until(self.ready, timeout=60, interval=0.1, message="PostgreSQL to accept connections")
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        """SQLAlchemy's URL for Airflow's metadata database."""
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/postgres"

    def connect(self) -> Any:
        """A psycopg2 connection (autocommit), to read the metadata database directly."""
        import psycopg2

        connection = psycopg2.connect(host="127.0.0.1", port=self.port, user=self.user, dbname="postgres")
        connection.autocommit = True
        return connection

    def ready(self) -> bool:
        import psycopg2

        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"PostgreSQL exited: {self.log.read_text(errors='replace')[-3000:]}")
        try:
            self.connect().close()
        except psycopg2.OperationalError:
            return False
        return True

    @staticmethod
    def _as_server_user(command: list[str]) -> list[str]:
        return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command

    def _run(self, program: str, *args: object, check: bool = True) -> subprocess.CompletedProcess:
        command = self._as_server_user([str(POSTGRES_BIN / program), *map(str, args)])
        result = subprocess.run(
            command, capture_output=True, text=True, cwd=self.root, timeout=180, start_new_session=True
        )
        if check and result.returncode != 0:
            raise RuntimeError(f"{program} failed: {result.stdout}{result.stderr}")
        return result

    def stop(self) -> None:
        if self.process is not None:
            if self.process.poll() is None:
                self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "-t", "60", "stop", check=False)
            stop_processes([self.process], signal.SIGKILL if self.process.poll() is None else signal.SIGTERM)
            self.process = None
        shutil.rmtree(self.root, ignore_errors=True)


class Redis:
    """
    Redis from Debian on a free loopback port, nothing persisted; stopped by its pid.

    :meth:`stop` and :meth:`start` stop it and start it again on the same port (empty, as nothing is
    persisted): what its clients see of a Redis that goes away and comes back.
    """

    @staticmethod
    def missing() -> str | None:
        if shutil.which("redis-server") is None:
            return "redis-server is not installed (.ci/run installs Debian's redis-server)"
        return None

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.log = folder / "redis.log"
        self.port = free_port()
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        """Start the server on its port, unless it runs; return once it answers PING."""
        if self.running():
            return
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self.folder)]
        command += ["--logfile", str(self.log)]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_until(
                self.ready, timeout=30, interval=0.05, message=f"Redis on port {self.port} to answer PING"
            )
        except BaseException:
            self.stop()
            raise

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def connection_json(self, db: int = 1) -> str:
        """An Airflow ``redis`` connection to it, for ``AIRFLOW_CONN_...`` variables."""
        return json.dumps({"conn_type": "redis", "host": "127.0.0.1", "port": self.port, "extra": {"db": db}})

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:  # e.g. its port was taken meanwhile: say so now
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"redis-server on port {self.port} exited ({self.process.returncode}): {log}")
        return self.ping()

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server by its pid (SIGTERM, then SIGKILL if it lingers); safe to call twice."""
        if self.process is not None and self.process.poll() is None:
            stop_processes([self.process], signal.SIGTERM, timeout=10)


class Deployment:
    """Airflow's components as separate processes (each in its own process group), and a REST client."""

    executor = "LocalExecutor"

    def __init__(
        self,
        home: Path,
        doc2x_connection: str,
        *,
        dags_folder: Path = REPO / "example_dags",
        parallelism: int = 4,
        env: dict[str, str] | None = None,
    ) -> None:
        port = free_port()
        bin_dir = str(Path(sys.executable).parent)
        self.home = home
        self.api = httpx.Client(base_url=f"http://localhost:{port}", timeout=30)
        self.processes: dict[str, subprocess.Popen] = {}
        self.dag_of_run: dict[str, str] = {}
        self.env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(dags_folder),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": self.executor,
            "AIRFLOW__CORE__PARALLELISM": str(parallelism),
            "AIRFLOW__API__PORT": str(port),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://localhost:{port}/execution/",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__TEST_CONNECTION": "Enabled",
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            # The DAG files do not change while a deployment runs: each is parsed when it is new or
            # changed, not again every 30 s (which kept a fifth of a core busy with the examples).
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "3600",
            "AIRFLOW__TRIGGERER__TRIGGERER_HEALTH_CHECK_THRESHOLD": "10",
            "AIRFLOW_CONN_DOC2X_DEFAULT": doc2x_connection,
            "DOC2X_PACING_DIR": str(home / "pacing"),
        }
        try:
            self.env.update(self.start_services())
            self.env.update(env or {})
            self.components = self.define_components()
            migrate = subprocess.run(
                ["airflow", "db", "migrate"], env=self.env, capture_output=True, text=True
            )
            assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
            for component in self.components:
                self.start(component)
            wait_until(
                self.healthy, timeout=180, interval=0.5, message="Airflow's components to report healthy"
            )
        except BaseException:
            self.stop()
            raise

    # -- what runs ----------------------------------------------------------------------------------

    def start_services(self) -> dict[str, str]:
        """Start what Airflow needs before its components; return the environment pointing at it."""
        return {}

    def define_components(self) -> dict[str, tuple[list[str], dict[str, str]]]:
        """Each component: its ``airflow`` subcommand and arguments, and its own environment."""
        return {name: ([name], {}) for name in ("api-server", "scheduler", "dag-processor", "triggerer")}

    def start(self, component: str) -> None:
        args, own_env = self.components[component]
        log = open(self.home / f"{component}.log", "ab")  # noqa: SIM115 - the process owns it
        self.processes[component] = subprocess.Popen(
            ["airflow", *args],
            env={**self.env, **own_env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def kill(self, component: str, sig: int = signal.SIGKILL) -> None:
        """Signal the component's whole process group; SIGKILL takes its task processes with it."""
        stop_processes([self.processes.pop(component)], sig)

    def stop(self) -> None:
        """Stop every component (all at once), then the services; safe to call twice."""
        stop_processes(list(self.processes.values()), signal.SIGTERM)
        self.processes.clear()
        self.stop_services()
        self.api.close()

    def stop_services(self) -> None:
        pass

    def healthy(self) -> bool:
        try:
            health = self.api.get("/api/v2/monitor/health").json()
        except (httpx.TransportError, ValueError):
            return False
        return all(health.get(part, {}).get("status") == "healthy" for part in ("scheduler", "triggerer"))

    # -- driving it ---------------------------------------------------------------------------------

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

    def task_logs(self, run_id: str, task_id: str, map_index: int = -1) -> dict[int, str]:
        """The task instance's log of each try (not its triggers'), by try number, from ``$AIRFLOW_HOME/logs``."""
        folder = self.home / "logs" / f"dag_id={self.dag_of_run[run_id]}" / f"run_id={run_id}"
        folder = folder / f"task_id={task_id}"
        if map_index >= 0:
            folder = folder / f"map_index={map_index}"
        tries = (re.fullmatch(r"attempt=(\d+)\.log", path.name) for path in folder.glob("attempt=*.log"))
        return {int(found[1]): (folder / found[0]).read_text(errors="replace") for found in tries if found}

    def logs(self) -> str:
        return "\n".join(
            f"--- {path.name}\n{path.read_text(errors='replace')[-3000:]}"
            for path in sorted(self.home.glob("*.log"))
        )


class CeleryDeployment(Deployment):
    """
    The deployment of production: PostgreSQL, Redis, CeleryExecutor with ``workers`` Celery workers
    (``worker-1``, ...), ``triggerers`` triggerers (``triggerer-1``, ...), scheduler, dag-processor
    and API server. Each worker stands for a host: its Celery hostname and Airflow's hostname (task
    instances and their logs name it), its own ``DOC2X_PACING_DIR`` and ``TMPDIR``.

    Every process can reach a Redis as the ``redis`` connection ``doc2x_pacing``: database 1 of the
    broker's Redis (the broker uses database 0), or with ``separate_pacing_redis`` a Redis of its own
    (``pacing_redis``), which :meth:`stop_pacing_redis` and :meth:`start_pacing_redis` stop and start
    again on the same port while Celery goes on.
    """

    executor = "CeleryExecutor"
    pacing_conn_id = "doc2x_pacing"

    @staticmethod
    def missing() -> str | None:
        """Why this machine cannot run it, or None."""
        for module, package in (
            ("psycopg2", "psycopg2-binary"),
            ("airflow.providers.celery", "apache-airflow-providers-celery"),
        ):
            try:
                __import__(module)
            except ImportError:
                return f"{package} is not installed (the test dependency group brings it)"
        return Postgres.missing() or Redis.missing()

    def __init__(
        self,
        home: Path,
        doc2x_connection: str,
        *,
        dags_folder: Path = REPO / "example_dags",
        workers: int = 3,
        worker_concurrency: int = 2,
        triggerers: int = 2,
        separate_pacing_redis: bool = False,
        env: dict[str, str] | None = None,
    ) -> None:
        self.worker_names = [f"worker-{number}" for number in range(1, workers + 1)]
        self.triggerer_names = [f"triggerer-{number}" for number in range(1, triggerers + 1)]
        self.worker_concurrency = worker_concurrency
        self.postgres: Postgres | None = None
        self.redis: Redis | None = None
        self.separate_pacing_redis = separate_pacing_redis
        #: The pacing store's own Redis, with ``separate_pacing_redis``.
        self.pacing_redis: Redis | None = None
        self._celery: Any = None
        super().__init__(
            home,
            doc2x_connection,
            dags_folder=dags_folder,
            parallelism=workers * worker_concurrency,
            env=env,
        )

    def start_services(self) -> dict[str, str]:
        self.postgres = Postgres()
        self.redis = Redis(self.home / "redis")
        if self.separate_pacing_redis:
            self.pacing_redis = Redis(self.home / "pacing-redis")
            pacing_connection = self.pacing_redis.connection_json(db=0)
        else:
            pacing_connection = self.redis.connection_json(db=1)
        return {
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": self.postgres.url,
            "AIRFLOW__CELERY__BROKER_URL": self.redis.url(0),
            "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + self.postgres.url.replace("+psycopg2", ""),
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(self.worker_concurrency),
            # One key on every host, as production has: trigger kwargs and connections are stored encrypted.
            "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
            f"AIRFLOW_CONN_{self.pacing_conn_id.upper()}": pacing_connection,
            # Each process names the host it stands for (tests.helpers.deployment.hostname).
            "AIRFLOW__CORE__HOSTNAME_CALLABLE": f"{__name__}.hostname",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            # A host that dies leaves its task running in the database until this timeout fails it.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "15",
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
        }

    def define_components(self) -> dict[str, tuple[list[str], dict[str, str]]]:
        components: dict[str, tuple[list[str], dict[str, str]]] = {
            name: ([name], {}) for name in ("api-server", "scheduler", "dag-processor")
        }
        for name in self.triggerer_names:
            # Logs are read from the shared log folder: no log server, whose port they would share.
            components[name] = (["triggerer", "--skip-serve-logs"], {"DEPLOYMENT_HOSTNAME": name})
        for name in self.worker_names:
            host = self.home / "hosts" / name
            (host / "tmp").mkdir(parents=True, exist_ok=True)
            args = ["celery", "worker", "--celery-hostname", name, "--skip-serve-logs"]
            args += ["--concurrency", str(self.worker_concurrency), "--pid", str(host / "worker.pid")]
            own_env = {
                "DEPLOYMENT_HOSTNAME": name,
                "DOC2X_PACING_DIR": str(host / "pacing"),
                "TMPDIR": str(host / "tmp"),
            }
            components[name] = (args, own_env)
        return components

    def stop_services(self) -> None:
        if self._celery is not None:
            self._celery.close()
            self._celery = None
        if self.pacing_redis is not None:
            self.pacing_redis.stop()
        if self.redis is not None:
            self.redis.stop()
        if self.postgres is not None:
            self.postgres.stop()

    def stop_pacing_redis(self) -> None:
        """Stop the pacing store's own Redis by its pid (SIGTERM); the broker and Celery go on."""
        self._own_pacing_redis().stop()

    def start_pacing_redis(self) -> None:
        """Start the pacing store's own Redis again, on the same port (empty); return once it answers."""
        self._own_pacing_redis().start()

    def _own_pacing_redis(self) -> Redis:
        if self.pacing_redis is None:
            raise RuntimeError(
                "this deployment paces in the broker's Redis: start it with separate_pacing_redis=True"
            )
        return self.pacing_redis

    def healthy(self) -> bool:
        if not super().healthy():
            return False
        live = self.api.get("/api/v2/jobs", params={"job_type": "TriggererJob", "is_alive": True}).json()
        hosts = {job["hostname"] for job in live.get("jobs", [])}
        return hosts >= set(self.triggerer_names) and set(self.live_workers()) >= set(self.worker_names)

    def live_workers(self) -> list[str]:
        """The Celery workers that answer a ping through the broker, by hostname."""
        replies = self._celery_app().control.ping(timeout=1.0)
        return sorted(name.split("@", 1)[-1] for reply in replies for name in reply)

    def _celery_app(self) -> Any:
        """A Celery client of the deployment's broker, to ask the workers (ping, active tasks)."""
        if self._celery is None:
            from celery import Celery

            assert self.redis is not None
            self._celery = Celery(broker=self.redis.url(0))
        return self._celery

    def sql(self, query: str, *params: object) -> list[tuple]:
        """Rows of a query on the metadata database."""
        assert self.postgres is not None
        with self.postgres.connect() as connection, connection.cursor() as cursor:
            cursor.execute(query, params)
            return cursor.fetchall() if cursor.description else []

    def triggerer_of(self, ti_id: str) -> str | None:
        """The host of the triggerer that runs the task instance's trigger, if one does."""
        rows = self.sql(
            "SELECT job.hostname FROM task_instance ti JOIN trigger t ON t.id = ti.trigger_id "
            "JOIN job ON job.id = t.triggerer_id WHERE ti.id = %s",
            ti_id,
        )
        return rows[0][0] if rows else None

    def holding(self, ti_id: str) -> list[str]:
        """
        What of the workers still holds the task instance: a Celery task that Celery reports active
        for it (its arguments name it), or a task process (titled ``airflow worker -- <ti id>``).
        """
        held = []
        active = self._celery_app().control.inspect(timeout=1.0).active() or {}
        for node, tasks in active.items():
            held += [
                f"{node}: active Celery task {task['id']}" for task in tasks if ti_id in str(task["args"])
            ]
        for name in self.worker_names:
            process = self.processes.get(name)
            if process is None:
                continue
            with suppress(psutil.NoSuchProcess):
                for child in psutil.Process(process.pid).children(recursive=True):
                    with suppress(psutil.NoSuchProcess):
                        title = " ".join(child.cmdline())
                        if title.startswith("airflow worker -- ") and ti_id in title:
                            held.append(f"{name}: task process {child.pid}")
        return held
