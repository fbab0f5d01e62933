"""torchrun worker: a few training steps of the tiny V4 model, single-process or parallel.

`--layouts single` (one process) writes the oracle: plain PyTorch, AdamW over every parameter
(`--muon`: train.optim's Muon + AdamW), torch's clip_grad_norm_. `--layouts dp2,tp2,...` runs
each layout in turn through `train.parallel` (megatron groups and layers, EP dispatcher,
DeepSpeed ZeRO for dense weights, our expert step) on the same global batches; rank 0 writes its
loss curve, gradient norms and the largest relative parameter difference against the oracle.

Data: global batch of ROWS rows; data-parallel rank r takes rows [r*ROWS/dp, (r+1)*ROWS/dp)
(the data loader's contract). Labels carry a different number of ignored (-100) tokens per row,
so the token-weighted data-parallel loss is exercised. The clip threshold is below every step's
norm, so clipping (and the expert norm folded into it) acts on every step.

Settings that keep 1-ulp differences from being amplified, each measured with `single_micro2`
(the oracle on the same batches in two row slices: no parallelism, only summation order):
- QAT off: FP4/FP8 fake quantization rounds, and a 1-ulp change flips a rounding; with the tiny
  preset's QAT on, the control already differs by 1.2e-4 (relative loss) at step 2, with it off
  by <= 2.3e-7 over 10 steps. `--qat` runs the preset as is for 2 steps.
- Router logits scaled x30: at init (std 0.006) the 8 experts' scores of a token nearly tie and
  top-k choices flip (control: 1.4e-3 gradient-norm drift by step 10 without it).
- AdamW eps 1e-6: the mHC head gradients are ~1e-10 (cancellation of equal streams); with eps
  1e-8 Adam turns their rounding noise into lr-sized steps (TP2: 2.2e-4 loss drift at step 10;
  with 1e-6: <= 1.8e-7).
"""

import argparse
import io
import json

import torch
import torch.distributed as dist

from model import ModelArgs, V4Model

ROWS, SEQ = 4, 64
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 3e-3, (0.9, 0.95), 1e-6, 0.1, 0.05
GATE_SCALE = 30.0
NO_QAT = dict(qat_fp8_kv=False, qat_fp4_experts=False, qat_fp4_indexer=False)
LAYOUTS = {"dp2": dict(tp=1, ep=1), "tp2": dict(tp=2, ep=1), "ep2": dict(tp=1, ep=2),
           "tp2_ep2": dict(tp=2, ep=2), "dp2_zero2_accum2": dict(tp=1, ep=1, zero_stage=2)}
LAYOUT_ACCUM = {"dp2_zero2_accum2": 2}    # micro-batches per step
RESUME_CHECK, RESUME_AT = ("ep2", "tp2_ep2", "dp2_zero2_accum2"), 5   # save before step 5, replay 5-6


def model_args(qat: bool) -> ModelArgs:
    return ModelArgs.preset("tiny", **({} if qat else NO_QAT))


def global_batch(step: int, vocab: int):
    gen = torch.Generator().manual_seed(1000 + step)
    # A learnable stream: each token determines the next one (t -> 5t + 3 mod vocab).
    ids = torch.empty(ROWS, SEQ + 1, dtype=torch.long)
    ids[:, 0] = torch.randint(0, vocab, (ROWS,), generator=gen)
    for t in range(SEQ):
        ids[:, t + 1] = (5 * ids[:, t] + 3) % vocab
    inputs, labels = ids[:, :-1].clone(), ids[:, 1:].clone()
    for row in range(ROWS):      # row r ignores 3*r + step % 4 random targets
        drop = torch.randperm(SEQ, generator=gen)[: 3 * row + step % 4]
        labels[row, drop] = -100
    return inputs, labels


def token_counts(labels: torch.Tensor) -> dict:
    """Targets of the token-mean losses of these rows."""
    return {"lm": int((labels != -100).sum()), "mtp": mtp_label_count(labels)}


def mtp_label_count(labels: torch.Tensor) -> int:
    """Targets of the MTP loss (V4Model._mtp_forward: position i predicts i+2, one document)."""
    return int(((labels[:, :-1] != -100) & (labels[:, 1:] != -100)).sum())


