"""How often do the teacher's concept labels change when the teacher (and its SAE) run in tf32 or bf16 instead of fp32?

    python benchmarks/teacher_dtype_agreement.py --teacher-model MODEL --teacher-layer 6 --sae SAE \
        --data-path PREFIX --seq-length 128 --num-sequences 32 [--batch-size 8] [--num-labels 4] [--mode act] \
        [--dtypes fp32,tf32,bf16] [--device cuda] [--output-json OUT.json]

For each --teacher-dtype name in --dtypes it loads the teacher (`load_teacher(..., dtype=name)`, same device) and
the SAE in the teacher's precision (`load_sae(..., dtype=TEACHER_DTYPES[name])`, as training does), and computes
`attribution_labels(teacher, sae, tokens, ...)` for the
LAST --num-sequences windows of --seq-length tokens of PREFIX (the windows tools/train_sae.py holds out with
--eval-sequences >= --num-sequences, and those tools/eval_sae.py evaluates; `TokenWindows`), with
mask_invalid=True (labels -1 where the score is <= 0 and at the last position) and mask_invalid=False (the
reference convention). Each dtype other than fp32 is compared with fp32 over every position except each window's
last:

    set_agreement   the 4 label ids as a set (-1 included) are identical in fp32 and the other dtype
    top1_agreement  the first (best) label is identical
    ordered_agreement  the whole ordered label row is identical

Noise floor: each dtype runs the teacher twice per batch (one attribution_labels call per mask setting); where
the mask_invalid=True row has no -1, the two calls must give the same row (`repeat_consistency`, 1.0 expected).
Diagnostic on the first batch: relative L2 difference of the hooked hidden state h and of its gradient g
between each dtype's teacher and the fp32 one (`Teacher.hidden_and_grad`, positions except the last).
`decision`: the fastest dtype (by label time, among those run) whose set agreement with fp32 is >= 0.99 with the
reference convention, the rule for --teacher-dtype's default (null off CUDA). On CUDA the timings synchronise
the device; they are indicative (one pass after one warm-up batch).

Prints one JSON line; --output-json also writes it to a file. Agreement is a property of the card's kernels: CPU
bf16 rounds differently from GPU bf16, and TF32 exists on CUDA only (tf32 equals fp32 on CPU).

On a slow shared machine the two dtypes can run as separate invocations: with --cache-dir, each dtype's labels
(and timings) are saved to CACHE/labels_<dtype>.pt and reused by a later invocation with the same settings, e.g.
`--dtypes fp32 --cache-dir C` then `--dtypes fp32,bf16 --cache-dir C` (computes bf16 only, then compares); an
invocation stopped part-way (timeout) resumes from CACHE/labels_<dtype>.partial.pt, saved after each batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="fp32 vs tf32 / bf16 teacher and SAE: concept-label agreement.",
                                allow_abbrev=False)
    p.add_argument("--teacher-model", required=True, help="Local Hugging Face model directory or .gguf file.")
    p.add_argument("--teacher-layer", type=int, required=True, help="Hook: the teacher's hidden_states[layer].")
    p.add_argument("--sae", required=True, help="OpenAI .pt, SAELens folder or sparsify folder.")
    p.add_argument("--data-path", required=True, help="Prefix of a tokenised .bin/.idx dataset.")
    p.add_argument("--seq-length", type=int, default=128, help="Tokens per window.")
    p.add_argument("--num-sequences", type=int, default=32, help="Windows compared (the last ones of the data).")
    p.add_argument("--batch-size", type=int, default=8, help="Windows per teacher forward/backward.")
    p.add_argument("--num-labels", type=int, default=4, help="Concept labels per token.")
    p.add_argument("--mode", default="act", help="Attribution mode: act, preact or abs.")
    p.add_argument("--device", default="cpu", help="Device of both teachers and the SAE.")
    p.add_argument("--dtypes", default="fp32,tf32,bf16",
                   help="--teacher-dtype names to run, comma-separated; fp32 plus others to compare.")
    p.add_argument("--teacher-lm-head", default="chunked", help="As training's flag (chunked or full).")
    p.add_argument("--cache-dir", default=None, help="Save / reuse each dtype's labels here (same settings only).")
    p.add_argument("--output-json", default=None, help="Also write the JSON result to this file.")
    return p


def _agreement(a, b) -> dict:
    """a, b: label tensors [n, t, L] over compared positions; fractions of identical rows."""
    import torch

    set_same = (torch.sort(a, dim=-1).values == torch.sort(b, dim=-1).values).all(-1)
    return {"set_agreement": set_same.double().mean().item(),
            "top1_agreement": (a[..., 0] == b[..., 0]).double().mean().item(),
            "ordered_agreement": (a == b).all(-1).double().mean().item(),
            "set_differ_tokens": int((~set_same).sum())}


def _synchronize(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _labels_for(name, args, batches, partial_path=None, key=None) -> dict:
    """Labels of every batch with a `dtype` teacher; with `partial_path`, progress is saved after each batch and
    resumed from there (timings summed over invocations, teacher load time of the first)."""
    import torch

    from megatron_cocomix.concepts import attribution_labels, check_teacher_sae, load_sae, load_teacher
    from megatron_cocomix.concepts.teacher import TEACHER_DTYPES

    state = {"key": key, "masked": [], "reference": [], "masked_s": 0.0, "reference_s": 0.0, "load_s": None,
             "invocations": 0}
    if partial_path and os.path.exists(partial_path):
        saved = torch.load(partial_path, weights_only=False)
        if saved["key"] == key:
            state = saved
            print(f"[{name}] resuming after batch {len(state['masked'])}", file=sys.stderr, flush=True)
    state["invocations"] += 1
    t0 = time.perf_counter()
    teacher = load_teacher(args.teacher_model, args.teacher_layer, dtype=name, device=args.device,
                           lm_head=args.teacher_lm_head)
    sae = load_sae(args.sae, device=args.device, dtype=TEACHER_DTYPES[name]).freeze()
    if state["load_s"] is None:
        state["load_s"] = time.perf_counter() - t0
    check_teacher_sae(teacher, sae)
    # Warm-up (kernel selection, allocator), not timed.
    attribution_labels(teacher, sae, batches[0][:1].to(args.device), num_labels=args.num_labels, mode=args.mode)
    for i in range(len(state["masked"]), len(batches)):
        tokens = batches[i]
        print(f"[{name}] batch {i + 1}/{len(batches)} ({state['masked_s'] + state['reference_s']:.0f} s)",
              file=sys.stderr, flush=True)
        tokens = tokens.to(args.device)
        _synchronize(args.device)
        t0 = time.perf_counter()
        masked = attribution_labels(teacher, sae, tokens, num_labels=args.num_labels, mode=args.mode,
                                    mask_invalid=True).cpu()
        t1 = time.perf_counter()
        reference = attribution_labels(teacher, sae, tokens, num_labels=args.num_labels, mode=args.mode,
                                       mask_invalid=False).cpu()
        state["masked_s"] += t1 - t0
        state["reference_s"] += time.perf_counter() - t1
        state["masked"].append(masked)
        state["reference"].append(reference)
        if partial_path:
            os.makedirs(os.path.dirname(partial_path), exist_ok=True)
            torch.save(state, partial_path)
    hidden, grad, _ = teacher.hidden_and_grad(batches[0].to(args.device))
    del teacher, sae
    masked, reference = torch.cat(state["masked"]), torch.cat(state["reference"])
    full = (masked[:, :-1] != -1).all(-1)
    repeat = (masked[:, :-1] == reference[:, :-1]).all(-1)[full].double().mean().item() if full.any() else None
    return {"masked": masked, "reference": reference, "load_s": state["load_s"], "masked_s": state["masked_s"],
            "reference_s": state["reference_s"], "invocations": state["invocations"], "repeat_consistency": repeat,
            "hidden": hidden[:, :-1].float().cpu(), "grad": grad[:, :-1].float().cpu()}


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(torch.device(device)) if str(device).startswith("cuda") else "cpu"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from megatron_cocomix.concepts import ATTRIBUTION_MODES, load_sae
    from megatron_cocomix.concepts.sae_training import TokenWindows
    from megatron_cocomix.concepts.teacher import TEACHER_DTYPES

    for name in ("seq_length", "num_sequences", "batch_size", "num_labels"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.mode not in ATTRIBUTION_MODES:
        raise SystemExit(f"--mode {args.mode!r} is not one of {', '.join(ATTRIBUTION_MODES)}")
    sae = load_sae(args.sae).freeze()  # its shape, for the report; each dtype loads its own copy
    windows = TokenWindows(args.data_path, args.seq_length)
    first = max(0, len(windows) - args.num_sequences)
    ids = list(range(first, len(windows)))
    batches = [windows.batch(ids[i:i + args.batch_size]) for i in range(0, len(ids), args.batch_size)]

    wanted = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not wanted or any(d not in TEACHER_DTYPES for d in wanted) or len(set(wanted)) < len(wanted):
        raise SystemExit(f"--dtypes {args.dtypes!r}: expected distinct names among {', '.join(TEACHER_DTYPES)}")
    if len(wanted) > 1 and "fp32" not in wanted:
        raise SystemExit(f"--dtypes {args.dtypes!r}: comparisons are against fp32, which must be one of them")
    key = {"teacher_model": os.path.abspath(args.teacher_model), "teacher_layer": args.teacher_layer,
           "sae": os.path.abspath(args.sae), "data_path": os.path.abspath(args.data_path),
           "seq_length": args.seq_length, "windows": [first, len(windows)], "num_labels": args.num_labels,
           "mode": args.mode, "device": args.device, "teacher_lm_head": args.teacher_lm_head}
    runs = {}
    for name in wanted:
        cache = os.path.join(args.cache_dir, f"labels_{name}.pt") if args.cache_dir else None
        if cache and os.path.exists(cache):
            saved = torch.load(cache, weights_only=False)
            if saved["key"] == key:
                print(f"[{name}] reusing {cache}", file=sys.stderr, flush=True)
                runs[name] = saved["run"]
                continue
            print(f"[{name}] {cache} has other settings: recomputing", file=sys.stderr, flush=True)
        partial = os.path.join(args.cache_dir, f"labels_{name}.partial.pt") if args.cache_dir else None
        runs[name] = _labels_for(name, args, batches, partial, key)
        if cache:
            os.makedirs(args.cache_dir, exist_ok=True)
            torch.save({"key": key, "run": runs[name]}, cache)
            if os.path.exists(partial):
                os.remove(partial)

    def seconds(run):
        return {"load": round(run["load_s"], 2), "labels_mask_true": round(run["masked_s"], 2),
                "labels_mask_false": round(run["reference_s"], 2), "invocations": run.get("invocations", 1)}

    if len(runs) < 2:
        (name, run), = runs.items()
        print(json.dumps({"dtype": name, "saved": bool(args.cache_dir), "repeat_consistency":
                          run["repeat_consistency"], "seconds": seconds(run)}))
        return 0
    fp32 = runs["fp32"]
    result = {"teacher_model": args.teacher_model, "teacher_layer": args.teacher_layer, "sae": args.sae,
              "sae_shape": [sae.d_model, sae.num_latents, sae.k],
              "data_path": args.data_path, "windows": [first, len(windows)], "num_sequences": len(ids),
              "seq_length": args.seq_length, "num_labels": args.num_labels, "mode": args.mode,
              "device": args.device, "device_name": _device_name(args.device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "teacher_lm_head": args.teacher_lm_head,
              "tokens_compared": len(ids) * (args.seq_length - 1), "compare": {}}
    rel = lambda x, ref: ((x - ref).norm() / ref.norm()).item()  # noqa: E731
    for name, run in runs.items():
        if name == "fp32":
            continue
        comparison = {}
        for which in ("masked", "reference"):
            a, b = fp32[which][:, :-1], run[which][:, :-1]  # every position except each window's last
            stats = _agreement(a, b)
            stats["fp32_no_label_fraction"] = (a == -1).double().mean().item()
            stats[f"{name}_no_label_fraction"] = (b == -1).double().mean().item()
            comparison["mask_invalid_true" if which == "masked" else "mask_invalid_false"] = stats
        comparison["first_batch_rel_l2_vs_fp32"] = {"hidden": rel(run["hidden"], fp32["hidden"]),
                                                    "grad": rel(run["grad"], fp32["grad"])}
        result["compare"][name] = comparison
    for name, run in runs.items():
        result[f"{name}_repeat_consistency"] = run["repeat_consistency"]
        result[f"{name}_seconds"] = seconds(run)
    agreeing = [name for name in runs
                if name == "fp32" or result["compare"][name]["mask_invalid_false"]["set_agreement"] >= 0.99]
    # CPU decides nothing: tf32 is fp32 there and CPU bf16 rounds otherwise than GPU bf16.
    result["decision"] = (min(agreeing, key=lambda name: runs[name]["masked_s"] + runs[name]["reference_s"])
                          if str(args.device).startswith("cuda") else None)
    print(json.dumps(result))
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
