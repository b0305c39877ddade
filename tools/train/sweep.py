#!/usr/bin/python3
"""Runs several train.py configurations side by side (one process each) and picks one by validation.

A model this small cannot use a GPU alone, and the corpus is small enough that the recipe's regularisation
(dropout, layer dropout, self-distillation weight) decides more than compute does, so the recipe trains a few
variants at once and keeps the one whose early exits agree best with its full depth on the validation split,
among those whose full-depth validation loss is within --loss-slack of the best run's. The held-out text never
decides.

Example (one GPU, eight runs of 7 minutes; CPU works too, with --device cpu and fewer runs):
  /usr/bin/python3 tools/train/sweep.py --minutes 7 --out build/sweep
Writes build/sweep/<name>/ (model, log.jsonl, DONE, train.out) and build/sweep/summary.json.
"""
import argparse
import json
import math
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# name → train.py flags on top of the shared ones
VARIANTS = {
    "ld10-do10-kl1": ["--layer-drop", "0.1", "--dropout", "0.1", "--distill", "1"],
    "ld20-do10-kl1": ["--layer-drop", "0.2", "--dropout", "0.1", "--distill", "1"],
    "ld00-do10-kl1": ["--layer-drop", "0.0", "--dropout", "0.1", "--distill", "1"],
    "ld10-do00-kl1": ["--layer-drop", "0.1", "--dropout", "0.0", "--distill", "1"],
    "ld10-do20-kl1": ["--layer-drop", "0.1", "--dropout", "0.2", "--distill", "1"],
    "ld10-do10-kl2": ["--layer-drop", "0.1", "--dropout", "0.1", "--distill", "2"],
    "ld10-do10-kl1-depthw": ["--layer-drop", "0.1", "--dropout", "0.1", "--distill", "1", "--exit-weights", "depth"],
    "ld10-do10-kl0": ["--layer-drop", "0.1", "--dropout", "0.1", "--distill", "0"],
    # Second round: more distillation and more weight on the early exits (the first round's agreement grew with both).
    "ld10-do10-kl3": ["--layer-drop", "0.1", "--dropout", "0.1", "--distill", "3"],
    "ld10-do10-kl4": ["--layer-drop", "0.1", "--dropout", "0.1", "--distill", "4"],
    "ld20-do10-kl2": ["--layer-drop", "0.2", "--dropout", "0.1", "--distill", "2"],
    "ld20-do10-kl3": ["--layer-drop", "0.2", "--dropout", "0.1", "--distill", "3"],
    "ld10-do10-kl2-uniform": ["--layer-drop", "0.1", "--dropout", "0.1", "--distill", "2", "--exit-weights", "1,1,1,1"],
    "ld10-do10-kl3-uniform": ["--layer-drop", "0.1", "--dropout", "0.1", "--distill", "3", "--exit-weights", "1,1,1,1"],
    "ld20-do10-kl2-uniform": ["--layer-drop", "0.2", "--dropout", "0.1", "--distill", "2", "--exit-weights", "1,1,1,1"],
    "ld10-do10-kl2-early": ["--layer-drop", "0.1", "--dropout", "0.1", "--distill", "2", "--exit-weights", "2,2,1.5,1"],
    # Third round: equal exit weights (the second round's best agreement) around its best run, trained longer.
    "ld20-do10-kl1-uniform": ["--layer-drop", "0.2", "--dropout", "0.1", "--distill", "1", "--exit-weights", "1,1,1,1"],
    "ld20-do10-kl15-uniform": ["--layer-drop", "0.2", "--dropout", "0.1", "--distill", "1.5", "--exit-weights", "1,1,1,1"],
    "ld30-do10-kl2-uniform": ["--layer-drop", "0.3", "--dropout", "0.1", "--distill", "2", "--exit-weights", "1,1,1,1"],
    "ld30-do10-kl15-uniform": ["--layer-drop", "0.3", "--dropout", "0.1", "--distill", "1.5", "--exit-weights", "1,1,1,1"],
    "ld20-do05-kl2-uniform": ["--layer-drop", "0.2", "--dropout", "0.05", "--distill", "2", "--exit-weights", "1,1,1,1"],
    "ld20-do10-kl2-uniform-lr3": ["--layer-drop", "0.2", "--dropout", "0.1", "--distill", "2", "--exit-weights", "1,1,1,1",
                                  "--lr", "3e-3"],
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, required=True)
    ap.add_argument("--out", default=os.path.join(HERE, "..", "..", "build", "sweep"))
    ap.add_argument("--only", default="", help="comma list of variant names (default: all)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per run")
    ap.add_argument("--loss-slack", type=float, default=0.02, help="full-depth validation loss allowed above the "
                    "best run's (0.02 ≈ 2%% perplexity)")
    ap.add_argument("--max-val-ppl", type=float, default=0.0, help="instead of --loss-slack: every run whose "
                    "full-depth validation perplexity is at most this is eligible")
    ap.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: flags for every train.py run")
    args = ap.parse_args()
    extra = [a for a in args.train_args if a != "--"]
    names = [n for n in VARIANTS if not args.only or n in args.only.split(",")]
    os.makedirs(args.out, exist_ok=True)
    procs = {}
    for name in names:
        d = os.path.join(args.out, name)
        os.makedirs(d, exist_ok=True)
        cmd = [sys.executable, os.path.join(HERE, "train.py"), "--minutes", str(args.minutes),
               "--threads", str(args.threads), "--out", os.path.join(d, "model"),
               "--log", os.path.join(d, "log.jsonl"), "--done-file", os.path.join(d, "DONE"),
               "--state", os.path.join(d, "train-state.pt"), *extra, *VARIANTS[name]]
        out = open(os.path.join(d, "train.out"), "w")
        procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env={**os.environ,
                                       "PYTHONUNBUFFERED": "1"})
        print(f"sweep: started {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    while any(p.poll() is None for p in procs.values()):
        time.sleep(15)
        print(f"sweep: {time.time() - t0:.0f}s, running {[n for n, p in procs.items() if p.poll() is None]}",
              flush=True)
    results = {}
    for name in names:
        done = os.path.join(args.out, name, "DONE")
        if procs[name].returncode != 0 or not os.path.exists(done):
            print(f"sweep: {name} failed (exit {procs[name].returncode}); see {name}/train.out", flush=True)
            continue
        results[name] = json.load(open(done))
    if not results:
        raise SystemExit("sweep: every run failed")

    def val(name, layer):
        return results[name]["final_val"][str(layer)]

    layers = sorted(int(k) for k in next(iter(results.values()))["final_val"])
    final, early = layers[-1], layers[:-1]
    best_loss = min(val(n, final)["loss"] for n in results)
    limit = math.log(args.max_val_ppl) if args.max_val_ppl > 0 else best_loss + args.loss_slack
    eligible = [n for n in results if val(n, final)["loss"] <= limit] or [min(results, key=lambda n: val(n, final)["loss"])]
    agreement = {n: sum(val(n, e)["top1_agree_final"] for e in early) / max(1, len(early)) for n in results}
    chosen = max(eligible, key=lambda n: agreement[n])
    summary = {
        "chosen": chosen,
        "rule": f"highest mean validation top-1 agreement of exits {early} among runs whose full-depth validation "
                f"loss is at most {limit:.4f} (best run: {best_loss})",
        "runs": {n: {"val_final_loss": val(n, final)["loss"], "val_final_ppl": round(math.exp(val(n, final)["loss"]), 2),
                     "val_mean_agreement": round(agreement[n], 4),
                     "val_agreement": {e: val(n, e)["top1_agree_final"] for e in early},
                     "heldout": results[n]["final_eval"], "steps": results[n]["steps"],
                     "tokens": results[n]["tokens"], "kept_step": results[n].get("kept_step"),
                     "flags": VARIANTS[n]} for n in results},
    }
    json.dump(summary, open(os.path.join(args.out, "summary.json"), "w"), indent=2)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