def build_model(args: ModelArgs) -> V4Model:
    torch.manual_seed(0)
    model = V4Model(args)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.weight.mul_(GATE_SCALE)
    return model


def adamw(params):
    return torch.optim.AdamW(params, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)


def muon_config():
    """Our Muon + AdamW (train.optim) with the test's learning rate and AdamW settings."""
    from train.optim import OptimConfig

    # hc_*_fn with AdamW: at init their gradients are ~1e-10 cancellation noise (equal streams) that
    # Newton-Schulz would turn into full-size updates (single-process control: 6.6e-2 apart by step 10).
    return OptimConfig(lr=LR, adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_eps=EPS, weight_decay=WEIGHT_DECAY,
                       vector_weight_decay=WEIGHT_DECAY, grad_clip=CLIP, hc_fn_muon=False)


def reference(out_path: str, steps: int, qat: bool, micro_batches: int = 1, muon: bool = False) -> None:
    """The oracle; with micro_batches > 1 the same global batch in row slices (control run)."""
    model = build_model(model_args(qat))
    if muon:
        from train.optim import build_optimizer

        opt = build_optimizer(model, muon_config())
    else:
        opt = adamw(model.parameters())
    losses, norms = [], []
    for step in range(steps):
        inputs, labels = global_batch(step, model.args.vocab_size)
        if micro_batches == 1:
            out = model(inputs, labels=labels)
            out.loss.backward()
        else:
            rows = ROWS // micro_batches
            n_lm, n_mtp = int((labels != -100).sum()), mtp_label_count(labels)
            total = 0.0
            for m in range(micro_batches):
                sl = slice(m * rows, (m + 1) * rows)
                part = model(inputs[sl], labels=labels[sl])
                w = {"lm": int((labels[sl] != -100).sum()) / n_lm, "mtp": mtp_label_count(labels[sl]) / n_mtp,
                     "balance": 1 / micro_batches, "indexer": 1 / micro_batches}
                loss = model.total_loss({k: v * w[k] for k, v in part.losses.items()})
                loss.backward()
                total += float(loss)
            out = type("Out", (), {"loss": torch.tensor(total)})
        norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)))
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_balance_biases()
        losses.append(float(out.loss))
    torch.save({"losses": losses, "norms": norms,
                "params": {k: v.detach().clone() for k, v in model.named_parameters()},
                "gate_bias": [m.gate.bias.clone() for m in model.moe_layers() if not m.hash_layer]},
               out_path)


