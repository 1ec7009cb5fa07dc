"""Cost of recording: generate-and-record (stage record's code) against generating alone with the same
machinery, and against the reference research code's approach (transformers' generate with its KV cache,
then a second full forward with hooks storing every c_proj input, then projecting), measured side by
side in one run on a random-init model of gpt2-medium's architecture.

    python -m bench.record_cost                       # gpt2-medium shape, 8 prompts x 20 tokens
    python -m bench.record_cost --n-layer 4 --prompts 4   # quick
"""

from __future__ import annotations

import argparse
import io
import time

import torch

from bench.common import model_args, prompts, save_model
from pipeline import models, record


def timed(fns: dict, repeat: int, device: str) -> dict[str, float]:
    """Best wall time of each method over `repeat` rounds; the methods take turns within a round (after
    one untimed warm-up each), so a machine that slows down or speeds up affects them alike. On a GPU
    each time ends when the queued kernels have finished, not when the last one was launched."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def value_projections(hf, w_hat: torch.Tensor) -> torch.Tensor:
    """(L, d_mlp) v_i . w_hat from the c_proj weights, computed once, outside the timed calls."""
    return torch.stack([b.mlp.c_proj.weight for b in hf.transformer.h]) @ w_hat


@torch.no_grad()
def reference(hf, rows, T: int, vw: torch.Tensor, batch: int):
    """The paper's code: generate, then one more forward over prompt + continuation storing every
    c_proj input (B, L + T, d_mlp) per layer, then keep the last T positions and project. The hooks are
    on for the second forward only, as generation needs none."""
    seen = {}
    act_sum = torch.zeros_like(vw)
    proj_sum = torch.zeros_like(vw)
    for s in range(0, len(rows), batch):
        ids = torch.stack(rows[s:s + batch])
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=T, do_sample=False, pad_token_id=0)
        seen.clear()
        handles = [b.mlp.c_proj.register_forward_hook(lambda m, inp, out, l=l: seen.__setitem__(l, inp[0].detach()))
                   for l, b in enumerate(hf.transformer.h)]
        hf(gen)
        for h in handles:
            h.remove()
        for l, a in seen.items():
            a = a[:, -T:].float()  # (B, T, d_mlp)
            act_sum[l] += a.sum((0, 1))
            proj_sum[l] += (a * vw[l]).sum((0, 1))
    return act_sum, proj_sum


def main(argv=None) -> None:
    p = model_args(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--repeat", type=int, default=3, help="timed rounds; each method's best is kept")
    args = p.parse_args(argv)
    path = save_model(args)
    T, rows = args.new_tokens, prompts(args.prompts, args)
    bridge = models.load_bridge(str(path), args.device)
    hf, _ = models.load_hf(str(path), args.device)
    hf.eval()
    hf.generation_config.eos_token_id = None  # generates all T tokens, as the bridge's stop_at_eos=False does
    w = torch.randn(args.d_model, device=args.device)
    w_hat = w / w.norm()
    with torch.no_grad():
        vw = value_projections(hf, w_hat)

    def bridge_generate(new_tokens=T):
        for s in range(0, len(rows), args.batch):
            ids, mask = record.left_pad(rows[s:s + args.batch], bridge.tokenizer.pad_token_id)
            with torch.no_grad():
                bridge.generate(ids.to(args.device), attention_mask=mask.to(args.device), max_new_tokens=new_tokens,
                                do_sample=False, stop_at_eos=False, use_past_kv_cache=True, return_type="tokens", verbose=False)

    # record's own hook points with hooks that do nothing, and its T + 1 passes (record.py's docstring): what
    # recording costs before it adds anything up
    noop = [(f"blocks.{l}.{point}", lambda x, hook: None) for l in range(bridge.cfg.n_layers)
            for point in ("mlp.hook_post", "hook_mlp_out")]

    def bridge_generate_noop_hooks():
        with bridge.hooks(fwd_hooks=noop):
            bridge_generate(T + 1)

    def generate_and_record():
        sums = {"act": torch.zeros(bridge.cfg.n_layers, bridge.cfg.d_mlp, device=args.device),
                "mlp_proj": torch.zeros(bridge.cfg.n_layers, device=args.device)}
        with torch.no_grad():
            for s in range(0, len(rows), args.batch):
                record._record_batch(bridge, rows[s:s + args.batch], T, w_hat, sums, {"act": io.BytesIO()})
        return sums["act"]

    def hf_generate():
        with torch.no_grad():
            for s in range(0, len(rows), args.batch):
                ids = torch.stack(rows[s:s + args.batch]).to(args.device)
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=T, do_sample=False, pad_token_id=0)

    t = timed({
        "generate alone (bridge)": bridge_generate,
        "T + 1 passes with no-op hooks at record's points": bridge_generate_noop_hooks,
        "generate-and-record (stage record)": generate_and_record,
        "generate alone (transformers, KV cache)": hf_generate,
        "reference: generate + hooked second forward": lambda: reference(hf, [r.to(args.device) for r in rows], T, vw, args.batch),
    }, args.repeat, args.device)
    shape = f"{args.n_layer} x {4 * args.d_model} neurons, d_model {args.d_model}, vocab {args.vocab}"
    print(f"{shape}; {args.prompts} prompts of {args.prompt_len} tokens, T = {T}, batch {args.batch}, "
          f"{args.device}, {torch.get_num_threads()} threads, best of {args.repeat} rounds")
    for name, s in t.items():
        print(f"  {name:<50} {s:8.2f} s")
    rec, alone, noop_hooks = t["generate-and-record (stage record)"], t["generate alone (bridge)"], t["T + 1 passes with no-op hooks at record's points"]
    print(f"  record / generate alone, same machinery:      {rec / alone:.2f}x  (target <= 1.10)")
    print(f"    of which the extra pass and the bridge calling {len(noop)} hooks a pass: {noop_hooks / alone:.2f}x; adding up the sums: "
          f"{rec / noop_hooks:.2f}x")
    print(f"  reference / record (speed-up of record):      {t['reference: generate + hooked second forward'] / rec:.2f}x  (target >= 1.8)")
    print(f"  record / transformers' cached generate alone: {rec / t['generate alone (transformers, KV cache)']:.2f}x")
    # The reference is transformers' generate plus a second forward: a method that records while it generates
    # saves at most that forward, so its speed-up is capped by reference / generate, whatever the hardware.
    gen, ref = t["generate alone (transformers, KV cache)"], t["reference: generate + hooked second forward"]
    print(f"  the reference's second forward and projection: {ref - gen:.2f} s, {(ref - gen) / gen:.0%} of its generate; "
          f"no one-pass method beats it by more than {ref / gen:.2f}x here")
    ours, theirs = generate_and_record(), reference(hf, [r.to(args.device) for r in rows], T, vw, args.batch)[0]
    print(f"  same sums of activations as the reference: max |difference| {float((ours - theirs).abs().max()):.1e} "
          f"(largest sum {float(theirs.abs().max()):.1e})")


if __name__ == "__main__":
    main()
