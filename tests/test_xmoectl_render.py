"""Rendering runs: valid scripts for every site, refused bad input, inert hostile values."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from helpers import xmoectl

from xmoectl import UserError, render, runs
from xmoectl import sites as S

# make the tiny preset fit any world size up to 16 ranks
FIT = ["train.micro_batch=1", "train.global_batch=16"]


def bash_n(text: str, tmp_path: Path) -> None:
    f = tmp_path / "check.sh"
    f.write_text(text)
    r = subprocess.run(["bash", "-n", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize(
    "site", ["frontier", "perlmutter", "dgx-a100", "h200", "local", "local-slurm"]
)
def test_every_site_renders_valid_bash(site, tmp_path):
    prof = S.load(site)
    nodes = 1 if prof.scheduler == "local" else 2
    job = render.resolve(prof, "tiny", nodes, tmp_path / "run", overrides=FIT)
    text = render.render_script(job)
    bash_n(text, tmp_path)
    assert f"--config {job.run_dir}/config.yaml --run-dir {job.run_dir}" in text


def test_frontier_script(tmp_path):
    job = render.resolve(
        S.load("frontier"), "tiny", 2, tmp_path / "f", overrides=FIT, account="ABC123"
    )
    text = render.render_script(job)
    assert "#SBATCH --account=ABC123" in text
    assert "#SBATCH --network=disable_rdzv_get" in text
    assert "#SBATCH --core-spec=8" in text
    assert (
        "srun --nodes=2 --ntasks=16 --ntasks-per-node=8 --cpus-per-task=7 --gpus-per-task=1 --gpu-bind=closest"
        in text
    )
    assert (
        "module load PrgEnv-gnu rocm/6.3.1 craype-accel-amd-gfx90a miniforge3 rccl-net-plugin"
        in text
    )
    assert "export FI_CXI_RDZV_PROTO=alt_read" in text
    assert 'export MIOPEN_USER_DB_PATH=/mnt/bb/"${USER}"/miopen' in text
    assert "ip -o -4 addr show dev hsn0" in text and "export MASTER_PORT=3442" in text
    assert "--peak-tflops 191.5" in text


def test_torchrun_site_runs_one_task_per_node(tmp_path):
    job = render.resolve(S.load("dgx-a100"), "tiny", 2, tmp_path / "d", overrides=FIT)
    text = render.render_script(job)
    assert (
        "srun --nodes=2 --ntasks=2 --ntasks-per-node=1 --cpus-per-task=128 --gpus-per-task=8"
        in text
    )
    assert "-m torch.distributed.run --nnodes=2 --nproc-per-node=8" in text
    assert dict(render.sbatch_options(job))["ntasks-per-node"] == 1


def test_layout_that_does_not_fit_is_refused_before_writing(tmp_path):
    # tiny: global_batch 8 = micro_batch 8 x dp 1; 2 nodes x 2 ranks cannot divide it
    r = xmoectl(
        "render", "--site", "local-slurm", "--nodes", "2", "--runs-dir", str(tmp_path / "runs")
    )
    assert r.returncode == 2
    assert (
        r.stderr.count("\n") == 1
        and "train.global_batch=8" in r.stderr
        and "multiple of 32" in r.stderr
    )
    assert not (tmp_path / "runs").exists()
    r = xmoectl(
        "render", "--site", "local-slurm", "--nodes", "2", "--set", "parallel.ep=3", "--dry-run"
    )
    assert r.returncode == 2 and "parallel.ep=3" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--site", "local", "--nodes", "2"], "use --nodes 1"),
        (["--site", "local", "--name", "a;b"], "run name 'a;b'"),
        (["--site", "local", "--name", "../x"], "run name '../x'"),
        (["--site", "local-slurm", "--time", "1:00\nrm"], "--time must be one line"),
        (["--site", "local-slurm", "--account", "a\nb"], "--account must be one line"),
        (["--site", "local-slurm", "--time", "soon"], "--time 'soon'"),
        (["--site", "h200", "--tasks-per-node", "8"], "exceeds the 4 accelerators"),
        (["--site", "local", "--set", "moe.top_kk=2"], "did you mean moe.top_k"),
        (["--site", "local", "--model", "tinyy"], "did you mean tiny"),
    ],
)
def test_bad_cli_input_one_line_exit_2(tmp_path, args, message):
    r = xmoectl("render", *args, "--runs-dir", str(tmp_path / "runs"))
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()


def test_run_directory_manifest_and_refusal(tmp_path):
    root = tmp_path / "runs"
    base = [
        "render",
        "--site",
        "local-slurm",
        "--nodes",
        "2",
        "--runs-dir",
        str(root),
        "--name",
        "r1",
    ]
    base += ["--set", "train.micro_batch=2"]
    r = xmoectl(*base)
    assert r.returncode == 0, r.stderr
    d = root / "r1"
    assert sorted(p.name for p in d.iterdir()) == ["config.yaml", "job.sbatch", "manifest.json"]
    m = json.loads((d / "manifest.json").read_text())
    import xmoe

    assert m["xmoe_version"] == xmoe.__version__
    assert m["site"] == "local-slurm" and m["nodes"] == 2 and m["world_size"] == 4
    assert "render --site local-slurm" in m["command_line"]
    assert m["created"].endswith("Z") and m["job_id"] is None
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(xmoe.__file__).parent
    )
    assert m["git_sha"] == head.stdout.strip()
    import yaml

    from xmoe.config import config_from_dict

    assert config_from_dict(yaml.safe_load((d / "config.yaml").read_text())).train.micro_batch == 2

    before = (d / "job.sbatch").read_text()
    r = xmoectl(*base, "--set", "train.steps=7")
    assert r.returncode == 2 and "already exists" in r.stderr
    assert (d / "job.sbatch").read_text() == before  # nothing overwritten
    r = xmoectl(*base, "--resume")
    assert r.returncode == 0 and "--resume" in (d / "job.sbatch").read_text()
    r = xmoectl(*base, "--force", "--set", "train.steps=7")
    assert r.returncode == 0 and "steps: 7" in (d / "config.yaml").read_text()
    r = xmoectl("render", "--site", "local", "--runs-dir", str(root), "--name", "new", "--resume")
    assert r.returncode == 2 and "not a run directory" in r.stderr


def test_find_run_by_name_path_and_job_id(tmp_path):
    root = tmp_path / "runs"
    for name, jid in (("a", "11"), ("b", "12")):
        job = render.resolve(S.load("local-slurm"), "tiny", 1, root / name, overrides=FIT)
        runs.write_run(job, render.render_script(job), ["test"])
        runs.update_manifest(root / name, job_id=jid)
    assert runs.find_run("a", root) == root / "a"
    assert runs.find_run("12", root) == root / "b"
    assert runs.find_run(str(root / "a"), root) == root / "a"
    with pytest.raises(UserError, match="no run 'zzz'"):
        runs.find_run("zzz", root)


# --------------------------------------------------------------------------- hostile values

HOSTILE = [
    "$(touch {m}/subst)",
    "`touch {m}/backtick`",
    "a; touch {m}/semicolon",
    'it\'s "quoted" & | > {m}/redirect',
    "line1\ntouch {m}/newline",
    "$HOME ${{HOME-x}} $((1+1)) \\ * ?",
]


def _hostile_profile(tmp_path: Path, marker: Path) -> Path:
    values = [v.format(m=marker) for v in HOSTILE]
    prof = {
        "name": "hostile",
        "scheduler": "slurm",
        "launcher": "srun",
        "node": {"gpus": 0, "cores": 2},
        "slurm": {
            "tasks_per_node": 2,
            "partition": "p$(touch " + str(marker) + "/part)",
            "qos": "q`x`",
        },
        "srun": {"cpus_per_task": 1, "extra": values[:3]},
        "modules": values,
        "env": {f"HOSTILE_{i}": v for i, v in enumerate(values)},
        "caches": {
            "HOSTILE_CACHE": str(tmp_path / "cache")
            + "/$(touch "
            + str(marker)
            + "/cache)/${XMOE_T}"
        },
        "rendezvous": {"interface": "hsn0; touch " + str(marker) + "/iface", "port": 0},
    }
    import yaml

    f = tmp_path / "hostile.yaml"
    f.write_text(yaml.safe_dump(prof))
    return f


def test_hostile_values_stay_inert(tmp_path):
    marker = tmp_path / "marker"
    marker.mkdir()
    prof = S.load(str(_hostile_profile(tmp_path, marker)))
    job = render.resolve(
        prof,
        "tiny",
        2,
        tmp_path / "run",
        overrides=["train.micro_batch=2"],
        account="acct $(touch x) `y`",
    )
    text = render.render_script(job)
    bash_n(text, tmp_path)
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    # Run the whole job script with Slurm's and Lmod's commands replaced by recorders.
    stubs = f"""
