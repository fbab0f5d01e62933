"""`python -m launch` starting real ranks of `python -m train` on CPU (issue 7).

Oracle: `python -m train` run directly with the same overrides. One rank started through the
DeepSpeed launcher, stopped by Ctrl-C and continued, stopped by SLURM's pre-emption signal and
started again as a requeued job, or SIGKILLed under --max-restarts 1, logs the same metrics step
for step: bit-identical, since it is the same single-threaded process resuming from its own
checkpoint (model, optimizer, RNG, data position).

Two-rank runs (two "nodes" on localhost against one node with two ranks, a worker killed under
--max-restarts 1) need the multi-process engine in train/loop.py; they switch on by themselves
once the loop stops refusing WORLD_SIZE > 1.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPARED = ("step", "loss", "lm_loss", "mtp_loss", "balance_loss", "indexer_loss", "lr", "grad_norm", "tokens")
SINGLE_PROCESS_ONLY = "this entry runs one process" in (ROOT / "train" / "loop.py").read_text()
needs_engine = pytest.mark.skipif(
    SINGLE_PROCESS_ONLY, reason="train/loop.py still refuses WORLD_SIZE > 1 (multi-process engine not wired in)")


def base_overrides(tmp_path, max_steps):
    return ["model=tiny", "logging.progress=false", "logging.wandb=false", f"train.max_steps={max_steps}",
            "train.global_batch=4", "train.micro_batch=2", "train.eval_every=0", "train.eval_batches=1",
            "train.stats_every=0", f"data.cache_dir={tmp_path.parent / 'data-cache'}",
            "data.embedded_math_problems=400", "data.embedded_code_max_files=8",
            "data.embedded_code_max_chars=120000", "data.embedded_prose_max_chars=120000"]


def child_env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled", DS_ACCELERATOR="cpu",
                CUDA_VISIBLE_DEVICES="", **extra)


def run(cmd, timeout=300, **kw):
    proc = subprocess.run(cmd, cwd=ROOT, env=kw.pop("env", child_env()), capture_output=True, text=True,
                          timeout=timeout, **kw)
    return proc


def check(proc):
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}")
    return proc


def metrics(run_dir):
    """The last logged row of every step (a resumed run re-logs the steps after its checkpoint)."""
    rows = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = {k: row[k] for k in COMPARED}
    return [rows[s] for s in sorted(rows)]


def assert_same_steps(got, expected):
    """Step-for-step equality; on failure, the first differing step of both runs."""
    for a, b in zip(got, expected):
        assert a == b, f"first difference at step {b['step']}:\n  got      {a}\n  expected {b}"
    assert len(got) == len(expected), (len(got), len(expected))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def processes_mentioning(text):
    """Pids of this user's processes whose command line contains `text`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture
