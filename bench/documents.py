"""
What documents cost our worker, format by format, through real Airflow tasks; conversions beside
what Pillow alone takes for the same pages.

    python bench/documents.py               # 1,805 pages: 20 PDFs of 50 pages, 20 TIFFs of 10, ...
    python bench/documents.py --scale 0.5   # half as many files in every folder
    python bench/documents.py --small       # a few pages of each format (the smoke test)
    python bench/documents.py --repeat 3    # each run three times: the medians are printed
    python bench/documents.py --only pdf,jpeg   # some folders only (the baselines are needed for ratios)

A folder per format, every page a 1240x1754 page (A4 at 150 dpi) drawn by
``airflow_provider_doc2x.local.samples.render`` (an invoice, a report with a figure, a scanned
manifest, a scanned memo), each stamped with its own number so that no two pages share a hash,
half of the files grey and half RGB:

- PDFs of JPEG pages, passed through the PDF API as they are (20 of 50 pages: their
  cost per page is small, so many pages keep the run-to-run spread small beside it);
- multi-page TIFFs (LZW), packed losslessly into one PDF each (20 of 10 pages);
- WebP (lossy, Pillow's default), BMP and GIF, converted losslessly to PNG (150 of each);
- PNGs over 7 MB (2480x3508, A4 at 300 dpi, with a scanner's grain: incompressible enough to pass
  7 MB), packed into a one-page PDF each (5);
- plain JPEGs, sent as they are through the image API: the baseline (150).

Each folder is one ``Doc2XImageParseOperator`` task (deferrable, ``poll_interval`` 0.25 s): an
``airflow dags test`` of ``bench/dags/doc2x_bench.py`` (``bench/_airflow.py``), against the local
server in its own process with nothing throttled (a key of 10,000 images per second, jobs done in
0.1 s, PDFs picked up at once, no time per PDF page, exports at once). The runs go one after the
other, so that none takes CPU from another; other work on the machine still does (CPU time grows
when cores are shared), so the load average is printed at the start and the end.

How the figures are obtained:

- our worker CPU per page: the user + system CPU time of the ``airflow dags test`` process (it
  runs the task, its trigger in line and every resume; ``os.wait4``), over the folder, less that
  of a run over the folder's first file alone, divided by the pages the folder has beyond that
  file. Airflow's start-up, the DAG's parsing, the format's imports and a task's fixed work are in
  both runs, so they drop out: what is left is what one more page of that format costs, its
  document's share of per-document work included (checking, copying and hashing, converting,
  uploading, waiting, fetching and splitting the result, the records);
- the spread: a run's fixed CPU varies from run to run by a few tenths of a second. The one-image
  runs of the image API's formats (WebP, BMP, GIF, JPEG: nearly the same work, one page each)
  show by how much; that spread over a folder's further pages is printed beside its figure as
  its "+-". With ``--repeat N`` each of a folder's two runs is made N times, one after the other
  in turn, and the median CPU of each is used (the spread then is that of the medians);
- difference from the JPEG baseline: that figure less the plain JPEGs' (what a page costs beyond
  a page that needs nothing done to it);
- Pillow alone: in this bench's own process (``time.process_time``), over the same files, right
  after the folder's tasks (the machine as it was for them): ``Image.open``, ``load`` and ``save``
  as PNG (default compression) into memory, of every frame of a TIFF and of the one frame of the
  other files; per page;
- ours / Pillow alone: the format's CPU per page less that of its lane's baseline (the plain JPEGs
  for a raster sent to the image API, the PDFs passed through for a document packed for the PDF
  API), over Pillow alone's. The lane's own cost of a page (upload, wait, records) is left out,
  what the conversion adds to it is kept: the check of the header, copying and hashing the
  source, the conversion itself, the larger upload of what it made;
- peak memory: the largest high-water mark of resident memory (``VmHWM``) of one process of the
  folder's run (the ``airflow dags test`` process, which runs the task, and any it starts), read
  from ``/proc`` while it runs, and its growth over the one-file run. Not ``ru_maxrss``: a process
  started by fork and exec carries its parent's peak in it, so this bench's own would show;
- the intake's wall time (``Doc2X: checked N files in S s``, as the task logs it; four threads)
  and the deferrals, beside the figures: a document the PDF lane submits after a resume is copied
  again and its sha256 checked (a raster document is packed once, when it is sent). Every PDF the
  task sends costs writes to the task state store (the task's list of PDFs, shared by the PDFs that
  leave together, and the PDF's record before and after its PUT): through ``airflow dags test``
  the execution API that serves them runs in the task's own process, so their cost is in the
  figures, where a deployment's API server bears it instead.

Targets, each printed with met or missed: a PDF passed through costs at most 2 ms of our CPU per
page; a conversion at most 1.2 times what Pillow alone takes.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from _airflow import HOW, TaskRun, migrated_database, operator_times, start
from _support import SCRATCH, LocalServer, report

#: A4 at 150 dpi, the pages of every folder but the large PNGs.
PAGE = (1240, 1754)
#: A4 at 300 dpi: with a scanner's grain its PNG passes the image API's 7 MB.
LARGE_PAGE = (2480, 3508)
PDF_TARGET_MS = 2.0
CONVERSION_TARGET = 1.2
#: Knobs of the local server: nothing waits but a job's 0.1 s.
SERVER_KNOBS = {
    "rate_limit": 10_000,
    "rate_window": 1.0,
    "processing_time": 0.1,
    "pickup_delay": 0,
    "pdf_page_seconds": 0,
    "pdf_page_workers": 8,
    "export_seconds": 0,
}
IMAGE_LANE, PDF_LANE = "image API", "PDF API"


@dataclass(frozen=True)
class Folder:
    """One format's folder: how many files of how many pages, how they travel, how one is made."""

    name: str
    label: str
    files: int
    pages_per_file: int
    lane: str
    #: (path, the file's pages as Pillow images)
    write: Callable[[Path, list], None]
    #: Whether the worker converts it (and Pillow alone is measured beside it).
    converted: bool = True
    large: bool = False
    suffix: str = ""

    @property
    def pages(self) -> int:
        return self.files * self.pages_per_file

    @property
    def file_suffix(self) -> str:
        return self.suffix or self.name


