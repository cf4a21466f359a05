"""Rank layouts of the process groups, Slurm host lists and launcher detection (pure Python)."""

import pytest

from xmoe.config import ConfigError
from xmoe.parallel.groups import build_groups
from xmoe.parallel.topology import detect_launch, expand_nodelist


def test_groups_tp2_ep4_on_two_nodes_of_four():
    g = build_groups(world=8, tp=2, ep=4, node_size=4)
    assert g["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert g["ep"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert g["expert_dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert g["node_local"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert g["cross_node"] == [[0], [1], [2], [3], [4], [5], [6], [7]]


def test_groups_ep_across_nodes():
    # EP=8 over 4 nodes of 2 ranks: replicas inside a node, pilots across nodes
    g = build_groups(world=16, tp=1, ep=8, node_size=2)
    assert g["ep"] == [list(range(8)), list(range(8, 16))]
    assert g["expert_dp"] == [[i, i + 8] for i in range(8)]
    assert g["node_local"][:4] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert g["cross_node"][:2] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert g["cross_node"][2:] == [[8, 10, 12, 14], [9, 11, 13, 15]]
    assert g["dp"] == [list(range(16))]


def test_every_rank_in_exactly_one_group_of_each_kind():
    for world, tp, ep, ns in [(8, 1, 2, 4), (12, 2, 6, 4), (4, 4, 4, 0), (16, 2, 16, 8)]:
        for kind, groups in build_groups(world, tp, ep, ns).items():
            flat = sorted(r for grp in groups for r in grp)
            assert flat == list(range(world)), (world, tp, ep, ns, kind)


def test_groups_refuse_non_dividing_sizes():
    with pytest.raises(ConfigError):
        build_groups(world=6, tp=4, ep=1, node_size=0)
    with pytest.raises(ConfigError):
        build_groups(world=8, tp=1, ep=3, node_size=0)


@pytest.mark.parametrize(
    "nodelist,hosts",
    [
        ("n1", ["n1"]),
        ("n[1-3,5]", ["n1", "n2", "n3", "n5"]),
        (
            "frontier[00098-00100],login7",
            ["frontier00098", "frontier00099", "frontier00100", "login7"],
        ),
        ("a[1-2]-b[3,4]", ["a1-b3", "a1-b4", "a2-b3", "a2-b4"]),
        ("gpu-a01,gpu-b[09-10]", ["gpu-a01", "gpu-b09", "gpu-b10"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_detect_launch_srun_torchrun_single():
    srun = detect_launch(
        {
            "SLURM_PROCID": "5",
            "SLURM_LOCALID": "1",
            "SLURM_NTASKS": "8",
            "SLURM_NTASKS_PER_NODE": "4",
            "SLURM_JOB_NODELIST": "x[7-8]",
            "MASTER_PORT": "3442",
        }
    )
    assert (srun.launcher, srun.rank, srun.world, srun.local_rank, srun.local_world) == (
        "srun",
        5,
        8,
        1,
        4,
    )
    assert (srun.master_addr, srun.master_port) == ("x7", 3442)
    tr = detect_launch(
        {
            "RANK": "1",
            "WORLD_SIZE": "2",
            "LOCAL_RANK": "1",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "h",
            "MASTER_PORT": "1234",
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "1",
        }
    )
    assert (tr.launcher, tr.rank, tr.world, tr.master_addr) == ("torchrun", 1, 2, "h")
    single = detect_launch({})
    assert (single.launcher, single.rank, single.world) == ("single", 0, 1)
    tasks = detect_launch(
        {
            "SLURM_PROCID": "0",
            "SLURM_NTASKS": "8",
            "SLURM_TASKS_PER_NODE": "4(x2)",
            "SLURM_NODELIST": "n[3-4]",
        }
    )
    assert tasks.local_world == 4 and tasks.master_addr == "n3"