def parallel(layout: str, ref: dict, steps: int, qat: bool, muon: bool = False) -> dict:
    from train.parallel import (ParallelConfig, destroy_parallel, gather_full_parameters, global_token_counts,
                                init_parallel, parallelize, reduce_expert_load, token_weights)

    args = model_args(qat)
    dims = init_parallel(ParallelConfig(**LAYOUTS[layout]), args)
    model = build_model(args)
    rows = ROWS // dims.dp
    accum = LAYOUT_ACCUM.get(layout, 1)
    micro = rows // accum
    if muon:
        from train.parallel.optimizers import muon_optimizer_fns

        dense_fn, expert_fn = muon_optimizer_fns(muon_config(), dims, args.o_groups)
    else:
        dense_fn = expert_fn = lambda named: adamw([p for _, p in named])
    engine = parallelize(model, dims, dense_optimizer_fn=dense_fn, expert_optimizer_fn=expert_fn,
                         micro_batch_size=micro, grad_accum_steps=accum, grad_clip=CLIP)
    module = engine.module
    score_gates = [m.gate for m in module.moe_layers() if not m.hash_layer]

    def train_step(step: int) -> tuple:
        """One optimizer step on this rank's rows; returns (global-batch loss, grad norm)."""
        inputs, labels = global_batch(step, args.vocab_size)
        inputs = inputs[dims.dp_rank * rows:(dims.dp_rank + 1) * rows]
        labels = labels[dims.dp_rank * rows:(dims.dp_rank + 1) * rows]
        totals = global_token_counts(token_counts(labels), dims)
        sums = {"lm": 0.0, "mtp": 0.0, "balance": 0.0, "indexer": 0.0}
        for m in range(accum):
            ids, lab = inputs[m * micro:(m + 1) * micro], labels[m * micro:(m + 1) * micro]
            out = engine(ids, labels=lab)
            weights = token_weights(token_counts(lab), totals, dims)
            weights.update(balance=1 / accum, indexer=1 / accum)
            engine.backward(module.total_loss({k: v * weights[k] for k, v in out.losses.items()}))
            for k in sums:      # this rank's share of the global-batch value of each term
                sums[k] += float(out.losses[k]) * weights[k] / dims.dp
        norm = engine.clip_grad_norm()
        engine.step()
        loads = reduce_expert_load([m.expert_load for m in module.moe_layers()], dims)
        module.update_balance_biases(loads=loads)
        total = torch.tensor([sums[k] for k in ("lm", "mtp", "balance", "indexer")], dtype=torch.float64)
        dist.all_reduce(total, group=dims.dp_group)
        return module.total_loss(dict(zip(("lm", "mtp", "balance", "indexer"), total.tolist()))), norm

    losses, norms, snapshot = [], [], None
    for step in range(steps):
        if layout in RESUME_CHECK and step == RESUME_AT:
            buffer = io.BytesIO()      # as a checkpoint file would hold it
            torch.save(engine.state_dict(), buffer)
            snapshot = (buffer, [g.bias.clone() for g in score_gates])
        loss, norm = train_step(step)
        losses.append(loss)
        norms.append(norm)
    full = gather_full_parameters(module, dims)
    bias_err = max((float((g.bias.cpu() - b).abs().max()) for g, b in zip(score_gates, ref["gate_bias"])),
                   default=0.0)
    resume_diff = None
    if snapshot is not None:
        # Restore the optimizer state (and the gate-bias buffers the model checkpoint would hold),
        # then replay two steps: they must repeat exactly.
        snapshot[0].seek(0)
        engine.load_state_dict(torch.load(snapshot[0], weights_only=False))
        with torch.no_grad():
            for gate, bias in zip(score_gates, snapshot[1]):
                gate.bias.copy_(bias)
        replay = [train_step(step) for step in (RESUME_AT, RESUME_AT + 1)]
        resume_diff = max(abs(a - b) for i in range(2)
                          for a, b in zip(replay[i], (losses[RESUME_AT + i], norms[RESUME_AT + i])))
    worst_name, worst = "", 0.0
    for name, ref_p in ref["params"].items():
        if full[name].shape != ref_p.shape:
            raise RuntimeError(f"{layout}: {name} gathered {tuple(full[name].shape)} != {tuple(ref_p.shape)}")
        err = float((full[name] - ref_p).abs().max() / ref_p.abs().max().clamp_min(1e-30))
        if err > worst:
            worst_name, worst = name, err
    loss_rel = [abs(a - b) / abs(b) for a, b in zip(losses, ref["losses"])]
    norm_rel = [abs(a - b) / abs(b) for a, b in zip(norms, ref["norms"])]
    result = {"losses": losses, "loss_rel": loss_rel, "norm_rel": norm_rel, "worst_param": worst_name,
              "param_rel": worst, "gate_bias_abs": bias_err, "resume_diff": resume_diff,
              "n_params": len(full), "missing": sorted(set(ref["params"]) - set(full))}
    destroy_parallel(keep_process_group=True)
    return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="JSON written by rank 0")
    parser.add_argument("--layouts", required=True, help="single | single_micro2 | dp2,tp2,ep2,tp2_ep2")
    parser.add_argument("--reference", required=True, help="oracle .pt (written by single)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--qat", action="store_true", help="the tiny preset with its QAT on")
    parser.add_argument("--muon", action="store_true", help="train.optim's Muon + AdamW instead of AdamW")
    opts = parser.parse_args()
    if opts.layouts in ("single", "single_micro2"):
        reference(opts.reference, opts.steps, opts.qat, 1 if opts.layouts == "single" else 2, opts.muon)
        with open(opts.out, "w") as f:
            json.dump({"losses": torch.load(opts.reference)["losses"]}, f)
        return
    ref = torch.load(opts.reference)
    results = {layout: parallel(layout, ref, opts.steps, opts.qat, opts.muon) for layout in opts.layouts.split(",")}
    if dist.get_rank() == 0:
        with open(opts.out, "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
