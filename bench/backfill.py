"""
A backfill at archive scale: tens of thousands of images through the PDF lane in mapped tasks, on a
real scheduler and triggerer, against the local server with fast page workers.

    python bench/backfill.py                          # 20,000 images in 20 mapped tasks
    python bench/backfill.py --images 200 --tasks 2   # a small check

Starts the local server (``pdf_page_seconds=0``, ``pickup_delay=0``, ``--page-workers`` page
workers) and Airflow 3.3's API server, scheduler (LocalExecutor, ``--slots`` worker processes),
dag-processor and triggerer on loopback (``tests.helpers.deployment.Deployment``, SQLite), then runs
the DAGs of ``bench/dags/doc2x_backfill.py`` through the REST API:

1. ``doc2x_backfill_empty`` twice: ``--tasks`` (at least twice ``--slots``) mapped tasks that do
   nothing; the first spawns LocalExecutor's workers and is not used, the second is the baseline;
2. the images, one folder per mapped task, listed (``list``) and parsed (``parse``:
   ``method="pdf"``, deferrable, ``retries=2``), once for each place the results go
   (``--results``, both by default, each run reported on its own):

   - ``xcom``, ``doc2x_backfill_xcom``: the records, Markdown in them, in XCom: what the lane
     itself costs;
   - ``files``, ``doc2x_backfill``: each result as files under an ``output_path`` (a folder, its
     Markdown and its sidecar), XCom holding paths, as a backfill of an archive would; the
     difference from the first run is what writing the results costs on this machine's disk.

The images are distinct grayscale JPEG pages of about 17 KB: four renders, each copy with its own
Markdown in a JPEG comment (what the local server's ``simple`` engine answers), so each has its own
sha256 and bills once; made once (in ``--images-dir``, or the scratch folder) and then reused.

How each figure is made:

- **Our CPU per image.** LocalExecutor runs each task start (a first start, or a resume after a
  deferral) in a task runner process that its worker process forks and reaps, so the kernel adds
  the runner's user + system time to the worker's ``cutime + cstime`` (``/proc/<pid>/stat``, read
  with psutil) once it ends. The figure is the growth of that sum over all worker processes during
  the run, less one baseline per task start, over the images. A task start is a ``running`` event
  of the run in Airflow's audit log (the ``log`` table); the baseline is the same growth during the
  empty run over its starts (fork, the DAG file's parse, the calls to the API server, the exit), so
  Airflow's start-up drops out and what is left is the operator's work (the ``folders`` and
  ``list`` tasks stay in, at the cost of listing). Beside it: the workers' own time (the
  supervisors: log forwarding, heartbeats, the API calls they make for the task), the
  triggerer's (less its idle rate during the empty run), and every other process's.
- **Peak memory.** ``VmHWM`` (the high-water mark of the resident set) from
  ``/proc/<pid>/status``, every 0.2 s, of each task runner, each worker process and each process of
  the triggerer, during the run: the largest of each kind. A task runner is forked without exec,
  so its ``VmHWM`` counts the pages it shares with its worker too.
- **What the triggerer passes on.** Every 2 s during the run, the largest trigger kwargs and the
  largest resumed task's kwargs (its event) in the database: Airflow 3's triggerer sends the one and
  logs the other through sockets of about 208 KB (apache/airflow#65286).
- **Metadata that remains.** After the run ended and its triggers were cleaned up: for each table
  of the SQLite metadata database, the growth since before the run of the sum of
  ``length(CAST(column AS BLOB))`` over every column of every row (the bytes of the stored values,
  without SQLite's record headers and indexes), per image. The tables the operator writes to
  (``task_state_store``, ``xcom``, ``trigger``, ``task_instance``) are summed against the target;
  XCom is split by task (``list`` holds the paths the DAG feeds the operator). Beside it: the
  growth of the pages in use, ``(page_count - freelist_count) * page_size``, indexes included.
- **Wall time against what the server allowed.** From the trigger to the run's success (REST API),
  and from the first task start to the last end (``task_instance``). Before Airflow starts, PDFs of
  the first ``--calibrate`` images (packed as the lane packs them, 200 pages at most), sent from
  this process with the hook within the key's bound in flight (``pdf_max_in_flight`` PDFs,
  ``pdf_max_pages_in_flight`` pages), give the server's page throughput alone on this machine: the
  images over it is the fastest a run could go. The server counts the PDFs and pages in progress.

Targets printed beside the figures: at most 2 ms of our worker CPU per image, at most 1.5 KB of
metadata per image that remains, no process over 500 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import importlib.util
import io
import os
import shlex
import sqlite3
import sys
import threading
import time
from contextlib import closing, suppress
from dataclasses import dataclass, field
from pathlib import Path

import airflow
import psutil
from _support import SCRATCH, LocalServer, report

from tests.helpers import AIRFLOW_VERSION, wait_until
from tests.helpers.deployment import Deployment

DAGS = Path(__file__).resolve().parent / "dags"
#: The backfill's DAG for each place its results go (``--results``).
MODES = {"xcom": "doc2x_backfill_xcom", "files": "doc2x_backfill"}
EMPTY_DAG_ID = "doc2x_backfill_empty"
#: How LocalExecutor titles its worker processes (``setproctitle``); their children are task runners.
WORKER_TITLE = "airflow worker -- LocalExecutor"
#: The tables the operator writes to, summed against the target.
OPERATOR_TABLES = ("task_state_store", "xcom", "trigger", "task_instance")
TARGET_CPU_MS = 2.0
TARGET_BYTES_PER_IMAGE = 1536
TARGET_PEAK_BYTES = 500 * 10**6
RENDERS = 4


# -- the images -----------------------------------------------------------------------------------


def make_pages(count: int, tasks: int, root: Path) -> list[Path]:
    """``count`` distinct JPEG pages in ``tasks`` folders (sizes differ by one at most); the folders."""
    root = root / f"{count}-in-{tasks}"
    folders = [root / f"part-{number:03d}" for number in range(tasks)]
    marker = root / "complete"
    if marker.exists():
        return folders
    from PIL import Image, ImageDraw, ImageFilter

    bodies = []
    for render in range(RENDERS):
        page = Image.new("L", (400, 560), "white")
        draw = ImageDraw.Draw(page)
        for line in range(20):
            right = 360 - (line * 37 + render * 53) % 130
            draw.rectangle((40, 40 + 24 * line, right, 48 + 24 * line), fill="black")
        encoded = io.BytesIO()
        page.filter(ImageFilter.GaussianBlur(1.5)).save(encoded, format="JPEG", quality=50)
        bodies.append(encoded.getvalue()[2:])  # after SOI: the comment segment goes in front
    for number in range(count):
        folder = folders[number * tasks // count]
        folder.mkdir(parents=True, exist_ok=True)
        text = f"# Backfill Page {number}\n\nPage {number} of an archive's backfill.".encode()
        comment = b"\xff\xfe" + (len(text) + 2).to_bytes(2, "big") + text
        (folder / f"page-{number:06d}.jpg").write_bytes(b"\xff\xd8" + comment + bodies[number % RENDERS])
    marker.touch()
    return folders


# -- the processes --------------------------------------------------------------------------------


def high_water_mark(pid: int) -> int:
    """A process's ``VmHWM`` in bytes, 0 once it has ended."""
    with suppress(OSError, ValueError), open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(process: psutil.Process, *, reaped: bool = True, tree: bool = False) -> float:
    """User + system CPU seconds of a process; with ``reaped``, of the children it waited for too;
    with ``tree``, of its live descendants as well. 0 once it has ended."""
    total = 0.0
    for member in [process, *(process.children(recursive=True) if tree else [])]:
        with suppress(psutil.NoSuchProcess):
            times = member.cpu_times()
            total += times.user + times.system
            if reaped:
                total += times.children_user + times.children_system
    return total


