"""The launch scripts in launch/: their dry runs, their errors, and (with fake gcloud / sbatch /
srun on PATH) what they really execute. Needs bash only: no gcloud, SLURM or GPU."""
from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
BASH = shutil.which("bash")
pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")

# Variables the scripts read as defaults: keep the developer's shell out of the tests.
_SCRUB = ("TPU_NAME", "ZONE", "XLA_FLAGS", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
          "JAX_PROCESS_ID", "JAX_COORDINATOR_PORT")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB and not k.startswith("SLURM_")}
    env.update(extra)
    return env


def run(script, *args, env=None, cwd=None):
    return subprocess.run([BASH, str(LAUNCH / script), *args], capture_output=True, text=True,
                          env=env or _env(), cwd=cwd or REPO, timeout=60)


def commands(out: str) -> list[list[str]]:
    """The '+ '-prefixed lines of a dry run, split back into words by a POSIX shell parser."""
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def ok(res):
    assert res.returncode == 0, res.stderr
    return res.stdout


def fails(res):
    assert res.returncode != 0, res.stdout
    err = res.stderr.strip()
    assert err and len(err.splitlines()) == 1, err     # one line, says what is wrong
    assert "error" in err
    return err


def fake_bin(tmp_path, name, body):
    d = tmp_path / "bin"
    d.mkdir(exist_ok=True)
    p = d / name
    p.write_text("#!/usr/bin/env bash\n" + body)
    p.chmod(p.stat().st_mode | stat.S_IEXEC)
    return d


# ------------------------------------------------------------------------------------ tpu.sh
POD = ["--name", "my-pod", "--zone", "us-east5-a"]


def test_tpu_help():
    out = ok(run("tpu.sh", "--help"))
    for word in ("create", "setup", "train", "delete", "--queued", "--dry-run"):
        assert word in out


def test_tpu_create_dry_run():
    out = ok(run("tpu.sh", "create", *POD, "--accelerator-type", "v5p-32", "--spot", "--dry-run"))
    (cmd,) = commands(out)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-pod"]
    assert "--zone=us-east5-a" in cmd and "--accelerator-type=v5p-32" in cmd
    assert "--version=v2-alpha-tpuv5" in cmd and "--spot" in cmd
    assert "+ gcloud compute tpus tpu-vm create my-pod --zone=us-east5-a --accelerator-type=v5p-32" in out


def test_tpu_create_queued_dry_run():
    out = ok(run("tpu.sh", "create", *POD, "--accelerator-type=v5litepod-16", "--queued",
                 "--version", "v2-alpha-tpuv5-lite", "--project", "proj", "--dry-run"))
    (cmd,) = commands(out)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-pod"]
    for flag in ("--zone=us-east5-a", "--accelerator-type=v5litepod-16", "--node-id=my-pod",
                 "--runtime-version=v2-alpha-tpuv5-lite", "--project=proj"):
        assert flag in cmd
    assert "--spot" not in cmd


