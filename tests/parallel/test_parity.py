"""Parallel layouts reproduce the single-process training run (CPU, gloo, tiny preset).

DP2, TP2, EP2, DP2 with ZeRO-2 and 2 micro-batches per step (2 processes) and TP2xEP2
(4 processes) run 10 steps through `train.parallel`
(megatron-core groups and layers, the EP all-to-all, DeepSpeed ZeRO-1 for dense weights, the
expert step, the global clip norm) against the plain single-process oracle on the same global
batches. Settings and the measured cause of each are in worker_parity.py's docstring.

Tolerances (fp32; measured maxima over all steps and layouts in brackets):
- loss per step: 1e-5 relative (2.5e-7);
- global gradient norm per step: 2e-5 relative (2.0e-6): summation order of the norm;
- final parameters: 2e-3 of each tensor's max |value| (6.6e-4, `mtp.0.hc_head_base`: mHC head
  gradients are ~1e-10 cancellation noise that Adam normalizes);
- gate biases: exact (sign updates: any routing difference shows as >= 1e-3);
- ep2, tp2_ep2, dp2_zero2_accum2: `engine.state_dict()` saved before step 5, restored after
  step 10 with `load_state_dict`, steps 5-6 replayed: losses and norms repeat bit-exactly.
With QAT on (FP4 experts/indexer, FP8 KV), 2 steps: step 0 (forward, first gradients, norm) at
the same tolerances; step 1 at 1e-4 relative loss: after one update, 1-ulp weight differences
flip FP4/FP8 roundings. Measured 2.9e-5 for TP2xEP2; the single-process oracle on the same
batches in two row slices (`single_micro2`, no parallelism) reaches 9.6e-6 at step 2 and 1.2e-4
at step 3.
"""

import pytest

LOSS_TOL, NORM_TOL, PARAM_TOL, QAT_STEP1_LOSS_TOL = 1e-5, 2e-5, 2e-3, 1e-4
TWO_RANK_LAYOUTS = ["dp2", "tp2", "ep2", "dp2_zero2_accum2"]


@pytest.fixture(scope="module")
def oracle(torchrun, tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    path = d / "oracle.pt"
    torchrun("worker_parity.py", 1, d / "oracle.json", "--layouts", "single", "--reference", str(path))
    return path


@pytest.fixture(scope="module")
def two_ranks(torchrun, oracle):
    return torchrun("worker_parity.py", 2, oracle.parent / "two.json", "--layouts", ",".join(TWO_RANK_LAYOUTS),
                    "--reference", str(oracle), timeout=400)


@pytest.fixture(scope="module")
def four_ranks(torchrun, oracle):
    return torchrun("worker_parity.py", 4, oracle.parent / "four.json", "--layouts", "tp2_ep2",
                    "--reference", str(oracle), timeout=400)


def _check(layout: str, r: dict) -> None:
    assert not r["missing"], f"{layout}: parameters missing after gathering: {r['missing']}"
    assert len(r["loss_rel"]) == 10, r["loss_rel"]
    worst = max(r["loss_rel"])
    assert worst <= LOSS_TOL, f"{layout}: loss differs by {worst:.2e} relative (curve {r['loss_rel']})"
    worst = max(r["norm_rel"])
    assert worst <= NORM_TOL, f"{layout}: grad norm differs by {worst:.2e} relative ({r['norm_rel']})"
    assert r["param_rel"] <= PARAM_TOL, f"{layout}: {r['worst_param']} differs by {r['param_rel']:.2e}"
    assert r["gate_bias_abs"] == 0.0, f"{layout}: gate biases differ by {r['gate_bias_abs']}"
    if r["resume_diff"] is not None:    # engine.state_dict at step 5, load_state_dict, replay 5-6
        assert r["resume_diff"] == 0.0, f"{layout}: replay after load_state_dict differs by {r['resume_diff']}"


@pytest.mark.slow
@pytest.mark.parametrize("layout", TWO_RANK_LAYOUTS)
def test_two_process_layouts(two_ranks, layout):
    _check(layout, two_ranks[layout])


@pytest.mark.slow
def test_tp2_ep2(four_ranks):
    _check("tp2_ep2", four_ranks["tp2_ep2"])


@pytest.mark.slow
def test_tp2_ep2_with_qat(torchrun, tmp_path_factory):
    d = tmp_path_factory.mktemp("parity_qat")
    torchrun("worker_parity.py", 1, d / "oracle.json", "--layouts", "single", "--reference",
             str(d / "oracle.pt"), "--steps", "2", "--qat")
    r = torchrun("worker_parity.py", 4, d / "four.json", "--layouts", "tp2_ep2", "--reference",
                 str(d / "oracle.pt"), "--steps", "2", "--qat", timeout=400)["tp2_ep2"]
    assert not r["missing"]
    assert r["loss_rel"][0] <= LOSS_TOL and r["norm_rel"][0] <= NORM_TOL, r
    assert r["loss_rel"][1] <= QAT_STEP1_LOSS_TOL, r["loss_rel"]


@pytest.mark.slow
def test_muon_through_the_engine(torchrun, tmp_path_factory):
    """train.optim's Muon + AdamW: dense under DeepSpeed ZeRO-1 (TP shards gathered for Newton-Schulz),
    experts on their masters; same tolerances (measured: loss 2.0e-7, norm 6.5e-7, params 1.0e-4).
    hc_*_fn use AdamW here (worker_parity.muon_config explains why)."""
    d = tmp_path_factory.mktemp("parity_muon")
    torchrun("worker_parity.py", 1, d / "oracle.json", "--layouts", "single", "--reference",
             str(d / "oracle.pt"), "--muon")
    results = torchrun("worker_parity.py", 2, d / "two.json", "--layouts", "ep2,tp2", "--reference",
                       str(d / "oracle.pt"), "--muon", timeout=400)
    for layout, r in results.items():
        _check(layout, r)
