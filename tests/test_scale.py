"""Scale-out: DDP in a worker process per variant, Ray and SLURM (submitit) launchers, and a team
MLflow server on PostgreSQL. Tiny models on synthetic data; each test trains for a few seconds."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from lab import cli, launch, track
from lab import spec as S
from lab.runner import run_experiment

from conftest import KillAt, tiny_spec_dict

ROOT = Path(__file__).resolve().parents[1]


def _load(write_spec, doc):
    spec = S.load_spec(write_spec(doc))
    return spec, S.expand(spec)


def _all_runs(cl, experiment: str) -> list:
    exp = cl.get_experiment_by_name(experiment)
    return cl.search_runs([exp.experiment_id], max_results=1000) if exp else []


def _steps(cl, run_id: str, metric: str) -> list[int]:
    """Every stored step of a metric, duplicates included (a second writer would double them)."""
    return sorted(m.step for m in cl.get_metric_history(run_id, metric))


# --------------------------------------------------------------------------- ranks


def test_rank_zero_from_environment():
    assert launch.is_rank_zero({})
    assert launch.is_rank_zero({"LOCAL_RANK": "0", "NODE_RANK": "0", "WORLD_SIZE": "2"})  # Lightning's rank 0
    assert launch.is_rank_zero({"SLURM_PROCID": "0", "SLURM_LOCALID": "0"})
    assert not launch.is_rank_zero({"LOCAL_RANK": "1", "NODE_RANK": "0"})  # ddp re-launched child
    assert not launch.is_rank_zero({"LOCAL_RANK": "0", "NODE_RANK": "1"})  # first process of node 1
    assert not launch.is_rank_zero({"SLURM_PROCID": "3"})  # srun task 3
    assert not launch.is_rank_zero({"RANK": "1"})  # torchrun


def test_nonzero_rank_trains_but_writes_nothing(store, write_spec):
    """What a rank > 0 of a distributed worker runs: it trains into the prepared run and never
    writes to MLflow (no run, param, metric, tag, artifact or status change)."""
    from lab import execute

    execute.quiet_logs()
    spec, vs = _load(write_spec, tiny_spec_dict(budget={"steps": 4}))
    v = vs[0]
    cl = track.client(store)
    exp_id = track.get_or_create_experiment(cl, "tiny", store)
    parent = track.start_parent_run(cl, exp_id, "tiny")
    ctx = execute.Context(
        spec=spec,
        variants=vs,
        uri=store,
        cl=cl,
        experiment="tiny",
        experiment_id=exp_id,
        parent_run_id=parent,
        baseline=v.key,
        progress=False,
    )
    rec, run_id, resume = execute.prepare_variant(v, ctx)
    tags_before = cl.get_run(run_id).data.tags
    rank1 = execute.Context(**{**ctx.__dict__, "rank_zero": False, "datamodules": {}})
    out = execute.execute_variant(v, rank1, rec, run_id, resume)
    assert out.status == "finished" and out.steps == 4 and out.top1 is not None
    run = cl.get_run(run_id)
    assert run.info.status == "RUNNING"  # only rank 0 ends the run
    assert run.data.params == {} and run.data.metrics == {} and run.data.tags == tags_before
    assert cl.list_artifacts(run_id) == []
    assert len(_all_runs(cl, "tiny")) == 2  # the parent and the prepared child, nothing new
    assert (track.checkpoint_dir(v, store) / "final.pt").exists() is False  # weights are rank 0's to save


# --------------------------------------------------------------------------- DDP


@pytest.mark.slow
def test_ddp_two_cpu_processes_log_one_run(store, write_spec):
    """`strategy: ddp, devices: 2` on CPU (gloo): the variant trains in a worker process of its own
    (Lightning re-launches only that worker), rank 0 alone writes one child run."""
    doc = tiny_spec_dict("ddp")
    doc["train"].update(accelerator="cpu", threads=1)
    rc = cli.main(["run", str(write_spec(doc)), "--devices", "2", "--strategy", "ddp", "--no-progress"])
    assert rc == 0
    cl = track.client(store)
    runs = _all_runs(cl, "ddp")
    children = [r for r in runs if r.data.tags.get("lab.role") == "variant"]
    parents = [r for r in runs if r.data.tags.get("lab.role") == "parent"]
    assert len(children) == 1 and len(parents) == 1
    run = children[0]
    t, m = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED" and t["mlflow.parentRunId"] == parents[0].info.run_id
    assert parents[0].info.status == "FINISHED"
    assert t["lab.world_size"] == "2" and run.data.params["train.strategy"] == "ddp"
    assert run.data.params["train.devices"] == "2"
    assert int(t["lab.worker.pid"]) != os.getpid()  # trained in a worker, not in the driver
    assert m["budget/steps"] == 12 and m["budget/images_seen"] == 12 * 16 * 2  # global batch = 2 x 16
    # one writer: every metric point exactly once
    assert _steps(cl, run.info.run_id, "train/loss") == [2, 4, 6, 8, 10, 12]
    assert _steps(cl, run.info.run_id, "val/top1") == [5, 10, 12]
    assert _steps(cl, run.info.run_id, "final/val_top1") == [12]
    assert {a.path for a in cl.list_artifacts(run.info.run_id)} == {"spec.yaml", "checkpoint"}
    assert [a.path for a in cl.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/final.pt"]


# --------------------------------------------------------------------------- Ray


@pytest.mark.slow
def test_ray_sweep_runs_variants_in_parallel_under_one_parent(store, write_spec):
    pytest.importorskip("ray")
    doc = tiny_spec_dict("sweep")
    doc["train"].update(accelerator="cpu", threads=1)
    doc["variants"] = {"a": {}, "b": {"train": {"lr": 1e-3}}, "c": {"train": {"lr": 2e-3}}}
    spec, vs = _load(write_spec, doc)
    opts = launch.LaunchOptions(ray_init={"num_cpus": 3, "include_dashboard": False, "log_to_driver": False})
    res = run_experiment(spec, vs, progress=False, launcher="ray", launch_options=opts)
    assert [r.status for r in res] == ["finished"] * 3
    cl = track.client(store)
    runs = track.find_variant_runs(cl, "sweep")
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)
    (parent,) = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert cl.get_run(parent).data.tags["lab.role"] == "parent" and cl.get_run(parent).info.status == "FINISHED"
    assert {r.data.tags["lab.launcher"] for r in runs} == {"ray"}
    # three Ray worker processes, whose execution windows overlap (start = task start, end = run end)
    assert len({r.data.tags["lab.worker.pid"] for r in runs}) == 3
    starts = [float(r.data.tags["lab.worker.started"]) for r in runs]
    ends = [r.info.end_time / 1000 for r in runs]
    assert max(starts) < min(ends), (starts, ends)
    assert all(r.data.metrics["budget/steps"] == 12 for r in runs)


# --------------------------------------------------------------------------- SLURM via submitit


@pytest.mark.slow
def test_slurm_launcher_resumes_and_skips_with_local_executor(store, write_spec, tmp_path):
    """submitit's LocalExecutor stands in for SLURM: one job per variant, the interrupted run is
    resumed in its job, everything under one parent; a second invocation submits nothing."""
    pytest.importorskip("submitit")

    doc = tiny_spec_dict("slurmy")
    doc["train"].update(accelerator="cpu", threads=1)
    doc["variants"] = {"a": {}, "b": {"train": {"lr": 1e-3}}}
    spec, vs = _load(write_spec, doc)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(spec, vs[:1], progress=False, callbacks=[KillAt(7)])
    cl = track.client(store)
    (killed,) = track.find_variant_runs(cl, "slurmy", key="a")
    assert killed.info.status == "KILLED"

    opts = launch.LaunchOptions(
        slurm_cluster="local", slurm_folder=str(tmp_path / "submitit" / "%j"), slurm_time=10, poll_s=0.5
    )
    res = run_experiment(spec, vs, progress=False, launcher="slurm", launch_options=opts)
    assert [(r.key, r.status, r.resumed) for r in res] == [("a", "finished", True), ("b", "finished", False)]
    assert res[0].run_id == killed.info.run_id
    runs = {r.data.tags["lab.variant"]: r for r in track.find_variant_runs(cl, "slurmy")}
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs.values())
    assert runs["a"].data.tags["lab.resumed"] == "1"
    assert _steps(cl, runs["a"].info.run_id, "train/loss") == [2, 4, 6, 8, 10, 12]
    assert runs["b"].data.tags["mlflow.parentRunId"] == runs["a"].data.tags["lab.resumed_by"]
    assert int(runs["b"].data.tags["lab.worker.pid"]) != os.getpid()
    assert list((tmp_path / "submitit").iterdir())  # submitit's job folders

    again = run_experiment(spec, vs, progress=False, launcher="slurm", launch_options=opts)
    assert [r.status for r in again] == ["skipped", "skipped"]


def test_multi_node_needs_the_slurm_launcher(store, write_spec, capsys):
    rc = cli.main(["run", str(write_spec(tiny_spec_dict())), "--num-nodes", "2", "--no-progress"])
    assert rc == 2
    assert "--launcher slurm" in capsys.readouterr().err
    assert track.find_variant_runs(track.client(store), "tiny") == []


# --------------------------------------------------------------------------- team server


PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pg_bin() -> Path | None:
    import glob

    cands = sorted(glob.glob(f"{PG_BIN_GLOB}/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if cands:
        return Path(cands[-1]).parent
    found = shutil.which("initdb")
    return Path(found).resolve().parent if found else None


def _require_postgres() -> Path:
    """The PostgreSQL bin folder; else FAIL under LAB_REQUIRE_POSTGRES=1 (CI), else skip."""
    bindir = _pg_bin()
    _need(
        bindir is not None,
        "PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin/initdb); apt-get install -y postgresql",
    )
    try:
        import psycopg2  # noqa: F401
    except ImportError:
        _need(False, "psycopg2 is not installed (pip install -e '.[scale]')")
    return bindir


def _need(ok: bool, why: str) -> None:
    if ok:
        return
    if os.environ.get("LAB_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"LAB_REQUIRE_POSTGRES=1 but {why}")
    pytest.skip(why)


@pytest.fixture
def postgres():
    """A throw-away PostgreSQL server on 127.0.0.1:<free port>; yields its SQLAlchemy URL base."""
    bindir = _require_postgres()
    as_user: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="lab-pg-"))  # under /tmp: reachable by the postgres user
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            _need(False, "running as root and there is no 'postgres' user to run the server")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data, log = base / "data", base / "server.log"
    started = False
    try:
        subprocess.run(
            as_user
            + [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            as_user
            + [
                str(bindir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(log),
                "-w",
                "-t",
                "60",
                "-o",
                f"-h 127.0.0.1 -p {port} -k {base} -F",
                "start",
            ],
            check=True,
            capture_output=True,
            timeout=90,
        )
        started = True
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE DATABASE mlflow")
        conn.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    except subprocess.CalledProcessError as e:
        extra = log.read_text()[-2000:] if log.is_file() else ""
        pytest.fail(f"PostgreSQL did not start: {e}\n{e.stdout}\n{e.stderr}\n{extra}")
    finally:
        if started:
            subprocess.run(
                as_user + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                capture_output=True,
                timeout=60,
            )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def mlflow_server(postgres, tmp_path):
    """`mlflow server` on the PostgreSQL store with an artifact root; yields (URI, artifact root)."""
    port = _free_port()
    artifacts = tmp_path / "artifact-root"
    artifacts.mkdir()
    log = open(tmp_path / "mlflow-server.log", "wb")
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        postgres,
        "--artifacts-destination",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    # no background job runners (MLflow's GenAI jobs): faster start and stop
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # its own session: the server and its workers are stopped together by their process group id
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.flush()
                pytest.fail("mlflow server did not come up:\n" + (tmp_path / "mlflow-server.log").read_text()[-3000:])
            time.sleep(0.5)
        yield uri, artifacts
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


@pytest.mark.postgres
@pytest.mark.slow
def test_team_server_on_postgres(request, write_spec, tmp_path, monkeypatch):
    """`python -m lab run` works unchanged against `mlflow server` (PostgreSQL + artifact root)
    through MLFLOW_TRACKING_URI."""
    from mlflow.tracking import MlflowClient

    _require_postgres()  # in the test body: a missing server is a FAILED test under LAB_REQUIRE_POSTGRES=1
    uri, artifacts = request.getfixturevalue("mlflow_server")
    doc = tiny_spec_dict("team", budget={"steps": 6})
    doc["train"].update(eval_every=6, accelerator="cpu")
    spec_path = write_spec(doc)
    work = tmp_path / "work"
    work.mkdir()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    out = subprocess.run(
        [sys.executable, "-m", "lab", "run", str(spec_path), "--no-progress"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    cl = MlflowClient(tracking_uri=uri)
    runs = track.find_variant_runs(cl, "team")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.metrics["budget/steps"] == 6
    parent = cl.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["lab.role"] == "parent" and parent.info.status == "FINISHED"
    assert {a.path for a in cl.list_artifacts(run.info.run_id)} >= {"spec.yaml", "checkpoint"}
    # the artifact went through the server into its artifact root
    got = Path(cl.download_artifacts(run.info.run_id, "checkpoint/final.pt", str(tmp_path / "dl")))
    assert got.is_file() and got.stat().st_size > 0
    assert list(artifacts.rglob("final.pt"))
    # a second invocation against the server finds the finished variant and skips it
    monkeypatch.chdir(work)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    spec = S.load_spec(spec_path)
    again = run_experiment(spec, S.expand(spec), progress=False, say=lambda s: None)
    assert [(r.status, r.run_id) for r in again] == [("skipped", run.info.run_id)]
