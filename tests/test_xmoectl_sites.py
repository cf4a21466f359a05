"""Site profiles: the bundled ones are valid, bad ones give one line naming file and field."""

from __future__ import annotations

import os

import pytest
from helpers import xmoectl

from xmoectl import resource_dir
from xmoectl import sites as S

BUNDLED = ["dgx-a100", "frontier", "h200", "local", "local-slurm", "perlmutter"]


def test_bundled_profiles_all_load():
    names = sorted(p.stem for p in resource_dir("site_profiles").glob("*.yaml"))
    assert names == BUNDLED
    for name in names:
        prof = S.load(name)
        assert prof.name == name
        assert prof.description


def test_frontier_follows_olcf_guidance():
    f = S.load("frontier")
    assert (f.launcher, f.slurm.tasks_per_node, f.srun.cpus_per_task) == ("srun", 8, 7)
    assert (f.srun.gpus_per_task, f.srun.gpu_bind) == (1, "closest")
    assert "--network=disable_rdzv_get" in f.slurm.extra_sbatch
    assert f.env["FI_CXI_RDZV_PROTO"] == "alt_read"
    assert f.env["FI_MR_CACHE_MONITOR"] == "kdreg2"
    assert "rccl-net-plugin" in f.modules
    assert f.rendezvous.interface == "hsn0"
    assert {"MIOPEN_USER_DB_PATH", "MIOPEN_CUSTOM_CACHE_DIR", "TRITON_CACHE_DIR"} <= set(f.caches)
    assert f.node.peak_tflops_bf16 == 191.5


def test_unknown_site_suggests_closest(tmp_path):
    with pytest.raises(S.SiteError, match="did you mean frontier"):
        S.load("frontir")
    r = xmoectl("sites", "show", "perlmuter", cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "did you mean perlmutter" in r.stderr


@pytest.mark.parametrize(
    "body, message",
    [
        ("name: x\nnode: {gpus: four}\n", "field node.gpus must be a whole number"),
        ("name: x\nnode: {gpu: 4}\n", "unknown field node.gpu; did you mean gpus"),
        ("name: x\nlauncher: mpirun\n", "field launcher='mpirun' must be one of srun, torchrun"),
        ('name: x\nslurm: {account: "a\\nrm -rf ~"}\n', "field slurm.account must be one line"),
        ("name: x\nslurm: {time: soon}\n", "field slurm.time='soon'"),
        ('name: x\nenv: {"A B": 1}\n', "env.'A B' is not a valid environment variable name"),
        ("name: x\nslurm: {extra_sbatch: [exclusive]}\n", "must be an option such as"),
        ("name: x\nnode: {gpus: 4}\nslurm: {tasks_per_node: 8}\n", "exceeds node.gpus=4"),
        ("name: x\nslurm: {requeue_grace_s: 0}\n", "field slurm.requeue_grace_s must be >= 1"),
        ("name: [x\n", "not valid YAML"),
        ("- a\n- b\n", "a site profile is a mapping"),
    ],
)
def test_bad_profile_one_line_naming_file_and_field(tmp_path, body, message):
    f = tmp_path / "bad.yaml"
    f.write_text(body)
    with pytest.raises(S.SiteError) as e:
        S.load(str(f))
    assert message in str(e.value)
    assert str(f) in str(e.value)
    r = xmoectl("sites", "validate", str(f), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.startswith("xmoectl: error:") and r.stderr.count("\n") == 1
    assert "Traceback" not in r.stderr


def test_search_path_order(tmp_path, monkeypatch):
    """./site_profiles beats $XMOE_SITE_PATH beats the user config dir beats the bundled ones."""
    cwd_dir, env_dir, cfg = tmp_path / "site_profiles", tmp_path / "extra", tmp_path / "cfg"
    user_dir = cfg / "xmoe" / "site_profiles"
    for d in (cwd_dir, env_dir, user_dir):
        d.mkdir(parents=True)
    (user_dir / "frontier.yaml").write_text("description: from user dir\n")
    (user_dir / "mysite.yaml").write_text("description: user site\n")
    (env_dir / "frontier.yaml").write_text("description: from XMOE_SITE_PATH\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(cfg))
    assert S.load("mysite").description == "user site"
    assert S.load("frontier").description == "from user dir"
    monkeypatch.setenv("XMOE_SITE_PATH", str(env_dir))
    assert S.load("frontier").description == "from XMOE_SITE_PATH"
    (cwd_dir / "frontier.yaml").write_text("description: from ./site_profiles\n")
    assert S.load("frontier").description == "from ./site_profiles"
    assert S.load("frontier").name == "frontier"
    assert S.load("h200").source.endswith("h200.yaml")  # bundled still found
    r = xmoectl("sites", "list", cwd=tmp_path, env=dict(os.environ))
    assert r.returncode == 0 and "mysite" in r.stdout


def test_sites_cli_show_and_validate(tmp_path):
    r = xmoectl("sites", "show", "local-slurm", cwd=tmp_path)
    assert r.returncode == 0
    assert "tasks_per_node: 2" in r.stdout
    r = xmoectl(
        "sites", "validate", str(resource_dir("site_profiles") / "frontier.yaml"), cwd=tmp_path
    )
    assert r.returncode == 0 and "ok (site frontier, slurm, srun)" in r.stdout