def kernel_seconds(process: psutil.Process) -> float:
    """System CPU seconds of a live process and its descendants, reaped children included; 0 once ended."""
    total = 0.0
    for member in [process, *process.children(recursive=True)]:
        with suppress(psutil.NoSuchProcess):
            times = member.cpu_times()
            total += times.system + times.children_system
    return total


def title(process: psutil.Process) -> str:
    """How a process names itself, short: its title, or its command without the interpreter's path."""
    words = " ".join(process.cmdline()).split()
    if words and words[0] == sys.executable:
        words = [Path(words[1]).name, *words[2:]] if len(words) > 1 else words
    return " ".join(words)[:80]


@dataclass
class Peak:
    """The largest ``VmHWM`` seen of one kind of process, and which process it was."""

    size: int = 0
    title: str = ""


class Watch:
    """The deployment's processes, found by their place in the process tree, and their peak memory.

    A thread reads ``VmHWM`` of every task runner, worker process and triggerer process every
    ``interval`` seconds; :meth:`restart` starts the peaks over.
    """

    def __init__(self, deployment: Deployment, interval: float = 0.2) -> None:
        self.deployment = deployment
        self.interval = interval
        self.peaks: dict[str, Peak] = {}
        # The largest trigger kwargs and resumed task's kwargs (its event) seen in the database, in bytes.
        self.messages = {"trigger kwargs": 0, "event (a resumed task's kwargs)": 0}
        self.runners_seen: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)
        self._thread.start()

    def component(self, name: str) -> psutil.Process:
        return psutil.Process(self.deployment.processes[name].pid)

    def workers(self) -> list[psutil.Process]:
        """LocalExecutor's worker processes: the scheduler's children titled as such."""
        found = []
        for child in self.component("scheduler").children():
            with suppress(psutil.NoSuchProcess):
                if " ".join(child.cmdline()).startswith(WORKER_TITLE):
                    found.append(child)
        return found

    def runners(self) -> list[psutil.Process]:
        """The task runners alive now: the workers' children."""
        found = []
        for worker in self.workers():
            with suppress(psutil.NoSuchProcess):
                found += worker.children()
        return found

    def kinds(self) -> dict[str, list[psutil.Process]]:
        triggerer = self.component("triggerer")
        return {
            "task runner": self.runners(),
            "worker (supervisor)": self.workers(),
            "triggerer": [triggerer, *triggerer.children(recursive=True)],
        }

    def _sample(self) -> None:
        rounds = 0
        while not self._stop.wait(self.interval):
            rounds += 1
            if rounds % 10 == 0:  # every 2 s: the messages Airflow's triggerer passes on
                self._sample_messages()
            with suppress(psutil.NoSuchProcess, KeyError):
                for kind, processes in self.kinds().items():
                    for process in processes:
                        size = high_water_mark(process.pid)
                        with self._lock, suppress(psutil.NoSuchProcess):
                            if kind == "task runner":
                                self.runners_seen.add(process.pid)
                            peak = self.peaks.setdefault(kind, Peak())
                            if size > peak.size:
                                peak.size, peak.title = size, title(process)

    def _sample_messages(self) -> None:
        database = self.deployment.home / "airflow.db"
        with suppress(sqlite3.Error):
            ((kwargs,),) = sql(database, "SELECT MAX(length(CAST(kwargs AS BLOB))) FROM trigger")
            ((event,),) = sql(database, "SELECT MAX(length(CAST(next_kwargs AS BLOB))) FROM task_instance")
            with self._lock:
                for name, size in zip(self.messages, (kwargs, event), strict=True):
                    self.messages[name] = max(self.messages[name], size or 0)

    def restart(self) -> None:
        with self._lock:
            self.peaks, self.runners_seen = {}, set()
            self.messages = dict.fromkeys(self.messages, 0)

    def results(self) -> tuple[dict[str, Peak], int, dict[str, int]]:
        with self._lock:
            return dict(self.peaks), len(self.runners_seen), dict(self.messages)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cpu(self, server: LocalServer) -> dict[str, float]:
        """CPU seconds so far of each part of the deployment (see the module's doc)."""
        workers = self.workers()
        return {
            "task runners": sum(
                times.children_user + times.children_system for times in (w.cpu_times() for w in workers)
            )
            + sum(cpu_seconds(runner, tree=True) for runner in self.runners()),
            "task runners (kernel)": sum(w.cpu_times().children_system for w in workers)
            + sum(kernel_seconds(runner) for runner in self.runners()),
            "workers (supervisors)": sum(cpu_seconds(worker, reaped=False) for worker in workers),
            "triggerer": cpu_seconds(self.component("triggerer"), tree=True),
            "API server": cpu_seconds(self.component("api-server"), tree=True),
            "scheduler (its workers apart)": cpu_seconds(self.component("scheduler"), reaped=False),
            "dag-processor": cpu_seconds(self.component("dag-processor"), tree=True),
            "local server": cpu_seconds(psutil.Process(server.process.pid), tree=True),
        }


