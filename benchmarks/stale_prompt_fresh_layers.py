"""Experiment (issue 26): which layers' stale prompt K/V cost accuracy? Threshold 0.9 decoding of sudoku4 in the dense
reference math (tests/reference.py), partial steps (masks, k 8, the last step's commits) reading the prompt's K/V
fresh (from a full forward not counted as work) at layers [a, b), stale (step 0's) at the others.

    python benchmarks/stale_prompt_fresh_layers.py llada-sudoku 500 "none;never;fresh:1:6;fresh:4:6"
"""
import json, sys, time
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "tests"))
import torch
from reference import dense_forward
from dengine.llm import LLM, chat_prompt
from dengine.bench.accuracy import model_task

torch.set_num_threads(1)
model_name, n = sys.argv[1], int(sys.argv[2])
modes = sys.argv[3].split(";")
llm = LLM(model_name, dtype="float32", max_num_seqs=1)
model, tok, cfg = llm.engine.model, llm.get_tokenizer(), llm.engine.config
MASK, EOS = cfg.mask_token_id, cfg.eos_token_id
task = model_task(model_name, None)
problems = task.held_out(n)
L = len(model.layers)
SHIFT = cfg.logit_shift
DREAM = cfg.model_type == 'dream'
from dengine.decoding import top_k_filter

def decode(prompt, mode):
    P = len(prompt); T = P + 24
    canvas = torch.tensor(prompt + [MASK] * 24)
    cache = None; recent = []; rows = 0.0; steps = 0
    while True:
        masked = (canvas[P:] == MASK).nonzero().flatten() + P
        if cache is None or mode == "none":
            logits, cache = dense_forward(model, canvas); query = torch.arange(T); rows += T
            logits = logits[(masked - SHIFT).clamp_min(0)]
        else:
            read = (masked - SHIFT).clamp_min(0)
            query = torch.tensor(sorted(set(masked.tolist()) | set(recent) | set(read.tolist())))
            stale = cache
            if mode != "never":
                kind, a, b = mode.split(":"); a, b = int(a), int(b)
                _, fresh = dense_forward(model, canvas)
                stale = [(k.clone(), v.clone()) for k, v in cache]
                for i in range(a, b):
                    stale[i][0][:P], stale[i][1][:P] = fresh[i][0][:P], fresh[i][1][:P]
                rows += P * (b - a) / L
            out, newkv = dense_forward(model, canvas, query=query, stale=stale)
            # keep the cache's prompt as it was (step 0's) unless refreshed; store the query rows' K/V
            for i in range(L):
                cache[i][0][query], cache[i][1][query] = newkv[i][0][query], newkv[i][1][query]
            rows += len(query)
            index = {int(p): r for r, p in enumerate(query)}
            logits = out[[index[int(p)] for p in read]]
        steps += 1
        logits = logits.clone(); logits[:, MASK] = -torch.inf
        probs = top_k_filter(logits.float(), 50).softmax(-1) if DREAM else logits.double().softmax(-1)
        tokens = logits.argmax(-1); conf = probs.gather(-1, tokens[:, None]).squeeze(-1)
        chosen = (conf >= 0.9).nonzero().flatten()
        if chosen.numel() == 0:
            chosen = conf.argmax()[None]
        pos = masked[chosen]
        canvas[pos] = tokens[chosen]
        new = sorted(pos.tolist())
        recent = (new + recent)[: max(8, len(new))]
        gen = canvas[P:]
        eos = (gen == EOS).nonzero()
        if eos.numel() and not bool((gen[: int(eos[0])] == MASK).any()):
            return gen[: int(eos[0])].tolist(), rows, steps
        if not bool((gen == MASK).any()):
            return gen.tolist(), rows, steps

res = {}
for mode in modes:
    t = time.time(); correct = []; rows = []
    for p in problems:
        ids = chat_prompt(tok, [{"role": "user", "content": p.question}])["prompt_token_ids"]
        gen, r, s = decode(ids, mode)
        correct.append(bool(p.check(tok.decode(gen, skip_special_tokens=True)))); rows.append(r)
    res[mode] = {"correct": correct, "rows": rows}
    base = res.get("none", res[mode])
    print(f"{mode:12s} {sum(correct)/n:.3f} rows/none {sum(rows)/sum(base['rows']):.3f} {time.time()-t:.0f}s", flush=True)
json.dump(res, open(f"/tmp/layers-{model_name}-{n}-{len(modes)}.json", "w"))