def test_tpu_setup_copies_and_installs_on_all_workers():
    out = ok(run("tpu.sh", "setup", *POD, "--dry-run"))
    cmds = commands(out)
    scp = next(c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"])
    assert "--worker=all" in scp and "my-pod:unclip_jax.tar.gz" in scp
    ssh = next(c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"])
    assert "--worker=all" in ssh
    remote = next(a for a in ssh if a.startswith("--command=")).removeprefix("--command=")
    assert 'pip install -e ".[tpu]"' in remote


def test_tpu_setup_git_clone():
    out = ok(run("tpu.sh", "setup", *POD, "--repo", "https://example.com/u/unclip_jax.git",
                 "--ref", "v1", "--dry-run"))
    (ssh,) = commands(out)
    remote = ssh[-1]
    assert "--worker=all" in ssh
    assert "git clone https://example.com/u/unclip_jax.git" in remote and "checkout v1" in remote
    assert 'pip install -e ".[tpu]"' in remote


def test_tpu_train_dry_run():
    out = ok(run("tpu.sh", "train", *POD, "--config", "configs/decoder.py:size=base",
                 "--workdir", "gs://bucket/runs/dec", "--dry-run", "--", "--config.lr=1e-4",
                 "--note=it's fine"))
    (cmd,) = commands(out)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod"]
    assert "--worker=all" in cmd and "--zone=us-east5-a" in cmd
    remote = next(a for a in cmd if a.startswith("--command=")).removeprefix("--command=")
    assert "JAX_PLATFORMS=tpu" in remote
    assert ("unclip-jax train --config configs/decoder.py:size=base --workdir gs://bucket/runs/dec"
            in remote)
    # the pass-through arguments survive the two levels of quoting
    words = shlex.split(remote.split("unclip-jax train", 1)[1])
    assert words[-2:] == ["--config.lr=1e-4", "--note=it's fine"]


def test_tpu_train_background():
    out = ok(run("tpu.sh", "train", *POD, "--config", "c.py", "--workdir", "gs://b/w",
                 "--background", "--dry-run"))
    remote = commands(out)[0][-1]
    assert "nohup unclip-jax train" in remote and remote.rstrip().endswith("&")


def test_tpu_other_commands_dry_run():
    out = ok(run("tpu.sh", "delete", *POD, "--queued", "--yes", "--dry-run"))
    assert commands(out) == [["gcloud", "compute", "tpus", "queued-resources", "delete", "my-pod",
                              "--zone=us-east5-a", "--force", "--quiet"]]
    out = ok(run("tpu.sh", "delete", *POD, "--dry-run"))
    assert commands(out) == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-pod",
                              "--zone=us-east5-a"]]
    out = ok(run("tpu.sh", "status", *POD, "--dry-run"))
    assert commands(out)[0][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "my-pod"]
    out = ok(run("tpu.sh", "ssh", *POD, "--worker", "1", "--dry-run"))
    assert commands(out) == [["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod",
                              "--zone=us-east5-a", "--worker=1"]]


def test_tpu_single_host_accepts_local_workdir():
    out = ok(run("tpu.sh", "train", *POD, "--accelerator-type", "v4-8", "--config", "c.py",
                 "--workdir", "/tmp/run", "--dry-run"))
    assert "--workdir /tmp/run" in commands(out)[0][-1]


@pytest.mark.parametrize("args, message", [
    (["train", *POD, "--config", "c.py", "--workdir", "/tmp/run"], "gs://"),
    (["train", *POD, "--accelerator-type", "v5litepod-16", "--config", "c.py",
      "--workdir", "runs/x"], "gs://"),
    (["train", *POD, "--config", "c.py"], "--workdir"),
    (["train", *POD, "--workdir", "gs://b/w"], "--config"),
    (["create", "--zone", "us-east5-a"], "--name"),
    (["create", *POD, "--frobnicate"], "--frobnicate"),
    (["explode", *POD], "explode"),
    ([], "command"),
    (["create", "--name"], "--name"),
    (["create", *POD, "--accelerator-type", "big"], "accelerator"),
])
def test_tpu_bad_input(args, message):
    assert message in fails(run("tpu.sh", *args, "--dry-run"))


def test_tpu_real_run_calls_gcloud(tmp_path):
    """Without --dry-run the same commands are executed (here by a fake gcloud)."""
    log = tmp_path / "gcloud.log"
    bindir = fake_bin(tmp_path, "gcloud", f'printf "%s\\n" "$*" >> {shlex.quote(str(log))}\n')
    env = _env(PATH=f"{bindir}:{os.environ['PATH']}", TMPDIR=str(tmp_path))
    args = ("train", *POD, "--config", "c.py", "--workdir", "gs://b/w")
    ok(run("tpu.sh", *args, env=env))
    dry = commands(ok(run("tpu.sh", *args, "--dry-run", env=env)))
    assert log.read_text().splitlines() == [" ".join(c[1:]) for c in dry]
    src = tmp_path / "checkout"                           # a small stand-in for the repository
    (src / "unclip_jax").mkdir(parents=True)
    (src / "setup.py").write_text("")
    ok(run("tpu.sh", "setup", *POD, "--source", str(src), env=env))
    assert not list(tmp_path.glob("*.tar.gz"))            # tar really ran; the tarball is removed
    assert "tpu-vm scp" in log.read_text()