def _write_pdf(path: Path, pages: list) -> None:
    import img2pdf

    jpegs = []
    for page in pages:
        buffer = io.BytesIO()
        page.save(buffer, "JPEG", quality=85)
        jpegs.append(buffer.getvalue())
    path.write_bytes(img2pdf.convert(jpegs))


def _write_tiff(path: Path, pages: list) -> None:
    pages[0].save(path, "TIFF", save_all=True, append_images=pages[1:], compression="tiff_lzw")


def _write_gif(path: Path, pages: list) -> None:
    from PIL import Image

    (page,) = pages
    (page if page.mode == "L" else page.convert("P", palette=Image.Palette.ADAPTIVE)).save(path, "GIF")


def _writer(fmt: str, **options) -> Callable[[Path, list], None]:
    def write(path: Path, pages: list) -> None:
        (page,) = pages
        page.save(path, fmt, **options)

    return write


def folders(scale: float, small: bool) -> list[Folder]:
    """The folders of a run: the default layout, scaled; ``small`` keeps a few pages of each."""

    def files(count: int) -> int:
        return 2 if small else max(2, round(count * scale))

    pdf_pages, tiff_pages = (3, 3) if small else (50, 10)
    image, pdf = {"pages_per_file": 1, "lane": IMAGE_LANE}, {"lane": PDF_LANE}
    return [
        Folder("pdf", "PDF, passed through", files(20), pdf_pages, **pdf, converted=False, write=_write_pdf),
        Folder("tiff", "multi-page TIFF, packed", files(20), tiff_pages, **pdf, write=_write_tiff),
        Folder("webp", "WebP, to PNG", files(150), **image, write=_writer("WEBP")),
        Folder("bmp", "BMP, to PNG", files(150), **image, write=_writer("BMP")),
        Folder("gif", "GIF, to PNG", files(150), **image, write=_write_gif),
        Folder("png", "PNG over 7 MB, packed", files(5), 1, **pdf, write=_writer("PNG"), large=True),
        Folder(
            "jpeg",
            "JPEG (baseline)",
            files(150),
            **image,
            converted=False,
            write=_writer("JPEG", quality=85),
            suffix="jpg",
        ),
    ]