# -- the metadata database ------------------------------------------------------------------------


def database_contents(path: Path) -> dict[str, tuple[int, int]]:
    """Each table's rows and the bytes of their values (see the module's doc)."""
    found = {}
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)) as database:
        query = database.execute  # SQL on the metadata database
        tables = [
            name
            for (name,) in query(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
            )
        ]
        for table in tables:
            columns = [row[1] for row in query(f'PRAGMA table_info("{table}")')]
            values = " + ".join(f'COALESCE(length(CAST("{column}" AS BLOB)), 0)' for column in columns)
            rows, size = query(f'SELECT COUNT(*), COALESCE(SUM({values}), 0) FROM "{table}"').fetchone()
            found[table] = (rows, size)
    return found


def sql(path: Path, statement: str, *params: object) -> list[tuple]:
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=60)) as database:
        return database.execute(statement, params).fetchall()


def pages_in_use(path: Path) -> int:
    """Bytes of the database's pages that hold data (the free list left out)."""
    (count,), (free,), (size,) = (
        sql(path, f"PRAGMA {name}")[0] for name in ("page_count", "freelist_count", "page_size")
    )
    return (count - free) * size


# -- the runs -------------------------------------------------------------------------------------


@dataclass
class Run:
    """One DAG run and what it cost."""

    run_id: str
    state: str
    seconds: float
    cpu: dict[str, float]
    starts: int
    runners_seen: int
    peaks: dict[str, Peak] = field(default_factory=dict)
    messages: dict[str, int] = field(default_factory=dict)


