"""Experiment (issue 26): per-layer prompt refresh with stale inputs. Partial steps also recompute the prompt's rows from
layer S up, starting from the prompt's hidden states at layer S's input stored at the last full forward (what a
real per-layer refresh could do); cost counted as prompt rows x (L - S) / L. Mode layer:S:tau refreshes only once the
entropy mass committed since the last refresh reaches tau.

    python benchmarks/stale_prompt_layer_refresh.py dream-sudoku 500 "none;layer:2;layer:3;layer:3:0.5"
"""
import json, sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
import torch
from reference import _rms, _rope
from dengine.llm import LLM, chat_prompt
from dengine.bench.accuracy import model_task
from dengine.decoding import top_k_filter

torch.set_num_threads(1)
model_name, n = sys.argv[1], int(sys.argv[2])
modes = sys.argv[3].split(";")
llm = LLM(model_name, dtype="float32", max_num_seqs=1)
model, tok, cfg = llm.engine.model, llm.get_tokenizer(), llm.engine.config
MASK, EOS, SHIFT, DREAM = cfg.mask_token_id, cfg.eos_token_id, cfg.logit_shift, cfg.model_type == "dream"
c = model.config
L = len(model.layers)
problems = model_task(model_name, None).held_out(n)


@torch.no_grad()
def forward(tokens, query, kv, extra=None, start=L, extra_hidden=None):
    """Rows `query` from layer 0; rows `extra` join at layer `start` with hidden states extra_hidden. kv: per layer
    (K, V) over the canvas, updated in place for every computed row. Returns logits of query rows and, per layer,
    the input hidden states of every computed row (dict layer -> (rows, x))."""
    group = c.num_heads // c.num_kv_heads
    q_size = c.num_heads * c.head_dim
    rows, x = query, model.embed.weight[tokens[query]]
    inputs = {}
    for i, layer in enumerate(model.layers):
        if extra is not None and i == start:
            rows, x = torch.cat([rows, extra]), torch.cat([x, extra_hidden])
        inputs[i] = (rows, x)
        h = _rms(x, layer.attn_norm.weight, c.rms_norm_eps)
        qkv = h @ layer.attn.qkv_proj.weight.T
        if layer.attn.qkv_proj.bias is not None:
            qkv = qkv + layer.attn.qkv_proj.bias
        q, k, v = qkv.split([q_size, c.kv_dim, c.kv_dim], -1)
        q = _rope(q.view(-1, c.num_heads, c.head_dim), rows, c.rope_theta, c.rope_in_fp32)
        k = _rope(k.view(-1, c.num_kv_heads, c.head_dim), rows, c.rope_theta, c.rope_in_fp32)
        v = v.view(-1, c.num_kv_heads, c.head_dim)
        kv[i][0][rows], kv[i][1][rows] = k, v
        keys = kv[i][0].repeat_interleave(group, dim=1).transpose(0, 1)
        values = kv[i][1].repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (q.transpose(0, 1) @ keys.transpose(1, 2)) / c.head_dim**0.5
        attn = (scores.float().softmax(-1).to(values.dtype) @ values).transpose(0, 1).reshape(-1, q_size)
        x = x + attn @ layer.attn.o_proj.weight.T
        h = _rms(x, layer.mlp_norm.weight, c.rms_norm_eps)
        gate, up = (h @ layer.mlp.gate_up_proj.weight.T).chunk(2, -1)
        x = x + (torch.nn.functional.silu(gate) * up) @ layer.mlp.down_proj.weight.T
    x = x[: query.numel()]
    return _rms(x, model.final_norm.weight, c.rms_norm_eps) @ model.lm_head.weight.T, inputs


def decode(prompt, mode):
    P = len(prompt); T = P + 24
    canvas = torch.tensor(prompt + [MASK] * 24)
    kv = None; recent = []; rows = 0.0; stored = None; mass = 0.0
    parts = mode.split(":")
    start = int(parts[1]) if parts[0] == "layer" else L
    tau = float(parts[2]) if len(parts) > 2 else 0.0
    while True:
        masked = (canvas[P:] == MASK).nonzero().flatten() + P
        read = (masked - SHIFT).clamp_min(0)
        if kv is None or mode == "none":
            kv = [(torch.zeros(T, c.num_kv_heads, c.head_dim), torch.zeros(T, c.num_kv_heads, c.head_dim)) for _ in range(L)]
            query = torch.arange(T)
            out, inputs = forward(canvas, query, kv); rows += T
            stored = {i: inputs[i][1][:P].clone() for i in range(L)}  # prompt rows come first
            logits = out[read]
        else:
            query = torch.tensor(sorted(set(masked.tolist()) | set(recent) | set(read.tolist())))
            refresh = start < L and mass >= tau
            if refresh:
                prompt_rows = torch.arange(P)
                prompt_rows = prompt_rows[~torch.isin(prompt_rows, query)]  # rows already computed from layer 0 stay so
                out, inputs = forward(canvas, query, kv, prompt_rows, start, stored[start][prompt_rows])
                rows += query.numel() + P * (L - start) / L
                mass = 0.0
            else:
                out, _ = forward(canvas, query, kv)
                rows += query.numel()
            index = {int(p): r for r, p in enumerate(query)}
            logits = out[[index[int(p)] for p in read]]
        logits = logits.clone(); logits[:, MASK] = -torch.inf
        probs = top_k_filter(logits.float(), 50).softmax(-1) if DREAM else logits.double().softmax(-1)
        tokens = logits.argmax(-1); conf = probs.gather(-1, tokens[:, None]).squeeze(-1)
        chosen = (conf >= 0.9).nonzero().flatten()
        if chosen.numel() == 0:
            chosen = conf.argmax()[None]
        mass += float(torch.special.entr(probs[chosen].double()).sum())
        pos = masked[chosen]
        canvas[pos] = tokens[chosen]
        new = sorted(pos.tolist())
        recent = (new + recent)[: max(8, len(new))]
        gen = canvas[P:]
        eos = (gen == EOS).nonzero()
        if eos.numel() and not bool((gen[: int(eos[0])] == MASK).any()):
            return gen[: int(eos[0])].tolist(), rows
        if not bool((gen == MASK).any()):
            return gen.tolist(), rows


res = {}
for mode in modes:
    t = time.time(); correct = []; rows = []
    for p in problems:
        ids = chat_prompt(tok, [{"role": "user", "content": p.question}])["prompt_token_ids"]
        gen, r = decode(ids, mode)
        correct.append(bool(p.check(tok.decode(gen, skip_special_tokens=True)))); rows.append(r)
    res[mode] = {"correct": correct, "rows": rows}
    base = res.get("none", res[mode])
    print(f"{mode:14s} {sum(correct)/n:.3f} rows/none {sum(rows)/sum(base['rows']):.3f} {time.time()-t:.0f}s", flush=True)
json.dump(res, open(f"/tmp/layers2-{model_name}-{n}-{'_'.join(modes).replace(':', '-')}.json", "w"))
