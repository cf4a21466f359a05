"""The planner: hand-computed memory, ranking properties, fixed fields, no-fit advice, CLI."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
from helpers import xmoectl

from xmoe.config import load_config
from xmoectl import UserError, plan_report, planner
from xmoectl import sites as S
from xmoectl.costmodel import (
    GIB,
    Assumptions,
    Hardware,
    Layout,
    evaluate,
    expected_unique_nodes,
    memory_estimate,
    rows_factor,
    time_estimate,
)

SMALL_SHAPE = [
    "model.hidden=64",
    "model.heads=4",
    "model.layers=2",
    "model.dense_layers=0",
    "model.vocab_size=128",
    "model.seq_len=16",
    "moe.num_experts=4",
    "moe.top_k=2",
    "moe.expert_hidden=32",
    "moe.num_shared_experts=0",
    "moe.activation=gelu",
    "moe.capacity_factor=null",
    "train.micro_batch=2",
    "train.global_batch=8",
]
HW = Hardware(
    gpus_per_node=4,
    hbm_gib=10.0,
    peak_tflops=100.0,
    gemm_tflops=70.0,
    intra_gbs=100.0,
    inter_gbs=10.0,
    allreduce_intra_gbs=100.0,
    node_nic_gbs=40.0,
)


def test_memory_of_a_small_shape_by_hand():
    # the plain exchange (one row per (token, k)); dedup_ep's buffers are tested below
    cfg = load_config("tiny", [*SMALL_SHAPE, "moe.dedup_ep=false"])
    lay = Layout(tp=1, ep=2, dispatcher="pft", micro_batch=2, zero_stage=1)
    a = Assumptions(imbalance=1.5, fragmentation=1.0, context_gib=0.0)
    mem = memory_estimate(cfg, lay, HW, 4, a)
    D, V, E, k, F, L = 64, 128, 4, 2, 32, 2
    # parameters: attention 4 D^2 per layer, embedding and head V D, routers E D per
    # layer, GELU experts 2 D F each, norms (2L + 1) D
    dense = L * 4 * D * D + 2 * V * D + L * E * D + (2 * L + 1) * D  # 49984
    expert = L * E * 2 * D * F // 2  # EP 2 holds half of them: 16384
    assert dense == 49984 and expert == 16384
    dp, edp = 4 // 1, 4 // 2  # DP over TP1, expert-DP over EP2
    weights = 2 * (dense + expert)
    grads = 2 * (dense + expert)  # bf16, accumulated over the micro-batches
    update_grads = 4 * (dense / 4 + expert / 2)  # the fp32 shard of the update
    optimizer = 12 * (dense / 4 + expert / 2)
    buckets = 2 * (dense + expert)
    T = 2 * 16  # micro-batch x sequence
    # per token: attention 12 D + 4 (norm: bf16 input 2D and fp32 1/rms 4, QKV input 2D,
    # roped q/k and copied v 6D, kernel output 2D, also the output projection's input)
    attention = 12 * D + 4
    # MoE: norm 2D + 4, router 2D (its bf16 input) + 8E, routed rows k r (2D + 2 x 2F) received
    # (PFT's experts apply the combine weights, so no returned rows are kept), 3 int64
    # indices per routed row; r = 1.5 (dropless, busiest GPU)
    moe = 2 * D + 4 + (2 * D + 8 * E) + k * 1.5 * (2 * D + 4 * F) + 24 * k
    layer = attention + moe
    head = 2 * D + 4 + 2 * D + 4 * V  # final norm, head input, fp32 log-probabilities
    transient = layer * T + 2 * k * 1.5 * 2 * D * T  # one layer's gradients + a2a buffers
    expect = {
        "weights": weights,
        "gradients": grads,
        "optimizer": optimizer,
        "zero_buckets": buckets,
        "activations": L * layer * T,
        "lm_head_loss": head * T,
        "transient": transient,
    }
    assert dp == 4 and edp == 2
    for key, value in expect.items():
        assert mem[key] * GIB == pytest.approx(value, rel=1e-9), key
    backward = sum(expect.values())
    update = weights + optimizer + buckets + update_grads
    assert mem["update_fp32_gradients"] * GIB == pytest.approx(update_grads, rel=1e-9)
    assert mem["backward_peak"] * GIB == pytest.approx(backward, rel=1e-9)
    assert mem["update_peak"] * GIB == pytest.approx(update, rel=1e-9)
    assert mem["peak_allocated"] * GIB == pytest.approx(max(backward, update), rel=1e-9)


def test_fp32_gradient_accumulation_memory():
    """train.grad_accum_dtype=fp32: every gradient in fp32 beside its bf16 one through
    backward (ZeRO-1), the shard (ZeRO-2); no separate fp32 copy for the update."""
    a = Assumptions(imbalance=1.5, fragmentation=1.0, context_gib=0.0)
    dense, expert = 49984, 16384  # as in test_memory_of_a_small_shape_by_hand
    for zero, grads in ((1, 6 * (dense + expert)), (2, 6 * (dense / 4 + expert / 2))):
        lay = Layout(tp=1, ep=2, dispatcher="pft", micro_batch=2, zero_stage=zero)
        cfg = load_config("tiny", SMALL_SHAPE + ["train.grad_accum_dtype=fp32"])
        mem = memory_estimate(cfg, lay, HW, 4, a)
        assert mem["gradients"] * GIB == pytest.approx(grads, rel=1e-9), zero
        assert mem["update_fp32_gradients"] == 0.0
        assert mem["peak_allocated"] == pytest.approx(mem["backward_peak"], rel=1e-12)


def test_memory_levers_move_the_right_way():
    cfg = load_config("small")
    hw = replace(HW, gpus_per_node=8, hbm_gib=64)
    a = Assumptions()
    base = Layout(tp=1, ep=8, micro_batch=2, capacity_factor=None)
    m0 = memory_estimate(cfg, base, hw, 64, a)
    assert (
        memory_estimate(cfg, replace(base, zero_stage=2), hw, 64, a)["gradients"] < m0["gradients"]
    )
    ac = memory_estimate(cfg, replace(base, checkpointing=True), hw, 64, a)
    assert ac["activations"] < m0["activations"] / 5
    assert memory_estimate(cfg, replace(base, ep=64), hw, 64, a)["weights"] < m0["weights"]
    tp = memory_estimate(cfg, replace(base, tp=2), hw, 64, a)
    assert tp["activations"] < m0["activations"]
    capped = memory_estimate(cfg, replace(base, capacity_factor=1.25), hw, 64, a)
    assert capped["activations"] < m0["activations"]  # 1.25 x instead of 1.5 x headroom
    # the fused LM loss keeps no fp32 log-probabilities and makes one chunk of logits
    fused = memory_estimate(load_config("small", ["model.fused_lm_loss=true"]), base, hw, 64, a)
    assert (
        fused["lm_head_loss"] < m0["lm_head_loss"]
        and fused["peak_allocated"] < m0["peak_allocated"]
    )
    # recomputation costs time
    t0 = time_estimate(cfg, base, hw, 64, a)["step"]
    assert time_estimate(cfg, replace(base, checkpointing=True), hw, 64, a)["step"] > t0


def test_expected_unique_nodes_matches_brute_force():
    E, k, n = 8, 3, 4
    per = E // n
    combos = list(itertools.combinations(range(E), k))
    brute = sum(len({e // per for e in c}) for c in combos) / len(combos)
    assert expected_unique_nodes(E, k, n) == pytest.approx(brute)
    assert expected_unique_nodes(E, k, 1) == 1.0


def test_rbd_cuts_inter_node_time_for_wide_top_k():
    cfg = load_config("large")
    hw = replace(HW, gpus_per_node=8)
    a = Assumptions()
    pft = Layout(tp=1, ep=64, dispatcher="pft", capacity_factor=1.25)
    rbd = replace(pft, dispatcher="rbd")
    assert (
        time_estimate(cfg, rbd, hw, 256, a)["all_to_all"]
        < time_estimate(cfg, pft, hw, 256, a)["all_to_all"]
    )


def test_dedup_ep_sends_one_row_per_rank():
    """moe.dedup_ep: the exchange carries expected_unique_nodes(E, k, ep) pilots a token
    instead of k rows, so the all-to-all time drops by about that ratio at EP = 2 (where
    one rank's worth of rows stays home either way) and the transient buffers shrink.
    With `moe.dedup_fixed_slots` (its default there) every token has a slot for every
    rank, filled or not, however skewed the routing."""
    hw = replace(HW, gpus_per_node=2, intra_gbs=1.0)  # slow enough that bytes dominate
    a = Assumptions()
    lay = Layout(tp=1, ep=2, dispatcher="pft", micro_batch=8)  # the exchange's buffers count
    plain = load_config("small", ["moe.dedup_ep=false"])
    dedup = load_config("small", ["moe.dedup_ep=true", "moe.dedup_fixed_slots=false"])
    fixed = load_config("small", ["moe.dedup_ep=true"])
    t_plain = time_estimate(plain, lay, hw, 2, a)["all_to_all"]
    t_dedup = time_estimate(dedup, lay, hw, 2, a)["all_to_all"]
    # the default (null): dedup for dropless pft with EP, unless moe.overlap_ep is set.
    # The layout's capacity factor decides dropless, as in the job it becomes: this
    # dropless layout replaces the small preset's cf 1.25, a dropping one does not.
    default = load_config("small")
    assert time_estimate(default, lay, hw, 2, a) == time_estimate(fixed, lay, hw, 2, a)
    dropping = replace(lay, capacity_factor=1.25)
    assert time_estimate(default, dropping, hw, 2, a) == time_estimate(plain, dropping, hw, 2, a)
    assert time_estimate(default, dropping, hw, 2, a) != time_estimate(dedup, dropping, hw, 2, a)
    overlap = load_config("small", ["moe.overlap_ep=true"])
    assert time_estimate(overlap, lay, hw, 2, a)["all_to_all"] == t_plain
    e = plain.moe
    ratio = expected_unique_nodes(e.num_experts, e.top_k, 2) / e.top_k
    assert t_dedup / t_plain == pytest.approx(ratio, rel=0.02)
    t_fixed = time_estimate(fixed, lay, hw, 2, a)["all_to_all"]
    skew = rows_factor(plain, lay, a.time_imbalance)  # the plain exchange's busiest rank
    assert t_fixed / t_plain == pytest.approx(2 / (e.top_k * skew), rel=0.02)
    # a shape whose exchange buffers, not the LM head's loss, are the largest transient
    small = [*SMALL_SHAPE, "moe.num_experts=8", "moe.top_k=4", "moe.dispatcher=pft"]
    m_plain = load_config("tiny", [*small, "moe.dedup_ep=false"])
    m_plain = memory_estimate(m_plain, lay, hw, 2, a)["transient"]
    m_dedup = load_config("tiny", [*small, "moe.dedup_ep=true"])
    assert memory_estimate(m_dedup, lay, hw, 2, a)["transient"] < m_plain
    # other dispatchers and one rank are unaffected
    for other in (replace(lay, dispatcher="rbd"), replace(lay, ep=1)):
        assert time_estimate(dedup, other, hw, 2, a) == time_estimate(plain, other, hw, 2, a)


def frontier(hbm: float | None = None):
    site = S.load("frontier")
    if hbm is not None:
        site = replace(site, node=replace(site.node, hbm_gb=hbm))
    return site


def test_more_memory_never_gives_a_slower_plan():
    cfg = load_config("medium")
    steps = []
    for hbm in (48, 64, 96, 128):
        p = planner.make_plan(cfg, frontier(hbm), 32, use_measured=False)
        assert p.chosen is not None
        steps.append(p.chosen.step_s)
    assert steps == sorted(steps, reverse=True)
    assert steps[-1] < steps[0]


def test_rbd_only_across_nodes():
    cfg = load_config("small")
    one = planner.make_plan(cfg, frontier(), 1, use_measured=False)
    assert all(x.layout.dispatcher != "rbd" for x in one.estimates)
    many = planner.make_plan(load_config("large"), frontier(), 32, use_measured=False)
    assert many.chosen.layout.dispatcher == "rbd"
    assert all(x.layout.ep > 8 for x in many.estimates if x.layout.dispatcher == "rbd")


def test_ranking_is_by_step_time_and_rejections_say_why():
    cfg = load_config("medium")
    p = planner.make_plan(cfg, frontier(), 32, use_measured=False)
    times = [x.step_s for x in p.feasible]
    assert times == sorted(times)
    assert all(x.needed_gib <= 64 for x in p.feasible)
    assert p.rejected and all(
        x.reason.startswith("needs ") and x.reason.endswith("> 64 GiB HBM") for x in p.rejected
    )
    for x in p.rejected:
        assert float(x.reason.split()[1]) == pytest.approx(x.needed_gib, abs=0.06)


def test_fixed_fields_are_kept():
    sets = ["parallel.ep=8", "train.activation_checkpointing=true"]
    cfg = load_config("small", sets)
    p = planner.make_plan(cfg, frontier(), 4, overrides=sets, use_measured=False)
    assert p.fixed == {"ep": 8, "checkpointing": True}
    assert p.estimates and all(x.layout.ep == 8 and x.layout.checkpointing for x in p.estimates)
    assert "parallel.ep=8" in p.overrides()


def test_no_fit_names_the_smallest_node_count():
    cfg = load_config("large")
    p = planner.make_plan(cfg, frontier(), 4, use_measured=False)
    assert p.chosen is None and p.min_nodes is not None
    assert f"--nodes {p.min_nodes}" in p.no_fit_message()
    assert planner.make_plan(cfg, frontier(), p.min_nodes, use_measured=False).chosen is not None
    # no node count between fits (the scan below the first fitting power of two is exact)
    for n in range(p.min_nodes - 1, 4, -1):
        try:
            below = planner.make_plan(cfg, frontier(), n, use_measured=False)
        except planner.PlanError:
            continue  # nothing even runs there (batch or EP divisibility)
        assert below.chosen is None, n


def test_paper_frontier_cases_all_get_a_plan():
    for model, paper in (("small", (1, 8)), ("medium", (1, 64)), ("large", (2, 64))):
        p = planner.make_plan(load_config(model), frontier(), 32, use_measured=False)
        assert p.chosen is not None and p.world == 256
        assert (p.config_layout.tp, p.config_layout.ep) == paper
        text = plan_report.format_plan(p)
        assert (
            "chosen: TP" in text
            and "the config's own layout, " + f"TP{paper[0]} EP{paper[1]}" in text
        )


def test_json_output_is_complete():
    p = planner.make_plan(load_config("small"), frontier(), 2, use_measured=False)
    data = json.loads(plan_report.plan_json(p))
    assert data["chosen"]["fits"] and data["world_size"] == 16
    assert len(data["layouts"]) == data["feasible"] + data["rejected"]
    assert data["overrides"] == p.chosen.layout.overrides()


def test_layout_overrides_load_back():
    p = planner.make_plan(load_config("small"), frontier(), 2, use_measured=False)
    cfg = load_config("small", p.overrides())
    assert planner.config_layout(cfg) == p.chosen.layout


def test_measured_figures_are_preferred(tmp_path, monkeypatch):
    prof = tmp_path / "site_profiles"
    prof.mkdir()
    text = open(S.load("frontier").source).read()
    (prof / "mysite.yaml").write_text(text.replace("name: frontier", "name: mysite"))
    (prof / "mysite.measured.json").write_text(
        json.dumps(
            {
                "schema": 1,
                "gemm_tflops": 42.0,
                "hbm_gib": 60.0,
                "intra_node": {"all_to_all_gbs": 33.0},
            }
        )
    )
    monkeypatch.chdir(tmp_path)
    site = S.load("mysite")
    cfg = load_config("small")
    p = planner.make_plan(cfg, site, 2)
    assert p.hardware.source == "measured" and p.measured_file.endswith("mysite.measured.json")
    assert (p.hardware.gemm_tflops, p.hardware.hbm_gib, p.hardware.intra_gbs) == (42.0, 60.0, 33.0)
    assert p.hardware.inter_gbs == 12.5  # not measured: from the profile (4 x 25 / 8)
    d = planner.make_plan(cfg, site, 2, use_measured=False)
    assert d.hardware.source == "datasheet" and d.hardware.gemm_tflops == pytest.approx(191.5 * 0.7)
    assert p.chosen.step_s > d.chosen.step_s  # a slower GEMM measured: a slower prediction
    (prof / "mysite.measured.json").write_text("{not json")
    with pytest.raises(UserError, match="mysite.measured.json: unreadable"):
        planner.make_plan(cfg, site, 2)


def test_evaluate_flags_what_does_not_fit():
    cfg = load_config("small")
    hw = replace(HW, gpus_per_node=8, hbm_gib=8.0)
    est = evaluate(cfg, Layout(ep=8, micro_batch=8), hw, 8, Assumptions())
    assert not est.fits and est.reason == f"needs {est.needed_gib:.1f} GiB > 8 GiB HBM"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--site", "local"], "does not describe its accelerators"),
        (["--site", "frontier", "--nodes", "0"], "--nodes 0 must be >= 1"),
        (["--site", "frontier", "--dispatchers", "pft,fast"], "--dispatchers 'pft,fast'"),
        (["--site", "frontier", "--imbalance", "0.5"], "--imbalance 0.5 must be >= 1"),
        (["--site", "h200", "--nodes", "2"], "no inter-node network"),
        (["--site", "frontier", "--set", "parallel.ep=3"], "parallel.ep=3 does not divide"),
        (["--site", "frontier", "--model", "small", "--set", "parallel.ep=16"], "EP16 must divide 64 experts and 8 ranks"),
        (["--site", "frontier", "--model", "large", "--nodes", "4"], "smallest node count that fits is 16 (--nodes 16)"),
        (["--site", "nowhere"], "unknown site 'nowhere'"),
    ],
)  # fmt: skip
def test_bad_input_one_line_exit_2(args, message):
    r = xmoectl("plan", *args)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_cli_table_and_json():
    r = xmoectl("plan", "--site", "frontier", "--model", "small", "--nodes", "2", "--top", "3")
    assert r.returncode == 0, r.stderr
    assert (
        "fitting layouts" in r.stdout
        and "chosen: TP" in r.stdout
        and "as config: --set" in r.stdout
    )
    r = xmoectl("plan", "--site", "frontier", "--model", "small", "--nodes", "2", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["chosen"]["fits"]


def test_tensor_parallel_shards_as_the_trainer_does():
    from xmoectl.costmodel import activation_bytes_per_token, local_params

    cfg = load_config("tiny", SMALL_SHAPE)
    D, V = 64, 128
    one = activation_bytes_per_token(cfg, Layout(tp=1, ep=2), 1.5)
    two = activation_bytes_per_token(cfg, Layout(tp=2, ep=2), 1.5)
    # sequence-parallel norms, the gathered QKV input in full, 1/t of the heads
    norm = 2 * D + 4  # bf16 input and fp32 1/rms per token
    assert two["attention"] == norm / 2 + 2 * D + 8 * D / 2
    assert two["moe"] == pytest.approx(one["moe"] / 2)  # SSMB: the whole block on the slice
    assert two["head"] == pytest.approx(one["head"] / 2)
    plain = activation_bytes_per_token(cfg, Layout(tp=2, ep=2, ssmb=False), 1.5)
    assert plain["moe"] == pytest.approx(norm / 2 + (one["moe"] - norm) + 2 * D)
    # attention shards; embedding and LM head stay whole on every TP rank
    d1, _ = local_params(cfg, Layout(tp=1))
    d2, _ = local_params(cfg, Layout(tp=2))
    assert d1 - d2 == 2 * 4 * D * D / 2
    assert V * D * 2 < d2


def test_expert_gemm_time_matches_the_h200_anchor():
    # REFERENCE: the two grouped GEMMs of a small-preset MoE layer (64 GELU experts x 1408,
    # top-6, hidden 2048, 16384 tokens on one H200) ran in 6.2 ms forward + backward
    cfg = load_config("small", ["model.layers=1", "train.micro_batch=8", "train.global_batch=8"])
    hw = replace(HW, gpus_per_node=1, gemm_tflops=780.0, hbm_gib=143)
    t = time_estimate(cfg, Layout(ep=1, micro_batch=8), hw, 1, Assumptions())
    assert t["experts"] == pytest.approx(6.2e-3, rel=0.05)


def test_recompute_permute_plans_pft_only_and_saves_memory():
    """moe.recompute_permute (which the config accepts with PFT on one EP rank) keeps
    the planner to PFT, and the same layout is predicted to need less memory."""
    sets = ["moe.recompute_permute=true", "parallel.ep=1"]
    cfg = load_config("small", sets)
    p = planner.make_plan(
        cfg, frontier(), 1, overrides=sets, dispatchers=("pft", "padded"), use_measured=False
    )
    assert p.estimates and {(x.layout.ep, x.layout.dispatcher) for x in p.estimates} == {(1, "pft")}
    lay = replace(p.estimates[0].layout, checkpointing=False)
    a = Assumptions()
    on = memory_estimate(cfg, lay, HW, 1, a)["peak_allocated"]
    off = memory_estimate(load_config("small", ["parallel.ep=1"]), lay, HW, 1, a)
    assert on < off["peak_allocated"]


def test_gradient_summing_is_counted_by_hand():
    """The micro-batches' gradients are summed over every local parameter: bf16 `.grad`
    adds after the first micro-batch (3 x 2 bytes), fp32 accumulation every one (10 bytes)."""
    from xmoectl.costmodel import local_params

    a = Assumptions()
    hw = replace(HW, hbm_tbs=2.0)
    lay = Layout(tp=1, ep=2, dispatcher="pft", micro_batch=2)
    for extra, by_hand in (
        ([], lambda acc, p: (acc - 1) * 6 * p),
        (["train.grad_accum_dtype=fp32"], lambda acc, p: acc * 10 * p),
    ):
        cfg = load_config("tiny", SMALL_SHAPE + ["train.global_batch=32"] + extra)
        params = sum(local_params(cfg, lay))
        t = time_estimate(cfg, lay, hw, 4, a)
        accum = 32 // (2 * 4)
        assert t["accumulation"] == accum
        assert t["grad_accumulate"] == pytest.approx(by_hand(accum, params) / 2e12, rel=1e-12)
        parts = ("dense", "attention", "experts", "dispatch", "all_to_all", "tensor_parallel")
        whole = sum(t[k] for k in parts + ("grad_accumulate", "grad_reduce", "optimizer"))
        assert t["step"] == pytest.approx(whole, rel=1e-12)
    # a larger micro-batch sums fewer times
    cfg = load_config("tiny", SMALL_SHAPE + ["train.global_batch=32"])
    t4 = time_estimate(cfg, replace(lay, micro_batch=4), hw, 4, a)["grad_accumulate"]
    assert t4 < time_estimate(cfg, lay, hw, 4, a)["grad_accumulate"]