def run_dag(deployment: Deployment, watch: Watch, server: LocalServer, dag_id: str, conf: dict) -> Run:
    """Trigger a run, wait for it and for its task runners to end; what it cost."""
    wait_until(lambda: not watch.runners(), timeout=120, interval=0.2, message="the task runners to end")
    watch.restart()
    before = watch.cpu(server)
    started = time.monotonic()
    run_id = deployment.trigger(dag_id, conf)
    state = deployment.wait_for_run(run_id, timeout=24 * 3600, must_succeed=False)
    seconds = time.monotonic() - started
    wait_until(lambda: not watch.runners(), timeout=120, interval=0.2, message="the task runners to end")
    after = watch.cpu(server)
    peaks, seen, messages = watch.results()
    (starts,) = sql(
        deployment.home / "airflow.db",
        "SELECT COUNT(*) FROM log WHERE dag_id = ? AND run_id = ? AND event = 'running'",
        dag_id,
        run_id,
    )[0]
    cpu = {part: after[part] - before[part] for part in after}
    return Run(run_id, state, seconds, cpu, starts, seen, peaks, messages)


def server_alone(images: list[str], max_pages: int) -> tuple[int, float]:
    """Pages parsed and seconds: PDFs of ``images`` through the hook, within the key's bound in flight."""
    # No log line per PDF from this process's Airflow (its level is read when Airflow is first
    # imported, here); the deployment's components, started later, log as usual.
    level = "AIRFLOW__LOGGING__LOGGING_LEVEL"
    given = os.environ.get(level)
    os.environ[level] = "WARNING"
    from airflow_provider_doc2x.hooks.doc2x import Doc2XHook
    from airflow_provider_doc2x.pdf.packing import pack_images

    if given is None:
        del os.environ[level]
    else:
        os.environ[level] = given

    with pack_images(images, pdf_max_pages=max_pages, temp_dir=SCRATCH) as packed:
        hook = Doc2XHook()

        async def parse_all() -> None:
            await asyncio.gather(
                *(
                    hook.pdf.aparse_pdf(pdf.path, pages=pdf.page_count, poll_interval=0.05)
                    for pdf in packed.pdfs
                )
            )

        started = time.monotonic()
        asyncio.run(parse_all())
        return packed.page_count, time.monotonic() - started


# -- the report -----------------------------------------------------------------------------------


def verdict(value: float, target: float) -> str:
    return "within" if value <= target else "OVER"