# ------------------------------------------------------------------------------ gpu_local.sh
def test_gpu_local_dry_run_installs_and_trains(tmp_path):
    venv = tmp_path / "venv"
    out = ok(run("gpu_local.sh", "--config", "configs/decoder.py:size=base", "--workdir",
                 "workdir/dec", "--venv", str(venv), "--gpus", "0,1", "--dry-run",
                 "--", "--config.batch_size=64"))
    cmds = commands(out)
    assert ["python3", "-m", "venv", str(venv)] in cmds
    assert [f"{venv}/bin/python", "-m", "pip", "install", "-e", ".[cuda]"] in cmds
    train = cmds[-1]
    assert train[0] == "env"
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.90" in train and "CUDA_VISIBLE_DEVICES=0,1" in train
    assert "JAX_PLATFORMS=cuda" in train
    xla = next(a for a in train if a.startswith("XLA_FLAGS="))
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in xla
    i = train.index(f"{venv}/bin/unclip-jax")
    assert train[i:] == [f"{venv}/bin/unclip-jax", "train", "--config",
                         "configs/decoder.py:size=base", "--workdir", "workdir/dec",
                         "--config.batch_size=64"]
    assert not venv.exists()                              # a dry run writes nothing
    # one process: no coordinator for jax.distributed
    assert not any(a.startswith("JAX_COORDINATOR_ADDRESS=") for a in train)


def test_gpu_local_no_install_and_defaults(tmp_path):
    out = ok(run("gpu_local.sh", "--config", "configs/prior.py", "--no-install", "--venv",
                 str(tmp_path / "none"), "--dry-run", env=_env(XLA_FLAGS="--xla_dump_to=/tmp/d")))
    (train,) = commands(out)
    assert train[-5:] == ["unclip-jax", "train", "--config", "configs/prior.py", "--workdir",
                          "workdir/prior"][-5:]
    xla = next(a for a in train if a.startswith("XLA_FLAGS="))
    assert xla.endswith("--xla_dump_to=/tmp/d")            # the user's flags come last and win


@pytest.mark.parametrize("args, message", [
    (["--workdir", "w"], "--config"),
    (["--config", "c.py", "--bogus"], "--bogus"),
    (["--config", "c.py", "--gpus", "all"], "--gpus"),
    (["--config", "c.py", "--mem-fraction", "2"], "--mem-fraction"),
])
def test_gpu_local_bad_input(args, message):
    assert message in fails(run("gpu_local.sh", *args, "--dry-run"))


def test_gpu_local_default_xla_flags_parse():
    """An unknown flag in XLA_FLAGS aborts jax at start-up: the defaults must all exist."""
    pytest.importorskip("jax")
    out = ok(run("gpu_local.sh", "--config", "c.py", "--no-install", "--dry-run"))
    xla = next(a for a in commands(out)[0] if a.startswith("XLA_FLAGS="))
    res = subprocess.run(
        [os.sys.executable, "-c", "import jax, jax.numpy as jnp; print(int(jnp.ones(2).sum()))"],
        capture_output=True, text=True, timeout=120,
        env={**_env(), "XLA_FLAGS": xla.removeprefix("XLA_FLAGS="), "JAX_PLATFORMS": "cpu"})
    assert res.returncode == 0 and res.stdout.strip() == "2", res.stderr[-2000:]


# ---------------------------------------------------------------------------------- slurm.sh
def _sbatch(out):
    cmds = [c for c in commands(out) if c[0] == "sbatch"]
    assert len(cmds) == 1
    return cmds[0]


def _job_script(out):
    start = out.index("# ---- rendered job script ----\n") + len("# ---- rendered job script ----\n")
    return out[start:out.index("# ---- end of job script ----")]


def test_slurm_per_gpu_dry_run():
    out = ok(run("slurm.sh", "--nodes", "2", "--gpus-per-node", "4", "--partition", "gpu",
                 "--time", "48:00:00", "--config", "configs/decoder.py", "--workdir",
                 "/shared/runs/dec", "--dry-run", "--", "--config.lr=3e-4"))
    cmd = _sbatch(out)
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu",
                 "--time=48:00:00", "--signal=TERM@120"):
        assert flag in cmd
    i = next(i for i, a in enumerate(cmd) if a.endswith(".sbatch"))
    assert cmd[i + 1:] == ["--config", "configs/decoder.py", "--workdir", "/shared/runs/dec",
                           "--config.lr=3e-4"]
    script = _job_script(out)
    assert script.startswith("#!/bin/bash\n")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4"):
        assert line in script
    assert "scontrol show hostnames" in script and "SLURM_JOB_NODELIST" in script
    for var in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        assert f"export {var}=" in script
    assert "srun" in script and 'unclip-jax train "$@"' in script
    assert "UNCLIP_PER_NODE=0" in " ".join(cmd)