class Pages:
    """Page-like pictures to stamp: the sample pages rendered once, grey and RGB, and a scanner's grain."""

    def __init__(self) -> None:
        from PIL import Image

        from airflow_provider_doc2x.local.samples import EXAMPLE_PAGES, TEST_PAGES, render

        chosen = [EXAMPLE_PAGES["invoice.png"], EXAMPLE_PAGES["report.jpg"], EXAMPLE_PAGES["scan.jpg"]]
        self.pictures = [
            Image.open(io.BytesIO(render(page, fmt="JPEG", size=PAGE))).convert("RGB")
            for page in [*chosen, TEST_PAGES["memo.jpg"]]
        ]
        self._grain = None

    def page(self, number: int, grey: bool, stamp: str, *, large: bool = False):
        """Page ``number`` of the cycle, grey or RGB, stamped; at 300 dpi and grainy if large."""
        from PIL import Image, ImageDraw, ImageFont

        picture = self.pictures[number % len(self.pictures)]
        if large:
            picture = Image.blend(picture.resize(LARGE_PAGE, Image.Resampling.BICUBIC), self.grain(), 0.05)
        else:
            picture = picture.copy()
        if grey:
            picture = picture.convert("L")
        draw = ImageDraw.Draw(picture)
        width, height = picture.size
        draw.text(
            (width - 420, height - 60),
            stamp,
            fill=0 if grey else (0, 0, 0),
            font=ImageFont.load_default(size=22),
        )
        return picture

    def grain(self):
        """A scanner's grain at 300 dpi, the same for every large page (their stamps tell them apart)."""
        from PIL import Image

        if self._grain is None:
            self._grain = Image.merge("RGB", [Image.effect_noise(LARGE_PAGE, 48) for _ in range(3)])
        return self._grain


#: The folder being made and its pages, for the forked processes that write its files.
_making: tuple[Folder, Pages] | None = None


def _make_file(number: int) -> str:
    """Write file ``number`` of the folder being made (in a forked process)."""
    assert _making is not None
    folder, pages = _making
    path = SCRATCH / "documents" / folder.name / f"{folder.name}-{number:04d}.{folder.file_suffix}"
    grey = number % 2 == 1 and not folder.large
    file_pages = [
        pages.page(
            number * folder.pages_per_file + page,
            grey,
            f"{folder.name} {number:04d} page {page + 1}",
            large=folder.large,
        )
        for page in range(folder.pages_per_file)
    ]
    folder.write(path, file_pages)
    return str(path)


def make_folder(folder: Folder, pages: Pages) -> list[str]:
    """Write the folder's files, in two forked processes (they inherit the pages rendered here)."""
    global _making
    (SCRATCH / "documents" / folder.name).mkdir(parents=True, exist_ok=True)
    if folder.large:
        pages.grain()  # made once, before the processes fork
    _making = (folder, pages)
    try:
        with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
            return list(pool.map(_make_file, range(folder.files)))
    finally:
        _making = None


def pillow_alone(paths: list[str]) -> tuple[float, int]:
    """CPU seconds (this process) to open, decode and encode as PNG every frame of the files; the frames."""
    from PIL import Image

    frames = 0
    began = time.process_time()
    for path in paths:
        with Image.open(path) as picture:
            for frame in range(getattr(picture, "n_frames", 1) if picture.format == "TIFF" else 1):
                picture.seek(frame)
                picture.load()
                picture.save(io.BytesIO(), "PNG")
                frames += 1
    return time.process_time() - began, frames


class PeakMemory:
    """The peak resident set of a run's processes while it runs: the largest ``VmHWM`` in ``/proc``.

    Not the ``ru_maxrss`` that ``wait4`` gives: a child started by fork (or vfork) and exec carries
    its parent's peak in it, so the bench's own peak (pages it drew) would show as the task's.
    ``VmHWM`` is the high-water mark of the process's own memory since its exec. It is read every
    50 ms from each process of the run (the ``airflow dags test`` process and any it started),
    until it ends; what it reaches in its last 50 ms (its exit) is not seen.
    """

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid = pid
        self.interval = interval
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="peak-memory", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.NoSuchProcess:
            return
        while True:
            try:
                pids = [self.pid, *(child.pid for child in root.children(recursive=True))]
            except psutil.NoSuchProcess:
                return
            for pid in pids:
                peak = _high_water_mark(pid)
                if peak:
                    self.peaks[pid] = max(peak, self.peaks.get(pid, 0))
            if self._stop.wait(self.interval):
                return

    def stop(self) -> int:
        """Stop watching; the largest peak of one process of the run, bytes."""
        self._stop.set()
        self._thread.join()
        return max(self.peaks.values(), default=0)