def cpu_rows(args, run: Run, baseline: Run) -> list[tuple[str, object]]:
    per_start = baseline.cpu["task runners"] / max(1, baseline.starts)
    ours = run.cpu["task runners"] - run.starts * per_start
    ms = 1000 * ours / args.images
    kernel_per_start = baseline.cpu["task runners (kernel)"] / max(1, baseline.starts)
    supervisor_per_start = baseline.cpu["workers (supervisors)"] / max(1, baseline.starts)
    supervisors = run.cpu["workers (supervisors)"] - run.starts * supervisor_per_start
    idle = baseline.cpu["triggerer"] / baseline.seconds
    triggerer = run.cpu["triggerer"] - idle * run.seconds
    rows: list[tuple[str, object]] = [
        (
            "our worker CPU per image",
            f"{ms:.2f} ms (target <= {TARGET_CPU_MS:g} ms: {verdict(ms, TARGET_CPU_MS)}): task runners' "
            f"{run.cpu['task runners']:.1f} s less {run.starts} starts x {per_start:.2f} s, over {args.images}",
        ),
        (
            "  task starts (baseline)",
            f"{run.starts} `running` events in the audit log, {run.runners_seen} task runner processes seen; "
            f"the empty run: {baseline.starts} starts, {baseline.cpu['task runners']:.1f} s",
        ),
        (
            "  of which in the kernel (system time)",
            f"{1000 * (run.cpu['task runners (kernel)'] - run.starts * kernel_per_start) / args.images:.2f} ms "
            "(files created, read and listed; less the empty run's per start)",
        ),
        (
            "  task runners' CPU per image, nothing taken off",
            f"{1000 * run.cpu['task runners'] / args.images:.2f} ms",
        ),
        (
            "supervisors' CPU per image",
            f"{1000 * supervisors / args.images:.2f} ms (worker processes' own time, less "
            f"{supervisor_per_start:.2f} s per start as in the empty run)",
        ),
        (
            "triggerer's CPU per image",
            f"{1000 * triggerer / args.images:.2f} ms (its processes, less its idle "
            f"{idle * 1000:.0f} ms/s of the empty run over the {run.seconds:.0f} s)",
        ),
    ]
    others = ", ".join(
        f"{part} {1000 * seconds / args.images:.2f}"
        for part, seconds in run.cpu.items()
        if part not in ("task runners", "task runners (kernel)", "workers (supervisors)", "triggerer")
    )
    total = sum(seconds for part, seconds in run.cpu.items() if part != "task runners (kernel)")
    rows.append(
        (
            "other processes' CPU per image (ms)",
            f"{others}; all processes together {1000 * total / args.images:.2f} ms",
        )
    )
    return rows


def memory_rows(run: Run) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = []
    for kind in ("task runner", "worker (supervisor)", "triggerer"):
        peak = run.peaks.get(kind, Peak())
        rows.append(
            (
                f"peak memory of a {kind}",
                f"{peak.size / 1e6:.0f} MB VmHWM ({verdict(peak.size, TARGET_PEAK_BYTES)} 500 MB; {peak.title})",
            )
        )
    for name, size in run.messages.items():
        # What the triggerer passes through its sockets of about 208 KB (apache/airflow#65286).
        rows.append((f"largest {name}", f"{size / 1000:.1f} KB (sampled every 2 s)"))
    return rows


def database_rows(
    args, before: dict, after: dict, used: tuple[int, int], xcom: list[tuple]
) -> list[tuple[str, object]]:
    per_image = lambda size: f"{size / args.images:.0f} B/image"  # noqa: E731
    rows: list[tuple[str, object]] = []
    operator_bytes = 0
    for table, (rows_after, size_after) in sorted(after.items()):
        rows_before, size_before = before.get(table, (0, 0))
        grown = size_after - size_before
        if table in OPERATOR_TABLES:
            operator_bytes += grown
        elif grown == 0:
            continue
        rows.append(
            (
                f"  {table}",
                f"{per_image(grown)} ({rows_after - rows_before:+d} rows, {grown:+,d} B; {rows_after} rows left)",
            )
        )
    for task_id, count, size in xcom:
        rows.append((f"    xcom of {task_id}", f"{per_image(size or 0)} ({count} rows)"))
    total = sum(size for _, size in after.values()) - sum(size for _, size in before.values())
    summed = operator_bytes / args.images
    return [
        (
            "metadata that remains per image",
            f"{summed:.0f} B in {', '.join(OPERATOR_TABLES)} (target <= {TARGET_BYTES_PER_IMAGE} B: "
            f"{verdict(summed, TARGET_BYTES_PER_IMAGE)}); every table: {total / args.images:.0f} B",
        ),
        ("  database pages in use, growth", per_image(used[1] - used[0]) + " (indexes included)"),
        *rows,
    ]