def reaper(tmp_path):
    """After the test, kill any process it left behind (they all name a path under tmp_path)."""
    yield
    for pid in processes_mentioning(str(tmp_path)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def direct_run(tmp_path_factory):
    """The oracle: `python -m train` itself, 6 steps, one process."""
    tmp = tmp_path_factory.mktemp("direct")
    check(run([sys.executable, "-m", "train", *base_overrides(tmp, 6), f"run.dir={tmp / 'run'}"]))
    return metrics(tmp / "run")


@pytest.mark.slow
def test_deepspeed_launcher_runs_the_rank_like_train_itself(tmp_path, direct_run, reaper):
    run_dir = tmp_path / "ds"
    proc = check(run([sys.executable, "-m", "launch", "cluster=deepspeed", f"cluster.master_port={free_port()}",
                      *base_overrides(tmp_path, 6), f"run.dir={run_dir}"]))
    assert (run_dir / "hostfile").read_text() == "localhost slots=1\n"
    # with --local_rank=0 appended, the rank entry would have refused its command line
    assert "'--config-file', '" + str(run_dir / "config.yaml") + "']" in proc.stdout + proc.stderr
    assert json.loads((run_dir / "env.json").read_text())["world_size"] == 1
    assert_same_steps(metrics(run_dir), direct_run)


def wait_for_first_step(proc, run_dir, timeout=240):
    deadline = time.monotonic() + timeout
    while not (run_dir / "metrics.jsonl").exists() or not (run_dir / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-4000:]
        time.sleep(0.1)


@pytest.mark.slow
def test_ctrl_c_reaches_each_rank_once_and_the_run_continues_where_it_stopped(tmp_path, direct_run, reaper):
    # a rank's second signal means "stop now, no checkpoint": the launcher must not double it
    run_dir = tmp_path / "local"
    cmd = [sys.executable, "-m", "launch", "cluster=local", *base_overrides(tmp_path, 6), "train.checkpoint_every=0",
           f"run.dir={run_dir}"]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    wait_for_first_step(launcher, run_dir)
    launcher.send_signal(signal.SIGINT)
    log = launcher.communicate(timeout=240)[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped_at = summary["steps"]
    assert summary["stopped_by_signal"] is True and 1 <= stopped_at < 6, (summary, log[-3000:])
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "manifest.json").is_file()

    check(run(cmd + ["run.resume=auto"]))
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from"].endswith(f"step_{stopped_at:08d}")
    assert_same_steps(metrics(run_dir), direct_run)


@pytest.mark.slow
def test_slurm_node_task_stops_on_preemption_and_its_requeue_resumes(tmp_path, direct_run, reaper):
    """submitit's own entry (`python -m submitit.core._submit`) in a one-node job environment.

    The pre-emption signal stops the ranks with a checkpoint; submitit then checkpoints the task
    and calls `scontrol requeue`, which does not exist here, so the first attempt ends there.
    Starting the job again, as SLURM does after a requeue, resumes and finishes the run.
    """
    from submitit.core.utils import DelayedSubmission, JobPaths

    from launch.resolve import RunDirs, prepare, resolve
    from launch.slurm import node_task

    run_dir = tmp_path / "sl"
    launched = resolve(["cluster=slurm", "cluster.gpus_per_node=0", "cluster.nproc_per_node=1",
                        f"cluster.master_port={free_port()}", *base_overrides(tmp_path, 6),
                        f"run.dir={run_dir}", "train.checkpoint_every=0"], RunDirs(multirun=False))
    prepare(launched, dry_run=False)
    folder = run_dir / "slurm" / "%j"
    job_id = "20000"                           # % PORT_SPREAD == 0: the rendezvous uses master_port itself
    paths = JobPaths(folder, job_id=job_id)
    paths.folder.mkdir(parents=True)
    delayed = DelayedSubmission(node_task(launched))
    delayed.set_timeout(launched.cluster.time_min, launched.cluster.max_timeouts)
    delayed.dump(paths.submitted_pickle)
    env = child_env(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID=job_id, SLURM_NODEID="0", SLURM_JOB_NUM_NODES="1",
                    SLURM_JOB_NODELIST="localhost", SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_NTASKS="1")
    cmd = [sys.executable, "-u", "-m", "submitit.core._submit", str(folder)]

    first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_first_step(first, run_dir)
    first.send_signal(signal.SIGUSR2)          # what SLURM sends signal_delay_s before the end, or on pre-emption
    log = first.communicate(timeout=240)[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped_at = summary["steps"]
    assert summary["stopped_by_signal"] is True and 1 <= stopped_at < 6, (summary, log[-3000:])
    assert (run_dir / "checkpoints" / f"step_{stopped_at:08d}" / "manifest.json").is_file()
    assert "scontrol" in log and first.returncode != 0, log[-3000:]

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["resumed_from"].endswith(f"step_{stopped_at:08d}")
    assert_same_steps(metrics(run_dir), direct_run)


@pytest.fixture(scope="module")
def one_node_two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("one_node")
    check(run([sys.executable, "-m", "launch", "cluster=local", "cluster.nproc_per_node=2",
               *base_overrides(tmp, 6), f"run.dir={tmp / 'run'}"]))
    return metrics(tmp / "run")


@pytest.mark.slow
@needs_engine
def test_two_nodes_on_localhost_match_one_node_with_two_ranks(tmp_path, one_node_two_ranks, reaper):
    run_dir = tmp_path / "two"
    check(run([sys.executable, "-m", "launch", "cluster=torchrun", "cluster.nnodes=2", "cluster.nproc_per_node=1",
               "cluster.colocate_nodes=true", "cluster.max_restarts=0", f"cluster.master_port={free_port()}", *base_overrides(tmp_path, 6),
               f"run.dir={run_dir}"]))
    started = json.loads((run_dir / "launch.json").read_text())["commands"]
    assert [c.split("--node-rank ")[1].split()[0] for c in started] == ["0", "1"]
    assert json.loads((run_dir / "env.json").read_text())["world_size"] == 2
    # two ranks either way; only the rendezvous differs, so the runs match step for step
    assert_same_steps(metrics(run_dir), one_node_two_ranks)


def rank_pid(run_dir, rank):
    """Pid of the worker (not the agent) with RANK=rank running on run_dir/config.yaml."""
    for pid in processes_mentioning(str(run_dir / "config.yaml")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"torch.distributed.run" not in cmdline and f"RANK={rank}".encode() in environ:
            return pid
    return None


@pytest.mark.slow
@pytest.mark.parametrize("nproc,oracle", [(1, "direct_run"), pytest.param(2, "one_node_two_ranks", marks=needs_engine)])
def test_a_killed_worker_restarts_from_its_checkpoint_and_finishes(tmp_path, request, reaper, nproc, oracle):
    expected = request.getfixturevalue(oracle)
    run_dir = tmp_path / "elastic"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "launch", "cluster=local", f"cluster.nproc_per_node={nproc}", "cluster.max_restarts=1",
         *base_overrides(tmp_path, 6), "train.checkpoint_every=2", f"run.dir={run_dir}"],
        cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first_ckpt = run_dir / "checkpoints" / "step_00000002" / "manifest.json"
    deadline = time.monotonic() + 300
    while not first_ckpt.exists():
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[0][-4000:]
        time.sleep(0.1)
    victim = rank_pid(run_dir, nproc - 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    log = launcher.communicate(timeout=300)[0]
    assert launcher.returncode == 0, log[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    # killed without a chance to save: the restart resumes from the last periodic checkpoint
    assert summary["steps"] == 6 and summary["resumed_from"], (summary, log[-3000:])
    assert Path(summary["resumed_from"]).name in {"step_00000002", "step_00000004"}
    assert_same_steps(metrics(run_dir), expected)