def test_slurm_per_node_dry_run():
    out = ok(run("slurm.sh", "--nodes=3", "--gpus-per-node=8", "--per-node", "--config", "c.py",
                 "--workdir", "gs://b/w", "--requeue", "--dry-run"))
    cmd = _sbatch(out)
    assert "--nodes=3" in cmd and "--ntasks-per-node=1" in cmd and "--gpus-per-node=8" in cmd
    assert "--requeue" in cmd
    assert "UNCLIP_PER_NODE=1" in " ".join(cmd)


@pytest.mark.parametrize("args, message", [
    (["--config", "c.py"], "--workdir"),
    (["--workdir", "w"], "--config"),
    (["--config", "c.py", "--workdir", "w", "--nodes", "two"], "--nodes"),
    (["--config", "c.py", "--workdir", "w", "--gpus", "4"], "--gpus"),
])
def test_slurm_bad_input(args, message):
    assert message in fails(run("slurm.sh", *args, "--dry-run"))


SRUN = r'''
# fake srun: skip its options, run the command once per task with SLURM's per-task variables
while [[ "$1" == -* ]]; do shift; done
tpn=$SLURM_NTASKS_PER_NODE
for (( i = 0; i < SLURM_NTASKS; i++ )); do
  SLURM_PROCID=$i SLURM_LOCALID=$(( i % tpn )) SLURM_GPUS_ON_NODE=4 "$@" || exit $?
done
'''
SCONTROL = 'printf "gpu-node-07\\ngpu-node-08\\n"\n'
UNCLIP = ('echo "task $JAX_PROCESS_ID/$JAX_NUM_PROCESSES coord=$JAX_COORDINATOR_ADDRESS '
          'devices=$JAX_LOCAL_DEVICE_IDS args=$*"\n')


@pytest.mark.parametrize("per_node", [False, True])
def test_slurm_job_script_runs(tmp_path, per_node):
    """Submit through a fake sbatch, then run the job script it received with fake srun,
    scontrol and unclip-jax: every task gets the coordinator, process count and its own id."""
    saved = tmp_path / "job.sbatch"
    fake_bin(tmp_path, "sbatch", f'cp "${{@: -5:1}}" {shlex.quote(str(saved))}\n'
                                 f'echo "$@" > {shlex.quote(str(tmp_path / "sbatch.args"))}\n')
    fake_bin(tmp_path, "srun", SRUN)
    fake_bin(tmp_path, "scontrol", SCONTROL)
    bindir = fake_bin(tmp_path, "unclip-jax", UNCLIP)
    env = _env(PATH=f"{bindir}:{os.environ['PATH']}", TMPDIR=str(tmp_path))
    layout = ["--per-node"] if per_node else []
    ok(run("slurm.sh", "--nodes", "2", "--gpus-per-node", "4", *layout, "--venv", str(tmp_path),
           "--config", "c.py", "--workdir", "/w", env=env))
    assert saved.exists()
    args = (tmp_path / "sbatch.args").read_text()
    assert "--config c.py --workdir /w" in args
    assert not list(tmp_path.glob("unclip-jax.*.sbatch"))  # the rendered temp file is removed
    (tmp_path / "bin" / "activate").write_text("")         # the fake venv's activate
    ntasks = 2 if per_node else 8
    job_env = _env(PATH=f"{bindir}:{os.environ['PATH']}", SLURM_JOB_ID="4100",
                   SLURM_JOB_NODELIST="gpu-node-[07-08]", SLURM_NTASKS=str(ntasks),
                   SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE=str(ntasks // 2),
                   UNCLIP_REPO=str(REPO), UNCLIP_VENV=str(tmp_path),
                   UNCLIP_PER_NODE="1" if per_node else "0")
    res = subprocess.run([BASH, str(saved), "--config", "c.py", "--workdir", "/w"],
                         capture_output=True, text=True, env=job_env, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if line.startswith("task ")]
    port = 4100 % 4096 + 61440
    assert len(lines) == ntasks
    for i, line in enumerate(lines):
        devices = "0,1,2,3" if per_node else str(i % 4)
        assert line == (f"task {i}/{ntasks} coord=gpu-node-07:{port} devices={devices} "
                        "args=train --config c.py --workdir /w")