def _high_water_mark(pid: int) -> int:
    """A process's ``VmHWM`` in bytes, 0 once it has ended."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, ValueError):
        pass
    return 0


@dataclass
class Measured:
    """A folder's two runs, and what they tell per page."""

    folder: Folder
    paths: list[str]
    whole: Run
    one: Run
    parsed_pages: int
    billed_pages: int
    #: The CPU seconds of every repeat of the folder's run, and of the one-file run.
    whole_cpu: list[float] = field(default_factory=list)
    one_cpu: list[float] = field(default_factory=list)
    pillow_seconds: float = 0.0
    pillow_frames: int = 0

    @property
    def whole_seconds(self) -> float:
        """The folder's run's CPU: the median of its repeats."""
        return statistics.median(self.whole_cpu or [self.whole.task.cpu_seconds])

    @property
    def one_seconds(self) -> float:
        """The one-file run's CPU: the median of its repeats."""
        return statistics.median(self.one_cpu or [self.one.task.cpu_seconds])

    @property
    def cpu_per_page(self) -> float:
        """Our CPU seconds for one more page: the folder's run less the one-file run, per further page."""
        return (self.whole_seconds - self.one_seconds) / self.further_pages

    @property
    def further_pages(self) -> int:
        """The pages the folder has beyond its first file."""
        return self.folder.pages - self.folder.pages_per_file

    @property
    def pillow_per_page(self) -> float:
        return self.pillow_seconds / self.pillow_frames if self.pillow_frames else 0.0

    def margin(self, spread: float) -> float:
        """How far the CPU per page may be off: the one-image runs' spread over the further pages."""
        return spread / self.further_pages

    def ratio(self, against: Against) -> float | None:
        """Our CPU per page beyond the lane's baseline, over Pillow alone's; None when not converted."""
        if not self.folder.converted or not self.pillow_per_page:
            return None
        return (self.cpu_per_page - against.lane(self).cpu_per_page) / self.pillow_per_page

    def target(self, against: Against) -> str:
        """The folder's target, met or missed, and whether the spread could turn it ("" when none)."""
        ratio = self.ratio(against)
        if self.folder.name == "pdf":
            value, margin = 1000 * self.cpu_per_page, 1000 * self.margin(against.spread)
            limit, what = PDF_TARGET_MS, f"<= {PDF_TARGET_MS:g} ms per page"
        elif ratio is not None:
            baseline = against.lane(self)
            value, limit, what = ratio, CONVERSION_TARGET, f"<= {CONVERSION_TARGET:g} x Pillow alone"
            margin = (self.margin(against.spread) + baseline.margin(against.spread)) / self.pillow_per_page
        else:
            return ""
        verdict = "met" if value <= limit else "MISSED"
        return f"{what}: {verdict}" + (" (within the spread)" if abs(value - limit) <= margin else "")


@dataclass(frozen=True)
class Against:
    """What a folder's figures are read against: the baselines, and the runs' spread."""

    pdf: Measured
    jpeg: Measured
    #: CPU seconds between the lightest and the heaviest one-image run of the image API's formats.
    spread: float

    def lane(self, measured: Measured) -> Measured:
        """The baseline of the lane the folder's pages travel by."""
        return self.jpeg if measured.folder.lane == IMAGE_LANE else self.pdf


@dataclass
class Run:
    """A finished task run, and the peak memory of its processes."""

    task: TaskRun
    peak_memory: int
    processes: int


def parsed_pages(task: TaskRun) -> int:
    """Pages that came back parsed: a document's pages, one for an image."""
    return sum(len(record.get("pages") or [None]) for record in task.xcom() or [])


