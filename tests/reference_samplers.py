"""The published samplers as small loops over the dense reference forward (test side only).

llada_generate follows LLaDA's reference `generate` (plus Fast-dLLM's threshold / factor rules and its
prefix / dual caches); dream_generate follows Dream's `diffusion_generate`, extended to semi-AR blocks
and Fast-dLLM's caches the way Fast-dLLM's Dream code does it (block-start forward commits the block's
first token). Caching is reproduced with dense_forward(query, stale=K/V frozen at the block start).

Dream's defaults are the official code's effective ones: called without a generation config it inherits
top_k = 50 from the model config (top_k=None here turns the filter off), and with temperature > 0 it draws
tokens with torch.distributions.Categorical and its `origin` coins with torch.rand, both from torch's
global random stream (seed it with torch.manual_seed to reproduce a run).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reference import dense_forward


def _window_logits(model, x, cache, block_start, block_end, frozen):
    """Logits over the window the cache mode computes, and the window's first canvas index."""
    if cache is None:
        return dense_forward(model, x)[0], 0
    query = torch.arange(block_start, x.numel() if cache == "prefix" else block_end)
    return dense_forward(model, x, query=query, stale=frozen)[0], block_start


def _pick(confidence, count, threshold, factor):
    """Indices to commit among candidate confidences (LLaDA schedule, threshold or factor rule)."""
    if threshold is not None:
        values, order = torch.topk(confidence, confidence.numel())
        keep = [order[0].item()] + [order[k].item() for k in range(1, order.numel()) if values[k] >= threshold]
        return torch.tensor(keep)
    if factor is not None:
        values, order = torch.sort(confidence, descending=True)
        n = 0
        while n < values.numel() and (n + 2) * (1 - values[n]) < factor:
            n += 1
        return order[: max(1, n)]
    return torch.topk(confidence, count).indices


def llada_generate(model, prompt, gen_length, block_length, steps, cache=None, threshold=None, factor=None,
                   cfg_scale=0.0, logits_eos_inf=False):
    c = model.config
    mask = c.mask_token_id
    x = torch.cat([prompt, torch.full((gen_length,), mask)])
    p_len = prompt.numel()
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    for b in range(num_blocks):
        start, end = p_len + b * block_length, p_len + (b + 1) * block_length
        n_mask = int((x[start:end] == mask).sum())
        base, rem = divmod(n_mask, steps_per_block)
        schedule = [base + (1 if i < rem else 0) for i in range(steps_per_block)]
        frozen = None
        i = 0
        while bool((x[start:end] == mask).any()):
            if cache is not None and i == 0:
                logits, frozen = dense_forward(model, x)
                offset = 0
            else:
                logits, offset = _window_logits(model, x, cache, start, end, frozen)
            if cfg_scale > 0:
                un_x = x.clone()
                un_x[:p_len] = mask
                if cache is None:
                    un_logits = dense_forward(model, un_x)[0]
                else:
                    raise NotImplementedError
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            logits[:, mask] = -torch.inf  # dengine never commits the mask token
            if logits_eos_inf:
                logits[:, c.eos_token_id] = -torch.inf
            positions = torch.arange(offset, offset + logits.shape[0])
            x0 = logits.argmax(-1)
            p = F.softmax(logits.double(), dim=-1)
            x0_p = p.gather(-1, x0[:, None]).squeeze(-1)
            candidate = (x[positions] == mask) & (positions >= start) & (positions < end)
            cand_idx = candidate.nonzero().flatten()
            chosen = _pick(x0_p[cand_idx], schedule[i] if i < len(schedule) else cand_idx.numel(), threshold, factor)
            commit = positions[cand_idx[chosen]]
            x[commit] = x0[cand_idx[chosen]]
            i += 1
    return x[p_len:]


def _dream_confidence(logits, alg, temperature, top_p, top_k):
    """Dream's sample_tokens: filtered softmax, sampled (T > 0) or argmax token, and the alg's confidence."""
    logits = logits.float()
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
        remove = cum > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter_(-1, order, remove), torch.finfo(logits.dtype).min)
    if top_k is not None:
        kth = torch.topk(logits, top_k)[0][..., -1, None]
        logits = logits.masked_fill(logits < kth, torch.finfo(logits.dtype).min)
    probs = torch.softmax(logits, dim=-1)
    if temperature > 0:
        x0 = torch.distributions.Categorical(probs=probs).sample()
        confidence = probs.gather(-1, x0[:, None]).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if alg == "topk_margin":
        top = torch.sort(probs, dim=-1, descending=True)[0]
        confidence = top[:, 0] - top[:, 1]
    elif alg == "entropy":
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def dream_generate(model, prompt, gen_length, block_length, steps, alg="maskgit_plus", eps=1e-3, cache=None,
                   threshold=None, top_p=None, top_k=50, temperature=0.0):
    mask = model.config.mask_token_id
    x = torch.cat([prompt, torch.full((gen_length,), mask)])
    p_len = prompt.numel()
    num_blocks = gen_length // block_length
    steps_per_block = steps // num_blocks
    timesteps = torch.linspace(1, eps, steps_per_block + 1)

    def shifted(logits):
        return torch.cat([logits[:1], logits[:-1]], dim=0)

    for b in range(num_blocks):
        start, end = p_len + b * block_length, p_len + (b + 1) * block_length
        frozen = None
        i = 0
        if cache is not None:
            logits, frozen = dense_forward(model, x)
            logits[:, mask] = -torch.inf
            _, x0 = _dream_confidence(shifted(logits), alg, temperature, top_p, top_k)
            x[start] = x0[start]
            i = 1
        while bool((x[start:end] == mask).any()):
            logits, offset = _window_logits(model, x, cache, start, end, frozen)
            logits = shifted(logits)
            logits[:, mask] = -torch.inf  # dengine never commits the mask token
            positions = torch.arange(offset, offset + logits.shape[0])
            candidate = (x[positions] == mask) & (positions >= start) & (positions < end)
            cand_idx = candidate.nonzero().flatten()
            mask_logits = logits[cand_idx]
            n = cand_idx.numel()
            if threshold is not None:
                confidence, x0 = _dream_confidence(mask_logits, "maskgit_plus", temperature, top_p, top_k)
                chosen = _pick(confidence, None, threshold, None)
                x[positions[cand_idx[chosen]]] = x0[chosen]
                continue
            t, s = timesteps[i], timesteps[i + 1]
            if alg == "origin":
                p_transfer = 1 - s / t if i < steps_per_block - 1 else 1
                transfer = torch.rand(n) < p_transfer
                x0 = torch.full((n,), mask)
                _, sampled = _dream_confidence(mask_logits[transfer], alg, temperature, top_p, top_k)
                x0[transfer] = sampled
                x[positions[cand_idx]] = x0
            else:
                confidence, x0 = _dream_confidence(mask_logits, alg, temperature, top_p, top_k)
                number = int(torch.tensor(float(n)) * (1 - s / t)) if i < steps_per_block - 1 else n
                if number > 0:
                    chosen = torch.topk(confidence, number).indices
                    x[positions[cand_idx[chosen]]] = x0[chosen]
            i += 1
    return x[p_len:]