def wall_rows(args, run: Run, span: float, alone: tuple[int, float], stats: dict) -> list[tuple[str, object]]:
    pages, seconds = alone
    rate = pages / seconds
    fastest = args.images / rate
    return [
        (
            "wall time",
            f"{run.seconds:.1f} s from the trigger to the run's success ({args.images / run.seconds:.1f} images/s); "
            f"{span:.1f} s from the first task start to the last end",
        ),
        (
            "what the server allowed",
            f"{rate:.0f} pages/s alone ({pages} pages in {seconds:.1f} s, before Airflow started): "
            f"{fastest:.1f} s for {args.images} images; the run took {run.seconds / fastest:.1f} x that",
        ),
        (
            "  the lane's bound in flight",
            f"{args.pdfs_in_flight} PDFs and {args.pages_in_flight} pages per key in a task "
            f"(PDFs of at most 200 pages), {args.tasks} tasks",
        ),
        (
            "  at the server, at most",
            f"{stats['max_pdf_tasks_in_progress']} PDFs and {stats['max_pages_in_progress']} pages in progress, "
            f"{stats['max_pages_parsing']} pages parsing at once ({args.page_workers} page workers)",
        ),
    ]


# -- the bench ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--tasks", type=int, default=20, help="mapped tasks (one folder of images each)")
    parser.add_argument("--slots", type=int, default=4, help="LocalExecutor worker processes")
    parser.add_argument("--page-workers", type=int, default=32, help="the server's pages parsed at once")
    parser.add_argument("--pdfs-in-flight", type=int, default=5, help="the connection's pdf_max_in_flight")
    parser.add_argument(
        "--pages-in-flight", type=int, default=1000, help="the connection's pdf_max_pages_in_flight"
    )
    parser.add_argument("--poll-interval", type=float, default=2.0, help="the operator's poll_interval")
    parser.add_argument(
        "--calibrate", type=int, default=2000, help="images for the server's throughput alone"
    )
    parser.add_argument("--images-dir", type=Path, help="where the images are made once and reused")
    parser.add_argument(
        "--results",
        choices=["files", "xcom", "both"],
        default="both",
        help="where the parse tasks put the results: files under output_path, XCom, or a run of each",
    )
    args = parser.parse_args()
    print("# " + shlex.join([sys.executable, *sys.argv]), flush=True)
    if not Path(importlib.util.cache_from_source(airflow.__file__)).exists():
        # pip compiles a package's modules when it installs them; uv does not, and with
        # PYTHONDONTWRITEBYTECODE set every task process compiles every module it imports.
        print(
            "# Airflow's modules have no bytecode cache: each process compiles them, so the CPU figures "
            "are too high (python -m compileall the venv's site-packages first)",
            flush=True,
        )
    if AIRFLOW_VERSION < (3, 3):
        raise SystemExit("this bench deploys Airflow 3.3's components and REST API")

    made = time.monotonic()
    folders = make_pages(args.images, args.tasks, args.images_dir or SCRATCH / "pages")
    images = sorted(str(path) for folder in folders for path in folder.glob("*.jpg"))
    knobs = {"pdf_page_seconds": 0.0, "pickup_delay": 0.0, "pdf_page_workers": args.page_workers}
    print(
        f"# backfill: {len(images)} images ({sum(os.path.getsize(p) for p in images) / len(images) / 1e3:.0f} KB "
        f"each, ready in {time.monotonic() - made:.1f} s) in {args.tasks} mapped tasks, method='pdf', "
        f"{args.slots} LocalExecutor slots, poll_interval {args.poll_interval:g} s, {os.cpu_count()} cores; "
        "server knobs: " + ", ".join(f"{name}={value:g}" for name, value in knobs.items()),
        flush=True,
    )
    server = LocalServer()
    extra = {"pdf_max_in_flight": args.pdfs_in_flight, "pdf_max_pages_in_flight": args.pages_in_flight}
    server.configure(**knobs)
    server.use_as_default_connection(**extra)
    alone = server_alone(images[: args.calibrate], max_pages=200)
    server.reset()
    server.configure(**knobs)

    started = time.monotonic()
    deployment = Deployment(
        SCRATCH / "deployment",
        server.connection_json(**extra),
        dags_folder=DAGS,
        parallelism=args.slots,
        env={
            "DOC2X_BENCH_POLL_INTERVAL": str(args.poll_interval),
            # Two busy cores may delay a heartbeat: no task taken for dead while it works.
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "600",
        },
    )
    atexit.register(deployment.stop)
    watch = Watch(deployment)
    atexit.register(watch.stop)
    print(f"# deployment started in {time.monotonic() - started:.0f} s", flush=True)
    # The first run spawns LocalExecutor's workers, and each worker's first task imports its
    # supervisor: not a baseline. Twice as many tasks as workers reach each of them, likely.
    empty = {"folders": [f"empty-{number}" for number in range(max(args.tasks, 2 * args.slots))]}
    warm_up = run_dag(deployment, watch, server, EMPTY_DAG_ID, empty)
    print(f"# warm-up run of the empty tasks: {warm_up.seconds:.0f} s", flush=True)
    baseline = run_dag(deployment, watch, server, EMPTY_DAG_ID, empty)
    if baseline.state != "success":
        raise SystemExit(f"the empty run ended {baseline.state}\n{deployment.logs()}")
    for mode in MODES if args.results == "both" else [args.results]:
        server.reset()
        server.configure(**knobs)
        measure(args, deployment, watch, server, baseline, folders, alone, mode)


