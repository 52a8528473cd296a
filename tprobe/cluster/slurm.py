"""Run ``tprobe extract`` as ONE SLURM array job: task i runs the ordinary ``--shard i/N`` command.

Submission is an sbatch script rendered from :data:`SBATCH_TEMPLATE` (plain text, kept in the
``--slurm-dir`` beside its logs, so what ran is readable and re-submittable by hand). Tasks carry no
pickled state: each one is the normal CLI on the same options, and the store's own unit markers
(``<store>.progress/unit_*.done``) are the only record of progress. So:

- a rerun submits only the shards that still have pending units and are not already queued;
- a finished store is "up to date" and nothing is submitted;
- progress (units done / total; shards running, pending in the queue, failed) comes from the markers
  plus ``squeue`` (works without SLURM accounting; ``sacct`` is not needed).

Usable from a notebook::

    from tprobe.cluster.slurm import SlurmOptions, extract_array
    res = extract_array(["--model", "dinov2-small-reg", "--data", "imgs/"], store_path, rows=n,
                        chunk_rows=64, shards=8, options=SlurmOptions(partition="gpu", gpus_per_task=1))
"""

from __future__ import annotations

import hashlib
import re
import shlex
import shutil
import subprocess
import sys
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tprobe.errors import TprobeError

__all__ = [
    "with_options",
    "SlurmOptions",
    "ArrayResult",
    "extract_array",
    "extract_slurm",
    "render_script",
    "job_name",
    "queue_states",
    "shard_progress",
    "SBATCH_TEMPLATE",
    "command_array",
    "render_commands",
    "sweep_array",
    "sweep_job_name",
    "sweep_commands",
    "check_sweep",
    "sweep_on_slurm",
    "resume_on_slurm",
]

SBATCH_TEMPLATE = """\
#!/bin/bash
# tprobe extract as a SLURM array: task i writes shard i/{n_shards} of
#   {store}
# Resubmit by hand with: sbatch --array=<shards> {script}
#SBATCH --job-name={name}
#SBATCH --output={log}
#SBATCH --chdir={chdir}
#SBATCH --ntasks=1
{sbatch_lines}
set -euo pipefail
echo "tprobe: shard ${{SLURM_ARRAY_TASK_ID}}/{n_shards} of job ${{SLURM_ARRAY_JOB_ID}} on $(hostname)"
exec {command} --shard "${{SLURM_ARRAY_TASK_ID}}/{n_shards}"
"""

# squeue states in which a task still runs or may run; anything else has left the queue for good
LIVE_STATES = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "SUSPENDED",
    "REQUEUED",
    "RESIZING",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
    "SIGNALING",
    "STAGE_OUT",
    "STOPPED",
}


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


# a resource value (partition, time, memory, account) is one sbatch word: no spaces, quotes or shell syntax
_RESOURCE = re.compile(r"[A-Za-z0-9_.:,+@%/=-]+")