module() {{ printf '%s\\0' "$@" > {tmp_path}/module.argv; }}
scontrol() {{ echo n1; echo n2; }}
ip() {{ return 1; }}
srun() {{ printf '%s\\0' "$@" > {tmp_path}/srun.argv; env -0 > {tmp_path}/env.dump; }}
export SLURM_JOB_ID=4242 SLURM_JOB_NODELIST='n[1-2]' XMOE_T=expanded
source {script}
"""
    r = subprocess.run(
        ["bash", "-c", stubs], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert list(marker.iterdir()) == [], "a hostile value was executed"
    values = [v.format(m=marker) for v in HOSTILE]
    assert (tmp_path / "module.argv").read_text().split("\0")[:-1] == ["load", *values]
    env = dict(
        kv.split("=", 1) for kv in (tmp_path / "env.dump").read_text().split("\0") if "=" in kv
    )
    for i, v in enumerate(values):
        assert env[f"HOSTILE_{i}"] == v
    cache = str(tmp_path / "cache") + "/$(touch " + str(marker) + "/cache)/expanded"
    assert env["HOSTILE_CACHE"] == cache and Path(cache).is_dir()  # only ${NAME} expands
    assert env["MASTER_ADDR"] == "n1" and env["MASTER_PORT"] == str(20000 + 4242 % 20000)
    argv = (tmp_path / "srun.argv").read_text().split("\0")[:-1]
    expected = ["--nodes=2", "--ntasks=4", "--ntasks-per-node=2", "--cpus-per-task=1", *values[:3]]
    expected += [job.python, "-u", "-m", "xmoe", "train", *render.trainer_args(job)]
    assert argv == expected
    # sbatch options stay on their own lines and keep their values literal
    lines = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    assert "#SBATCH --account='acct $(touch x) `y`'" in lines
    assert f"#SBATCH --partition='p$(touch {marker}/part)'" in lines


def test_hostile_values_in_local_run_script(tmp_path):
    """run.sh (local site) with the same values, run for real against a recording 'python'."""
    marker = tmp_path / "marker"
    marker.mkdir()
    values = [v.format(m=marker) for v in HOSTILE]
    import yaml

    f = tmp_path / "hl.yaml"
    f.write_text(
        yaml.safe_dump(
            {"name": "hl", "scheduler": "local", "env": {f"H_{i}": v for i, v in enumerate(values)}}
        )
    )
    env_prefix = tmp_path / "env"
    fake = env_prefix / "venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(
        f"#!/bin/bash\nprintf '%s\\0' \"$@\" > {tmp_path}/py.argv\nenv -0 > {tmp_path}/env.dump\n"
    )
    fake.chmod(0o755)
    with pytest.raises(UserError):  # run names are restricted...
        render.resolve(S.load(str(f)), "tiny", 1, tmp_path / "run$(touch pwned)")
    run_dir = tmp_path / "runs $(touch pwned) `touch pwned2`; x" / "ok"  # ...other paths quoted
    job = render.resolve(S.load(str(f)), "tiny", 1, run_dir, env_prefix=str(env_prefix))
    runs.write_run(job, render.render_script(job), ["test"])
    r = subprocess.run(
        ["bash", str(run_dir / "run.sh")], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert list(marker.iterdir()) == []
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "pwned2").exists()
    env = dict(
        kv.split("=", 1) for kv in (tmp_path / "env.dump").read_text().split("\0") if "=" in kv
    )
    assert [env[f"H_{i}"] for i in range(len(values))] == values
    assert env["PATH"].startswith(str(env_prefix / "venv" / "bin") + ":")
    assert (tmp_path / "py.argv").read_text().split("\0")[:-1] == [
        "-u",
        "-m",
        "xmoe",
        "train",
        *render.trainer_args(job),
    ]
    assert (run_dir / "exit_code").read_text().strip() == "0"


def test_unquoted_template_value_is_refused(tmp_path, monkeypatch):
    from xmoectl import shell

    env = shell.environment()
    t = env.from_string("echo {{ value }}\n")
    with pytest.raises(UserError, match="unquoted value"):
        t.render(value="$(id)")
    assert env.from_string("echo {{ value|q }}\n").render(value="$(id)") == "echo '$(id)'\n"
    assert shell.quote_expand("a${B}c$(d)") == "a\"${B}\"'c$(d)'"
    assert os.environ.get("B") is None or True


@pytest.mark.parametrize("restart, tail", [("0", []), ("2", ["--resume"])])
def test_requeued_job_resumes(tmp_path, restart, tail):
    """A job Slurm restarts (requeue after node failure or preemption) passes --resume."""
    job = render.resolve(
        S.load("local-slurm"),
        "tiny",
        2,
        tmp_path / "r",
        overrides=["train.micro_batch=2"],
        force=True,
    )
    script = tmp_path / "job.sbatch"
    script.write_text(render.render_script(job))
    stubs = f"""
scontrol() {{ echo n1; }}
srun() {{ printf '%s\\0' "$@" > {tmp_path}/srun.argv; }}
export SLURM_JOB_ID=7 SLURM_JOB_NODELIST=n1 SLURM_RESTART_COUNT={restart}
source {script}
"""
    r = subprocess.run(
        ["bash", "-c", stubs], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert r.returncode == 0, r.stderr
    argv = (tmp_path / "srun.argv").read_text().split("\0")[:-1]
    assert argv[-len(render.trainer_args(job)) - len(tail) :] == [*render.trainer_args(job), *tail]
    assert "--force" in render.trainer_args(
        job
    )  # --force reaches the trainer; --resume wins over it