def measure(args, deployment, watch, server, baseline: Run, folders, alone, mode: str) -> None:
    """One run of the backfill, its results as files or in XCom (``mode``), and its report."""
    database = deployment.home / "airflow.db"
    contents_before, used_before = database_contents(database), pages_in_use(database)
    conf = {"folders": [str(folder) for folder in folders], "output_path": str(SCRATCH / f"results-{mode}")}
    run = run_dag(deployment, watch, server, MODES[mode], conf)
    stats = server.stats()
    # What remains: the triggerer deletes the run's triggers once no task waits on them.
    with suppress(AssertionError):  # left over after a minute: counted as what remains
        wait_until(lambda: not sql(database, "SELECT 1 FROM trigger"), timeout=60, interval=0.5)
    contents_after, used_after = database_contents(database), pages_in_use(database)
    xcom = sql(
        database,
        "SELECT task_id, COUNT(*), SUM(length(CAST(value AS BLOB))) FROM xcom WHERE run_id = ? GROUP BY task_id",
        run.run_id,
    )
    ((span,),) = sql(
        database,
        "SELECT (julianday(MAX(end_date)) - julianday(MIN(start_date))) * 86400 FROM task_instance"
        " WHERE run_id = ?",
        run.run_id,
    )
    parsed = sum(len(deployment.xcom(run.run_id, "parse", index) or []) for index in range(args.tasks))
    retried = sum(
        deployment.task_instance(run.run_id, "parse", index).get("try_number", 1) > 1
        for index in range(args.tasks)
    )
    where = "as files under output_path" if mode == "files" else "in XCom (no files)"
    report(
        f"{args.images} images, PDF lane, {args.tasks} mapped tasks, results {where} (run {run.state})",
        [
            (
                "images parsed",
                f"{parsed} (the parse tasks' XCom); pages billed {stats['pdf_pages_billed'] + stats['billed_total']}, "
                f"at most {max(stats['max_pdf_billed_per_page'], stats['max_billed_per_image'])} per page; "
                f"{stats['pdf_tasks']} PDFs, {stats['pdf_tasks_failed']} failed",
            ),
            ("mapped tasks that needed a second try", retried),
            *cpu_rows(args, run, baseline),
            *memory_rows(run),
            *database_rows(args, contents_before, contents_after, (used_before, used_after), xcom),
            *wall_rows(args, run, span, alone, stats),
        ],
    )


if __name__ == "__main__":
    main()