def script_value(what: str, value) -> str:
    """``value`` as text for an sbatch script, refused in one line if it holds a control character.

    A newline (or carriage return, NUL, ...) in an option, a path or the working directory would start
    a new line of the script, which bash runs; every value written into a script passes through here.
    """
    text = str(value)
    bad = next((c for c in text if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")), None)
    if bad is not None:
        raise TprobeError(
            f"{what} {text!r}: holds a control character ({bad!r}); an sbatch script takes each "
            "value on one line: remove it (or rename the folder)"
        )
    return text


def _script_path(what: str, path) -> str:
    """A path for an sbatch script line: checked by :func:`script_value`, shell-quoted when needed."""
    return shlex.quote(script_value(what, path))


@dataclass
class SlurmOptions:
    """sbatch resources of each array task (one task = one shard = one process)."""

    partition: str | None = None
    time: str | None = None  # e.g. "2:00:00"
    gpus_per_task: int | None = None
    cpus_per_task: int | None = None
    mem: str | None = None  # e.g. "32G"
    account: str | None = None
    max_running: int | None = None  # array throttle: at most this many tasks at once (%k)
    extra: tuple[str, ...] = ()  # more sbatch options, e.g. ("--constraint=a100", "--qos=high")
    slurm_dir: Path = field(default_factory=lambda: Path("slurm"))  # scripts + logs

    def __post_init__(self):
        self.sbatch_lines()  # refuse a bad value when the options are made, before any scheduler call
        script_value("--slurm-dir", Path(self.slurm_dir).absolute())

    def sbatch_lines(self) -> list[str]:
        opts = {
            "partition": self.partition,
            "time": self.time,
            "gpus-per-task": self.gpus_per_task,
            "cpus-per-task": self.cpus_per_task,
            "mem": self.mem,
            "account": self.account,
            "max-running": self.max_running,
        }
        lines = []
        for k, v in opts.items():
            if v in (None, ""):
                continue
            text = script_value(f"--{k}", v)
            if not _RESOURCE.fullmatch(text):
                raise TprobeError(
                    f"--{k} {text!r}: give one value without spaces, quotes or shell characters "
                    "(e.g. --partition gpu, --time 2:00:00, --mem 32G)"
                )
            if k != "max-running":  # the array throttle goes on the --array option, not a directive
                lines.append(f"#SBATCH --{k}={text}")
        for opt in self.extra:
            if not script_value("--sbatch-option", opt).startswith("-"):
                raise TprobeError(f"--sbatch-option {opt!r}: give one sbatch option, e.g. --qos=high")
            lines.append(f"#SBATCH {opt}")
        return lines


@dataclass
class ArrayResult:
    path: Path
    status: str  # "up to date" | "written"
    job_ids: list[str] = field(default_factory=list)  # array jobs submitted by this call
    submitted: list[int] = field(default_factory=list)  # shards submitted by this call
    seconds: float = 0.0


def with_options(args: Sequence[str], options: Mapping[str, str | None]) -> list[str]:
    """``args`` (``--opt value`` pairs and flags) with each option of ``options`` set to its value in place
    (appended when absent), or removed with its value when the value is ``None``."""
    out = list(args)
    for opt, value in options.items():
        at = next((i for i, a in enumerate(out[:-1]) if a == opt), None)
        if at is None:
            out += [] if value is None else [opt, str(value)]
        elif value is None:
            del out[at : at + 2]
        else:
            out[at + 1] = str(value)
    return out


def job_name(store: str | Path, shards: int) -> str:
    """One name per (store, N): reruns find the tasks of earlier submissions still in the queue."""
    digest = hashlib.sha1(str(Path(store).absolute()).encode()).hexdigest()[:10]
    return f"tprobe-{digest}-of{shards}"


def render_script(
    command: Sequence[str], store: Path, shards: int, options: SlurmOptions, script: Path
) -> str:
    """The sbatch script text; ``command`` is the full extract command line without ``--shard``."""
    name = job_name(store, shards)
    log = Path(options.slurm_dir).absolute() / "%x-%A_%a.out"
    for arg in command:
        script_value("extract option", arg)
    return SBATCH_TEMPLATE.format(
        n_shards=shards,
        store=_script_path("the store path (--cache)", Path(store).absolute()),
        script=_script_path("--slurm-dir", script),
        name=name,
        log=_script_path("--slurm-dir", log),
        chdir=_script_path("the working directory", Path.cwd()),
        sbatch_lines="\n".join(options.sbatch_lines()),
        command=shlex.join(command),
    )


def _run(argv: list[str], what: str, tries: int = 3) -> str:
    if shutil.which(argv[0]) is None:
        raise TprobeError(
            f"{argv[0]} not found: --executor slurm needs the SLURM client commands on PATH "
            "(try scripts/slurm_cluster.sh start for a local cluster)"
        )
    for attempt in range(tries):  # slurmctld may be briefly busy
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode == 0:
            return proc.stdout
        if attempt + 1 < tries:
            time.sleep(1 + attempt)
    msg = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
    raise TprobeError(f"{what} failed: {msg[-1] if msg else f'exit {proc.returncode}'}")


def queue_states(prefix: str) -> dict[str, dict[int, tuple[str, str]]]:
    """``{job name: {array task id: (array job id, state)}}`` for queued jobs whose name starts with ``prefix``."""
    out = _run(["squeue", "--noheader", "--array", "--format=%j|%F|%K|%T"], "squeue")
    jobs: dict[str, dict[int, tuple[str, str]]] = {}
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4 or not parts[0].startswith(prefix) or parts[3] not in LIVE_STATES:
            continue
        name, job, task, state = parts
        if task.isdigit():
            jobs.setdefault(name, {})[int(task)] = (job, state)
    return jobs


def _complete(store: Path) -> bool:
    from tprobe.cache.keys import is_sealed

    return is_sealed(store)


def shard_progress(store: Path, n_units: int, shards: int) -> tuple[int, int, list[int]]:
    """(units done, units in all, pending units per shard) from the store's markers.

    ``n_units`` is the expected count, used until a task has created the store; after that the
    store's own chunking counts (a resumed store keeps the ``--chunk-rows`` it was created with).
    """
    store = Path(store)
    from tprobe.cache.keys import progress_dir

    meta = progress_dir(store) / "meta.json"
    if _complete(store):
        done = set(range(n_units))
    elif meta.exists():
        from tprobe.cache.store import FeatureStore

        fs = FeatureStore.open(store, allow_incomplete=True)
        done, n_units = fs.done_units(), fs.n_units
    else:
        done = set()
    return len(done), n_units, [sum(u not in done for u in range(n_units)[i::shards]) for i in range(shards)]


def _spec(shards: list[int], max_running: int | None) -> str:
    spec = ",".join(map(str, shards))
    return f"{spec}%{max_running}" if max_running else spec


def _fmt(items: list[int]) -> str:
    return ",".join(map(str, items)) if items else "-"


def extract_array(
    extract_args: Sequence[str],
    store: str | Path,
    *,
    rows: int,
    chunk_rows: int,
    shards: int,
    options: SlurmOptions | None = None,
    poll: float = 10.0,
    echo: Callable[[str], None] = _stderr,
    python: str | None = None,
) -> ArrayResult:
    """Submit the shards of ``store`` that still have pending units as one array job, watch, return sealed.

    ``extract_args``: the ``tprobe extract`` options (without ``--shard``) that write ``store``;
    ``rows``/``chunk_rows`` give its unit count before any task has created it. Tasks of an earlier
    call still in the queue are watched, not resubmitted. Raises :class:`TprobeError` naming the failed
    shards and their logs once no task is left and units are still pending; rerunning resubmits them.
    """
    options = options or SlurmOptions()
    store = Path(store).absolute()
    script_value("the store path (--cache)", store)  # before any scheduler call: see render_script
    script_value("the working directory", Path.cwd())
    t0 = time.perf_counter()
    if _complete(store):
        return ArrayResult(store, "up to date")
    if shards < 1:
        raise TprobeError(f"--shards {shards}: must be at least 1")
    n_units = -(-rows // chunk_rows)
    if shards > n_units:
        raise TprobeError(
            f"--shards {shards} is more than the store's {n_units} units of --chunk-rows "
            f"{chunk_rows}; use --shards {n_units} or fewer (or a smaller --chunk-rows)"
        )
    name = job_name(store, shards)
    prefix = name.rsplit("-of", 1)[0]
    queued = queue_states(prefix)
    others = sorted(n for n in queued if n != name)
    if others:
        jobs = sorted({job for n in others for job, _ in queued[n].values()})
        raise TprobeError(
            f"tasks of another --shards count ({', '.join(others)}) are still queued for {store}; "
            f"wait for them or `scancel {' '.join(jobs)}`, then rerun"
        )
    mine = queued.get(name, {})
    _, n_units, pending = shard_progress(store, n_units, shards)
    todo = [i for i in range(shards) if pending[i] and i not in mine]
    result = ArrayResult(store, "written")
    logs: dict[int, Path] = {}
    slurm_dir = Path(options.slurm_dir).absolute()
    if todo:
        slurm_dir.mkdir(parents=True, exist_ok=True)
        script = slurm_dir / f"{name}.sbatch"
        command = [python or sys.executable, "-m", "tprobe.cli", "extract", *extract_args]
        script.write_text(render_script(command, store, shards, options, script))
        array = f"--array={_spec(todo, options.max_running)}"
        # one try only: a retried sbatch that had in fact gone through would submit the shards twice
        out = _run(["sbatch", "--parsable", array, str(script)], f"sbatch {script}", tries=1)
        job = out.strip().split(";")[0]
        result.job_ids.append(job)
        result.submitted = todo
        logs = {i: slurm_dir / f"{name}-{job}_{i}.out" for i in todo}
        echo(
            f"submitted array job {job}: shards {_fmt(todo)} of {shards} ({len(todo)} task{'s' if len(todo) != 1 else ''}); "
            f"script and logs in {slurm_dir}"
        )
    if mine:
        jobs = sorted({job for job, _ in mine.values()})
        echo(f"shards {_fmt(sorted(mine))} already queued (job {', '.join(jobs)}): watching them")
    try:
        _watch(store, name, n_units, shards, poll, echo, logs)
    except KeyboardInterrupt:
        raise TprobeError(
            f"stopped watching; the tasks ({name}) keep running: rerun the same command to "
            f"watch them again (nothing is resubmitted while they are queued), or `scancel --name={name}`"
        ) from None
    result.seconds = time.perf_counter() - t0
    return result


def extract_slurm(
    pre,
    ref,
    *,
    args: Sequence[str],
    shards: int,
    options: SlurmOptions | None = None,
    cache: str | Path = "cache",
    fmt: str = "zarr",
    dtype: str = "float16",
    precision: str = "auto",
    tokens=("cls", "registers", "patches"),
    layers="-1",
    patch_layers="-1",
    chunk_rows: int = 64,
    poll: float = 10.0,
    echo: Callable[[str], None] = _stderr,
):
    """Extract ``pre`` (a :class:`~tprobe.data.preprocess.Preprocessed`) with ``ref`` as one SLURM array job
    of ``shards`` tasks (:func:`extract_array`); returns the :class:`~tprobe.cache.extract.ExtractResult`.

    ``args``: the ``tprobe extract`` options each task runs (without ``--shard`` and the SLURM options);
    the canvas (maybe rounded to the patch size) and the precision (``auto``: fp16 with GPUs per task,
    else fp32) are set in it here, so the tasks write the store watched here.
    """
    from tprobe.cache.extract import ExtractResult, check_sealed
    from tprobe.cache.keys import is_sealed, store_path

    options = options or SlurmOptions()
    if precision == "auto":  # resolved here, so the tasks (maybe on GPUs) write the store watched here
        precision = "fp16" if options.gpus_per_task else "fp32"
    path = store_path(
        cache, pre, ref, dtype, fmt, precision, tokens, layers=layers, patch_layers=patch_layers
    )
    if is_sealed(path):  # as a one-process extract: a missing chunk refused, the manifest restored
        check_sealed(path, pre.kept)
    res = extract_array(
        with_options(args, {"--canvas": str(pre.config.canvas), "--precision": precision}),
        path,
        rows=len(pre.kept),
        chunk_rows=chunk_rows,
        shards=shards,
        options=options,
        poll=poll,
        echo=echo,
    )
    return ExtractResult(
        path, res.status, len(pre.kept), res.seconds, model=ref, executor="slurm", job_ids=res.job_ids
    )


def _watch(store, name, n_units, shards, poll, echo, logs) -> None:
    last = None
    while True:
        queued = queue_states(name).get(name, {})  # read the queue before the markers: no false "failed"
        done, n_units, pending = shard_progress(store, n_units, shards)
        if _complete(store):
            echo(f"units {n_units}/{n_units} done; store sealed")
            return
        live = {i: s for i, (_, s) in sorted(queued.items()) if pending[i]}  # finished shards may still exit
        running = [i for i, s in live.items() if s not in ("PENDING", "REQUEUED")]
        waiting = [i for i, s in live.items() if s in ("PENDING", "REQUEUED")]
        failed = [i for i in range(shards) if pending[i] and i not in queued]
        line = (
            f"units {done}/{n_units} done | running {_fmt(running)} | queued {_fmt(waiting)} | "
            f"finished {_fmt([i for i in range(shards) if not pending[i]])} | failed {_fmt(failed)}"
        )
        if line != last:
            echo(line)
            last = line
        if not queued:
            _settle(store, failed, logs)
            if _complete(store):
                echo(f"units {n_units}/{n_units} done; store sealed")
                return
        time.sleep(poll)


def _last_line(log: Path, skip: str | None = None) -> str:
    """The log's last non-blank line (leaving out lines that start with ``skip``), cut to 200 characters."""
    try:
        lines = [
            ln.strip()
            for ln in log.read_text(errors="replace").splitlines()
            if ln.strip() and not (skip and ln.strip().startswith(skip))
        ]
    except OSError:
        return "(no log)"
    return lines[-1][-200:] if lines else "(empty log)"


def _settle(store: Path, failed: list[int], logs: dict[int, Path]) -> None:
    """No task is left in the queue: raise for failed shards, or seal a fully written store."""
    if failed:
        where = [logs[i] for i in failed if i in logs]
        last = _last_line(where[0]) if where else ""
        raise TprobeError(
            f"shard(s) {_fmt(failed)} ended with units still pending"
            + (f" (logs: {', '.join(map(str, where))}; {where[0].name} ends: {last!r})" if where else "")
            + "; rerun the same command to resubmit only those shards"
        )
    if not _complete(store):  # every unit written but no task sealed it (e.g. the sealer was killed)
        from tprobe.cache.store import FeatureStore

        fs = FeatureStore.open(store, allow_incomplete=True)
        if not fs.finalize():  # sealing is idempotent: only pending units can stop it
            raise TprobeError(
                f"{store}: units are still pending after every task ended; rerun the same command"
            )


# ---- any list of tprobe commands as one array (e.g. a probe sweep's pool x head runs) ------------------
COMMANDS_TEMPLATE = """\
#!/bin/bash
# tprobe: task i of this array runs command i below; written by tprobe.cluster.slurm.command_array
#SBATCH --job-name={name}
#SBATCH --output={log}
#SBATCH --chdir={chdir}
#SBATCH --ntasks=1
{sbatch_lines}
case "${{SLURM_ARRAY_TASK_ID}}" in
{cases}
  *) echo "tprobe: no command for task ${{SLURM_ARRAY_TASK_ID}}"; exit 2 ;;
esac
rc=$?
echo "tprobe-task-exit $rc"
exit $rc
"""


def render_commands(commands: Sequence[Sequence[str]], *, name: str, options: SlurmOptions) -> str:
    """The sbatch script text of :func:`command_array`: task i runs ``commands[i]`` (each value checked)."""
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise TprobeError(f"job name {name!r}: use letters, digits and _.+- only")
    for cmd in commands:
        for arg in cmd:
            script_value("command argument", arg)
    chdir = _script_path("the working directory", Path.cwd())
    log = _script_path("--slurm-dir", Path(options.slurm_dir).absolute() / "%x-%A_%a.out")
    cases = "\n".join(f"  {i}) {shlex.join(map(str, cmd))} ;;" for i, cmd in enumerate(commands))
    return COMMANDS_TEMPLATE.format(
        name=name, log=log, chdir=chdir, sbatch_lines="\n".join(options.sbatch_lines()), cases=cases
    )


def command_array(
    commands: Sequence[Sequence[str]],
    *,
    name: str,
    options: SlurmOptions | None = None,
    done: Callable[[int], bool] | None = None,
    poll: float = 10.0,
    echo: Callable[[str], None] = _stderr,
) -> dict[int, str]:
    """Run ``commands[i]`` as task i of ONE array job (only those not ``done(i)``); wait; return states.

    The commands are written into a plain sbatch script (a ``case`` on the task id), never pickled.
    A task counts as ``"done"`` when ``done(i)`` says so (e.g. its run directory is complete) or,
    without ``done``, when its log ends with exit status 0; otherwise ``"failed"`` (without ``done``, a task this
    call did not submit is ``"unknown"``). Rerunning with the
    same ``done`` resubmits only the failed tasks. Tasks of ``name`` already queued are waited for.
    """
    options = options or SlurmOptions()
    slurm_dir = Path(options.slurm_dir).absolute()
    text = render_commands(commands, name=name, options=options)  # every value checked before squeue
    queued = queue_states(name).get(name, {})
    todo = [i for i in range(len(commands)) if not (done and done(i)) and i not in queued]
    logs: dict[int, Path] = {}
    if todo:
        slurm_dir.mkdir(parents=True, exist_ok=True)
        script = slurm_dir / f"{name}.sbatch"
        script.write_text(text)
        array = f"--array={_spec(todo, options.max_running)}"
        job = (
            _run(["sbatch", "--parsable", array, str(script)], f"sbatch {script}", tries=1)
            .strip()
            .split(";")[0]
        )
        logs = {i: slurm_dir / f"{name}-{job}_{i}.out" for i in todo}
        echo(
            f"submitted array job {job}: tasks {_fmt(todo)} of {len(commands)}; script and logs in {slurm_dir}"
        )
    last = None
    while True:
        queued = queue_states(name).get(name, {})
        states = {}
        for i in range(len(commands)):
            if i in queued:
                states[i] = "queued" if queued[i][1] in ("PENDING", "REQUEUED") else "running"
            elif done is not None:
                states[i] = "done" if done(i) else "failed"
            else:
                ok = i in logs and _last_line(logs[i]) == "tprobe-task-exit 0"
                states[i] = "done" if ok else "failed" if i in logs else "unknown"  # unknown: not ours
        line = " | ".join(
            f"{s} {_fmt([i for i, v in states.items() if v == s])}"
            for s in ("running", "queued", "done", "failed", "unknown")
            if s != "unknown" or s in states.values()
        )
        if line != last:
            echo(line)
            last = line
        if not queued:
            return states
        time.sleep(poll)


# ---- a probe sweep as one array: task i fits (pool, head) i of the sweep folder's plan -----------------
def sweep_job_name(sweep: str | Path) -> str:
    """One name per sweep folder: a rerun finds that sweep's tasks still in the queue."""
    digest = hashlib.sha1(str(Path(sweep).absolute()).encode()).hexdigest()[:10]
    return f"tprobe-sweep-{digest}"


def sweep_commands(sweep: str | Path, n_tasks: int, python: str | None = None) -> list[list[str]]:
    """Task i's command: ``tprobe probe --resume SWEEP --sweep-task i`` (the plan in SWEEP says the rest)."""
    sweep = str(Path(sweep).absolute())
    return [
        [python or sys.executable, "-m", "tprobe.cli", "probe", "--resume", sweep, "--sweep-task", str(i)]
        for i in range(n_tasks)
    ]


def sweep_array(
    sweep: str | Path,
    *,
    options: SlurmOptions | None = None,
    poll: float = 10.0,
    echo: Callable[[str], None] = _stderr,
    python: str | None = None,
) -> dict[int, str]:
    """Submit the sweep folder's missing (pool, head) tasks as ONE array job, watch them, return the states.

    The folder comes from :func:`tprobe.probing.sweep.plan_sweep`; a task is done when its record is written
    (:func:`tprobe.probing.sweep.task_done`), so a rerun submits only failed, cancelled or never-run tasks, and
    tasks of this sweep still queued are watched, not resubmitted. Raises :class:`TprobeError` naming
    failed tasks; collect with :func:`tprobe.probing.sweep.collect_sweep` once every task is done.
    """
    from tprobe.probing.sweep import SweepPlan, task_done

    sweep = Path(sweep).absolute()
    options = options or SlurmOptions()
    plan = SweepPlan.load(sweep)
    commands = sweep_commands(sweep, len(plan.tasks), python)
    name = sweep_job_name(sweep)
    try:
        states = command_array(
            commands, name=name, options=options, done=lambda i: task_done(sweep, i), poll=poll, echo=echo
        )
    except KeyboardInterrupt:
        raise TprobeError(
            f"stopped watching; the tasks ({name}) keep running: `tprobe probe --resume {sweep} "
            f"--executor slurm` watches them again (nothing queued is resubmitted)"
        ) from None
    failed = [i for i, s in states.items() if s != "done"]
    if failed:
        what = ", ".join(f"{i} ({plan.tasks[i][0]} · {plan.tasks[i][1]})" for i in failed)
        slurm_dir = Path(options.slurm_dir).absolute()
        logs = sorted(slurm_dir.glob(f"{name}-*_{failed[0]}.out"), key=lambda p: p.stat().st_mtime)
        ends = f"; {logs[-1].name} ends: {_last_line(logs[-1], skip='tprobe-task-exit')!r}" if logs else ""
        raise TprobeError(
            f"sweep task(s) {what} ended without a run (logs: {slurm_dir}/{name}-<job>_<task>.out{ends}); "
            f"`tprobe probe --resume {sweep} --executor slurm` resubmits only those"
        )
    return states


def check_sweep(out: str | Path, *, store: bool = True) -> None:
    """Refusals before any work of a sweep on SLURM: features that are not a store (a table's sweep is
    small), or an ``out`` / working directory that cannot go into an sbatch script."""
    if not store:
        raise TprobeError(
            "--executor slurm sweeps a feature store (--store/--model); a --features table's "
            "sweep is small: run it without --executor slurm"
        )
    script_value("--out", Path(out).absolute())
    script_value("the working directory", Path.cwd())


def sweep_on_slurm(
    store: str | Path,
    pools: Sequence[str],
    heads: Sequence[str],
    *,
    out: str | Path = "runs",
    probe_kwargs: dict | None = None,
    options: SlurmOptions | None = None,
    poll: float = 10.0,
    echo: Callable[[str], None] = _stderr,
):
    """The probe sweep as ONE array job: plan the sweep folder (:func:`tprobe.probing.sweep.plan_sweep`),
    run its tasks (:func:`sweep_array`), collect its summary; returns the
    :class:`~tprobe.probing.sweep.SweepResult`."""
    from tprobe.probing.sweep import plan_sweep

    check_sweep(out)
    sweep = plan_sweep(store, pools, heads, out=out, probe_kwargs=probe_kwargs)
    echo(f"sweep folder {sweep}: one SLURM array task per pool x head")
    return resume_on_slurm(sweep, options=options, poll=poll, echo=echo)


def resume_on_slurm(
    sweep: str | Path,
    *,
    options: SlurmOptions | None = None,
    poll: float = 10.0,
    echo: Callable[[str], None] = _stderr,
):
    """A sweep folder's missing tasks as one array job (:func:`sweep_array`), then its summary
    (:func:`tprobe.probing.sweep.collect_sweep`)."""
    from tprobe.probing.sweep import collect_sweep

    check_sweep(sweep)
    sweep_array(sweep, options=options, poll=poll, echo=echo)
    return collect_sweep(sweep)