def run_folder(server: LocalServer, name: str, paths: list[str], env: dict[str, str]) -> Run:
    """One real task over ``paths`` on an empty, unthrottled server; it must succeed."""
    server.reset()
    server.configure(**SERVER_KNOBS)
    env = {**env, "DOC2X_PACING_DIR": str(SCRATCH / "pacing" / name)}
    operator = {"image_path": paths, "deferrable": True, "poll_interval": 0.25, "timeout": 3600}
    task = start(name, operator, env=env)
    memory = PeakMemory(task.process.pid)
    try:
        task.wait()
    finally:
        peak = memory.stop()
    return Run(task.must_succeed(), peak, len(memory.peaks))


def measure(
    server: LocalServer, folder: Folder, paths: list[str], env: dict[str, str], repeat: int = 1
) -> Measured:
    """The folder's first file alone, then the whole folder, ``repeat`` times in turn; all in real tasks.

    The first repeat's runs are reported (memory, log, records); every repeat's CPU goes into the medians.
    """
    runs: list[tuple[Run, Run, int]] = []
    for _ in range(repeat):
        one = run_folder(server, f"{folder.name}-one", paths[:1], env)
        whole = run_folder(server, folder.name, paths, env)
        stats = server.stats()
        runs.append((one, whole, stats["billed_total"] + stats["pdf_pages_billed"]))
    one, whole, billed = runs[0]
    return Measured(
        folder,
        paths,
        whole,
        one,
        parsed_pages(whole.task),
        billed,
        whole_cpu=[run[1].task.cpu_seconds for run in runs],
        one_cpu=[run[0].task.cpu_seconds for run in runs],
    )


def _seconds(values: list[float]) -> str:
    return " ".join(f"{value:.2f}" for value in values) + " s"


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.2f} ms"


def rows_of(measured: Measured, against: Against) -> list[tuple[str, object]]:
    """The printed figures of one folder."""
    folder = measured.folder
    sizes = sum(os.path.getsize(path) for path in measured.paths)
    per_page = measured.cpu_per_page
    whole = measured.whole.task
    checked = operator_times(whole.output).get("checked")
    rows: list[tuple[str, object]] = [
        (
            "pages",
            f"{folder.pages} in {folder.files} files of {folder.pages_per_file} "
            f"({sizes / folder.files / 1e6:.2f} MB a file); parsed {measured.parsed_pages}, "
            f"billed {measured.billed_pages}",
        ),
        ("travels by", folder.lane),
        ("our worker CPU per page", f"{_ms(per_page)} +- {_ms(measured.margin(against.spread))}"),
        ("  difference from the JPEG baseline", f"{1000 * (per_page - against.jpeg.cpu_per_page):+.2f} ms"),
        (
            "  the two runs",
            f"{measured.whole_seconds:.2f} s CPU over the folder, {measured.one_seconds:.2f} s over its first "
            f"file ({folder.pages_per_file} page{'s' if folder.pages_per_file > 1 else ''})"
            + (
                f"; medians of {len(measured.whole_cpu)} (folder {_seconds(measured.whole_cpu)}, "
                f"first file {_seconds(measured.one_cpu)})"
                if len(measured.whole_cpu) > 1
                else ""
            ),
        ),
        (
            "peak memory",
            f"{measured.whole.peak_memory / 1e6:.0f} MB (growth over the one-file run: "
            f"{round((measured.whole.peak_memory - measured.one.peak_memory) / 1e6):+d} MB; "
            f"{measured.whole.processes} process{'es' if measured.whole.processes != 1 else ''} watched)",
        ),
        (
            "checking (the intake), wall",
            f"{checked['seconds']:.2f} s for {checked['images']:.0f} files, as the task logged it"
            if checked
            else "not logged",
        ),
        (
            "deferrals",
            f"{len(whole.trigger_waits())} (the trigger in line; each resume checks what it sends next)",
        ),
        ("task run's wall time", f"{whole.seconds:.1f} s (`dags test` start-up and DAG parsing included)"),
    ]
    ratio = measured.ratio(against)
    if ratio is not None:
        baseline = against.lane(measured).cpu_per_page
        rows += [
            (
                "Pillow alone per page",
                f"{_ms(measured.pillow_per_page)} (open, load, save PNG; {measured.pillow_frames} frames)",
            ),
            (
                "ours / Pillow alone",
                f"{ratio:.2f} ({_ms(per_page - baseline)} per page beyond the {folder.lane}'s baseline "
                f"of {_ms(baseline)})",
            ),
        ]
    if target := measured.target(against):
        rows.append(("target", target))
    return rows


