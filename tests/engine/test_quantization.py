"""Weight-only quantization on CPU (the PyTorch path; the Triton kernel is checked on a GPU in
tests/gpu/test_quantization.py): per-channel round trip, the quantized linear layer and embedding
table against the float ones, an INT8 engine on the tiny models (with and without the embedding / LM
head quantized) against the float32 and bf16 engines and against its own dequantized weights, and
clear errors at engine start."""

import gc
import logging
import weakref

import pytest
import torch
from gemma_serve.engine import quantization as quant
from gemma_serve.engine.models.gemma import TiedEmbedding
from gemma_serve.engine.quantization import QuantizedEmbedding, QuantizedLinear, dequantize_weight, quantize_weight
from gemma_serve.engine.sampling_params import SamplingParams
from gemma_serve.settings import ServingSettings
from gemma_serve.triton.repository import engine_config
from torch import nn

from .conftest import engine_for, prompt
from .test_hf_equivalence import engine_logits, rel_err


def random_weight(n: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    w[0] = 0.0  # an all-zero channel
    w[1, 3] = 0.5  # a channel with one outlier
    return w


def test_int8_round_trip_error_is_at_most_half_a_step_per_element():
    w = random_weight(96, 160, 0)
    q, scale = quantize_weight(w, "int8")
    assert q.dtype == torch.int8 and q.shape == w.shape and scale.shape == (96,) and scale.dtype == torch.float32
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    err = (dequantize_weight(q, scale, torch.float32) - w).abs()
    assert bool((err <= scale[:, None] / 2 * (1 + 1e-5)).all()), float((err / scale[:, None]).max())
    assert torch.equal(q[0], torch.zeros_like(q[0]))
    # Each channel's absmax maps onto +-127 exactly.
    assert torch.allclose(dequantize_weight(q, scale, torch.float32).abs().amax(1)[1:], w.abs().amax(1)[1:],
                          rtol=1e-6)


def test_fp8_round_trip_error_is_at_most_half_an_e4m3_step():
    w = random_weight(64, 96, 1)
    q, scale = quantize_weight(w, "fp8")
    assert q.dtype == torch.float8_e4m3fn
    err = (dequantize_weight(q, scale, torch.float32) - w).abs()
    # e4m3: 3 mantissa bits (half a step is 2^-4 of the value); below the smallest normal, 2^-6,
    # values round to 0 or +-2^-6 (no subnormals are stored: the GPU kernel widens normals only).
    bound = torch.maximum(w.abs() * 2.0 ** -4, scale[:, None] * 2.0 ** -7) * (1 + 1e-5)
    assert bool((err <= bound).all())
    mags = q.float().abs()
    assert bool(((mags == 0) | (mags >= 2.0 ** -6)).all())


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_quantized_linear_matches_float_linear_within_the_rounding_bound(method):
    linear = nn.Linear(160, 96, bias=False)
    with torch.no_grad():
        linear.weight.copy_(random_weight(96, 160, 2))
    layer = QuantizedLinear.from_linear(linear, method)
    x = torch.randn(3, 5, 160, generator=torch.Generator().manual_seed(3))
    out = layer(x)
    assert out.shape == (3, 5, 96) and out.dtype == torch.float32
    # Exactly the dequantized weight's product (float32 rounding only) ...
    deq = dequantize_weight(layer.weight, layer.scale, torch.float32)
    assert torch.allclose(out, x @ deq.T, rtol=1e-5, atol=1e-6)
    # ... so its distance to the float layer is bounded by |x| . |weight error| per output.
    err_w = (deq - linear.weight).abs()
    bound = x.abs() @ err_w.T
    assert bool(((out - linear(x)).abs() <= bound * (1 + 1e-4) + 1e-6).all())
    # And small overall: INT8 steps are 1/254 of a channel's range, fp8's 2^-4 of a value.
    assert rel_err(out, linear(x).detach()) < (1e-2 if method == "int8" else 5e-2)


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_quantized_embedding_lookup_is_the_dequantized_rows(method):
    table = nn.Embedding(50, 24)
    with torch.no_grad():
        table.weight.copy_(random_weight(50, 24, 4) * 25)
    emb = QuantizedEmbedding.from_embedding(table, method, rows_per_chunk=7)
    # Quantized 7 rows at a time: the same as the whole table at once (one scale per row).
    q, scale = quantize_weight(table.weight, method)
    assert emb.weight.dtype == q.dtype and torch.equal(emb.weight.view(torch.uint8), q.view(torch.uint8))
    assert torch.equal(emb.scale, scale) and emb.dtype == torch.float32
    ids = torch.tensor([[3, 0, 49], [3, 17, 1]])  # repeats, the all-zero row 0, the outlier row 1, the last
    for dtype in (torch.float32, torch.bfloat16):
        rows = emb.lookup(ids, dtype)
        assert rows.shape == (2, 3, 24) and rows.dtype == dtype
        assert torch.equal(rows, dequantize_weight(q, scale, dtype)[ids])
    assert torch.equal(emb(ids), emb.lookup(ids, torch.float32))
    # The LM head: the dequantized table's product, also where it is dequantized 7 rows at a time.
    x = torch.randn(5, 24, generator=torch.Generator().manual_seed(5))
    logits = emb.project(x)
    assert logits.shape == (5, 50) and logits.dtype == torch.float32
    assert torch.allclose(logits, x @ dequantize_weight(q, scale, torch.float32).T, rtol=1e-6, atol=1e-6)
    whole = QuantizedEmbedding(emb.weight, emb.scale, emb.dtype, rows_per_chunk=50)
    assert torch.allclose(whole.project(x), logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lm_head", [True, False])
def test_quantize_model_swaps_the_layer_matrices_and_the_embedding_table(checkpoints, caplog, lm_head):
    folder, _ = checkpoints["gemma3"]
    caplog.set_level(logging.INFO, logger="gemma_serve.engine.quantization")
    engine = engine_for(folder, quantization="int8", quantize_lm_head=lm_head)
    model = engine.runner.model
    swapped = [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    assert len(swapped) == 4 * len(model.layers)  # qkv, o, gate_up, down in every layer
    assert not any(isinstance(m, nn.Linear) for m in model.layers.modules())
    assert "int8 weight-only quantization of 16 linear layers" in caplog.text
    float_model = engine_for(folder).runner.model
    vocab, hidden = float_model.embed_tokens.weight.shape
    if lm_head:
        table = model.embed_tokens
        assert isinstance(table, QuantizedEmbedding) and table.dtype == torch.float32
        assert table.weight.dtype == torch.int8 and table.weight.shape == (vocab, hidden)
        assert table.scale.dtype == torch.float32 and table.scale.shape == (vocab,)
        assert "embed_tokens.weight" not in dict(model.named_parameters())  # stored once, as a buffer
        assert "and the embedding" in caplog.text and "embedding / LM head" in caplog.text
    else:
        assert type(model.embed_tokens) is TiedEmbedding and model.embed_tokens.weight.dtype == torch.float32
        assert torch.equal(model.embed_tokens.weight, float_model.embed_tokens.weight)
        assert "the embedding stays in the model's dtype" in caplog.text
    linear_bytes = sum(m.weight.numel() * 4 for m in float_model.layers.modules() if isinstance(m, nn.Linear))
    # float32 -> int8: the linear layers (and the table) shrink 4x, plus a float32 scale per output
    # channel (per vocabulary row).
    saved = quant.model_weight_bytes(float_model) - quant.model_weight_bytes(model)
    scales = sum(m.scale.numel() * 4 for m in model.modules() if isinstance(m, QuantizedLinear))
    expected = linear_bytes * 3 // 4 - scales
    if lm_head:
        expected += vocab * hidden * 3 - vocab * 4
    assert saved == expected
    assert quant.model_weight_count(model) == quant.model_weight_count(float_model)

    # The float table is freed once quantized (the KV cache is sized from free memory next).
    table_ref = weakref.ref(float_model.embed_tokens.weight)
    quant.quantize_model(float_model, "int8", lm_head=lm_head)
    gc.collect()
    assert (table_ref() is None) == lm_head
    assert quant.model_weight_bytes(float_model) == quant.model_weight_bytes(model)


def _dequantized_into(float_engine, model: nn.Module) -> None:
    """Copy `model`'s quantized weights, dequantized, into the float engine's matching weights."""
    float_model = float_engine.runner.model
    targets = dict(float_model.named_modules())
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, (QuantizedLinear, QuantizedEmbedding)):
                target = targets[name].weight
                target.copy_(dequantize_weight(m.weight, m.scale, target.dtype))


@pytest.mark.parametrize("lm_head", [True, False])
def test_int8_engine_computes_its_dequantized_weights_exactly(checkpoints, lm_head):
    """On CPU an INT8 engine is the float32 engine with the dequantized weights, bit for bit: the
    embedding lookup reads the dequantized rows, and the LM head and the layers multiply by the
    dequantized matrices. Without `quantize_lm_head` the table is the float one, as before."""
    folder, _ = checkpoints["gemma2"]  # final logit soft-capping included
    int8 = engine_for(folder, quantization="int8", quantize_lm_head=lm_head, max_num_batched_tokens=16)
    assert isinstance(int8.runner.model.embed_tokens, QuantizedEmbedding) == lm_head
    dequantized = engine_for(folder)
    _dequantized_into(dequantized, int8.runner.model)
    p = prompt(3, 29)
    for chunk in (64, 1):
        assert torch.equal(engine_logits(int8, p, chunk), engine_logits(dequantized, p, chunk)), chunk


@pytest.mark.parametrize("lm_head", [True, False])
@pytest.mark.parametrize("generation", ["gemma1", "gemma2", "gemma3"])
def test_int8_engine_logits_and_greedy_tokens_match_float32(checkpoints, generation, lm_head):
    folder, _ = checkpoints[generation]
    reference = engine_for(folder)
    int8 = engine_for(folder, quantization="int8", quantize_lm_head=lm_head, max_num_batched_tokens=16)
    p = torch.randint(5, 300, (37,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = engine_logits(reference, p, 64)
    # Prefill and decode paths alike: whole prompt and token by token.
    for chunk in (64, 1):
        ours = engine_logits(int8, p, chunk)
        # Measured on these weights: 6.6e-3 (Gemma 3) to 8.6e-3 (Gemma 1) with the layers quantized,
        # 1.11e-2 to 1.29e-2 with the embedding / LM head too (its rows of 64 values round by up to
        # half of 1/127 of their absmax, as the layers' do); fp8 lands at 3e-2.
        assert rel_err(ours, ref) < 2e-2
    params = SamplingParams(max_tokens=16, temperature=0.0)
    ours = int8.generate([prompt(2, 21)], params)[0]
    expected = reference.generate([prompt(2, 21)], params)[0]
    assert len(ours) == 16
    # Measured: the same 16 tokens with the layers quantized; with the table too, the first 16 / 14 /
    # 8 (Gemma 1 / 2 / 3). The first few are asserted (flat random logits may tie later).
    assert ours[:4] == expected[:4]
    assert int8.block_manager.num_free_blocks == int8.block_manager.num_blocks


def test_int8_bf16_engine_logits_match_bf16_and_float32(checkpoints):
    """The bf16 model with INT8 weights and table: bf16 activations (and the float32 residual)."""
    folder, _ = checkpoints["gemma3"]
    p = prompt(1, 37)
    float32 = engine_logits(engine_for(folder), p, 64)
    bf16 = engine_logits(engine_for(folder, dtype="bfloat16"), p, 64)
    int8 = engine_for(folder, quantization="int8", dtype="bfloat16", max_num_batched_tokens=16)
    assert isinstance(int8.runner.model.embed_tokens, QuantizedEmbedding)
    assert int8.runner.model.embed_tokens.dtype == torch.bfloat16
    for chunk in (64, 1):
        ours = engine_logits(int8, p, chunk)
        # Measured 1.23e-2 from bf16 and 1.26e-2 from float32 (bf16 alone: 4.2e-3 from float32).
        assert rel_err(ours, bf16) < 2e-2 and rel_err(ours, float32) < 2e-2, chunk
        assert float((ours.argmax(-1) == float32.argmax(-1)).float().mean()) >= 0.9


def test_fp8_on_cpu_is_refused_at_engine_start(checkpoints):
    folder, _ = checkpoints["gemma3"]
    with pytest.raises(ValueError, match="'fp8' needs a CUDA GPU of compute capability 8.9"):
        engine_for(folder, quantization="fp8")


@pytest.mark.parametrize("method", ["int4", "awq", "INT8", ""])
def test_unknown_quantization_is_refused_at_engine_start(checkpoints, method):
    folder, _ = checkpoints["gemma3"]
    with pytest.raises(ValueError, match="unknown quantization .* supports none, int8, fp8"):
        engine_for(folder, quantization=method)


def test_settings_accept_the_engine_methods(monkeypatch):
    for method in ("none", "int8", "fp8"):
        assert ServingSettings(quantization=method).quantization == method
    with pytest.raises(ValueError):
        ServingSettings(quantization="int4")


def test_quantize_lm_head_reaches_the_engine_config():
    assert engine_config(ServingSettings(quantization="int8")).quantize_lm_head is True
    settings = ServingSettings.load({"quantization": "int8"}, environ={"GEMMA_SERVE_QUANTIZE_LM_HEAD": "false"})
    assert engine_config(settings).quantize_lm_head is False


def test_kernel_config_picks_the_one_token_kernel_and_splits_k_only_for_few_tiles(monkeypatch):
    sms = 132
    monkeypatch.setattr(quant, "GEMV_WIDE_K_WARPS", 8)  # the default
    # Gemma 3 4B decode shapes (N, K): qkv, o_proj, gate_up, down, the LM head (vocabulary 262,144).
    shapes = ((4096, 2560), (2560, 2048), (20480, 2560), (2560, 10240), (262144, 2560), (100, 72))
    for n, k in shapes:
        one = quant.kernel_config(1, n, k, sms)
        assert one.block_m == 1 and one.split_k == 1  # thousands of narrow programs, no split needed
        assert k % one.block_k == 0 or k < one.block_k  # no ragged K tile on the real shapes
    for m in (1, 16, 64, 256):  # the LM head's 262,144 outputs make tiles enough without K splits
        assert quant.kernel_config(m, 262144, 2560, sms).split_k == 1
    # 8-bit weights stream o and down (2048 divides K) in 2048-wide steps on 8 warps, 16-bit weights
    # in 1024-wide steps on 4; GEMMA_GEMV_WIDE_K=0 keeps 8-bit on those too.
    for n, k in ((2560, 2048), (2560, 10240)):
        assert (quant.kernel_config(1, n, k, sms).block_k, quant.kernel_config(1, n, k, sms).num_warps) == (2048, 8)
        assert (quant.one_token_config(n, k).block_k, quant.one_token_config(n, k).num_warps) == (1024, 4)
    assert quant.kernel_config(1, 4096, 2560, sms).block_k == 512
    # The fourteenth run's per-shape tiles (quant_bench --one-token-tiles, then W1): 16-bit down on 2
    # rows, 16-bit gate_up on 8 rows x 256; INT8 keeps its tiles (faster ones at one token were
    # slower at 2-4); the LM head (a vocabulary, not an MLP) keeps the general tiles.
    tile = lambda c: (c.block_n, c.block_k, c.num_warps, c.num_stages)  # noqa: E731
    assert tile(quant.one_token_config(2560, 10240)) == (2, 1024, 4, 2)
    assert tile(quant.one_token_config(20480, 2560)) == (8, 256, 4, 3)
    assert tile(quant.one_token_config(4096, 2560)) == (4, 512, 4, 3)
    assert tile(quant.one_token_config(2560, 2048)) == (4, 1024, 4, 2)
    assert tile(quant.kernel_config(1, 2560, 2048, sms)) == (4, 2048, 8, 2)
    assert tile(quant.kernel_config(1, 20480, 2560, sms)) == (8, 512, 4, 2)
    assert tile(quant.kernel_config(1, 2560, 10240, sms)) == (4, 2048, 8, 2)
    assert tile(quant.kernel_config(1, 262144, 2560, sms)) == (8, 512, 4, 2)
    assert tile(quant.one_token_config(262144, 2560)) == (4, 512, 4, 3)
    if hasattr(torch, "float8_e4m3fn"):  # FP8 was not swept: the general tiles
        assert tile(quant.kernel_config(1, 20480, 2560, sms, torch.float8_e4m3fn)) == (8, 512, 4, 2)
    if hasattr(torch, "float8_e4m3fn"):  # FP8 keeps 1024-wide steps (slower at 3-4 tokens with 2048)
        assert quant.kernel_config(3, 2560, 10240, sms, torch.float8_e4m3fn).block_k == 1024
    with monkeypatch.context() as m:
        m.setattr(quant, "GEMV_WIDE_K_WARPS", 0)
        assert (quant.kernel_config(4, 2560, 10240, sms).block_k, quant.kernel_config(4, 2560, 10240, sms).num_warps) \
            == (1024, 4)
    down = quant.kernel_config(8, 2560, 10240, sms)
    assert down.split_k > 1 and (2560 // down.block_n) * down.split_k >= 2 * sms
    assert quant.kernel_config(8, 20480, 2560, sms).split_k == 1
    for m in (2, 4, 7, 16, 24, 64, 256):
        for n, k in shapes:
            cfg = quant.kernel_config(m, n, k, sms)
            if m <= quant.FEW_TOKEN_ROWS:  # GEMMA_FEW_TOKEN_ROWS: the one-token kernel on m tokens
                assert cfg == quant.kernel_config(1, n, k, sms)
                continue
            assert cfg.block_m >= 16 and cfg.block_n >= 16 and cfg.block_k >= 16
            # Every share of K holds at least one tile.
            assert -(-k // cfg.block_k) >= cfg.split_k

