"""ModelArgs: presets, parameter counts on meta (spec §2.1, §5 item 26), validation, HF round trip."""

import pytest
import torch

from model import PRESETS, ModelArgs, V4Model


@pytest.mark.parametrize("name,total,active", [
    ("flash", 284.33e9, 13.27e9),   # spec §2.1, without MTP; active excludes the embedding
    ("pro", 1573.0e9, 48.85e9),
    ("h200_1b", 863e6, 335e6),      # spec §4.2
])
def test_parameter_counts_on_meta(name, total, active):
    with torch.device("meta"):
        model = V4Model(ModelArgs.preset(name))
    assert abs(model.num_parameters() / total - 1) < 0.005
    assert abs(model.num_parameters(active=True) / active - 1) < 0.005


def test_tiny_counts_and_features():
    args = ModelArgs.preset("tiny")
    model = V4Model(args)
    # spec §4.1: 0.53M total, 0.31M active (MTP included)
    assert abs(model.num_parameters(include_mtp=True) / 0.53e6 - 1) < 0.01
    assert abs(model.num_parameters(active=True, include_mtp=True) / 0.31e6 - 1) < 0.01
    kinds = [args.layer_kind(i) for i in range(args.n_layers + 1)]
    assert set(kinds) == {"sliding", "csa", "hca"} and kinds[-1] == "sliding"
    assert args.n_hash_layers >= 1 and args.n_hash_layers < args.n_layers and args.n_mtp_layers == 1
    assert args.qat_fp8_kv and args.qat_fp4_experts and args.qat_fp4_indexer


@pytest.mark.parametrize("change,fields", [
    (dict(compress_ratios=[0, 4, 16, 4]), ["compress_ratios", "n_layers"]),
    (dict(index_topk=0), ["index_topk"]),
    (dict(n_activated_experts=9), ["n_activated_experts", "n_routed_experts"]),
    (dict(rope_head_dim=64), ["rope_head_dim", "head_dim"]),
    (dict(fp4_block=48), ["fp4_block"]),
    (dict(fp8_block=64), ["fp8_block"]),
    (dict(o_groups=3), ["o_groups", "n_heads"]),
    (dict(index_head_dim=48, fp4_block=16), ["index_head_dim"]),
    (dict(indexer_mode="bogus"), ["indexer_mode"]),
    (dict(hc_dynamic=False), ["hc_dynamic", "hc_mult"]),
])
def test_validation_names_fields(change, fields):
    with pytest.raises(ValueError) as err:
        ModelArgs.preset("tiny", **change)
    for f in fields:
        assert f in str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelArgs.preset("huge")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_hf_round_trip(name):
    args = ModelArgs.preset(name)
    hf = args.to_hf_config()
    assert hf["hidden_size"] == args.dim and hf["num_key_value_heads"] == 1
    back = ModelArgs.from_hf_config(hf, qat_fp8_kv=args.qat_fp8_kv, qat_fp4_experts=args.qat_fp4_experts,
                                    qat_fp4_indexer=args.qat_fp4_indexer, fp8_block=args.fp8_block,
                                    fp4_block=args.fp4_block)
    assert back.to_hf_config() == hf
    for key in ("dim", "n_layers", "compress_ratios", "index_topk", "route_scale", "rope_factor",
                "original_seq_len", "n_hash_layers", "o_groups", "window_size"):
        assert getattr(back, key) == getattr(args, key)


def test_flash_official_config_fields():
    official = {  # the official config.json fields of V4-Flash (spec §2.1)
        "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "vocab_size": 129280,
        "hidden_size": 4096, "num_hidden_layers": 43, "num_attention_heads": 64, "num_key_value_heads": 1,
        "head_dim": 512, "qk_rope_head_dim": 64, "q_lora_rank": 1024, "o_groups": 8, "o_lora_rank": 1024,
        "sliding_window": 128, "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0], "index_n_heads": 64,
        "index_head_dim": 128, "index_topk": 512, "n_routed_experts": 256, "n_shared_experts": 1,
        "num_experts_per_tok": 6, "moe_intermediate_size": 2048, "num_hash_layers": 3,
        "scoring_func": "sqrtsoftplus", "topk_method": "noaux_tc", "norm_topk_prob": True,
        "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "hc_mult": 4, "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6, "rms_norm_eps": 1e-6, "rope_theta": 10000, "compress_rope_theta": 160000,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        "max_position_embeddings": 1048576, "num_nextn_predict_layers": 1,
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
    }
    args = ModelArgs.from_hf_config(official)
    flash = ModelArgs.preset("flash")
    for key in ("dim", "n_layers", "n_heads", "compress_ratios", "index_topk", "n_routed_experts",
                "moe_inter_dim", "route_scale", "rope_factor", "original_seq_len", "o_lora_rank"):
        assert getattr(args, key) == getattr(flash, key), key
    hf = args.to_hf_config()
    for key, value in official.items():
        if key != "quantization_config":
            assert hf[key] == value, key
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelArgs.from_hf_config(dict(official, num_key_value_heads=8))