def summary(measured: list[Measured], against: Against) -> None:
    print("\n## summary (CPU per page in ms)")
    print(
        f"  {'format':<24} {'pages':>6} {'ours':>8} {'+-':>6} {'-JPEG':>8} {'Pillow':>8} {'ratio':>6} "
        f"{'peak MB':>8}  target"
    )
    for item in measured:
        per_page, ratio = item.cpu_per_page, item.ratio(against)
        pillow, times = (
            (f"{1000 * item.pillow_per_page:.2f}", f"{ratio:.2f}") if ratio is not None else ("-", "-")
        )
        beyond_jpeg = per_page - against.jpeg.cpu_per_page
        print(
            f"  {item.folder.label:<24} {item.folder.pages:>6} {1000 * per_page:>8.2f} "
            f"{1000 * item.margin(against.spread):>6.2f} {1000 * beyond_jpeg:>+8.2f} "
            f"{pillow:>8} {times:>6} {item.whole.peak_memory / 1e6:>8.0f}  {item.target(against)}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--scale", type=float, default=1.0, help="files per folder, times the default")
    parser.add_argument("--small", action="store_true", help="2 files of each format, 3 pages a document")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs of each kind per folder; medians are used"
    )
    parser.add_argument(
        "--only", default="", help="comma-separated folder names (pdf, tiff, webp, bmp, gif, png, jpeg)"
    )
    args = parser.parse_args()
    layout = folders(args.scale, args.small)
    if args.only:
        wanted = set(args.only.split(",")) | {"pdf", "jpeg"}  # the baselines every ratio is read against
        layout = [folder for folder in layout if folder.name in wanted]
    print(
        f"# documents {HOW}, deferrable: our worker CPU per page by format, "
        f"{sum(folder.pages for folder in layout)} pages, {os.cpu_count()} cores (load average "
        f"{os.getloadavg()[0]:.1f}); "
        f"started {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        flush=True,
    )
    if args.small:
        print("# --small: a page or two beyond each one-file run; the figures are noise, not measures")
    print("# server knobs: " + ", ".join(f"{name}={value:g}" for name, value in SERVER_KNOBS.items()))
    began = time.monotonic()
    pages = Pages()
    made = {folder.name: make_folder(folder, pages) for folder in layout}
    print(f"# files made in {time.monotonic() - began:.0f} s", flush=True)

    migrated_database()
    server = LocalServer("--processing-time", str(SERVER_KNOBS["processing_time"]))
    connection = server.connection_json(rate_limit_images=10_000, rate_limit_window=1.0)
    env = {"AIRFLOW_CONN_DOC2X_DEFAULT": connection}
    measured = []
    for folder in layout:
        item = measure(server, folder, made[folder.name], env, args.repeat)
        if folder.converted:  # right after its tasks: the machine as it was for them
            item.pillow_seconds, item.pillow_frames = pillow_alone(item.paths)
        measured.append(item)
        print(f"# {folder.name}: measured at {time.monotonic() - began:.0f} s", flush=True)
    ones = [item.one_seconds for item in measured if item.folder.lane == IMAGE_LANE]
    by_name = {item.folder.name: item for item in measured}
    against = Against(by_name["pdf"], by_name["jpeg"], spread=max(ones) - min(ones))
    print(
        "\n# our worker CPU per page: the `dags test` process's CPU (task, trigger in line, resumes) over a"
        "\n# folder, less a run over its first file alone, per further page (start-up, parsing, imports drop"
        "\n# out). Pillow alone: open + load + save PNG of every frame, in this process. ours / Pillow alone:"
        "\n# our CPU per page less the lane's baseline (JPEG for the image API, PDF passed through for the"
        "\n# PDF API), over Pillow alone. Peak memory: VmHWM of the run's processes, read while they ran."
        f"\n# Spread: the one-image runs of the image API's formats took {min(ones):.2f} to {max(ones):.2f} s"
        f"\n# of CPU; {against.spread:.2f} s over a folder's further pages is the +- beside its figure; a"
        "\n# target met or missed by less than that is marked (within the spread)."
    )
    for item in measured:
        report(item.folder.label, rows_of(item, against))
    summary(measured, against)
    print(f"\n# done in {time.monotonic() - began:.0f} s (load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
